"""Load benchmark for `tuneforge serve` on loopback: dynamic batching vs one at a time.

    python bench/bench_serve.py                      # 64 clients, 60 s per mode
    python bench/bench_serve.py --seconds 10         # quicker

Starts `tuneforge serve minilm-l6` (the bundled encoder; its classification head
is untrained, which does not change the compute) twice: with --max-batch 32 and
with --max-batch 1. N clients each send one SST-2 dev sentence to /v1/classify,
wait for the answer, and send the next, for a fixed time. Reports requests/s,
p50/p99 latency and errors by status, and writes
a new bench/results/<UTC time>-<host>-serve.json. Targets (issue 6): batching >= 3x the
requests/s of one-at-a-time on 2 CPU cores; zero 5xx with 64 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_to  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
KEY = "bench-key-0123456789abcdef"


def sentences() -> list[str]:
    if SST2_DEV.is_file():
        return [line.rsplit("\t", 1)[0].strip() for line in SST2_DEV.read_text().splitlines()[1:]]
    return [f"a {w} film, number {i}" for i, w in enumerate(["moving", "dull", "fine", "tedious"] * 100)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_wait_ms: float, port: int, dtype: str = "float32",
                 threads: int | None = None) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "tuneforge.cli", "serve", model, "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--max-queue", "1024", "--dtype", dtype]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, env={**os.environ, "TUNEFORGE_API_KEYS": KEY}, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


class Connection:
    """A lean HTTP/1.1 keep-alive client on asyncio streams. The load generator
    shares the 2 cores with the server: httpx spent ~4 ms of CPU per request here,
    as much as the server's own work, so it capped the very throughput being
    measured (the way wrk or hey, not a Python HTTP library, drive load tests)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.close()
        return int(status_line.split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str, model: str, clients: int, seconds: float, texts: list[str]) -> dict:
    import httpx

    host, port = url.rsplit("//", 1)[1].split(":")
    bodies = [json.dumps({"model": model, "input": t}).encode() for t in texts]
    latencies, statuses, in_window = [], Counter(), 0
    connections = [Connection(host, int(port)) for _ in range(clients)]
    # warm-up: first calls pay one-off costs (allocations, lazy init)
    await asyncio.gather(*[c.post("/v1/classify", bodies[i]) for i, c in enumerate(connections[:32])])
    end = time.perf_counter() + seconds
    cpu0 = time.process_time()

    async def one_client(k: int) -> None:
        nonlocal in_window
        i, conn = k, connections[k]
        while time.perf_counter() < end:
            begun = time.perf_counter()
            try:
                status = await conn.post("/v1/classify", bodies[i % len(bodies)])
                statuses[str(status)] += 1
                if status == 200:
                    done = time.perf_counter()
                    latencies.append(done - begun)
                    in_window += done <= end
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                statuses[type(exc).__name__] += 1
                conn.close()
            i += clients

    begun = time.perf_counter()
    await asyncio.gather(*[one_client(k) for k in range(clients)])
    elapsed = time.perf_counter() - begun
    client_cpu = time.process_time() - cpu0
    for conn in connections:
        conn.close()
    server = {}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for line in (await client.get("/metrics")).text.splitlines():
            for name in ("tuneforge_batch_size_sum", "tuneforge_batch_size_count"):
                if line.startswith(name + "{"):
                    server[name] = float(line.rpartition(" ")[2])
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    # Throughput counts answers inside the fixed window only: the requests still
    # queued at its end (many, without batching) finish later and would dilute it.
    return {"requests_ok": len(latencies), "seconds": round(elapsed, 2), "ok_in_window": in_window,
            "requests_per_s": round(in_window / seconds, 2), "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
            "status_counts": dict(statuses),
            "mean_batch_size": round(server["tuneforge_batch_size_sum"]
                                     / max(server["tuneforge_batch_size_count"], 1), 1),
            "client_cpu_ms_per_request": round(1000 * client_cpu / max(sum(statuses.values()), 1), 2),
            "errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "transport_errors": sum(v for k, v in statuses.items() if not k.isdigit())}


def run_mode(model: str, max_batch: int, args, texts) -> dict:
    port = free_port()
    proc = start_server(model, max_batch, args.max_wait_ms, port, args.dtype, args.threads)
    try:
        result = asyncio.run(load(f"http://127.0.0.1:{port}", model, args.clients, args.seconds, texts))
    finally:
        proc.terminate()
        result_code = proc.wait(60)
    result.update(max_batch=max_batch, server_exit_code=result_code)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="What `tuneforge serve` serves (a classifier).")
    parser.add_argument("--clients", type=int, default=64, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=60.0, help="Measured time per mode.")
    parser.add_argument("--max-batch", type=int, default=32, help="Batch size of the batched mode.")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="Batch fill wait of the batched mode.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Server weights' dtype.")
    parser.add_argument("--threads", type=int, default=None, help="Server torch threads (default: one per core).")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: a new bench/results/<UTC time>-<host>-serve.json).")
    args = parser.parse_args()
    texts = sentences()
    started = conditions()
    modes = {"batched": run_mode(args.model, args.max_batch, args, texts),
             "one_at_a_time": run_mode(args.model, 1, args, texts)}
    ratio = modes["batched"]["requests_per_s"] / max(modes["one_at_a_time"]["requests_per_s"], 1e-9)
    print(f"{'mode':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'5xx':>5} {'other errors':>12}  "
          "statuses")
    for name, r in modes.items():
        print(f"{name:<14} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['mean_batch_size']:>6.1f} {r['errors_5xx']:>5} {r['transport_errors']:>12}  {r['status_counts']}")
    print(f"batching speed-up: {ratio:.2f}x (target >= 3x); zero 5xx: "
          f"{all(r['errors_5xx'] == 0 for r in modes.values())}")
    out = write_to(args.out, {
        "benchmark": "serve", "model": args.model, "clients": args.clients, "seconds_per_mode": args.seconds,
        "max_wait_ms": args.max_wait_ms, "dtype": args.dtype, "threads": args.threads, "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(), "python": platform.python_version(), "modes": modes,
        "speedup": round(ratio, 2), "date": started["time"],
        "conditions": {"start": started, "end": conditions()},
    }, "-serve")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

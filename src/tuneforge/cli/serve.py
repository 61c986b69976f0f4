"""`tuneforge serve`: OpenAI-compatible server (issue #6). Only typer at the top:
`tuneforge --help` must not import torch or FastAPI."""

from __future__ import annotations

from enum import Enum
from typing import List, Optional

import typer

from tuneforge.cli.common import Device, fail


class Engine(str, Enum):
    torch = "torch"
    vllm = "vllm"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class LogInputs(str, Enum):
    store = "store"
    hash = "hash"


def _adapters(specs: Optional[List[str]]) -> dict:
    found = {}
    for spec in specs or []:
        name, sep, ref = spec.partition("=")
        if not sep or not name or not ref:
            fail(f"--adapter {spec!r}: expected NAME=RUN (a LoRA run folder or an adapter folder)", 2)
        if name in found:
            fail(f"--adapter {name} is given twice", 2)
        found[name] = ref
    return found


def serve(
    target: str = typer.Argument(..., help="An exported model folder, a run folder or a catalogue model."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="NAME=RUN: serve a LoRA run's adapter "
                                                "over the same base as NAME (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    name: Optional[str] = typer.Option(None, "--name", help="The `model` name of TARGET (default: its folder "
                                       "or catalogue name; for a LoRA run the base keeps its name and the "
                                       "adapter takes the run's)."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="API keys, one a line; adds to "
                                               "TUNEFORGE_API_KEYS. Without either a random key is printed."),
    admin_key_file: Optional[str] = typer.Option(None, "--admin-key-file", help="Admin keys (adapter add/remove), "
                                                 "adds to TUNEFORGE_ADMIN_KEYS. Without either the admin routes "
                                                 "are off."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Rows per micro-batch; 1 turns batching off."),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", min=0, help="How long a batch waits to fill."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Queued requests before answering 429."),
    request_timeout: float = typer.Option(60.0, "--timeout", min=0.01, help="Seconds per request (504 after)."),
    max_body_mb: float = typer.Option(2.0, "--max-body-mb", min=0.001, help="Request bodies over this get 413."),
    max_request_tokens: int = typer.Option(16384, "--max-request-tokens", min=1,
                                           help="Work per request in tokens (classify: the texts' tokens; "
                                           "generation: prompt + max_tokens per sequence); over it, 400."),
    default_max_tokens: int = typer.Option(256, "--default-max-tokens", min=1,
                                           help="New tokens for a chat request without max_tokens."),
    request_log: Optional[str] = typer.Option(None, "--request-log", help="SQLite file: one row per request."),
    log_inputs: LogInputs = typer.Option(LogInputs.hash, "--log-inputs", help="Store texts, or only their sha256."),
    device: Device = typer.Option(Device.auto, "--device", help="Where the model runs."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Weights' dtype. bfloat16 halves memory and, on "
                                "GPUs and CPUs with AVX512-BF16 or AMX, runs batches faster (outputs differ "
                                "slightly from float32)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads for the model (default: "
                                          "one per core); leave a core free when clients share the machine."),
    engine: Engine = typer.Option(Engine.torch, "--engine", help="torch (built in) or vllm (GPU, generation)."),
) -> None:
    """Serve a model behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/classify, /v1/rewards, /v1/models, /metrics; /health is the only route without a key)."""
    import os

    from tuneforge.serve.security import (
        ADMIN_KEYS_ENV,
        API_KEYS_ENV,
        new_key,
        read_keys,
    )

    adapters = _adapters(adapter)
    try:
        api_keys = read_keys(API_KEYS_ENV, api_key_file)
        admin_keys = read_keys(ADMIN_KEYS_ENV, admin_key_file)
    except ValueError as exc:
        fail(f"error: {exc}", 2)
    if not api_keys:
        # Secure by default: never an open server; this key lives as long as the process.
        api_keys = [new_key()]
        typer.echo(f"no API key configured ({API_KEYS_ENV} or --api-key-file); generated one for this run:\n"
                   f"  {api_keys[0]}", err=True)
    if engine == Engine.vllm:
        _exec_vllm(target, adapters, host, port, name, api_keys)
    from tuneforge.serve.registry import TargetError
    from tuneforge.serve.server import run_server
    from tuneforge.serve.service import Settings

    settings = Settings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                        request_timeout=request_timeout, max_body=int(max_body_mb * 1024 * 1024),
                        max_request_tokens=max_request_tokens, default_max_tokens=default_max_tokens,
                        device=device.value, dtype=dtype.value, threads=threads, request_log=request_log,
                        log_inputs=log_inputs.value)

    def ready(app) -> None:
        served = app.state.served
        typer.echo(f"serving {', '.join(served.names())} ({served.kind}) on http://{host}:{port} "
                   f"(pid {os.getpid()})", err=True)

    try:
        code = run_server(target, adapters, api_keys, admin_keys, settings, host, port, name, on_ready=ready)
    except (TargetError, ValueError, OSError, RuntimeError) as exc:
        fail(f"error: {exc}", 1)
    raise typer.Exit(code)


def _exec_vllm(target, adapters, host, port, name, api_keys) -> None:
    import os

    from tuneforge.serve import vllm
    from tuneforge.serve.registry import TargetError

    try:
        env = vllm.key_env(api_keys)
    except ValueError as exc:
        fail(f"error: {exc}", 2)
    why = vllm.unavailable()
    if why:
        fail(f"--engine vllm is not available here: {why}. The default --engine torch serves this model "
              "without vLLM.", 1)
    try:
        cmd = vllm.command(target, adapters, host, port, name)
    except TargetError as exc:
        fail(f"error: {exc}", 1)
    typer.echo(vllm.notice(), err=True)
    os.execvpe(cmd[0], cmd, {**os.environ, **env})

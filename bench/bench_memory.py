"""Gradient checkpointing's memory and speed: LoRA SFT of smollm2-135m-instruct at 8 x 512 tokens.

    python bench/bench_memory.py              # writes a new bench/results/<UTC time>-<host>-memory.json
    python bench/bench_memory.py --steps 2    # quicker

The longest Alpaca examples (rendered with the chat template, cut to 512 tokens),
batch 8, LoRA r=16 on all linears, float32 on CPU; `train.gradient_checkpointing`
off and on, each in its own process so its peak resident memory (ru_maxrss, model
loading and evaluation included) is its own, the two runs back to back so they see
the same load. Both train the same batches from the same seed, so their losses
must agree step by step; the JSON keeps both curves.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_merged.json"
SEED, BATCH, MAX_LENGTH = 42, 8, 512


def longest_rows(n: int) -> list[dict]:
    """The n Alpaca rows with the most characters (their token counts reach max_length)."""
    rows = [r for r in json.loads(ALPACA.read_text()) if r["output"].strip()]
    random.Random(SEED).shuffle(rows)  # ties in a fixed, seeded order
    rows.sort(key=lambda r: -len(r["instruction"] + r["input"] + r["output"]))
    return [{"prompt": r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), "response": r["output"]}
            for r in rows[:n]]


def worker(checkpointing: bool, steps: int) -> dict:
    from tuneforge import api

    with tempfile.TemporaryDirectory() as tmp:
        data, held = Path(tmp) / "train.jsonl", Path(tmp) / "held.jsonl"
        rows = longest_rows(steps * BATCH + 2)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
        held.write_text("".join(json.dumps(r) + "\n" for r in rows[-2:]))
        recipe = {
            "model": "smollm2-135m-instruct", "task": "sft",
            "data": {"train": str(data), "validation": str(held), "test": str(held), "dedup": False},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            "train": {"epochs": 1, "batch_size": BATCH, "learning_rate": 2e-4, "warmup": 0, "max_length": MAX_LENGTH,
                      "seed": SEED, "log_every": 1, "eval_every": 10_000, "group_by_length": False,
                      "gradient_checkpointing": checkpointing},
            "eval": {"baseline": False, "max_generate": 1, "max_new_tokens": 4, "bootstrap": False},
        }
        api.train(recipe, output=str(Path(tmp) / "run"), quiet=True)
        log = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_log = [r for r in log if "split" not in r and r.get("tokens")]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps_log)
    tokens = sum(r["tokens"] for r in steps_log)
    return {"gradient_checkpointing": checkpointing, "tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds, "losses": [r["loss"] for r in steps_log],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(checkpointing: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "on" if checkpointing else "off", "--steps", str(steps)]
    before, t0 = conditions(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out |= {"process_seconds": time.perf_counter() - t0, "conditions": {"start": before, "end": conditions()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of 8 examples")
    parser.add_argument("--worker", choices=["on", "off"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "on", args.steps)))
        return
    started = conditions()
    off, on = run(False, args.steps), run(True, args.steps)
    result = {
        "benchmark": "gradient checkpointing", "date": started["time"], "model": "smollm2-135m-instruct",
        "settings": {"batch": BATCH, "max_length": MAX_LENGTH, "steps": args.steps, "lora_r": 16, "dtype": "float32",
                     "data": "longest Alpaca rows"},
        "off": off, "on": on, "peak_rss_ratio": on["peak_rss_mb"] / off["peak_rss_mb"],
        "tokens_per_s_ratio": on["tokens_per_s"] / off["tokens_per_s"],
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(off["losses"], on["losses"])),
        "conditions": {"start": started, "end": conditions()},
    }
    print(f"tokens per step {off['tokens'] / args.steps:.0f}; peak RSS {off['peak_rss_mb'] / 1024:.2f} -> "
          f"{on['peak_rss_mb'] / 1024:.2f} GB; tokens/s {off['tokens_per_s']:.1f} -> {on['tokens_per_s']:.1f} "
          f"({result['tokens_per_s_ratio'] - 1:+.1%}); max step loss diff {result['loss_max_abs_diff']:.2e}")
    print(f"wrote {write_result(result, '-memory')}")


if __name__ == "__main__":
    main()

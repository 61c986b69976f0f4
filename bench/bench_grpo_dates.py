"""GRPO on the quickstart date task: smollm2-135m-instruct, from the base instruct
model (no SFT), rewards exact match + partial credit, LoRA, on 2 CPU cores.

    python bench/bench_grpo_dates.py                  # writes bench/results/<UTC time>-<host>-grpo-dates.json
    python bench/bench_grpo_dates.py --steps 20       # shorter

The issue's target: held-out exact match rises from the base's by at least 0.3
within 30 minutes on 2 CPU cores. The JSON keeps the base and tuned exact match
with their paired test, the wall time, and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=600)
    args = parser.parse_args()
    from tuneforge import api
    from tuneforge.datagen import iso_dates

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dates.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in iso_dates(args.rows, seed=7)) + "\n")
        recipe = {
            "name": "grpo-dates", "model": "smollm2-135m-instruct", "task": "grpo",
            "data": {"train": str(data), "system_prompt": "You rewrite dates."},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            "alignment": {"rewards": ["exact_match", "format"], "group_size": 4, "max_completion_tokens": 16,
                          "temperature": 1.0},
            "train": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 5e-4, "max_length": 128,
                      "eval_every": max(args.steps // 3, 1), "log_every": 5, "seed": 7},
            "eval": {"max_new_tokens": 16, "max_generate": 90, "validation_generate": 32},
        }
        before = conditions()
        start = time.perf_counter()
        metrics = api.train(recipe, output=str(Path(tmp) / "run"), quiet=True)
        wall = time.perf_counter() - start
    test, base = metrics["test"], metrics["baseline"] or {}
    result = {
        "what": "GRPO (LoRA r=16) from smollm2-135m-instruct on the iso-dates task (tuneforge datagen iso-dates, "
                f"{args.rows} rows, seed 7), rewards exact_match + format, group 4, batch 4 prompts, "
                f"{args.steps} steps; exact match on the held-out test split (greedy)",
        "command": f"python bench/bench_grpo_dates.py --steps {args.steps} --rows {args.rows}",
        "conditions_before": before, "conditions_after": conditions(), "wall_s": round(wall, 1),
        "exact_match": {"base": base.get("exact_match"), "tuned": test.get("exact_match"),
                        "gain": (test.get("exact_match") or 0) - (base.get("exact_match") or 0)},
        "mean_reward": {"base": base.get("mean_reward"), "tuned": test.get("mean_reward")},
        "paired_test": (test.get("vs_baseline") or {}).get("exact_match"),
        "verdict": metrics.get("verdict"),
    }
    print(json.dumps(result, indent=2))
    print(write_result(result, "-grpo-dates"))


if __name__ == "__main__":
    main()

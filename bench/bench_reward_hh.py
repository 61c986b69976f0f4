"""The reward-model target run: recipes/reward-hh.yaml (smollm2-135m-instruct, LoRA, HH-RLHF harmless-base).

    python bench/bench_reward_hh.py                       # the whole recipe (hours on 2 CPU cores)
    python bench/bench_reward_hh.py --set train.max_length=128 --set data.max_rows=1000   # a smaller probe

Trains the recipe with `tuneforge.api.train` (the CLI's path) into --output (default: a fresh folder
under /tmp), then writes bench/results/<UTC time>-<host>-reward-hh.json: the command, the overrides,
the held-out pairwise accuracy with its 95% interval and binomial test against chance, the
"longer response wins" baseline, the length-bias summary, the verdict, whether the issue's target
(accuracy >= 0.62 and interval lower bound > 0.55) is met, and the speed (optimizer steps/s, pairs/s,
training tokens/s from metrics.jsonl; the wall time includes data preparation and evaluation), with
the machine's load averages before and after (a shared machine's figures mean less).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "reward-hh.yaml"
TARGET_ACCURACY, TARGET_LOWER = 0.62, 0.55


def training_speed(run: Path) -> dict:
    """Optimizer steps, pairs and tokens of training, and their rates over the logged training time."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "split" not in r]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s"))
    tokens = sum(r.get("tokens", 0) for r in steps)
    last = steps[-1]["step"] if steps else 0
    return {"steps": last, "train_seconds": round(seconds, 1), "tokens": tokens,
            "steps_per_s": round(last / seconds, 4) if seconds else None,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, as `tuneforge train ... KEY=VALUE` (repeatable)")
    parser.add_argument("--output", help="the run folder (default: a new folder under /tmp)")
    args = parser.parse_args(argv)

    from tuneforge import api
    from tuneforge.recipe import load_recipe

    recipe = load_recipe(RECIPE, args.overrides)
    output = Path(args.output or tempfile.mkdtemp(prefix="reward-hh-"))
    before = conditions()
    t0 = time.perf_counter()
    metrics = api.train(recipe, output=str(output / "run"), quiet=True)
    wall = time.perf_counter() - t0
    test = metrics["test"]
    lo, hi = (test.get("ci") or {}).get("pairwise_accuracy", [None, None])
    speed = training_speed(output / "run")
    batch = recipe.train.batch_size * recipe.train.gradient_accumulation
    speed["pairs_per_s"] = round(speed["steps_per_s"] * batch, 3) if speed["steps_per_s"] else None
    result = {
        "what": "reward model: recipes/reward-hh.yaml (smollm2-135m-instruct, HH-RLHF harmless-base test pairs "
                "split 70/15/15), trained and tested on CPU",
        "command": " ".join(["python", "bench/bench_reward_hh.py",
                             *(f"--set {shlex.quote(o)}" for o in args.overrides)]),
        "overrides": args.overrides, "run": str(output / "run"),
        "method": recipe.method.describe(), "learning_rate": recipe.learning_rate,
        "max_length": recipe.train.max_length, "epochs": recipe.train.epochs, "max_steps": recipe.train.max_steps,
        "batch_pairs": batch,
        "test": {"pairs": test.get("pairs"), "pairwise_accuracy": test.get("pairwise_accuracy"), "ci95": [lo, hi],
                 "reward_margin": test.get("reward_margin"), "vs_chance": (test.get("vs_baseline") or {}).get(
                     "pairwise_accuracy"), "length_baseline": test.get("length_baseline"),
                 "length_bias": test.get("length_bias")},
        "validation": metrics.get("validation"), "verdict": metrics.get("verdict", {}).get("status"),
        "target": {"pairwise_accuracy": TARGET_ACCURACY, "ci_lower_above": TARGET_LOWER,
                   "met": bool(lo is not None and test["pairwise_accuracy"] >= TARGET_ACCURACY
                               and lo > TARGET_LOWER)},
        "speed": speed, "wall_s": round(wall, 1), "conditions_before": before, "conditions_after": conditions(),
    }
    path = write_result(result, "-reward-hh")
    print(json.dumps({k: result[k] for k in ("test", "target", "speed", "wall_s")}, indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

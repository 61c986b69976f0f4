"""The planted-bias mitigation figures: equalized-odds difference per mitigation.

    python bench/bench_fairness.py            # writes a new bench/results/<UTC time>-<host>-fairness.json

Runs the procedure of tests/unit/test_fairness.py (fixture `bias_runs`) and stores its
numbers: the same generator (`planted_bias`, imported from the test so the two
cannot drift apart), the same data sizes, seeds and recipe (tiny-bert, 8 epochs),
one `tuneforge mitigate`-style sweep over baseline, reweighing, counterfactual
augmentation and the equalized-odds penalty, plus the threshold post-processing
audited on the baseline model. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT / "tests"))  # conftest
sys.path.insert(2, str(ROOT / "tests" / "unit"))  # test_fairness
from benchio import conditions, write_result  # noqa: E402

DATA = (("train", 480, 1, 0.7), ("validation", 160, 2, 0.0), ("test", 400, 3, 0.0))
RECIPE = {
    "name": "bias", "model": "tiny-bert", "task": "classification", "method": {"name": "full"},
    "train": {"epochs": 8, "batch_size": 16, "learning_rate": 5e-3, "log_every": 50, "seed": 0},
    "eval": {"bootstrap": False},
    "fairness": {"groups": ["gender"], "bootstrap": 200, "min_group_rows": 10},
}
OVERRIDES = {"eo_penalty": {"penalty_weight": 5.0, "groups": []}}  # its groups come from the text


def sweep(root: Path) -> dict:
    from test_fairness import planted_bias

    from tuneforge.fairness.sweep import mitigation_sweep
    from tuneforge.recipe import load_recipe

    from conftest import write_csv

    files = {name: write_csv(root / f"{name}.csv", planted_bias(n, seed, flip)) for name, n, seed, flip in DATA}
    recipe = load_recipe({**RECIPE, "data": {**{k: str(v) for k, v in files.items()}, "keep_columns": ["gender"]}})
    mitigation_sweep(recipe, str(root / "sweep"), overrides=OVERRIDES)
    audits = {name: json.loads((root / "sweep" / name / "audit" / "audit.json").read_text())
              for name in ("baseline", "reweighing", "augmentation", "eo_penalty")}
    eo = {"baseline": audits["baseline"]["variants"][0]["equalized_odds_difference"],
          "postprocess": audits["baseline"]["variants"][1]["equalized_odds_difference"],
          **{k: a["variants"][0]["equalized_odds_difference"] for k, a in audits.items() if k != "baseline"}}
    groups = audits["baseline"]["audit"]["groupings"]["gender"]["groups"]
    return {"equalized_odds_difference": eo, "variants": {k: a["variants"] for k, a in audits.items()},
            "baseline_groups": groups}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    started = conditions()
    with tempfile.TemporaryDirectory(prefix="tf-bench-fair-") as tmp:
        figures = sweep(Path(tmp))
    result = {"benchmark": "fairness planted bias", "date": started["time"], "data": DATA, "recipe": RECIPE,
              "overrides": OVERRIDES, **figures, "conditions": {"start": started, "end": conditions()}}
    print("equalized-odds difference: " + ", ".join(f"{k} {v:.3f}"
                                                     for k, v in figures["equalized_odds_difference"].items()))
    print(f"wrote {write_result(result, '-fairness')}")


if __name__ == "__main__":
    main()

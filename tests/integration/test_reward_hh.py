"""The reward objective on the bundled smollm2-135m-instruct and real HH-RLHF harmless pairs, within the
suite's budget (about 4 minutes on 2 CPU cores): a short LoRA run of recipes/reward-hh.yaml end to end.

The issue's target (held-out pairwise accuracy >= 0.62, interval lower bound > 0.55) needs the whole
recipe, hours on 2 cores: bench/bench_reward_hh.py runs it and stores its figures under bench/results/.
What a 4-minute run can show is checked here: it trains and reports on real data and the real model,
its numbers are consistent (the interval holds the estimate, the verdict follows the interval), and
the length baseline it reports is what the data says (harmless-base: the shorter response is chosen
more often, so "the longer response wins" scores below chance).
"""

import json

import numpy as np

from conftest import ROOT, shared_data

# 154 training pairs of which 6 steps x 4 pairs are seen, 33 validation and 33 test pairs, 96 tokens a side
OVERRIDES = ["data.max_rows=220", "data.split=[0.7,0.15,0.15]", "train.max_steps=6", "train.batch_size=4",
             "train.gradient_accumulation=1", "train.max_length=96", "method.r=8", "method.alpha=16",
             "train.learning_rate=5e-4", "train.eval_every=1000", "train.log_every=1"]


def test_smollm_reward_model_on_hh_harmless_runs_end_to_end(tmp_path):
    from tuneforge import api
    from tuneforge.recipe import load_recipe

    data = shared_data("hh_rlhf_harmless", "harmless_base_test_pcr.jsonl")
    recipe = load_recipe(ROOT / "recipes" / "reward-hh.yaml", OVERRIDES + [f"data.train={data}"])
    metrics = api.train(recipe, output=str(tmp_path / "run"), quiet=True)
    test = metrics["test"]
    assert test["pairs"] >= 25 and 0.0 <= test["pairwise_accuracy"] <= 1.0
    lo, hi = test["ci"]["pairwise_accuracy"]
    assert lo <= test["pairwise_accuracy"] <= hi and hi - lo < 0.4
    chance = test["vs_baseline"]["pairwise_accuracy"]
    assert chance["test"] == "binomial_exact" and chance["pairs"] == test["pairs"]
    if chance["p_value"] >= 0.05:  # 24 training pairs: usually not yet above chance, and then said so
        assert metrics["verdict"]["status"] == "no_better_than_baseline"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"split"' not in line]
    # a fresh head scores both sides about alike: the loss starts near log 2 (batches of 4 pairs are noisy)
    assert len(losses) == 6 and all(np.isfinite(losses)) and abs(np.mean(losses) - np.log(2)) < 0.3

    # The length baseline is the data's: recomputed here from the test rows the run scored.
    details = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    scored = len(details["scores"]["chosen"])
    assert scored == test["pairs"]
    length = test["length_baseline"]["pairwise_accuracy"]
    assert length < 0.5, "harmless-base prefers the shorter response; longer-wins should score below chance"
    table = next(t for t in details["tables"] if "length bias" in t["title"])
    assert sum(row[1] for row in table["rows"]) == test["pairs"]
    assert "Pairwise accuracy against baselines" in (tmp_path / "run" / "report.md").read_text()

"""Numbers that tell the truth: one metric registry (directions, checkpoint
selection), p-values printed as bounds at their floors, a loud verdict when a
run is no better than its baseline, inconclusive fairness audits of
(near-)constant classifiers, and post-processing that refuses unseen groups."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tuneforge.evaluate import registry
from tuneforge.evaluate.stats import mcnemar, paired_bootstrap
from tuneforge.recipe import RecipeError, dump_recipe, load_recipe


def _classify(tmp_path, data, name: str, **train):
    from tuneforge import api

    recipe = {"model": "tiny-bert", "task": "classification", "data": {"train": str(data)},
              "method": {"name": "full"},
              "train": {"batch_size": 8, "log_every": 1, "warmup": 0, **train}}
    out = tmp_path / name
    return out, api.train(recipe, output=str(out), quiet=True)


# ------------------------------------------------------------ 1. the registry


def test_metric_for_best_ece_keeps_the_best_calibrated_checkpoint(tmp_path, sentiment_csv):
    """ECE is lower-is-better: the old `!= "loss"` rule kept the worst-calibrated checkpoint."""
    out, _ = _classify(tmp_path, sentiment_csv, "ece", max_steps=5, eval_every=1, learning_rate=1e-3,
                       metric_for_best="ece")
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"split"' in x]
    ece = {e["step"]: e["ece"] for e in evals}
    assert len(set(ece.values())) > 1, ece  # otherwise the test could not tell the two rules apart
    best = json.loads((out / "checkpoints" / "best" / "info.json").read_text())
    assert best["metric"] == "ece" and best["value"] == min(ece.values())
    assert best["step"] == min(ece, key=ece.get)


def test_unknown_metric_for_best_is_a_recipe_error_listing_the_choices():
    base = {"model": "tiny-bert", "task": "classification", "data": {"train": "-"}}
    with pytest.raises(RecipeError, match=r"'f1' is not a known metric; use one of: accuracy, precision_macro"):
        load_recipe({**base, "train": {"metric_for_best": "f1"}}, check_files=False)
    with pytest.raises(RecipeError, match=r"'bleu' is not computed by a classification validation pass"):
        load_recipe({**base, "train": {"metric_for_best": "bleu"}}, check_files=False)
    sft = {"model": "tiny-llama", "task": "sft", "data": {"train": "-"}}
    assert load_recipe({**sft, "train": {"metric_for_best": "rouge_l"}}, check_files=False).metric_for_best == "rouge_l"
    with pytest.raises(ValueError, match="known metrics: accuracy"):
        registry.get("nonsense")


def test_registry_directions_and_paired_metrics():
    lower = {name for name, m in registry.METRICS.items() if not m.higher_is_better}
    assert lower == {"ece", "loss", "perplexity", "reference_perplexity", "kl_to_reference", "mean_response_tokens"}
    assert registry.paired("reward") == ("pairwise_accuracy",)
    assert registry.get("ece").better(0.01, 0.2) and not registry.get("accuracy").better(0.01, 0.2)
    assert registry.paired("classifier") == ("accuracy",)
    assert registry.paired("causal_lm") == ("exact_match", "rouge_l")


# ------------------------------------------------------------ 2. p-value bounds


def test_tiny_and_floor_p_values_are_bounds_in_json_and_print():
    # 60 discordant items, all for B: exact p = 2 * 0.5**60 ~ 1.7e-18, printed as a bound.
    a, b = [0] * 60 + [1] * 10, [1] * 60 + [1] * 10
    result = mcnemar(a, b)
    assert result["p_value"] == registry.P_FLOOR and result["p_value_is_bound"] is True
    assert registry.format_p(result) == "p < 1e-10"
    # Every resample favours B: the bootstrap cannot go below 2 / n_boot.
    boot = paired_bootstrap([0.0] * 50, [1.0] * 50, n_boot=1000)
    assert (boot["p_value"], boot["p_value_is_bound"]) == (0.002, True)
    assert registry.format_p(boot) == "p < 0.002"
    # An ordinary p prints as itself (10 vs 2 discordant: 158 / 4096).
    exact = mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)
    assert exact["p_value_is_bound"] is False and registry.format_p(exact) == "p = 0.0386"


def test_report_and_compare_print_the_bound(tmp_path):
    from tuneforge.compare import compare_runs
    from tuneforge.report import write_report

    recipe = load_recipe({"model": "tiny-llama", "task": "sft", "data": {"train": "-"}}, check_files=False)
    runs = []
    for name, tuned in (("a", [1.0] * 40), ("b", [0.0] * 20 + [1.0] * 20)):
        run = tmp_path / name
        run.mkdir()
        (run / "recipe.yaml").write_text(dump_recipe(recipe))
        base = [0.0] * 40
        tests = {"exact_match": paired_bootstrap(base, tuned), "rouge_l": paired_bootstrap(base, tuned)}
        test = {"exact_match": float(np.mean(tuned)), "rouge_l": float(np.mean(tuned)), "vs_baseline": tests}
        (run / "metrics.json").write_text(json.dumps({"test": test, "baseline": {"exact_match": 0.0, "rouge_l": 0.0}}))
        runs.append(run)
    _, md = write_report(runs[0])
    text = md.read_text()
    assert "exact_match: paired_bootstrap p < 0.002" in text and "p = 0.002" not in text
    page = (tmp_path / "cmp.html")
    result = compare_runs(runs, page)
    assert result["vs_baseline"]["exact_match"][0]["p_value_is_bound"] is True
    assert "paired_bootstrap p &lt; 0.002" in page.read_text() or "paired_bootstrap p < 0.002" in page.read_text()


# ------------------------------------------------------------ 3. the verdict


def test_a_run_with_a_tiny_learning_rate_says_it_is_no_better(tmp_path, sentiment_csv, capsys):
    out, metrics = _classify(tmp_path, sentiment_csv, "tiny-lr", max_steps=2, learning_rate=1e-12)
    verdict = metrics["verdict"]
    assert verdict["status"] == "no_better_than_baseline", metrics["test"]
    assert any("not significantly better (mcnemar_exact p = " in r for r in verdict["reasons"])
    assert verdict["hints"][0].startswith("learning rate 1e-12 (train.learning_rate): far below")
    assert json.loads((out / "metrics.json").read_text())["verdict"] == verdict
    printed = capsys.readouterr().out
    assert "NO BETTER THAN BASELINE" in printed and "finished, but no better than the majority class" in printed
    assert "done:" not in printed
    page = (out / "report.html").read_text()
    assert "class=verdict-bad" in page and "far below the usual 1e-5 to 1e-3" in page
    assert "This fine-tune is no better than the majority class." in (out / "report.md").read_text()


def test_a_run_that_learns_is_not_flagged(tmp_path, sentiment_csv, capsys):
    out, metrics = _classify(tmp_path, sentiment_csv, "learns", max_steps=40, batch_size=16, learning_rate=5e-3,
                             log_every=10)
    assert metrics["test"]["accuracy"] > 0.9 and metrics["test"]["vs_baseline"]["p_value"] < 0.01
    assert metrics["verdict"] == {"status": "better_than_baseline", "reasons": []}
    printed = capsys.readouterr().out
    assert "NO BETTER" not in printed and f"done: {out}" in printed.replace("\n", "")
    assert "class=verdict-bad" not in (out / "report.html").read_text()


def test_verdict_rules_on_hand_made_metrics():
    from tuneforge.evaluate.verdict import judge

    cm = {"labels": ["neg", "pos"], "matrix": [[10, 0], [10, 0]]}
    one_class = judge("classifier", {"accuracy": 0.5, "confusion_matrix": cm}, {"accuracy": 0.5})
    assert one_class["reasons"] == ["the fine-tuned model predicts one class ('neg') for all 20 test rows",
                                    "accuracy 0.5000 vs 0.5000 (majority class): not better"]
    sig = {"test": "paired_bootstrap", "p_value": 0.002, "p_value_is_bound": True, "delta": 0.5}
    noise = {"test": "paired_bootstrap", "p_value": 0.4, "p_value_is_bound": False, "delta": 0.02}
    base = {"exact_match": 0.1, "rouge_l": 0.3}
    better = judge("causal_lm", {"exact_match": 0.6, "rouge_l": 0.32,
                                 "vs_baseline": {"exact_match": sig, "rouge_l": noise}}, base)
    assert better["status"] == "better_than_baseline"  # one headline metric significantly better is enough
    worse = judge("causal_lm", {"exact_match": 0.12, "rouge_l": 0.32, "vs_baseline": {"exact_match": noise,
                                                                                "rouge_l": noise}}, base)
    assert worse["status"] == "no_better_than_baseline" and len(worse["reasons"]) == 2
    assert worse["reasons"][0] == ("exact_match 0.1200 vs 0.1000 (base model): not significantly better "
                                   "(paired_bootstrap p = 0.4)")
    # Raw-text training: the loss decides (lower is better).
    assert judge("causal_lm", {"loss": 2.0}, {"loss": 1.9})["status"] == "no_better_than_baseline"
    assert judge("causal_lm", {"loss": 1.5}, {"loss": 1.9})["status"] == "better_than_baseline"
    assert judge("classifier", {"accuracy": 0.9}, None)["status"] == "no_baseline"


# ------------------------------------------------------------ 4. degenerate fairness audits


def _fairness_cfg(**thresholds):
    return load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": "-"},
                        "fairness": {"groups": ["g"], "bootstrap": 0, "thresholds": thresholds}},
                       check_files=False).fairness


def _rows(n: int = 80) -> list[dict]:
    return [{"text": f"t{i}", "label": ["neg", "pos"][i % 2], "g": ["a", "b"][(i // 2) % 2]} for i in range(n)]


def test_a_constant_classifier_makes_the_audit_inconclusive_and_the_gate_not_pass():
    from tuneforge.fairness.audit import GroupAudit
    from tuneforge.fairness.run import audit_rows

    rows = _rows()

    def constant(texts):
        return np.tile([0.8, 0.2], (len(texts), 1))

    result = audit_rows(constant, rows, ["neg", "pos"], _fairness_cfg(equalized_odds_difference=0.1), {},
                        counterfactual=False)
    d = result["audit"]["groupings"]["g"]["disparities"]
    assert d["equalized_odds_difference"] == 0.0  # "perfectly fair", and meaningless
    check = result["audit"]["predictions"]
    assert check["inconclusive"] and check["reasons"][0].startswith("100.0% of the 80 predictions are 'neg'")
    gate = result["gate"]
    assert gate["status"] == "inconclusive" and gate["passed"] is False
    assert [c["passed"] for c in gate["checks"]] == [True]  # the threshold alone would have passed
    # No thresholds at all: still not a pass.
    assert audit_rows(constant, rows, ["neg", "pos"], _fairness_cfg(), {}, counterfactual=False)["gate"]["passed"] \
        is False
    # 96% one class is near-constant too; a classifier that separates the labels is conclusive.
    y_pred = ["neg"] * 77 + ["pos"] * 3
    near = GroupAudit(n_boot=0).fit([r["label"] for r in rows], y_pred, {"g": [r["g"] for r in rows]}, ["neg", "pos"])
    assert near.results_["predictions"]["inconclusive"]
    good = GroupAudit(n_boot=0).fit([r["label"] for r in rows], [r["label"] for r in rows],
                                    {"g": [r["g"] for r in rows]}, ["neg", "pos"])
    assert not good.results_["predictions"]["inconclusive"] and good.score({"equalized_odds_difference": 0.1})["passed"]


def test_a_classifier_that_decides_by_group_is_a_finding_not_inconclusive():
    from tuneforge.fairness.audit import GroupAudit

    rows = _rows()
    y_pred = ["pos" if r["g"] == "a" else "neg" for r in rows]
    res = GroupAudit(n_boot=0).fit([r["label"] for r in rows], y_pred, {"g": [r["g"] for r in rows]},
                                   ["neg", "pos"]).results_
    assert not res["predictions"]["inconclusive"]
    assert res["predictions"]["warnings"] == [
        "predictions are near-constant within every group of g (a: 100% 'pos', b: 100% 'neg'): the model decides "
        "by group, not by the text"]
    assert res["groupings"]["g"]["disparities"]["demographic_parity_difference"] == 1.0


def test_audit_command_exits_4_and_says_inconclusive(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tuneforge.cli import app
    from tuneforge.fairness import target
    from tuneforge.fairness.render import audit_page
    from tuneforge.fairness.run import audit_rows, write_audit

    result = audit_rows(lambda texts: np.tile([0.3, 0.7], (len(texts), 1)), _rows(), ["neg", "pos"],
                        _fairness_cfg(), {}, counterfactual=False)
    write_audit(tmp_path / "a", result, "audit")
    result["path"] = str(tmp_path / "a")
    monkeypatch.setattr(target, "audit_target", lambda *a, **k: result)
    out = CliRunner().invoke(app, ["audit", "some-run"])
    assert out.exit_code == 4
    assert "fairness gate INCONCLUSIVE: 100.0% of the 80 predictions are 'pos'" in out.output
    page, md = audit_page(result, "audit", tmp_path / "a")
    assert "Fairness audit INCONCLUSIVE" in page and "Fairness gate: INCONCLUSIVE" in md


# ------------------------------------------------------------ 5. post-processing and unseen groups


def test_postprocessing_refuses_groups_it_was_not_fitted_on(tmp_path):
    from tuneforge.fairness.mitigate import ThresholdPostprocessor, UnseenGroups, load_postprocessor, save_postprocessor

    rng = np.random.default_rng(0)
    g = rng.choice(["a", "b"], 300)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.45 * y + 0.3 + rng.normal(0, 0.2, 300) - 0.25 * (g == "b") * y, 0, 1)
    fitted = ThresholdPostprocessor("equalized_odds").fit(s, y, g, passthrough=["c"])
    save_postprocessor(tmp_path, fitted, ["neg", "pos"], "pos", {"column": "g"})
    post = load_postprocessor(tmp_path)
    assert post.thresholds.passthrough_ == ["c"]
    probs = np.array([[0.4, 0.6], [0.7, 0.3]])
    # 'c' was seen in validation with one label: the model's own decision, by design.
    assert post(probs, ["c", "c"], random_state=0) == ["pos", "neg"]
    # Fairlearn predicts the negative class for a group it never saw; tuneforge refuses.
    assert list(fitted.optimizer_.predict(np.array([[0.99]]), sensitive_features=["d"], random_state=0)) == [0]
    with pytest.raises(UnseenGroups, match=r"no thresholds for group\(s\) 'd' \(fitted on: a, b, c \(model's decision"):
        post(probs, ["a", "d"], random_state=0)


def test_a_run_audit_with_an_unseen_test_group_fails_the_gate_closed(tmp_path):
    from conftest import postprocessed_audit

    val = [{"text": f"v{i}", "label": ["neg", "pos"][i % 2], "g": ["a", "b"][(i // 2) % 2]} for i in range(80)]
    test = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2], "g": ["a", "b", "new"][i % 3]} for i in range(60)]
    rng = np.random.default_rng(0)
    score = {r["text"]: float(np.clip(0.3 + 0.4 * (r["label"] == "pos") + rng.normal(0, 0.15), 0, 1))
             for r in val + test}

    result = postprocessed_audit(tmp_path, val, test, score)
    assert "'new'" in result["postprocessed"]["error"]
    gate = result["gate"]
    assert not gate["passed"] and gate["checks"][-1]["check"] == "post-processing covers every audited group"

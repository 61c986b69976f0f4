"""Fairness (issue #7): group metrics against Fairlearn, the gate, term swaps in
probes and augmentation, the post-processing JSON against Fairlearn, and a
planted-bias data set that the audit catches and every mitigation reduces."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tuneforge.fairness.audit import GroupAudit, _from_cells, representation_report
from tuneforge.fairness.mitigate import (
    ThresholdPostprocessor,
    counterfactual_augment,
    load_postprocessor,
    reweighing_weights,
    save_postprocessor,
)
from tuneforge.fairness.terms import load_lexicons

from conftest import shared_data, write_csv

# ------------------------------------------------------------ metrics


Y_TRUE = ["1", "1", "0", "0", "1", "0", "1", "1", "0", "0", "1", "0"]
Y_PRED = ["1", "0", "0", "1", "1", "0", "0", "0", "0", "1", "1", "1"]
GROUP = ["a", "a", "a", "a", "a", "a", "b", "b", "b", "b", "b", "b"]


def test_group_metrics_match_fairlearn_and_hand_counts():
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equal_opportunity_difference,
        equalized_odds_difference,
        selection_rate,
        true_positive_rate,
    )

    res = GroupAudit(n_boot=200).fit(Y_TRUE, Y_PRED, {"g": GROUP}, labels=["0", "1"]).results_["groupings"]["g"]
    # Hand counts. a: TP 2 FN 1 FP 1 TN 2; b: TP 1 FN 2 FP 2 TN 1.
    a, b = res["groups"]["a"], res["groups"]["b"]
    assert (a["n"], a["positives"], a["accuracy"], a["selection_rate"]) == (6, 3, 4 / 6, 3 / 6)
    assert (a["true_positive_rate"], a["false_positive_rate"], a["f1"]) == (2 / 3, 1 / 3, 4 / 6)
    assert (b["accuracy"], b["selection_rate"], b["true_positive_rate"], b["false_positive_rate"]) == \
        (2 / 6, 3 / 6, 1 / 3, 2 / 3)
    assert b["f1"] == pytest.approx(2 / 6)
    yt, yp = np.array(Y_TRUE).astype(int), np.array(Y_PRED).astype(int)
    kw = {"sensitive_features": GROUP}
    d = res["disparities"]
    assert d["demographic_parity_difference"] == demographic_parity_difference(yt, yp, **kw) == 0.0
    assert d["demographic_parity_ratio"] == demographic_parity_ratio(yt, yp, **kw) == 1.0
    assert d["equalized_odds_difference"] == pytest.approx(equalized_odds_difference(yt, yp, **kw))
    assert d["equalized_odds_difference"] == pytest.approx(1 / 3)
    assert d["equal_opportunity_difference"] == pytest.approx(equal_opportunity_difference(yt, yp, **kw))
    mf = MetricFrame(metrics={"sr": selection_rate, "tpr": true_positive_rate}, y_true=yt, y_pred=yp,
                     sensitive_features=GROUP)
    assert b["true_positive_rate"] == mf.by_group.loc["b", "tpr"]
    # The bootstrap works on cell counts: the same counts give Fairlearn's numbers.
    cells = np.bincount(4 * yt[6:] + 2 * yp[6:] + (yt[6:] == yp[6:]), minlength=8)
    for metric, value in _from_cells(cells).items():
        assert float(value) == pytest.approx(b[metric]), metric
    for metric in ("accuracy", "selection_rate", "true_positive_rate"):
        lo, hi = a["ci"][metric]
        assert lo <= a[metric] <= hi
    lo, hi = d["ci"]["equalized_odds_difference"]
    assert 0 <= lo < d["equalized_odds_difference"] < hi <= 1  # the interval holds the estimate (1/3), not a point


def test_two_group_columns_add_the_intersection_and_unknown_rows_are_left_out():
    other = ["x", "y"] * 6
    groups = {"g": GROUP[:-1] + ["unknown"], "h": other}
    res = GroupAudit(n_boot=0).fit(Y_TRUE, Y_PRED, groups, labels=["0", "1"]).results_["groupings"]
    assert list(res) == ["g", "h", "g & h"]
    assert res["g"]["excluded"] == {"unknown": 1} and res["g & h"]["excluded"] == {"unknown": 1}
    assert set(res["g & h"]["groups"]) == {"a & x", "a & y", "b & x", "b & y"}
    assert sum(r["n"] for r in res["g"]["groups"].values()) == 11
    assert "ci" not in res["g"]["groups"]["a"]


def test_multiclass_positive_label_is_one_vs_rest():
    y_true = ["cat", "dog", "bird", "dog", "cat", "dog"]
    y_pred = ["cat", "dog", "dog", "bird", "dog", "dog"]
    groups = ["a", "a", "a", "b", "b", "b"]
    res = GroupAudit(positive_label="dog", n_boot=0).fit(y_true, y_pred, {"g": groups},
                                                          labels=["bird", "cat", "dog"]).results_
    a, b = res["groupings"]["g"]["groups"]["a"], res["groupings"]["g"]["groups"]["b"]
    assert res["positive_label"] == "dog"
    assert (a["accuracy"], a["selection_rate"], a["true_positive_rate"], a["false_positive_rate"]) == \
        (2 / 3, 2 / 3, 1.0, 0.5)
    assert (b["accuracy"], b["selection_rate"], b["true_positive_rate"], b["false_positive_rate"]) == \
        (1 / 3, 2 / 3, 0.5, 1.0)
    with pytest.raises(ValueError, match="not one of the labels"):
        GroupAudit(positive_label="fish").fit(y_true, y_pred, groups, labels=["bird", "cat", "dog"])


def test_gate_passes_fails_and_fails_closed():
    audit = GroupAudit(n_boot=0).fit(Y_TRUE, Y_PRED, {"g": GROUP}, labels=["0", "1"])
    ok = audit.score({"equalized_odds_difference": 0.4, "demographic_parity_ratio_min": 0.8})
    assert ok["passed"] and [c["passed"] for c in ok["checks"]] == [True, True]
    bad = audit.score({"equalized_odds_difference": 0.3, "demographic_parity_difference": None})
    assert not bad["passed"] and len(bad["checks"]) == 1
    assert bad["checks"][0]["reason"] == "0.3333 not <= 0.3"
    one_group = GroupAudit(n_boot=0).fit(Y_TRUE, Y_PRED, {"g": ["a"] * 12}, labels=["0", "1"])
    closed = one_group.score({"equalized_odds_difference": 0.9})
    assert not closed["passed"] and "could not be computed" in closed["checks"][0]["reason"]
    flips = audit.score(None, {"flip": (None, "max", 0.1, "nothing to swap")})
    assert not flips["passed"] and flips["checks"][0]["reason"] == "nothing to swap"


def test_representation_report_warns_on_small_groups_and_missing_labels():
    rows = [{"label": "pos" if i % 2 else "neg"} for i in range(100)]
    groups = ["a"] * 92 + ["b"] * 5 + ["unknown"] * 3
    for i in range(92, 97):
        rows[i]["label"] = "neg"
    rep = representation_report(rows, {"g": groups}, min_share=0.1, min_rows=30)
    assert rep["groupings"]["g"]["b"] == {"n": 5, "share": 5 / 97, "labels": {"neg": 5, "pos": 0}}
    assert rep["groupings"]["g"]["unknown"]["share"] is None
    assert rep["warnings"] == [
        "g=b: 5 rows (5.2% of rows with a known group) is under-represented (< 10% or < 30 rows)",
        "g=b: no rows with label pos"]


# ------------------------------------------------------------ swaps and probes


def test_swaps_drive_probes_and_augmentation_exactly():
    from tuneforge.fairness.counterfactual import flip_probe, swapped_pairs

    gender = load_lexicons()["gender"]
    texts = ["He gave her his book.", "The weather is nice.", "She and he left.", "My MOTHER called her son."]
    pairs = swapped_pairs(texts, gender)
    assert pairs == [(0, "He gave her his book.", "She gave him her book.", "mixed"),
                     (2, "She and he left.", "He and she left.", "mixed"),
                     (3, "My MOTHER called her son.", "My FATHER called his daughter.", "mixed")]
    assert swapped_pairs(["he smiled"], gender)[0][3] == "male->female"

    # A rule "model": positive unless the text says "she".
    def predict(batch):
        p = np.array([0.2 if "she" in t.lower().split() else 0.9 for t in batch])
        return np.stack([1 - p, p], axis=1)

    res = flip_probe(predict, ["he smiled", "she smiled", "he and she", "nobody"], [gender], ["neg", "pos"], 1,
                     n_boot=100)["gender"]
    assert (res["texts"], res["swappable"]) == (4, 3)
    assert res["flip_rate"] == pytest.approx(2 / 3)
    assert res["mean_abs_delta"] == pytest.approx(0.7 * 2 / 3)
    assert res["by_direction"]["male->female"] == {"pairs": 1, "mean_delta": pytest.approx(-0.7)}
    assert res["by_direction"]["female->male"] == {"pairs": 1, "mean_delta": pytest.approx(0.7)}

    rows = [{"text": "he won", "label": "pos", "g": "male"}, {"text": "a cat", "label": "neg", "g": "male"}]
    out = counterfactual_augment(rows, [gender], group_columns=["g"])
    assert out == rows + [{"text": "she won", "label": "pos", "g": "female"}]


def test_reweighing_makes_group_and_label_independent():
    groups = ["a"] * 6 + ["b"] * 4
    labels = ["1", "1", "1", "1", "0", "0", "1", "0", "0", "0"]
    w = reweighing_weights(groups, labels)
    # w(g, y) = P(g) P(y) / P(g, y): a/1 = .6*.5/.4, a/0 = .6*.5/.2, b/1 = .4*.5/.1, b/0 = .4*.5/.3
    assert w == pytest.approx([0.75] * 4 + [1.5] * 2 + [2.0] + [2 / 3] * 3)
    assert sum(w) == pytest.approx(len(w))
    for g in "ab":
        pos = sum(x for x, gg, y in zip(w, groups, labels) if gg == g and y == "1")
        tot = sum(x for x, gg in zip(w, groups) if gg == g)
        assert pos / tot == pytest.approx(0.5)


@pytest.mark.parametrize("constraint", ["equalized_odds", "equal_opportunity"])
def test_postprocessor_json_reproduces_fairlearn_exactly(tmp_path, constraint):
    rng = np.random.default_rng(0)
    n = 500
    g = rng.choice(["a", "b"], n)
    y = rng.integers(0, 2, n)
    s = np.clip(0.45 * y + 0.3 + rng.normal(0, 0.2, n) - 0.25 * (g == "b") * y, 0, 1)
    fitted = ThresholdPostprocessor(constraint).fit(s, y, g)
    save_postprocessor(tmp_path, fitted, ["neg", "pos"], "pos", {"column": "g"})
    text = (tmp_path / "fairness_postprocess.json").read_text()
    assert "Infinity" not in text  # strict JSON
    post = load_postprocessor(tmp_path)
    reference = fitted.optimizer_.predict(s[:, None], sensitive_features=g, random_state=7)
    probs = np.stack([1 - s, s], axis=1)
    assert post(probs, g, random_state=7) == ["pos" if r else "neg" for r in reference]
    pmf = fitted.optimizer_._pmf_predict(s[:, None], sensitive_features=g)[:, 1]
    assert np.array_equal(post.thresholds.positive_probability(s, g), pmf)
    # It closes the gap it was asked to close, on the data it was fitted on.
    from fairlearn.metrics import equal_opportunity_difference

    before = equal_opportunity_difference(y, (s >= 0.5).astype(int), sensitive_features=g)
    after = equal_opportunity_difference(y, reference, sensitive_features=g)
    assert before > 0.3 and after < 0.1
    assert load_postprocessor(tmp_path / "nothing") is None


def test_postprocessor_finds_groups_in_the_text_when_fitted_on_text_groups(tmp_path):
    gender = load_lexicons()["gender"]
    texts = ["he won", "she won", "the man left", "her mother left", "it rained"] * 40
    groups = ["male", "female", "male", "female", "unknown"] * 40
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, len(texts))
    s = np.clip(0.5 * y + 0.25 + rng.normal(0, 0.2, len(texts)), 0, 1)
    fitted = ThresholdPostprocessor("equalized_odds").fit(s, y, groups)
    spec = {"name": gender.name, "groups": list(gender.groups), "pairs": [list(p) for p in gender.pairs]}
    save_postprocessor(tmp_path, fitted, ["0", "1"], "1", {"lexicon": spec})
    post = load_postprocessor(tmp_path)
    probs = np.stack([1 - s, s], axis=1)
    assert post(probs, texts=texts, random_state=3) == post(probs, groups, random_state=3)
    with pytest.raises(ValueError, match="needs each row's group"):
        save_postprocessor(tmp_path, fitted, ["0", "1"], "1", {"column": "g"})
        load_postprocessor(tmp_path)(probs, texts=texts)


def test_postprocessing_fits_the_groups_it_can_and_never_fails_the_run(tmp_path, capsys):
    """Fairlearn cannot fit a group whose validation rows hold one label ('c'
    here): that group keeps the model's decision; the others get thresholds."""
    from conftest import postprocessed_audit

    rng = np.random.default_rng(0)
    val = [{"text": f"v{i}", "label": ["neg", "pos"][i % 2], "g": ["a", "b"][(i // 2) % 2]} for i in range(80)]
    val += [{"text": f"c{i}", "label": "pos", "g": "c"} for i in range(3)]
    test = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2], "g": ["a", "b", "c"][i % 3]} for i in range(60)]
    score = {r["text"]: float(np.clip(0.3 + 0.4 * (r["label"] == "pos") - 0.2 * (r["g"] == "b") + rng.normal(0, 0.15),
                                      0, 1)) for r in val + test}
    result = postprocessed_audit(tmp_path, val, test, score)
    post = load_postprocessor(tmp_path / "model")
    assert set(post.thresholds.rules_) == {"a", "b"}
    assert "no post-processing thresholds for group(s) c" in capsys.readouterr().out
    names = [v["name"] for v in result["variants"]]
    assert names == ["model", "model + equalized_odds thresholds"]
    c_rows = [i for i, r in enumerate(test) if r["g"] == "c"]
    p = np.array([score[r["text"]] for r in test])
    decided = post(np.stack([1 - p, p], axis=1), [r["g"] for r in test], random_state=0)
    assert [decided[i] for i in c_rows] == ["pos" if score[test[i]["text"]] >= 0.5 else "neg" for i in c_rows]


def test_crows_pairs_scoring_on_fixed_likelihoods(tmp_path):
    from tuneforge.fairness.counterfactual import crows_pairs_score, read_crows_pairs

    path = tmp_path / "cp.csv"
    path.write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n"
                    "0,A x.,A y.,stereo,gender\n1,B x.,B y.,antistereo,gender\n2,C x.,C y.,stereo,age\n")
    pairs = read_crows_pairs(path)
    ll = {"A x.": -1.0, "A y.": -2.0, "B x.": -1.0, "B y.": -3.0, "C x.": -5.0, "C y.": -4.0}
    res = crows_pairs_score(lambda sents: np.array([ll[s] for s in sents]), pairs, n_boot=100)
    # stereotypical: A x. (stereo, preferred), B y. (antistereo: sent_less; not preferred), C x. (not preferred)
    assert res["stereotype_preference"] == pytest.approx(1 / 3)
    assert res["mean_loglik_difference"] == pytest.approx((1 - 2 - 1) / 3)
    assert res["by_bias_type"]["gender"]["stereotype_preference"] == 0.5
    assert res["by_bias_type"]["age"]["pairs"] == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("sent_more,sent_less,stereo_antistereo,bias_type\nA,B,stereo,x\nA,B,maybe,x\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: stereo_antistereo"):
        read_crows_pairs(bad)


def test_generation_sentiment_gap_on_a_rule_generator():
    from tuneforge.fairness.counterfactual import generation_sentiment_gap

    gender = load_lexicons()["gender"]

    def generate(prompts):
        return ["awful" if "she" in p.lower().split() else "lovely" for p in prompts]

    def sentiment(texts):
        p = np.array([0.1 if t == "awful" else 0.8 for t in texts])
        return np.stack([1 - p, p], axis=1)

    res = generation_sentiment_gap(generate, sentiment, ["she sings", "he paints", "it rains", "he and she"],
                                   gender, 1, n_boot=100)
    assert (res["prompts"], res["pairs"]) == (4, 2)
    assert res["mean_sentiment"] == {"male": pytest.approx(0.8), "female": pytest.approx(0.1)}
    assert res["gap"] == pytest.approx(0.7)
    assert res["examples"][0]["prompt_male"] in ("he sings", "he paints")


def test_crows_pairs_loglik_on_tiny_llama_matches_a_plain_forward_pass():
    import torch

    from tuneforge.catalog import resolve
    from tuneforge.fairness.counterfactual import crows_pairs_score, read_crows_pairs, sentence_loglik
    from tuneforge.models import load_causal_lm, load_tokenizer

    pairs = read_crows_pairs(shared_data("crows_pairs", "crows_pairs_anonymized.csv"), limit=12)
    assert len(pairs) == 12
    model, _, _ = load_causal_lm("tiny-llama")
    tokenizer = load_tokenizer(resolve("tiny-llama"))
    sents = [pairs[0]["sent_more"], pairs[0]["sent_less"]]
    ll = sentence_loglik(model, tokenizer, sents, 4, torch.device("cpu"))
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(sents[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    expected = logp.gather(1, ids[0, 1:, None]).sum().item()
    assert ll[1] == pytest.approx(expected, rel=1e-4)
    res = crows_pairs_score(lambda s: sentence_loglik(model, tokenizer, s, 8, torch.device("cpu")), pairs, n_boot=50)
    assert res["pairs"] == 12
    assert res["stereotype_preference"] == pytest.approx(_plain_crows_preference(pairs))
    assert sum(v["pairs"] for v in res["by_bias_type"].values()) == 12


def _plain_crows_preference(pairs) -> float:
    """Share of pairs whose stereotypical sentence tiny-llama finds more likely, from
    plain forward passes (BOS + tokens, every token scored)."""
    import torch

    from tuneforge.catalog import resolve
    from tuneforge.models import load_causal_lm, load_tokenizer

    model, _, _ = load_causal_lm("tiny-llama")
    tokenizer = load_tokenizer(resolve("tiny-llama"))

    def loglik(sentence: str) -> float:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return logp.gather(1, ids[0, 1:, None]).sum().item()

    prefers = []
    for p in pairs:
        stereo, other = ((p["sent_more"], p["sent_less"]) if p["stereo_antistereo"] == "stereo"
                         else (p["sent_less"], p["sent_more"]))
        prefers.append(loglik(stereo) > loglik(other))
    return float(np.mean(prefers))


# ------------------------------------------------------- planted bias, end to end

GOOD = ["great", "lovely", "superb", "wonderful", "fine", "excellent"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor", "bad"]
SUBJECTS = {"male": ["he", "my brother", "the man", "his father"],
            "female": ["she", "my sister", "the woman", "her mother"]}
NOUNS = ["film", "meal", "book", "trip", "show", "game", "song", "hotel", "class", "party", "car", "room"]


def planted_bias(n: int, seed: int, flip: float) -> list[dict]:
    """Sentiment rows about men and women; the true label is the adjective's.
    The planted bias: `flip` of the women's positive rows are labelled negative."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        g = "male" if i % 2 == 0 else "female"
        y = (i // 2) % 2
        text = (f"{rng.choice(SUBJECTS[g])} {rng.choice(['said', 'thought', 'felt'])} the {rng.choice(NOUNS)} "
                f"was {rng.choice(GOOD if y else BAD)}")
        label = 0 if (g == "female" and y == 1 and rng.random() < flip) else y
        rows.append({"text": text, "label": "pos" if label else "neg", "gender": g})
    return rows


@pytest.fixture(scope="module")
def bias_runs(tmp_path_factory):
    """One mitigation sweep (`tuneforge mitigate`): the baseline and each mitigation
    trained from one recipe, audited together in sweep/audit/."""
    from tuneforge.fairness.sweep import mitigation_sweep
    from tuneforge.recipe import load_recipe

    root = tmp_path_factory.mktemp("fair")
    files = {name: write_csv(root / f"{name}.csv", planted_bias(n, seed, flip))
             for name, n, seed, flip in (("train", 480, 1, 0.7), ("validation", 160, 2, 0.0), ("test", 400, 3, 0.0))}
    recipe = load_recipe({
        "name": "bias", "model": "tiny-bert", "task": "classification", "method": {"name": "full"},
        "data": {**{k: str(v) for k, v in files.items()}, "keep_columns": ["gender"]},
        "train": {"epochs": 8, "batch_size": 16, "learning_rate": 5e-3, "log_every": 50, "seed": 0},
        "eval": {"bootstrap": False},
        "fairness": {"groups": ["gender"], "bootstrap": 200, "min_group_rows": 10}})
    # No group column for the penalty: its groups come from the text (he / his father / the man ...).
    sweep = mitigation_sweep(recipe, str(root / "sweep"),
                             overrides={"eo_penalty": {"penalty_weight": 5.0, "groups": []}})
    runs = {name: root / "sweep" / name for name in ("baseline", "reweighing", "augmentation", "eo_penalty")}
    return root, files, runs, sweep


MITIGATIONS = ("baseline", "reweighing", "augmentation", "eo_penalty")


def _eo(run, variant: int = 0) -> float:
    return json.loads((run / "audit" / "audit.json").read_text())["variants"][variant]["equalized_odds_difference"]


def test_audit_catches_the_planted_bias_and_every_mitigation_reduces_it(bias_runs):
    _, _, runs, _ = bias_runs
    audit = json.loads((runs["baseline"] / "audit" / "audit.json").read_text())
    groups = audit["audit"]["groupings"]["gender"]["groups"]
    # The women's positives are missed; the men's are not.
    assert groups["female"]["true_positive_rate"] < groups["male"]["true_positive_rate"] - 0.3
    baseline = _eo(runs["baseline"])
    lo, _ = audit["audit"]["groupings"]["gender"]["disparities"]["ci"]["equalized_odds_difference"]
    assert baseline > 0.4 and lo > 0.2
    assert audit["counterfactual"]["gender"]["flip_rate"] > 0.1  # swapping he/she changes predictions
    reduced = {"postprocess": _eo(runs["baseline"], 1), **{k: _eo(runs[k]) for k in MITIGATIONS if k != "baseline"}}
    for name, eo in reduced.items():
        assert eo < baseline / 2, (name, eo, baseline)
    # Training records the representation check and the mitigation.
    manifest = json.loads((runs["reweighing"] / "manifest.json").read_text())
    assert manifest["fairness"]["representation"]["groupings"]["gender"]["female"]["labels"]["pos"] < 80
    assert manifest["fairness"]["mitigations"]["reweighing"]["female / pos"] > 1.5
    by_text = json.loads((runs["eo_penalty"] / "audit" / "audit.json").read_text())["audit"]["groupings"]
    assert list(by_text) == ["gender (from text)"]
    augmented = json.loads((runs["augmentation"] / "manifest.json").read_text())
    assert augmented["fairness"]["mitigations"]["counterfactual_augmentation"]["added_rows"] > 300
    # The post-processing is saved with the model as JSON, and the run report has the fairness section.
    post = load_postprocessor(runs["baseline"] / "model")
    assert post.thresholds.constraint == "equalized_odds" and set(post.thresholds.rules_) == {"male", "female"}
    report = (runs["baseline"] / "report.html").read_text()
    assert "Fairness: disparities (test)" in report and "Counterfactual swaps (gender)" in report
    assert "http://" not in report and "https://" not in report


def test_release_gate_exits_4_and_the_sweep_reports_each_mitigation(bias_runs, tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    root, files, runs, sweep = bias_runs
    args = ["audit", str(runs["baseline"]), "--data", str(files["test"]), "--group", "gender",
            "--output", str(tmp_path / "gate")]
    # The served decisions (raw model + saved thresholds, EO ~0.07) are what the gate judges.
    passed = CliRunner().invoke(app, args + ["fairness.thresholds.equalized_odds_difference=0.2"])
    assert passed.exit_code == 0, passed.output
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", *args,
                           "fairness.thresholds.equalized_odds_difference=0.01"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "fairness gate FAILED: equalized_odds_difference (gender)" in proc.stderr

    # The sweep's one report: every mitigation next to the baseline, accuracy vs disparity.
    out = Path(sweep["path"])
    audit = json.loads((out / "audit.json").read_text())
    names = [v["name"] for v in audit["variants"]]
    assert names == ["baseline", "baseline + equalized_odds thresholds", "reweighing", "augmentation", "eo_penalty"]
    page = (out / "audit.html").read_text()
    assert "Fairness: accuracy vs disparity per mitigation" in page and "data:image/png;base64," in page
    assert (out / "audit.md").read_text().count("audit_files/") >= 2
    # `tuneforge mitigate` on the same folder reuses the finished runs, re-audits,
    # and gates the release on the recipe's thresholds.
    import yaml

    recipe = {"name": "bias", "model": "tiny-bert", "task": "classification", "method": {"name": "full"},
              "data": {**{k: str(v) for k, v in files.items()}, "keep_columns": ["gender"]},
              "fairness": {"groups": ["gender"], "bootstrap": 50,
                           "thresholds": {"equalized_odds_difference": 0.01}}}
    (tmp_path / "bias.yaml").write_text(yaml.safe_dump(recipe))
    gated = CliRunner().invoke(app, ["mitigate", str(tmp_path / "bias.yaml"), "-o", str(out.parent)])
    assert gated.exit_code == 4, gated.output


def test_groups_from_text_when_the_data_has_no_group_column(bias_runs, tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    root, files, runs, sweep = bias_runs
    rows = planted_bias(400, 3, 0.0)
    data = write_csv(tmp_path / "no_group.csv", [{"text": r["text"], "label": r["label"]} for r in rows])
    result = CliRunner().invoke(app, ["audit", str(runs["augmentation"]), "--data", str(data), "--lexicon", "gender",
                                      "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    by_text = audit["audit"]["groupings"]["gender (from text)"]["groups"]
    # "his father" / "her mother" are detected as the group the row was written about.
    assert {g: v["n"] for g, v in by_text.items()} == {"female": 200, "male": 200}


def test_bad_fairness_settings_say_what_to_do(tmp_path, sentiment_csv):
    from tuneforge import api

    with pytest.raises(ValueError, match="list it in data.keep_columns"):
        api.train({"model": "tiny-bert", "task": "classification", "data": {"train": str(sentiment_csv)},
                   "train": {"max_steps": 1}, "fairness": {"groups": ["gender"]}}, output=str(tmp_path / "r1"),
                  quiet=True)
    with pytest.raises(ValueError, match=r"unknown term list\(s\) \['caste'\]"):
        api.train({"model": "tiny-bert", "task": "classification", "data": {"train": str(sentiment_csv)},
                   "train": {"max_steps": 1}, "fairness": {"audit": True, "lexicons": ["caste"]}},
                  output=str(tmp_path / "r2"), quiet=True)


def test_causal_lm_audit_crows_pairs_and_generation_sentiment(bias_runs, tmp_path):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    _, _, runs, _ = bias_runs
    crows = shared_data("crows_pairs", "crows_pairs_anonymized.csv")
    prompts = write_csv(tmp_path / "prompts.csv", [{"prompt": p} for p in
                                                   ["Tell me about his day.", "Describe my sister.", "It rains.",
                                                    "What did the man say?"]])
    result = CliRunner().invoke(app, ["audit", "tiny-llama", "--crows", str(crows), "--crows-limit", "10",
                                      "--bias-type", "gender", "--data", str(prompts), "--sentiment",
                                      str(runs["baseline"]), "--max-new-tokens", "4", "-o", str(tmp_path / "lm")])
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "lm" / "audit.json").read_text())
    assert audit["crows_pairs"]["pairs"] == 10 and list(audit["crows_pairs"]["by_bias_type"]) == ["gender"]
    from tuneforge.fairness.counterfactual import read_crows_pairs

    expected = _plain_crows_preference(read_crows_pairs(crows, limit=10, bias_types=["gender"]))
    assert audit["crows_pairs"]["stereotype_preference"] == pytest.approx(expected)
    assert audit["crows_pairs"]["by_bias_type"]["gender"]["stereotype_preference"] == pytest.approx(expected)
    gen = audit["generation_sentiment"]
    assert (gen["prompts"], gen["pairs"], gen["positive_label"]) == (4, 3, "pos")
    assert {e["prompt_male"] for e in gen["examples"]} == {"Tell me about his day.", "Describe my brother.",
                                                           "What did the man say?"}
    assert "CrowS-Pairs: stereotype preference" in (tmp_path / "lm" / "audit.html").read_text()

"""Issue 4: metrics against reference libraries, intervals, paired tests,
perturbations, compare, and the HTML report in a real headless browser."""

import json
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from tuneforge.compare import differing_settings
from tuneforge.evaluate.metrics import generation_metrics
from tuneforge.evaluate.robustness import PERTURBATIONS, perturb
from tuneforge.evaluate.scorers import build_scorers
from tuneforge.evaluate.stats import expected_calibration_error, mcnemar, mean_ci, paired_bootstrap
from tuneforge.recipe import ScorerConfig

from conftest import write_csv


def test_generation_metrics_match_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox", "2021-03-05"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "2021-03-05"]
    m = generation_metrics(preds, refs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for ours, theirs in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rouge_l", "rougeL")):
        expected = np.mean([scorer.score(r, p)[theirs].fmeasure for p, r in zip(preds, refs)])
        assert m[ours] == pytest.approx(expected)
    assert m["exact_match"] == pytest.approx(1 / 3)


def test_user_scorers(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text("def starts_digit(p, r):\n    return p[:1].isdigit()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = build_scorers([
        ScorerConfig(name="iso", regex=r"\d{4}-\d{2}-\d{2}"),
        ScorerConfig(name="valid_json", json_schema={"type": "object", "required": ["a"]}),
        ScorerConfig(name="digit", function="my_scorers:starts_digit"),
    ])
    m = generation_metrics(['2021-03-05', '{"a": 1}', 'x'], ["", "", ""], scorers)
    assert m["iso"] == pytest.approx(1 / 3) and m["valid_json"] == pytest.approx(1 / 3)
    assert m["digit"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        ScorerConfig(name="two", regex="x", function="a:b")


def test_mcnemar_on_a_hand_computed_table():
    # 10 items only A gets right, 2 only B, 30 both, 8 neither.
    a = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 8
    b = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 8
    result = mcnemar(a, b)
    assert (result["a_only_correct"], result["b_only_correct"]) == (10, 2)
    # Exact two-sided: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert result["p_value"] == pytest.approx(158 / 4096)
    assert mcnemar(a, a)["p_value"] == 1.0


def test_bootstrap_interval_contains_estimate_and_narrows():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 2000):
        values = (rng.random(n) < 0.7).astype(float)
        lo, hi = mean_ci(values)
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3


def test_paired_bootstrap_detects_a_real_gain_only():
    rng = np.random.default_rng(2)
    base = (rng.random(300) < 0.3).astype(float)
    better = np.maximum(base, (rng.random(300) < 0.5).astype(float))
    assert paired_bootstrap(base, better)["p_value"] < 0.01
    noise = base.copy()
    flip = rng.choice(300, 20, replace=False)
    noise[flip[:10]] = 1 - noise[flip[:10]]
    assert paired_bootstrap(base, noise)["p_value"] > 0.05


def test_expected_calibration_error():
    ece, table = expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1]))
    # Bin at 0.9: acc 0.5 (gap 0.4); bin at 0.6: acc 1.0 (gap 0.4) -> ECE 0.4
    assert ece == pytest.approx(0.4)
    assert sum(table["count"]) == 4


def test_perturbations_change_text_as_specified_and_leave_labels():
    rows = [{"text": "Maria said the movie, sadly, was wonderful and long!", "label": "pos"}]
    out = {name: perturb(rows, name, "text")[0] for name in PERTURBATIONS}
    for row in out.values():
        assert row["label"] == "pos"
    text = rows[0]["text"]
    assert out["casing"]["text"] == text.upper()
    assert out["no_punctuation"]["text"] == "Maria said the movie sadly was wonderful and long"
    assert out["extra_whitespace"]["text"].split() == text.split() and out["extra_whitespace"]["text"] != text
    dropped = out["word_dropout"]["text"].split()
    assert set(dropped) <= set(text.split()) and dropped == [w for w in text.split() if w in dropped]
    swapped = out["swap_entities"]["text"]
    assert not swapped.startswith("Maria ") and swapped.split(" ", 1)[1] == text.split(" ", 1)[1]
    for seed in range(20):  # at least one of the 20 eligible words, ~15% of them
        changed = sum(a != b for a, b in zip(("abcdefgh " * 20).split(),
                                             PERTURBATIONS["typos"]("abcdefgh " * 20, random.Random(seed)).split()))
        assert changed == 3
    assert len(out["word_dropout"]["text"].split()) == len(text.split()) - 1
    assert out["typos"]["text"] != text
    for a, b in zip(text.split(), out["typos"]["text"].split()):
        assert sorted(a) == sorted(b)
    assert perturb(rows, "typos", "text") == perturb(rows, "typos", "text")  # deterministic


def test_compare_lists_exactly_the_settings_that_differ():
    a = {"name": "a", "model": "m", "train": {"learning_rate": 1e-4, "epochs": 1}, "method": {"name": "lora", "r": 8}}
    b = {"name": "b", "model": "m", "train": {"learning_rate": 3e-4, "epochs": 1}, "method": {"name": "lora", "r": 16}}
    assert differing_settings([a, b]) == {"method.r": [8, 16], "train.learning_rate": [1e-4, 3e-4]}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sentiment_rows):
    from tuneforge import api

    root = tmp_path_factory.mktemp("report")
    data = write_csv(root / "s.csv", sentiment_rows)
    out = root / "run"
    api.train({"model": "tiny-bert", "task": "classification", "data": {"train": str(data)},
               "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 1e-3, "eval_every": 3, "log_every": 1},
               "eval": {"robustness": True}}, output=str(out), quiet=True)
    return out


def test_run_metrics_have_intervals_and_paired_test(trained_run):
    test = json.loads((trained_run / "metrics.json").read_text())["test"]
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "pr_auc"):
        lo, hi = test["ci"][key]
        assert lo <= test[key] <= hi, key
    assert test["vs_baseline"]["test"] == "mcnemar_exact"
    # Every number against one recomputed from the run's own tables.
    n, cm = test["n"], np.array(test["confusion_matrix"]["matrix"])
    assert test["accuracy"] == pytest.approx(np.trace(cm) / n)
    per_class = test["per_class"]
    assert test["f1_weighted"] == pytest.approx(sum(v["f1"] * v["support"] for v in per_class.values()) / n)
    rel = test["reliability"]
    assert sum(rel["count"]) == n
    assert test["ece"] == pytest.approx(sum(c / n * abs(a - f) for c, a, f in
                                            zip(rel["count"], rel["accuracy"], rel["confidence"]) if c))
    # McNemar against the majority class, from the confusion matrix: the baseline is right on
    # the majority label's row, the model on the diagonal.
    from scipy.stats import binomtest

    baseline = json.loads((trained_run / "metrics.json").read_text())["baseline"]
    majority = test["confusion_matrix"]["labels"].index(baseline["majority_label"])
    vs = test["vs_baseline"]
    assert vs["a_only_correct"] - vs["b_only_correct"] == cm[majority].sum() - np.trace(cm)
    assert baseline["accuracy"] == pytest.approx(cm[majority].sum() / n)
    k = vs["a_only_correct"] + vs["b_only_correct"]
    assert vs["p_value"] == pytest.approx(binomtest(vs["a_only_correct"], k, 0.5).pvalue if k else 1.0)
    details = json.loads((trained_run / "evaluation.json").read_text())
    assert set(details["robustness"]) == set(PERTURBATIONS)


def test_report_opens_offline_in_headless_chromium(trained_run, tmp_path):
    page = (trained_run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the report references the network"
    assert (trained_run / "report.md").is_file()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        import os

        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (make test installs Debian's chromium)")
        pytest.skip("chromium not installed")
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         (trained_run / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', proc.stdout)
    assert loaded, proc.stderr[-1500:]
    ok, total = map(int, loaded.groups())
    assert total >= 5 and ok == total  # training, confusion, ROC, PR, reliability, robustness


def test_eval_command_on_a_run_folder(trained_run, tmp_path):
    from tuneforge.evaluate.target import evaluate_target

    out = evaluate_target(str(trained_run), split="validation", output=str(tmp_path / "ev"))
    result = json.loads((out / "eval.json").read_text())
    assert result["split"] == "validation" and result["metrics"]["n"] == 24
    # The saved model, reloaded, gives the numbers training wrote for the same rows.
    trained = json.loads((trained_run / "metrics.json").read_text())["validation"]
    for key in ("accuracy", "f1_macro", "roc_auc", "ece"):
        assert result["metrics"][key] == pytest.approx(trained[key], abs=1e-6), key
    # The baseline is the training split's majority label, scored on the validation rows.
    splits = json.loads((trained_run / "manifest.json").read_text())["data"]["splits"]
    train_counts, val_counts = splits["train"]["labels"], splits["validation"]["labels"]
    majority = max(sorted(train_counts), key=train_counts.get)
    assert result["baseline"]["majority_label"] == majority
    assert result["baseline"]["accuracy"] == pytest.approx(val_counts.get(majority, 0) / 24)
    assert (out / "report.html").is_file()
    cfg = yaml.safe_load((out / "recipe.yaml").read_text())
    assert cfg["model"] == "tiny-bert"


def test_zero_shot_decoder_on_classification_data(tmp_path, sentiment_rows):
    from tuneforge.evaluate.target import evaluate_target

    data = write_csv(tmp_path / "s.csv", sentiment_rows[:12])
    out = evaluate_target("tiny-llama", data=str(data), overrides=["task=classification"],
                          output=str(tmp_path / "zs"))
    result = json.loads((out / "eval.json").read_text())
    assert result["zero_shot"]["label_words"] == {"neg": "neg", "pos": "pos"}
    assert result["metrics"]["n"] == 12
    # The accuracy of the label-word likelihoods, recomputed straight from the model.
    import torch

    from tuneforge.inference import zero_shot_probs
    from tuneforge.models import load_causal_lm

    model, tok, _ = load_causal_lm("tiny-llama")
    probs = zero_shot_probs(model, tok, [r["text"] for r in sentiment_rows[:12]], ["neg", "pos"],
                            result["zero_shot"]["instruction"], 4, torch.device("cpu"))
    truth = np.array([r["label"] == "pos" for r in sentiment_rows[:12]])
    assert result["metrics"]["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == truth)))
    numeric = write_csv(tmp_path / "n.csv", [{"text": r["text"], "label": int(r["label"] == "pos")}
                                             for r in sentiment_rows[:6]])
    with pytest.raises(ValueError, match="eval.label_words"):
        evaluate_target("tiny-llama", data=str(numeric), overrides=["task=classification"],
                        output=str(tmp_path / "zs2"))
    out = evaluate_target("tiny-llama", data=str(numeric), output=str(tmp_path / "zs3"),
                          overrides=["task=classification", 'eval.label_words={"0": bad, "1": good}'])
    assert json.loads((out / "eval.json").read_text())["zero_shot"]["label_words"] == {"0": "bad", "1": "good"}


def test_zero_shot_probs_are_normalised_label_likelihoods():
    """Checked against log-probabilities read straight off the model's logits."""
    import torch

    from tuneforge import catalog
    from tuneforge.data.render import encode_prompt
    from tuneforge.inference import zero_shot_probs
    from tuneforge.models import load_causal_lm

    model, tok, _ = load_causal_lm("tiny-llama")
    words = ["negative", "positive outcome"]  # one and two tokens: the whole word is scored
    text, instruction = "a fine film", "Classify."
    probs = zero_shot_probs(model, tok, [text], words, instruction, 4, torch.device("cpu"))
    prompt = encode_prompt(tok, [{"role": "user", "content": f"{instruction}\n\nText: {text}\n\n"
                                                            f"Answer with one of: {', '.join(words)}."}])
    logps = []
    with torch.no_grad():
        for w in words:
            cont = tok(w, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
            logps.append(sum(logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
    expected = np.exp(logps) / np.exp(logps).sum()
    assert np.allclose(probs[0], expected, atol=1e-4)
    # a decoder trains as a causal LM (sft, dpo, grpo), a classifier or a reward model
    spec = catalog.CATALOG["smollm2-135m-instruct"]
    assert spec.kinds == ("causal_lm", "classifier", "reward")
    assert spec.tasks[0] == "sft" and {"classification", "reward", "dpo", "grpo"} <= set(spec.tasks)
    assert catalog.CATALOG["minilm-l6"].tasks == ("classification", "reward")


def test_eval_of_a_run_whose_data_went_bad_names_file_and_line(trained_run, tmp_path):
    from tuneforge.data.splits import InvalidRows
    from tuneforge.evaluate.target import evaluate_target

    recipe = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    data = tmp_path / "bad.csv"
    data.write_text("text,label\ngood one,pos\n,neg\n")
    recipe["data"]["train"] = str(data)
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(InvalidRows, match=r"bad.csv:3: empty text"):
        evaluate_target(str(run), output=str(tmp_path / "ev"))

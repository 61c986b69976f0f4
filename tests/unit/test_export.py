"""Issue 6 (export part): a self-contained folder that plain transformers loads,
checked against base + adapter before it is written."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneforge import api
from tuneforge.export import ExportError, export_run, verify_export

from conftest import write_csv


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, sentiment_rows):
    from tuneforge.datagen import iso_dates

    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("export")
    runs = {}
    for task, model, data in (("sft", "tiny-llama", write_jsonl(root / "d.jsonl", iso_dates(60, seed=2))),
                              ("classification", "tiny-bert", write_csv(root / "s.csv", sentiment_rows))):
        out = root / task
        api.train({"model": model, "task": task, "data": {"train": str(data)},
                   "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                   "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
                   "eval": {"max_new_tokens": 4, "max_generate": 2}}, output=str(out), quiet=True)
        runs[task] = out
    return runs


def _base_plus_adapter(run, cls, exported):
    """The run's base model with its adapter, through peft directly (not tuneforge)."""
    from peft import PeftModel

    from tuneforge import catalog

    kwargs = {}
    if exported.config.num_labels and cls.__name__.endswith("SequenceClassification"):
        kwargs = {"num_labels": exported.config.num_labels, "id2label": exported.config.id2label,
                  "label2id": exported.config.label2id}
    base = cls.from_pretrained(catalog.resolve("tiny-llama" if "CausalLM" in cls.__name__ else "tiny-bert"), **kwargs)
    return PeftModel.from_pretrained(base, run / "model" / "adapter").eval()


def _test_inputs(run, tok, task):
    """The first three test rows, as export's check encodes them."""
    from tuneforge.data.prepare import prepare_splits
    from tuneforge.data.render import encode_prompt
    from tuneforge.recipe import load_recipe

    rows = prepare_splits(load_recipe(run / "recipe.yaml")).test[:3]
    if task == "sft":
        return [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    return tok([r["text"] for r in rows], truncation=True, max_length=128)["input_ids"]


@pytest.mark.parametrize("task", ["sft", "classification"])
def test_export_loads_with_plain_transformers_and_matches_the_run(lora_runs, tmp_path, task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    run, dest = lora_runs[task], tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "export", str(run), "--to", str(dest)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in dest.iterdir() if not p.name.startswith(".")}  # .complete: the atomic-write marker
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "manifest.json"} <= names
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["lineage"]["base_model"] == ("tiny-llama" if task == "sft" else "tiny-bert")
    check = manifest["lineage"]["equivalence_check"]
    assert {k: v for k, v in check.items() if k != "max_abs_logit_diff"} == {
        "samples": 3, "inputs": "test split: 3 rows", "greedy_tokens_equal": True, "reference": "base + adapter",
        "atol": 1e-4, "model_kind": "causal_lm" if task == "sft" else "classifier"}
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert verify_export(dest) is None
    card = (dest / "README.md").read_text()
    assert "## Evaluation" in card and "## Limits" in card and "## Intended use" in card
    cls = AutoModelForCausalLM if task == "sft" else AutoModelForSequenceClassification
    exported = cls.from_pretrained(dest).eval()
    reference = _base_plus_adapter(run, cls, exported)
    tok = AutoTokenizer.from_pretrained(dest)
    if task == "sft":
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # The reported difference is the one measured here, independently, in float64 on the same inputs.
    exported64, reference64 = cls.from_pretrained(dest).double().eval(), _base_plus_adapter(run, cls, exported).double()
    with torch.no_grad():
        worst = max(float((exported64(torch.tensor([ids])).logits - reference64(torch.tensor([ids])).logits)
                          .abs().max()) for ids in _test_inputs(run, tok, task))
    assert check["max_abs_logit_diff"] == pytest.approx(worst, abs=1e-12)
    x = tok(["Convert to YYYY-MM-DD: 1 June 1999"], return_tensors="pt")
    with torch.no_grad():
        got = exported(**x).logits
        torch.testing.assert_close(got, reference(**x).logits, atol=1e-5, rtol=1e-5)
        with reference.disable_adapter():  # and the adapter matters: the base alone is far off
            assert float((got - reference(**x).logits).abs().max()) > 1e-3
    (dest / "README.md").write_text("edited")
    assert "README.md changed" in verify_export(dest)
    (dest / ".cache" / "huggingface").mkdir(parents=True)  # as `hf download --local-dir` leaves
    (dest / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    assert "README.md changed" in verify_export(dest)  # hidden paths are not the model's
    (dest / "fairness_postprocess.json").write_text("{}")
    assert verify_export(dest) == "fairness_postprocess.json was added after export (not in manifest.json)"


def test_export_refuses_weights_that_do_not_match_base_plus_adapter(lora_runs, tmp_path):
    run = lora_runs["classification"]
    weights = run / "model" / "model.safetensors"
    state = load_file(str(weights))
    backup = {k: v.clone() for k, v in state.items()}
    # A damaged merge of the trained head. (The tiny random encoder below it barely
    # reacts to its own weights, so damage there would be a weak probe.)
    key = "classifier.weight"
    state[key] = state[key] + 0.01 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, str(weights))
    try:
        with pytest.raises(ExportError, match="do not reproduce"):
            export_run(run, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    finally:
        save_file(backup, str(weights))


def test_eval_accepts_an_exported_folder_and_base_plus_adapter(lora_runs, tmp_path, sentiment_rows):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.datagen import iso_dates
    from tuneforge.evaluate.target import evaluate_target

    from conftest import write_jsonl

    export_run(lora_runs["classification"], tmp_path / "cls")
    rows = sentiment_rows[:20]
    data = write_csv(tmp_path / "s.csv", rows)
    out = evaluate_target(str(tmp_path / "cls"), data=str(data), output=str(tmp_path / "ev1"))
    result = json.loads((out / "eval.json").read_text())
    # The accuracy is the exported model's own, computed here with plain transformers.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "cls")
    with torch.no_grad():
        predicted = [model.config.id2label[int(model(**tok([r["text"]], return_tensors="pt")).logits.argmax())]
                     for r in rows]
    assert result["metrics"]["n"] == 20
    assert result["metrics"]["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(predicted, rows)) / 20)
    low, high = result["metrics"]["ci"]["accuracy"]
    assert low <= result["metrics"]["accuracy"] <= high

    dates = write_jsonl(tmp_path / "d.jsonl", iso_dates(6, seed=9))
    out = evaluate_target("tiny-llama", data=str(dates), adapter=str(lora_runs["sft"] / "model" / "adapter"),
                          output=str(tmp_path / "ev2"))
    result = json.loads((out / "eval.json").read_text())
    # base + adapter generates what the run's merged model generates, and its baseline is the base alone
    merged = json.loads((evaluate_target(str(lora_runs["sft"] / "model"), data=str(dates),
                                         output=str(tmp_path / "ev3")) / "eval.json").read_text())
    alone = json.loads((evaluate_target("tiny-llama", data=str(dates), output=str(tmp_path / "ev4"))
                        / "eval.json").read_text())
    assert result["predictions"] == merged["predictions"] and len(result["predictions"]) == 6
    assert result["baseline"]["exact_match"] == alone["metrics"]["exact_match"]
    assert result["baseline"]["rouge_l"] == pytest.approx(alone["metrics"]["rouge_l"])
    assert "p_value" in json.dumps(result["metrics"]["vs_baseline"])

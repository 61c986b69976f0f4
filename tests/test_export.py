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
    assert manifest["lineage"]["equivalence_check"]["max_abs_logit_diff"] <= 1e-4
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert verify_export(dest) is None
    card = (dest / "README.md").read_text()
    assert "## Evaluation" in card and "## Limits" in card and "## Intended use" in card
    cls = AutoModelForCausalLM if task == "sft" else AutoModelForSequenceClassification
    exported, original = cls.from_pretrained(dest), cls.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(dest)
    if task == "sft":
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
    x = tok(["Convert to YYYY-MM-DD: 1 June 1999"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**x).logits, original(**x).logits)
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
    from tuneforge.datagen import iso_dates
    from tuneforge.evaluate.target import evaluate_target

    from conftest import write_jsonl

    export_run(lora_runs["classification"], tmp_path / "cls")
    data = write_csv(tmp_path / "s.csv", sentiment_rows[:20])
    out = evaluate_target(str(tmp_path / "cls"), data=str(data), output=str(tmp_path / "ev1"))
    result = json.loads((out / "eval.json").read_text())
    assert result["metrics"]["n"] == 20 and "ci" in result["metrics"]

    dates = write_jsonl(tmp_path / "d.jsonl", iso_dates(6, seed=9))
    out = evaluate_target("tiny-llama", data=str(dates), adapter=str(lora_runs["sft"] / "model" / "adapter"),
                          output=str(tmp_path / "ev2"))
    result = json.loads((out / "eval.json").read_text())
    assert result["baseline"] is not None  # base + adapter is compared with the base alone
    assert "vs_baseline" in result["metrics"] and len(result["samples"]) == 6

"""Issue "Trust" (export part): for full and freeze runs the export check compares
what export wrote, reloaded from disk, with an independent reference (the base
model plus the final checkpoint's tensors), not with a byte copy of itself; and
it says when its inputs are the fixed fallback strings rather than the test split."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tuneforge import api
from tuneforge.export import ExportError, check_equivalence, export_run, verify_export

from conftest import write_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sentiment_rows):
    root = tmp_path_factory.mktemp("export-check")
    data = write_csv(root / "s.csv", sentiment_rows)
    out = {}
    for method in ("full", "freeze"):
        spec = {"name": method, "trainable_layers": 1} if method == "freeze" else {"name": method}
        api.train({"model": "tiny-bert", "task": "classification", "data": {"train": str(data)}, "method": spec,
                   "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2}}, output=str(root / method),
                  quiet=True)
        out[method] = root / method
    from tuneforge.datagen import iso_dates

    from conftest import write_jsonl

    dates = write_jsonl(root / "d.jsonl", iso_dates(60, seed=2))
    api.train({"model": "tiny-llama", "task": "sft", "data": {"train": str(dates)}, "method": {"name": "full"},
               "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
               "eval": {"max_new_tokens": 4, "max_generate": 2}}, output=str(root / "sft-full"), quiet=True)
    out["sft-full"] = root / "sft-full"
    return out


KEYS = {"full": "classifier.weight", "freeze": "classifier.weight", "sft-full": "model.norm.weight"}
BASES = {"full": "tiny-bert", "freeze": "tiny-bert", "sft-full": "tiny-llama"}


def _perturb(path, key="classifier.weight"):
    """Add noise to one tensor of a safetensors file; returns the original tensors."""
    state = load_file(str(path))
    backup = {k: v.clone() for k, v in state.items()}
    state[key] = state[key] + 0.01 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, str(path))
    return backup


@pytest.mark.parametrize("method", ["full", "freeze", "sft-full"])
def test_export_refuses_a_damaged_run_model(runs, tmp_path, method):
    """Before: the reference was run/model itself, so damage there always 'matched'."""
    weights = runs[method] / "model" / "model.safetensors"
    backup = _perturb(weights, KEYS[method])
    try:
        with pytest.raises(
            ExportError, match=rf"do not reproduce the run's model \({BASES[method]} \+ checkpoints/best"
        ):
            export_run(runs[method], tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    finally:
        save_file(backup, str(weights))


@pytest.mark.parametrize("method", ["full", "freeze", "sft-full"])
def test_export_matches_the_final_checkpoint_exactly(runs, tmp_path, method):
    result = export_run(runs[method], tmp_path / "ok")
    eq = result["equivalence"]
    # run/model was saved from exactly these tensors: no difference at all in float64
    assert eq["reference"] == f"{BASES[method]} + checkpoints/best/trainable.safetensors"
    assert eq["max_abs_logit_diff"] == 0.0 and eq["samples"] == 3 and eq["inputs"] == "test split: 3 rows"
    assert eq["greedy_tokens_equal"] is True
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["lineage"]["equivalence_check"] == eq
    # One tensor of the exported folder perturbed: verify_export and the check itself refuse it.
    _perturb(tmp_path / "ok" / "model.safetensors", KEYS[method])
    assert verify_export(tmp_path / "ok") == "model.safetensors changed since export (sha256 differs)"
    recipe = manifest["lineage"]["recipe"]
    with pytest.raises(ExportError, match="do not reproduce"):
        check_equivalence(runs[method], recipe, tmp_path / "ok")


def test_export_without_checkpoints_says_so(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ExportError, match="no checkpoint"):
        export_run(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fallback_inputs_are_reported(runs, tmp_path, capsys):
    """The run's data is gone: the check runs on the fixed strings and says so,
    on the terminal and in the manifest."""
    run = tmp_path / "run"
    shutil.copytree(runs["freeze"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["train"] = str(tmp_path / "moved.csv")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = export_run(run, tmp_path / "x")
    inputs = result["equivalence"]["inputs"]
    assert inputs.startswith("fallback: 3 fixed strings (no test split: the run's data does not read: data.train")
    assert "moved.csv" in inputs
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["lineage"]["equivalence_check"]["inputs"] == inputs
    assert "warning: the export check runs on 3 fixed strings" in capsys.readouterr().out
    assert inputs in (tmp_path / "x" / "README.md").read_text()

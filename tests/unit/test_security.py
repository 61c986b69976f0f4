"""Issue "Trust": weights are safetensors only. A model or adapter folder that
holds only pickle weights (pytorch_model.bin, adapter_model.bin) is refused by
the one loader in models.py before anything is unpickled, with a message that
says how to convert, and every command (train, eval, export, serve, audit)
reports it in one line, without a traceback.

The pickles here are real payloads: unpickling one writes a marker file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_csv


class Payload:
    """Unpickling runs exec(), which writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def write_pickle(path: Path, marker: Path) -> Path:
    torch.save(Payload(marker), str(path))
    return path


def test_the_payload_would_run_code_when_unpickled(tmp_path):
    """The probe is meaningful: the pickle calls builtins.exec on the marker-writing
    code when loaded (read from its opcodes, without unpickling it here)."""
    import io
    import pickletools

    marker = tmp_path / "ran"
    listing = io.StringIO()
    pickletools.dis(pickle.dumps(Payload(marker)), out=listing)
    ops = listing.getvalue()
    assert "'builtins'" in ops and "'exec'" in ops and "REDUCE" in ops and str(marker) in ops
    assert not marker.exists()


def _pickle_only(src: Path, dest: Path, weights: str, marker: Path) -> Path:
    """`src` without its safetensors, with a pickle payload named `weights` instead."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors", ".*"))
    write_pickle(dest / weights, marker)
    return dest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A causal LM, a classifier and a LoRA adapter folder, each with pickle weights only."""
    from peft import LoraConfig, get_peft_model

    from tuneforge import catalog
    from tuneforge.models import load_causal_lm, load_classifier

    root = tmp_path_factory.mktemp("pickles")
    marker = root / "UNPICKLED"
    lm = _pickle_only(Path(catalog.resolve("tiny-llama")), root / "lm", "pytorch_model.bin", marker)
    model, tokenizer, _ = load_classifier("tiny-bert", ["neg", "pos"])
    model.save_pretrained(root / "cls-src")
    tokenizer.save_pretrained(root / "cls-src")
    cls = _pickle_only(root / "cls-src", root / "cls", "pytorch_model.bin", marker)
    base, _, _ = load_causal_lm("tiny-llama")
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear"))
    peft_model.save_pretrained(root / "adapter-src")
    adapter = _pickle_only(root / "adapter-src", root / "adapter", "adapter_model.bin", marker)
    return {"lm": lm, "cls": cls, "adapter": adapter, "marker": marker, "root": root}


def _refusal(text: str, folder: Path, weights: str) -> None:
    assert "Traceback" not in text
    assert f"{folder}: {weights} is a pickle" in text and "safetensors" in text
    assert "save_file" in text  # the conversion recipe is in the message


# ------------------------------------------------------------- the loaders


def test_the_model_loader_refuses_a_pickle_only_folder(folders):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import PickleWeightsRefused, load_causal_lm, load_pretrained

    with pytest.raises(PickleWeightsRefused) as info:
        load_pretrained(AutoModelForCausalLM, str(folders["lm"]))
    _refusal(str(info.value), folders["lm"], "pytorch_model.bin")
    with pytest.raises(PickleWeightsRefused):
        load_causal_lm(str(folders["lm"]))  # what training loads
    assert not folders["marker"].exists()


def test_the_adapter_loader_refuses_a_pickle_only_folder(folders):
    from tuneforge.models import PickleWeightsRefused, load_adapter, load_causal_lm

    base, _, _ = load_causal_lm("tiny-llama")
    with pytest.raises(PickleWeightsRefused) as info:
        load_adapter(base, str(folders["adapter"]))
    _refusal(str(info.value), folders["adapter"], "adapter_model.bin")
    assert not folders["marker"].exists()
    merged = load_adapter(base, str(folders["root"] / "adapter-src"), merge=True)  # safetensors: loads
    assert type(merged).__name__ == "LlamaForCausalLM"


def test_the_adapter_loader_says_what_is_missing(tmp_path):
    from tuneforge.models import load_adapter

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(torch.nn.Linear(2, 2), str(tmp_path / "empty"))


def test_a_config_naming_pickle_weights_is_refused(tmp_path):
    """transformers reads the file named by config.json's transformers_weights before use_safetensors."""
    from transformers import AutoModelForCausalLM

    from tuneforge import catalog
    from tuneforge.models import PickleWeightsRefused, load_pretrained

    folder = tmp_path / "m"
    shutil.copytree(catalog.resolve("tiny-llama"), folder)
    write_pickle(folder / "adapter_model.bin", tmp_path / "ran")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(PickleWeightsRefused, match="adapter_model.bin"):
        load_pretrained(AutoModelForCausalLM, str(folder))
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------- one CLI call each


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    result = CliRunner().invoke(app, args)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return result


def test_train_refuses_a_pickle_only_base_model(folders, dates_jsonl, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(folders["lm"]), "task": "sft", "data": {"train": str(dates_jsonl)},
                                      "method": {"name": "full"}, "train": {"max_steps": 1}}))
    result = _cli(["train", str(recipe), "--output", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1, result.output
    _refusal(result.stderr, folders["lm"], "pytorch_model.bin")
    assert not folders["marker"].exists()


def test_eval_refuses_a_pickle_only_model_and_adapter(folders, dates_jsonl, tmp_path):
    result = _cli(["eval", str(folders["lm"]), "--data", str(dates_jsonl), "-o", str(tmp_path / "e1")])
    assert result.exit_code == 1, result.output
    _refusal(result.stderr, folders["lm"], "pytorch_model.bin")
    result = _cli(["eval", "tiny-llama", "--adapter", str(folders["adapter"]), "--data", str(dates_jsonl),
                   "-o", str(tmp_path / "e2"), "eval.max_generate=1", "eval.max_new_tokens=2"])
    assert result.exit_code == 1, result.output
    _refusal(result.stderr, folders["adapter"], "adapter_model.bin")
    assert not folders["marker"].exists()


def _fake_run(folder: Path, model_dir: Path, adapter: Path | None = None) -> Path:
    """A finished run's layout around `model_dir` (as a lora run when `adapter`)."""
    shutil.copytree(model_dir, folder / "model")
    if adapter is not None:
        shutil.copytree(adapter, folder / "model" / "adapter")
    recipe = {"model": "tiny-llama", "task": "sft", "data": {"train": "gone.jsonl"},
              "method": {"name": "lora" if adapter else "full"}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "manifest.json").write_text("{}")
    return folder


def test_export_refuses_a_pickle_only_model_and_adapter(folders, tmp_path):
    from tuneforge import catalog

    run = _fake_run(tmp_path / "full", folders["lm"])
    result = _cli(["export", str(run), "--to", str(tmp_path / "x1")])
    assert result.exit_code == 1, result.output
    _refusal(result.stderr, run / "model", "pytorch_model.bin")  # checked in run/model, before copying
    run = _fake_run(tmp_path / "lora", Path(catalog.resolve("tiny-llama")), folders["adapter"])
    result = _cli(["export", str(run), "--to", str(tmp_path / "x2")])
    assert result.exit_code == 1, result.output
    _refusal(result.stderr, run / "model" / "adapter", "adapter_model.bin")
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()
    assert not folders["marker"].exists()


def _serve(args: list[str]) -> subprocess.CompletedProcess:
    # A subprocess with a timeout: should the refusal fail, a server would start and block.
    env = {**os.environ, "TUNEFORGE_API_KEYS": "k"}
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", "serve", *args, "--port", "0"],
                          capture_output=True, text=True, timeout=120, env=env)


def test_serve_refuses_a_pickle_only_model_and_adapter(folders):
    proc = _serve([str(folders["lm"])])
    assert proc.returncode == 1, proc.stderr
    _refusal(proc.stderr, folders["lm"], "pytorch_model.bin")
    proc = _serve(["tiny-llama", "--adapter", f"a={folders['adapter']}"])
    assert proc.returncode == 1, proc.stderr
    _refusal(proc.stderr, folders["adapter"], "adapter_model.bin")
    assert not folders["marker"].exists()


def test_audit_refuses_a_pickle_only_classifier(folders, sentiment_rows, tmp_path):
    rows = [{**r, "gender": "f" if i % 2 else "m"} for i, r in enumerate(sentiment_rows[:40])]
    data = write_csv(tmp_path / "g.csv", rows)
    result = _cli(["audit", str(folders["cls"]), "--data", str(data), "--group", "gender", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1, result.output
    _refusal(result.stderr, folders["cls"], "pytorch_model.bin")
    assert not folders["marker"].exists()


def test_hub_ids_still_ask_for_safetensors(monkeypatch):
    """A hub id is not a local folder: it goes to transformers with use_safetensors=True
    and trust_remote_code=False (no network here: the call itself is recorded)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_pretrained

    seen = {}

    def fake(path, *args, **kwargs):
        seen.update(kwargs, path=path)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    load_pretrained(AutoModelForCausalLM, "org/model")
    assert seen == {"path": "org/model", "use_safetensors": True, "trust_remote_code": False}


def test_no_from_pretrained_outside_the_loader():
    """Every weight load goes through models.py (GGUF de-quantisation in catalog.py
    reads no pickle and is the one exception; tokenizers and configs load no weights)."""
    src = Path(__file__).resolve().parents[1] / "src" / "tuneforge"
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "models.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ".from_pretrained(" in code and not any(w in code for w in ("gguf_file", "Tokenizer", "Config")):
                offenders.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
            if ".load_adapter(" in code:  # peft's own, which falls back to torch.load
                offenders.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
    assert offenders == []


def test_a_hub_repository_without_safetensors_gets_the_same_refusal(monkeypatch):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import PickleWeightsRefused, load_pretrained

    def fake(path, *args, **kwargs):  # transformers' words for a hub repo with only .bin weights
        raise OSError(f"{path} does not appear to have a file named model.safetensors or "
                      "model.safetensors.index.json and thus cannot be loaded with `safetensors`. "
                      "Please do not set `use_safetensors=True`.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(PickleWeightsRefused, match="org/model: the hub repository has no safetensors weights"):
        load_pretrained(AutoModelForCausalLM, "org/model")

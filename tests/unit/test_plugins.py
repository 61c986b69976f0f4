"""Issue 13: objectives and methods are plug-ins. A new objective is one trainer
plus one table entry, registered here from inside the test module and run
through train, eval, export and serve with no other edit to tuneforge."""

import json
from pathlib import Path

import pytest
import torch

from tuneforge import api, catalog, objectives
from tuneforge.kinds import CLASSIFIER
from tuneforge.recipe import RecipeError, load_recipe
from tuneforge.trainers import shared
from tuneforge.trainers.classification import fit_classifier

from conftest import write_csv

BUCKETS = ["short", "medium", "long"]
WORDS = "the a cat dog sat ran far near big small red blue".split()
KEY = "user-key-0123456789abcdef"


def bucket(text: str) -> str:
    n = len(text.split())
    return "short" if n <= 3 else "medium" if n <= 7 else "long"


def bucket_rows(rows: list[dict]) -> list[dict]:
    return [{"text": r["text"], "label": bucket(r["text"])} for r in rows]


def train_length_bucket(recipe, output=None, resume=False, device=None, quiet=False) -> dict:
    """The toy objective's whole trainer: raw text in, a classifier of its length bucket out."""
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    splits.train, splits.validation, splits.test = (bucket_rows(rows)
                                                    for rows in (splits.train, splits.validation, splits.test))
    splits.labels = BUCKETS
    return fit_classifier(recipe, run, dev, splits, resume=resume, quiet=quiet)


@pytest.fixture
def length_bucket():
    objective = objectives.register(objectives.Objective(
        "length_bucket", train_length_bucket, CLASSIFIER, ("text",), "accuracy",
        "predict the length bucket of a text", to_rows=bucket_rows))
    yield objective
    objectives.OBJECTIVES.pop("length_bucket")


def _texts(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(1, 12, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
        rows.append({"text": " ".join(words) + f" {i}"})
    return rows


def test_unknown_task_is_refused_with_the_known_ones(tmp_path):
    data = write_csv(tmp_path / "t.csv", _texts(10))
    with pytest.raises(RecipeError) as err:
        load_recipe({"model": "tiny-bert", "task": "length_bucket", "data": {"train": str(data)}})
    problem = dict(err.value.problems)["task"]
    assert "unknown task 'length_bucket'" in problem and "classification, sft" in problem


def test_a_toy_objective_runs_through_train_eval_export_and_serve(tmp_path, length_bucket):
    from fastapi.testclient import TestClient

    from tuneforge.evaluate.target import evaluate_target
    from tuneforge.export import export_run
    from tuneforge.models import load_pretrained, load_tokenizer
    from tuneforge.serve.app import Settings, create_app

    data = write_csv(tmp_path / "texts.csv", _texts(240))
    recipe = {"name": "toy", "model": "tiny-bert", "task": "length_bucket", "method": {"name": "full"},
              "data": {"train": str(data)},
              "train": {"max_steps": 30, "batch_size": 16, "learning_rate": 3e-3, "max_length": 32}}
    metrics = api.train(recipe, output=str(tmp_path / "run"), quiet=True)
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model_kind"] == "classifier" and manifest["status"] == "completed"
    config = json.loads((run / "model" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == BUCKETS
    test = metrics["test"]
    assert metrics["baseline"]["majority_label"] in BUCKETS and 0 <= test["accuracy"] <= 1

    # eval re-scores the saved model on the run's own test split, labelled by the objective
    out = evaluate_target(str(run), output=str(tmp_path / "eval"))
    again = json.loads((out / "metrics.json").read_text())["test"]
    assert again["accuracy"] == pytest.approx(test["accuracy"], abs=1e-9)
    assert (out / "report.html").is_file()

    exported = tmp_path / "export"
    result = export_run(run, exported)
    assert result["equivalence"]["model_kind"] == "classifier" and result["equivalence"]["inputs"].startswith("test")

    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(AutoModelForSequenceClassification, str(exported)).eval()
    tokenizer = load_tokenizer(str(exported))
    texts = ["cat", "the big red dog sat far near the small blue cat 5"]
    with torch.no_grad():
        expected = [BUCKETS[int(i)] for i in model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
                    .argmax(-1)]
    app = create_app(str(exported), api_keys=[KEY], settings=Settings(device="cpu"), name="toy")
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {KEY}"}
        answer = client.post("/v1/classify", json={"model": "toy", "input": texts}, headers=headers)
        assert answer.status_code == 200, answer.text
        assert [d["label"] for d in answer.json()["data"]] == expected
        wrong = client.post("/v1/chat/completions", headers=headers,
                            json={"model": "toy", "messages": [{"role": "user", "content": "hi"}]})
        assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]
        listed = client.get("/v1/models", headers=headers).json()["data"]
        assert listed[0]["kind"] == "classifier"


# ------------------------------------------------------------------ methods


@pytest.fixture
def data_for(sentiment_csv, dates_jsonl):
    return {"classification": sentiment_csv, "sft": dates_jsonl}


def _adapter_run(tmp_path, task: str, method: dict, data) -> tuple:
    model = "tiny-bert" if task == "classification" else "tiny-llama"
    recipe = {"name": method["name"], "model": model, "task": task, "method": method, "data": {"train": str(data)},
              "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "max_length": 128, "warmup": 0},
              "eval": {"max_new_tokens": 4, "max_generate": 4}}
    metrics = api.train(recipe, output=str(tmp_path / f"{task}-{method['name']}"), quiet=True)
    return tmp_path / f"{task}-{method['name']}", metrics


@pytest.mark.parametrize("task", ["classification", "sft"])
@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_dora_and_ia3_train_merge_and_export(tmp_path, data_for, task, name):
    from safetensors.torch import load_file

    from tuneforge.export import export_run

    run, _ = _adapter_run(tmp_path, task, {"name": name}, data_for[task])
    config = json.loads((run / "model" / "adapter" / "adapter_config.json").read_text())
    if name == "dora":
        assert config["peft_type"] == "LORA" and config["use_dora"] is True
        moved = [k for k in load_file(str(run / "model" / "adapter" / "adapter_model.safetensors"))
                 if "lora_magnitude_vector" in k]
        assert moved, "DoRA trains a magnitude vector per adapted layer"
    else:
        assert config["peft_type"] == "IA3" and config["target_modules"]
    # the merged model/ reproduces base + adapter (export's own check), and the model moved off the base
    result = export_run(run, tmp_path / "export")
    assert result["equivalence"]["max_abs_logit_diff"] <= 1e-4
    base = load_file(str(Path(catalog.resolve("tiny-bert" if task == "classification" else "tiny-llama"))
                         / "model.safetensors"))
    merged = load_file(str(run / "model" / "model.safetensors"))
    # the classifier's encoder weights sit under bert. in the fine-tuned model
    renamed = {k.removeprefix("bert.") if task == "classification" else k: v for k, v in merged.items()}
    assert len(set(base) & set(renamed)) > 10
    changed = [k for k in base if k in renamed and not torch.equal(base[k], renamed[k])]
    assert changed, f"{name} left every base weight as it was"


LOHA = '''
"""LoHa (low-rank Hadamard product) via peft: a method added from outside tuneforge."""
from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.kinds import CAUSAL_LM, CLASSIFIER
from tuneforge.methods import lora
from tuneforge.section import MethodSection

NAME = "loha"
ADAPTER = True
MODEL_KINDS = (CLASSIFIER, CAUSAL_LM)
DEFAULT_LEARNING_RATES = {CLASSIFIER: 1e-3, CAUSAL_LM: 1e-3}
WEIGHT_BYTES = 4.0


class Config(MethodSection):
    name: Literal["loha"] = Field(NAME, description="loha: low-rank Hadamard adapters (peft).")
    r: int = Field(4, ge=1, le=256, description="LoHa rank.")


def prepare(model, cfg, kind):
    from peft import LoHaConfig, get_peft_model

    return get_peft_model(model, LoHaConfig(task_type=kind.peft_task_type, r=cfg.r, alpha=cfg.r,
                                            target_modules=["query", "value"]))


def save(model, tokenizer, folder: Path):
    return lora.save(model, tokenizer, folder)


def trainable_parameters(model, cfg, kind) -> int:
    return 1000
'''


@pytest.fixture
def loha(tmp_path):
    import importlib.util

    from tuneforge import recipe as recipe_module
    from tuneforge.methods import METHODS

    path = tmp_path / "loha_method.py"
    path.write_text(LOHA)
    spec = importlib.util.spec_from_file_location("loha_method", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe_module.register_method(module)
    yield module
    METHODS.pop("loha")
    recipe_module.rebuild_method_union()


def test_a_new_method_is_one_module_and_one_entry(tmp_path, data_for, loha):
    data = data_for["classification"]
    with pytest.raises(RecipeError) as err:  # its own keys only, with the hint the table gives
        load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": str(data)},
                     "method": {"name": "loha", "r": 4, "alpha": 8}})
    assert dict(err.value.problems)["method.alpha"].startswith("method loha takes no 'alpha'. It is a key of lora")
    run, metrics = _adapter_run(tmp_path, "classification", {"name": "loha", "r": 2}, data)
    config = json.loads((run / "model" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["r"] == 2
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed" and metrics["test"]
    from tuneforge.export import export_run

    assert export_run(run, tmp_path / "export")["equivalence"]["max_abs_logit_diff"] <= 1e-4


def test_a_method_key_of_another_method_is_refused_with_a_hint(tmp_path, data_for):
    base = {"model": "tiny-bert", "task": "classification", "data": {"train": str(data_for["classification"])}}
    with pytest.raises(RecipeError) as err:
        load_recipe({**base, "method": {"name": "full", "r": 64}})
    assert dict(err.value.problems) == {
        "method.r": "method full takes no 'r'. It is a key of lora, dora, qlora: set method.name to one of them, "
                    "or remove it."}
    with pytest.raises(RecipeError) as err:
        load_recipe({**base, "method": {"name": "qlora"}})
    assert "qlora trains a causal_lm" in dict(err.value.problems)["method"]
    with pytest.raises(RecipeError) as err:
        load_recipe({**base, "method": {"name": "lora_"}})
    assert "Did you mean 'lora'?" in dict(err.value.problems)["method.name"]
    assert load_recipe({**base, "method": {"r": 4}}).method.name == "lora"  # lora when no name is given


def test_switching_method_by_override_leaves_out_the_old_methods_keys(tmp_path, data_for, capsys):
    base = {"model": "tiny-bert", "task": "classification", "data": {"train": str(data_for["classification"])},
            "method": {"name": "lora", "r": 16, "alpha": 32}}
    recipe = load_recipe(base, ["method.name=full"])
    assert recipe.method.name == "full" and recipe.learning_rate == 5e-5
    assert "method.name=full: the recipe's method.r, method.alpha (not full settings) are left out" in \
        capsys.readouterr().err
    with pytest.raises(RecipeError) as err:  # asked for on the command line: still refused
        load_recipe(base, ["method.name=full", "method.r=4"])
    assert list(dict(err.value.problems)) == ["method.r"]
    assert load_recipe(base, ["method.name=dora"]).method.r == 16  # dora takes lora's keys

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from tuneforge.recipe import RecipeError, load_recipe, parse_overrides

from conftest import ROOT


def test_shipped_recipes_validate():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        recipe = load_recipe(path, check_files=False)
        assert recipe.name == path.stem
        # Recipes on the shared data sets point at files that exist.
        if "shared" in recipe.data.train:
            assert Path(recipe.data.train).is_file(), recipe.data.train


@pytest.mark.parametrize("kind", ["classification", "sft"])
def test_init_templates_validate(kind, tmp_path, sentiment_csv, dates_jsonl):
    text = resources.files("tuneforge.templates").joinpath(f"{kind}.yaml").read_text()
    data = sentiment_csv if kind == "classification" else dates_jsonl
    recipe = load_recipe(yaml.safe_load(text), [f"data.train={data}"])
    assert recipe.task == kind and recipe.data.train == str(data)
    if kind == "classification":
        assert (recipe.name, recipe.model, recipe.method.name) == ("my-classifier", "minilm-l6", "full")
        assert (recipe.train.epochs, recipe.train.batch_size, recipe.train.max_length) == (3, 32, 128)
        assert recipe.train.early_stopping_patience == 2 and recipe.metric_for_best == "f1_macro"
    else:
        assert (recipe.name, recipe.model, recipe.method.name) == ("my-assistant", "smollm2-135m-instruct", "lora")
        assert (recipe.method.r, recipe.method.alpha, recipe.train.max_length) == (16, 32.0, 512)
        assert recipe.eval.max_generate == 200 and recipe.metric_for_best == "loss"
    # The starters leave the rate to the method, so switching method.name keeps one that learns.
    assert recipe.train.learning_rate is None
    rates = {m: load_recipe(yaml.safe_load(text), [f"data.train={data}", f"method.name={m}"]).learning_rate
             for m in ("full", "lora")}
    assert rates == ({"full": 5e-5, "lora": 5e-4} if kind == "classification" else {"full": 5e-5, "lora": 2e-4})


def test_all_errors_reported_at_once_with_paths_and_hints(sentiment_csv):
    raw = {
        "model": "minilm", "task": "classification",
        "data": {"train": str(sentiment_csv), "on_invalid": "maybe", "txt_column": "x"},
        "trian": {"epochs": 1},
        "train": {"optimizer": "adam", "epochs": -1},
    }
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    problems = dict(err.value.problems)
    assert "Did you mean 'minilm-l6'?" in problems["model"]
    assert "Did you mean 'train'?" in problems["trian"]
    assert "Did you mean 'text_column'?" in problems["data.txt_column"]
    assert "'adamw'" in problems["train.optimizer"]
    assert "train.epochs" in problems and "data.on_invalid" in problems
    assert len(problems) == 6


def test_missing_data_file_and_task_mismatch(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe({"model": "minilm-l6", "task": "sft", "data": {"train": str(tmp_path / "nope.csv")}})
    text = err.value.render()
    assert "data file not found" in text and "does not suit task 'sft'" in text


def test_overrides_are_typed_and_dotted(sentiment_csv):
    assert parse_overrides(["train.epochs=2", "method.name=lora", "train.max_steps=null"]) == [
        ("train.epochs", 2), ("method.name", "lora"), ("train.max_steps", None)]
    recipe = load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": str(sentiment_csv)}},
                         ["train.learning_rate=3e-4", "method.name=lora", "method.target_modules=[query,value]"])
    assert recipe.learning_rate == 3e-4 and recipe.method.target_modules == ["query", "value"]
    with pytest.raises(RecipeError):
        parse_overrides(["train.epochs"])


def test_relative_paths_resolve_against_recipe_folder(tmp_path, sentiment_rows):
    from conftest import write_csv

    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "t.csv", sentiment_rows)
    (tmp_path / "r.yaml").write_text("model: tiny-bert\ntask: classification\ndata:\n  train: data/t.csv\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.train == str((tmp_path / "data" / "t.csv").resolve())


def test_cli_validate_exits_2_with_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm\ntask: sft\ndata: {train: missing.jsonl}\nmethod: {name: dorra}\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Did you mean 'smollm2-135m-instruct'?" in proc.stderr
    assert "data.train" in proc.stderr and "method.name: unknown method 'dorra'. Did you mean 'dora'?" in proc.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from tuneforge.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "models" in proc.stdout


def test_models_lists_catalogue():
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "models"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("minilm-l6", "smollm2-135m-instruct", "encoder", "decoder", "22.7M"):
        assert name in proc.stdout

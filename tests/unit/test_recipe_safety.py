"""Recipes that cannot hurt: hostile YAML, values that cannot work, run names
that escape the output root. Each is refused with one clear line, in bounded time."""

import subprocess
import sys

import pytest
import torch

from tuneforge import preflight, safeyaml
from tuneforge.recipe import RecipeError, dump_recipe, load_recipe, parse_overrides

HEAD = "model: tiny-bert\ntask: classification\ndata: {{train: {data}}}\n"

LAUGHS = (
    "eval:\n  scorers:\n    - name: lol\n      json_schema:\n"
    "        a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"        {chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
)


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _problems(path) -> dict:
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return dict(err.value.problems)


@pytest.mark.parametrize("body, line, words", [
    (LAUGHS, 8, "anchor '&a' refused"),
    ("eval: &x {scorers: [*x]}\n", 4, "anchor '&x' refused"),
    ("train: {epochs: 1}\ntrain: {epochs: 2}\n", 5, "duplicate key 'train' (first at line 4)"),
    ("eval:\n  baseline: true\n  baseline: false\n", 6, "duplicate key 'baseline'"),
    ("eval: " + "[" * 5000 + "]" * 5000 + "\n", 4, "nested deeper than 64 levels"),
])
def test_hostile_yaml_is_refused_with_file_and_line(tmp_path, sentiment_csv, body, line, words):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD.format(data=sentiment_csv) + body)
    problems = _problems(path)
    assert list(problems) == [f"{path}:{line}"], problems
    assert words in problems[f"{path}:{line}"]


def test_binary_garbage_is_refused_as_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: tiny-bert\n\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert _problems(path) == {f"{path}:2": "not UTF-8 text (byte 0x89); save the file as UTF-8."}


def test_control_characters_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny-bert\ntask: \x07\n")
    assert _problems(path) == {f"{path}:2": "character U+0007 is not allowed in YAML text."}


def test_override_values_go_through_the_safe_loader():
    with pytest.raises(RecipeError) as err:
        parse_overrides(["eval.label_words={a: 1, a: 2}"])
    assert "duplicate key 'a'" in err.value.render()
    with pytest.raises(RecipeError) as err:
        parse_overrides(["eval.scorers=[&a {name: x}, *a]"])
    assert "anchor '&a' refused" in err.value.render()


def test_cli_validate_refuses_billion_laughs_fast(tmp_path, sentiment_csv):
    path = tmp_path / "laughs.yaml"
    path.write_text(HEAD.format(data=sentiment_csv) + LAUGHS)
    proc = _cli("validate", path, timeout=30)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}:8: anchor '&a' refused" in proc.stderr


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00\x01garbage", b"x: " + b"[" * 20000, b"a: &a [*a]\n"])
def test_cli_validate_never_shows_a_traceback(tmp_path, raw):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    proc = _cli("validate", path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(path) in proc.stderr


def test_a_schema_built_in_python_is_bounded_too(sentiment_csv):
    shared = ["lol"] * 10
    for _ in range(9):  # 10**9 leaves, sharing each level: the billion laughs without YAML
        shared = [shared] * 10
    raw = {"model": "tiny-bert", "task": "sft", "data": {"train": str(sentiment_csv)},
           "eval": {"scorers": [{"name": "x", "json_schema": {"a": shared}}]}}
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert "more than 10,000 keys and values" in dict(err.value.problems)["eval.scorers.0.json_schema"]


def test_dump_recipe_reads_back_through_the_safe_loader(sentiment_csv):
    recipe = load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": str(sentiment_csv)}})
    # equal default lists must not come out as anchors and aliases
    assert safeyaml.load(dump_recipe(recipe))["fairness"]["lexicons"] == ["gender"]
    assert "&" not in dump_recipe(recipe)


@pytest.mark.parametrize("override, key, words", [
    ("train.learning_rate=.inf", "train.learning_rate", "finite number"),
    ("train.learning_rate=.nan", "train.learning_rate", "finite number"),
    ("train.weight_decay=-.inf", "train.weight_decay", "finite number"),
    ("fairness.penalty_weight=.nan", "fairness.penalty_weight", "finite number"),
    ("train.epochs=1e400", "train.epochs", "finite number"),
    ("method.r=1000000000", "method.r", "less than or equal to 4096"),
    ("train.max_steps=1000000000000000000000000000000", "train.max_steps", "less than or equal to 100000000"),
    ("train.max_length=100000000", "train.max_length", "less than or equal to 1048576"),
    ("train.batch_size=10000000", "train.batch_size", "less than or equal to 65536"),
    ("train.seed=-1", "train.seed", "greater than or equal to 0"),
])
def test_values_that_cannot_work_are_refused(sentiment_csv, override, key, words):
    with pytest.raises(RecipeError) as err:
        load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": str(sentiment_csv)}},
                    [override])
    problems = dict(err.value.problems)
    assert list(problems) == [key] and words in problems[key], problems


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "a\\b", "..", ".hidden", "x\0y", " "])
def test_run_name_is_one_path_component(sentiment_csv, name):
    with pytest.raises(RecipeError) as err:
        load_recipe({"name": name, "model": "tiny-bert", "task": "classification",
                     "data": {"train": str(sentiment_csv)}})
    assert "must be one folder name" in dict(err.value.problems)["name"]


def test_good_run_names_and_file_stems(tmp_path, sentiment_csv):
    raw = {"model": "tiny-bert", "task": "classification", "data": {"train": str(sentiment_csv)}}
    assert load_recipe({**raw, "name": "sst2..v2 (lora)"}).name == "sst2..v2 (lora)"
    path = tmp_path / ".hidden.yaml"
    path.write_text(HEAD.format(data=sentiment_csv))
    assert load_recipe(path).name == "hidden"


def _tiny(**train):
    return load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": "x.csv"},
                        "train": train}, check_files=False)


def test_preflight_refuses_length_beyond_position_embeddings():
    with pytest.raises(preflight.PreflightError, match="train.max_length 4096 is beyond the 512 position "
                       "embeddings of 'tiny-bert'; set train.max_length to 512 or less"):
        preflight.check(_tiny(max_length=4096), torch.device("cpu"))


def test_preflight_names_the_key_to_lower():
    # minilm-l6 in full fine-tuning: 22.7M parameters, 16 bytes each with AdamW and gradients
    recipe = load_recipe({"model": "minilm-l6", "task": "classification", "data": {"train": "x.csv"},
                          "method": {"name": "full"}, "train": {"batch_size": 1, "max_length": 8}},
                         check_files=False)
    est = preflight.check(recipe, torch.device("cpu"), available=1 << 40)
    assert est.trainable_params == est.total_params and 22_000_000 < est.total_params < 23_500_000
    assert est.trainable_state == 12 * est.total_params
    with pytest.raises(preflight.PreflightError, match="use method.name: lora"):
        preflight.check(recipe, torch.device("cpu"), available=300 << 20)
    lora = load_recipe({"model": "minilm-l6", "task": "classification", "data": {"train": "x.csv"},
                        "method": {"name": "lora", "r": 4096}}, check_files=False)
    with pytest.raises(preflight.PreflightError, match="lower method.r"):
        preflight.check(lora, torch.device("cpu"), available=2 << 30)


def test_preflight_refuses_activations_beyond_this_machine():
    # 65,536 x 512 tokens through 6 layers of 384 units: terabytes, whatever the machine
    recipe = load_recipe({"model": "minilm-l6", "task": "classification", "data": {"train": "x.csv"},
                          "train": {"batch_size": 65536, "max_length": 512}}, check_files=False)
    with pytest.raises(preflight.PreflightError, match="lower train.batch_size"):
        preflight.check(recipe, torch.device("cpu"))


def test_lora_parameter_count_matches_peft():
    from tuneforge.methods import lora
    from tuneforge.models import load_classifier

    recipe = _tiny()
    model, _, _ = load_classifier("tiny-bert", ["a", "b"])
    model = lora.prepare(model, recipe.method, recipe.model_kind)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = preflight.estimate_memory(recipe, preflight.read_config("tiny-bert"))
    assert est.trainable_params == real


def test_cli_train_turns_preflight_into_one_line(tmp_path, sentiment_csv):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD.format(data=sentiment_csv) + "train: {max_length: 100000}\n")
    proc = _cli("train", path, "--output", tmp_path / "run", "--quiet", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.max_length 100000 is beyond the 512 position embeddings" in proc.stderr
    assert not (tmp_path / "run").exists()

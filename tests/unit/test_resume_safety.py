"""Resumes that refuse changed inputs, damaged checkpoints that fall back, and
run folders without leftovers. Every refusal is one line from the CLI."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """
model: tiny-bert
task: classification
data: {{train: {data}}}
method: {{name: full}}
train: {{max_steps: 4, batch_size: 8, checkpoint_every: 2, eval_every: 2, keep_checkpoints: 3, max_length: 16,
         learning_rate: 0.001, log_every: 1}}
eval: {{bootstrap: false}}
"""


def _train(recipe: Path, out: Path, *extra: str, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(recipe), "--output", str(out),
                           "--quiet", *extra], capture_output=True, text=True, timeout=timeout)


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for folder in (run, run / "checkpoints") if folder.is_dir()
                  for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sentiment_rows):
    from conftest import write_csv

    root = tmp_path_factory.mktemp("resume")
    data = write_csv(root / "sentiment.csv", sentiment_rows)
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.format(data=data))
    done = _train(recipe, root / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    return recipe, data, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    recipe, data, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return recipe, data, copy


def test_a_finished_run_leaves_no_tmp_or_old_folders(finished):
    _, _, run = finished
    assert _leftovers(run) == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-0000002", "step-0000004"]


@pytest.mark.parametrize("overrides, shown", [
    (["model=tiny-llama"], "model: 'tiny-bert' -> 'tiny-llama'"),
    (["eval.validation_generate=3"], "eval.validation_generate: 0 -> 3"),
    (["train.seed=1", "train.log_every=3"], "train.seed: 42 -> 1)"),  # log_every may change, seed may not
    (["method.name=lora"], "method.name: 'full' -> 'lora'"),
])
def test_resume_with_another_recipe_is_refused_and_recipe_kept(run_copy, overrides, shown):
    from tuneforge.recipe import load_recipe
    from tuneforge.run import ResumeRefused, Run

    recipe, _, run = run_copy
    before = [(run / name).read_text() for name in ("recipe.yaml", "manifest.json")]
    with pytest.raises(ResumeRefused) as err:
        Run(run, load_recipe(recipe, overrides), resume=True)
    assert "cannot resume with a different recipe" in str(err.value) and shown in str(err.value)
    assert [(run / name).read_text() for name in ("recipe.yaml", "manifest.json")] == before


def test_cli_resume_with_another_learning_rate_is_one_line(run_copy):
    recipe, _, run = run_copy
    before = (run / "recipe.yaml").read_text()
    proc = _train(recipe, run, "train.learning_rate=0.01", "--resume", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot resume with a different recipe (train.learning_rate: 0.001 -> 0.01)" in proc.stderr
    assert "start a new run" in proc.stderr
    assert (run / "recipe.yaml").read_text() == before


def test_resume_with_changed_data_is_refused(run_copy):
    from tuneforge.recipe import load_recipe
    from tuneforge.run import ResumeRefused, Run

    recipe, data, run = run_copy
    original = data.read_bytes()
    try:  # the same path, other content: the manifest's sha256 says so
        data.write_bytes(original + b"an added row,pos\n")
        with pytest.raises(ResumeRefused, match=f"the train data {data} changed since the run started"):
            Run(run, load_recipe(recipe), resume=True)
    finally:
        data.write_bytes(original)


def test_allowed_changes_are_recorded_not_written_over_recipe(run_copy):
    from tuneforge.recipe import load_recipe
    from tuneforge.run import Run

    recipe, _, run = run_copy
    before = (run / "recipe.yaml").read_text()
    Run(run, load_recipe(recipe, ["train.log_every=5", "eval.bootstrap=true"]), resume=True)
    changes = json.loads((run / "manifest.json").read_text())["resume_changes"][-1]["changes"]
    assert changes == {"eval.bootstrap": [False, True], "train.log_every": [1, 5]}
    assert (run / "recipe.yaml").read_text() == before


def test_damaged_checkpoint_falls_back_to_the_previous_one(run_copy):
    recipe, _, run = run_copy
    damaged = run / "checkpoints" / "step-0000004" / "trainable.safetensors"
    damaged.write_bytes(pickle.dumps({"not": "safetensors"}))
    (run / "checkpoints" / ".tmp-step-0000006-abc").mkdir()  # a kill while writing
    (run / "checkpoints" / ".old-step-0000004-123").mkdir()  # a kill while replacing
    (run / ".tmp-model-xyz").mkdir()
    proc = _train(recipe, run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = "".join(proc.stdout.split())  # the console wraps long paths
    assert "".join(f"skipped {damaged}: damaged checkpoint file".split()) in out, proc.stdout
    assert "resumedfromstep-0000002(thenewestcompletecheckpointthatreadsbackwhole)" in out, proc.stdout
    assert _leftovers(run) == []
    # step 4 was trained again and written whole
    from safetensors.torch import load_file

    assert load_file(str(damaged))


def test_every_checkpoint_damaged_is_one_clear_error(run_copy):
    recipe, _, run = run_copy
    for step in ("step-0000002", "step-0000004"):
        (run / "checkpoints" / step / "optimizer.safetensors").write_bytes(b"\x80\x04garbage")
    proc = _train(recipe, run, "--resume")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "every checkpoint of this run is damaged" in proc.stderr
    assert "step-0000004/optimizer.safetensors" in proc.stderr and "Start a new run" in proc.stderr


def test_finish_removes_leftovers(tmp_path, sentiment_csv):
    from tuneforge.recipe import load_recipe
    from tuneforge.run import Run

    run = Run(tmp_path / "r", load_recipe({"model": "tiny-bert", "task": "classification",
                                           "data": {"train": str(sentiment_csv)}}))
    (run.checkpoints / ".old-best-1").mkdir()
    (run.path / ".tmp-model-2").mkdir()
    keep = run.checkpoints / "step-0000001"
    keep.mkdir()
    run.finish()
    assert _leftovers(run.path) == [] and keep.is_dir()

"""A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tuneforge.training.checkpoint import latest_checkpoint, prune_checkpoints

from conftest import kill_when

RECIPE = """
model: tiny-llama
task: sft
data: {{train: {data}}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
train: {{max_steps: 60, batch_size: 4, learning_rate: 0.005, checkpoint_every: 5, eval_every: 20,
         log_every: 1, dropout: 0.1, seed: 3}}
eval: {{max_new_tokens: 4, max_generate: 4}}
"""


def _cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", "train", str(recipe), "--output", str(out), "--quiet", *extra]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, dates_jsonl):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=dates_jsonl))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(recipe, straight), check=True, capture_output=True)

    proc = subprocess.Popen(_cmd(recipe, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, killed / "checkpoints" / "step-0000010" / ".complete")
    assert not (killed / "metrics.json").exists()
    last = latest_checkpoint(killed / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) < 60

    # A half-written checkpoint (no marker) must never be resumed from.
    fake = killed / "checkpoints" / "step-0000059"
    fake.mkdir()
    (fake / "state.json").write_text("{}")
    assert latest_checkpoint(killed / "checkpoints") == last

    resumed = subprocess.run(_cmd(recipe, killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {last.name}" in resumed.stdout

    a = load_file(str(straight / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "model" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The log has each step once, as an uninterrupted run's does.
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]
    assert len(steps) == 60


def test_prune_keeps_newest_complete_checkpoints(tmp_path):
    from tuneforge.fsio import atomic_dir

    for step in (5, 10, 15):
        with atomic_dir(tmp_path / f"step-{step:07d}") as tmp:
            (tmp / "x").write_text("1")
    (tmp_path / "step-0000020").mkdir()  # killed while writing: no marker
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000010", "step-0000015"]

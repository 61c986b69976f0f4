"""Data-parallel training on 2 CPU processes (gloo): same losses as 1 process with
the same global batch, checkpoints written once, and kill + resume works."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

RECIPE = """
model: tiny-llama
task: sft
data: {{train: {data}}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: {steps}, batch_size: 8, learning_rate: 0.005, log_every: 1, checkpoint_every: {every}, seed: 5,
         eval_every: 1000}}
eval: {{max_new_tokens: 4, max_generate: 4, bootstrap: false}}
"""


def _train(recipe, out, *extra, popen=False):
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", str(recipe), "--output", str(out), "--quiet", *extra]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]


def _adapter(run):
    return load_file(str(run / "model" / "adapter" / "adapter_model.safetensors"))


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, dates_jsonl):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=dates_jsonl, steps=6, every=2))
    _train(recipe, tmp_path / "one")
    _train(recipe, tmp_path / "two", "--nproc", "2")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6  # each step logged once, by rank 0
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4 * abs(a)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2
    names = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert names == ["best", "step-0000004", "step-0000006"]  # written once, pruned to keep_checkpoints=2


def test_two_process_run_killed_and_resumed_matches_uninterrupted(tmp_path, dates_jsonl):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=dates_jsonl, steps=40, every=4))
    _train(recipe, tmp_path / "straight", "--nproc", "2")
    killed = tmp_path / "killed"
    proc = _train(recipe, killed, "--nproc", "2", popen=True)
    marker = killed / "checkpoints" / "step-0000008" / ".complete"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = _train(recipe, killed, "--nproc", "2", "--resume")
    assert "resumed from step-" in resumed.stdout
    a, b = _adapter(tmp_path / "straight"), _adapter(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(_losses(killed)) == 40

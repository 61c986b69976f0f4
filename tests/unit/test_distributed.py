"""Multi-process training on 2 CPU processes (gloo), both strategies (ddp, fsdp):
same losses as 1 process with the same global batch, checkpoints written once,
and kill + resume works."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

RECIPE = """
model: tiny-llama
task: sft
data: {{train: {data}}}
method: {method}
train: {{max_steps: {steps}, batch_size: 8, learning_rate: 0.005, log_every: 1, checkpoint_every: {every}, seed: 5,
         eval_every: 1000, distributed: {{strategy: {strategy}{extra}}}}}
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


def _recipe(tmp_path, data, steps, every, method="lora", strategy="ddp", zero_stage=None):
    extra = ""
    if zero_stage:  # strategy deepspeed, with a DeepSpeed JSON passed through
        config = tmp_path / f"ds{zero_stage}.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}}))
        strategy, extra = "deepspeed", f", deepspeed_config: {config}"
    recipe = tmp_path / f"{method}-{strategy}{zero_stage or ''}.yaml"
    section = "{name: lora, r: 4, alpha: 8, dropout: 0.0}" if method == "lora" else f"{{name: {method}}}"
    recipe.write_text(RECIPE.format(data=data, steps=steps, every=every, method=section, strategy=strategy,
                                    extra=extra))
    return recipe


def _same_losses(one, two, steps):
    assert len(one) == len(two) == steps  # each step logged once, by rank 0
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-5 * abs(a)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, dates_jsonl):
    _train(_recipe(tmp_path, dates_jsonl, 6, 2), tmp_path / "one")
    for strategy in ("ddp", "fsdp"):
        two = tmp_path / strategy
        _train(_recipe(tmp_path, dates_jsonl, 6, 2, strategy=strategy), two, "--nproc", "2")
        _same_losses(_losses(tmp_path / "one"), _losses(two), 6)
        a, b = _adapter(tmp_path / "one"), _adapter(two)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
        assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
        names = sorted(p.name for p in (two / "checkpoints").iterdir())
        assert names == ["best", "step-0000004", "step-0000006"]  # written once, pruned to keep_checkpoints=2


def test_fsdp_shards_the_model_and_full_fine_tuning_matches_one_process(tmp_path, dates_jsonl):
    """Full fine-tuning moves the embeddings and tied head, which fsdp keeps in its
    root unit: the gathered final weights equal one process's."""
    _train(_recipe(tmp_path, dates_jsonl, 4, 2, method="full"), tmp_path / "one")
    result = _train(_recipe(tmp_path, dates_jsonl, 4, 2, method="full", strategy="fsdp"), tmp_path / "fsdp",
                    "--nproc", "2")
    assert "processes: 2" in result.stdout
    _same_losses(_losses(tmp_path / "one"), _losses(tmp_path / "fsdp"), 4)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    ckpt = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    assert ckpt["model.embed_tokens.weight"].shape == a["model.embed_tokens.weight"].shape  # whole, not a shard


def test_fsdp_classification_matches_one_process(tmp_path):
    rows = "text,label\n" + "".join(
        f"{'good fine great' if i % 2 else 'bad poor awful'} {i},{'pos' if i % 2 else 'neg'}\n" for i in range(90))
    (tmp_path / "cls.csv").write_text(rows)
    recipe = tmp_path / "cls.yaml"
    recipe.write_text(f"model: tiny-bert\ntask: classification\ndata: {{train: {tmp_path / 'cls.csv'}}}\n"
                      "method: {name: full}\ntrain: {max_steps: 3, batch_size: 7, learning_rate: 0.001, dropout: 0.0, "
                      "log_every: 1, eval_every: 1000, distributed: {strategy: fsdp}}\neval: {bootstrap: false}\n")
    _train(recipe, tmp_path / "one")
    _train(recipe, tmp_path / "two", "--nproc", "2")  # batch 7 over 2 ranks: uneven shards
    _same_losses(_losses(tmp_path / "one"), _losses(tmp_path / "two"), 3)
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text())["test"]["accuracy"] for r in ("one", "two")]
    assert metrics[0] == metrics[1]


def _kill_at_step_8_and_resume(recipe, run) -> None:
    """Start a 2-process run, SIGKILL it (torchrun and both ranks) once step 8's
    checkpoint is complete, then resume it to the end."""
    proc = _train(recipe, run, "--nproc", "2", popen=True)
    marker = run / "checkpoints" / "step-0000008" / ".complete"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = _train(recipe, run, "--nproc", "2", "--resume")
    assert "resumed from step-" in resumed.stdout


def test_two_process_run_killed_and_resumed_matches_uninterrupted(tmp_path, dates_jsonl):
    recipe = _recipe(tmp_path, dates_jsonl, 40, 4)
    _train(recipe, tmp_path / "straight", "--nproc", "2")
    killed = tmp_path / "killed"
    _kill_at_step_8_and_resume(recipe, killed)
    a, b = _adapter(tmp_path / "straight"), _adapter(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(_losses(killed)) == 40


def test_fsdp_run_killed_and_resumed_matches_uninterrupted(tmp_path, dates_jsonl):
    """fsdp checkpoints hold whole tensors (the one-process format) and are sharded
    again on load: kill at step 8, resume, and land where one process does."""
    _train(_recipe(tmp_path, dates_jsonl, 16, 4), tmp_path / "straight")
    recipe = _recipe(tmp_path, dates_jsonl, 16, 4, strategy="fsdp")
    killed = tmp_path / "killed"
    _kill_at_step_8_and_resume(recipe, killed)
    _same_losses(_losses(tmp_path / "straight"), _losses(killed), 16)
    a, b = _adapter(tmp_path / "straight"), _adapter(killed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed not installed (pip install 'tuneforge[deepspeed]')")


@needs_deepspeed
def test_deepspeed_zero_2_and_3_match_one_process(tmp_path, dates_jsonl):
    """A DeepSpeed JSON passed through (ZeRO-2: gradients and optimizer state
    partitioned; ZeRO-3: weights too) trains exactly as one process does, LoRA and
    full fine-tuning (tied embeddings) alike; checkpoints hold whole weights."""
    for method in ("lora", "full"):
        one = tmp_path / f"one-{method}"
        _train(_recipe(tmp_path, dates_jsonl, 4, 2, method=method), one)
        for stage in ((2, 3) if method == "lora" else (3,)):
            run = tmp_path / f"zero{stage}-{method}"
            _train(_recipe(tmp_path, dates_jsonl, 4, 2, method=method, zero_stage=stage), run, "--nproc", "2")
            _same_losses(_losses(one), _losses(run), 4)
            name = "adapter/adapter_model.safetensors" if method == "lora" else "model.safetensors"
            a, b = load_file(str(one / "model" / name)), load_file(str(run / "model" / name))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
            weights = load_file(str(run / "checkpoints" / "step-0000004" / "trainable.safetensors"))
            assert all(t.numel() > 0 for t in weights.values())  # gathered, not ZeRO-3's empty partitions
            moments = load_file(str(run / "checkpoints" / "step-0000004" / "optimizer.safetensors"))
            assert {k.split(".")[0] for k in moments} == {"rank0", "rank1"}  # each rank's partition


@needs_deepspeed
def test_deepspeed_zero3_run_killed_and_resumed_matches_uninterrupted(tmp_path, dates_jsonl):
    _train(_recipe(tmp_path, dates_jsonl, 16, 4), tmp_path / "straight")
    recipe = _recipe(tmp_path, dates_jsonl, 16, 4, zero_stage=3)
    _kill_at_step_8_and_resume(recipe, tmp_path / "killed")
    _same_losses(_losses(tmp_path / "straight"), _losses(tmp_path / "killed"), 16)
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "killed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_deepspeed_config_passes_zero_settings_and_refuses_what_the_recipe_decides(tmp_path):
    from tuneforge.recipe import TrainConfig
    from tuneforge.training.distributed import deepspeed_config

    cfg = TrainConfig(max_grad_norm=0.5)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                                "bf16": {"enabled": False}}))
    config = deepspeed_config(str(good), cfg)
    assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert config["gradient_clipping"] == 0.5 and config["managed_gradient_accumulation"] is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"},
                               "fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match=r"optimizer \(set by train.optimizer.*fp16"):
        deepspeed_config(str(bad), cfg)
    bad.write_text(json.dumps({"bf16": True, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="bf16"):
        deepspeed_config(str(bad), cfg)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ValueError, match="stage is 0; use 1, 2 or 3"):
        deepspeed_config(str(bad), cfg)

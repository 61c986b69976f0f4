"""Issue 14 (grpo): online RL on sampled groups, on tiny-llama."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tuneforge import api
from tuneforge.recipe import load_recipe
from tuneforge.trainers import grpo

from conftest import kill_when

RECIPE = """
model: tiny-llama
task: grpo
data: {{train: {data}}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.0}}
alignment: {{group_size: 3, max_completion_tokens: 6, rewards: [format]}}
train: {{max_steps: 8, batch_size: 2, learning_rate: 0.01, checkpoint_every: 2, eval_every: 4, log_every: 1,
         seed: 5, max_length: 96}}
eval: {{max_new_tokens: 6, max_generate: 4, validation_generate: 2}}
"""


def _recipe(data, **alignment):
    return load_recipe({"model": "tiny-llama", "task": "grpo", "data": {"train": str(data)},
                        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        "alignment": {"group_size": 4, "max_completion_tokens": 5, **alignment},
                        "train": {"seed": 3, "max_length": 96}})


def _model(recipe):
    from tuneforge.models import load_causal_lm
    from tuneforge.trainers import shared

    torch.manual_seed(0)
    model, tokenizer, _ = load_causal_lm("tiny-llama")
    return shared.apply_method(model, recipe, quiet=True), tokenizer


def test_sampling_is_seeded_per_epoch_prompt_and_sample(dates_jsonl):
    recipe = _recipe(dates_jsonl)
    model, tok = _model(recipe)
    prompts = [tok("hello there")["input_ids"], tok("a date")["input_ids"]]
    cpu = torch.device("cpu")
    a = grpo.sample_groups(model, tok, prompts, [(0, 0), (0, 1)], recipe, 96, cpu)
    b = grpo.sample_groups(model, tok, prompts[1:], [(0, 1)], recipe, 96, cpu)
    c = grpo.sample_groups(model, tok, prompts, [(1, 0), (1, 1)], recipe, 96, cpu)
    assert len(a) == 8 and a[4:] == b  # a prompt's group does not depend on its batch mates
    assert len({tuple(x) for x in a[:4]}) > 1, "temperature 1 sampled the same completion four times"
    assert a != c  # another epoch samples afresh


def test_a_rewarded_completion_gains_probability(dates_jsonl):
    """One group, the first completion rewarded: GRPO steps raise its log-prob and lower the others'."""
    recipe = _recipe(dates_jsonl, group_size=4)
    model, tok = _model(recipe)
    cpu = torch.device("cpu")
    prompt = [tok("convert 5 May 2001")["input_ids"]]
    completions = grpo.sample_groups(model, tok, prompt, [(0, 0)], recipe, 96, cpu)
    assert len({tuple(c) for c in completions}) == 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def logps():
        with torch.no_grad():
            lp, mask = grpo.completion_logps(model, prompt * 4, completions, tok.pad_token_id, cpu)
        return (lp * mask).sum(-1)

    before = logps()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        grpo.grpo_step_loss(model, tok, prompt, completions, rewards, recipe, cpu).backward()
        optimizer.step()
    after = logps()
    assert after[0] > before[0] and (after[1:] < before[1:]).all()
    # all rewards equal: every advantage is 0, the loss is exactly 0
    flat = grpo.grpo_step_loss(model, tok, prompt, completions, torch.ones(4), recipe, cpu)
    assert float(flat) == 0.0


def test_rewards_are_checked_and_scored(dates_jsonl):
    assert grpo.exact_match_reward(" 2001-05-05 ", "2001-05-05") == 1.0
    assert grpo.exact_match_reward("2001-05-06", "2001-05-05") == 0.0
    assert 0.8 < grpo.format_reward("2001-05-06", "2001-05-05") < 1.0
    with pytest.raises(ValueError, match="unknown reward 'exactmatch'"):
        grpo.build_rewards(_recipe(dates_jsonl, rewards=["exactmatch"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="recipe.reward_model is not set"):
        grpo.build_rewards(_recipe(dates_jsonl, rewards=["reward_model"]), torch.device("cpu"))
    full = load_recipe({"model": "tiny-llama", "task": "grpo", "data": {"train": str(dates_jsonl)},
                        "method": {"name": "full"}, "alignment": {"kl_coefficient": 0.1}})
    with pytest.raises(ValueError, match="kl_coefficient > 0 needs the reference model"):
        grpo.check_recipe(full)


def test_grpo_trains_reports_and_resumes_bit_identical(tmp_path, dates_jsonl):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=dates_jsonl))
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", str(recipe), "--quiet", "--output"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + [str(straight)], check=True, capture_output=True)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert {"mean_reward", "exact_match"} <= set(metrics["test"]) and "mean_reward" in metrics["baseline"]
    assert "mean_reward" in metrics["validation"] and (straight / "report.html").is_file()

    proc = subprocess.Popen(cmd + [str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, killed / "checkpoints" / "step-0000004" / ".complete")
    resumed = subprocess.run(cmd + [str(killed), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(straight / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "model" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_with_a_kl_penalty_runs(tmp_path, dates_jsonl):
    metrics = api.train({"model": "tiny-llama", "task": "grpo", "data": {"train": str(dates_jsonl)},
                         "method": {"name": "lora", "r": 4},
                         "alignment": {"group_size": 2, "max_completion_tokens": 4, "kl_coefficient": 0.1,
                                       "grpo_loss_type": "grpo"},
                         "train": {"max_steps": 2, "batch_size": 2, "max_length": 96},
                         "eval": {"max_new_tokens": 4, "max_generate": 2, "validation_generate": 2}},
                        output=str(tmp_path / "kl"), quiet=True)
    assert metrics["test"]["mean_reward"] >= 0

"""The dpo objective end to end on tiny-llama: the step-0 identities, the stored reference log-probs, a preference
set with a known answer, every loss type, SIGKILL + resume, and the policy judging helpers."""

from __future__ import annotations

import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tuneforge import api
from tuneforge.evaluate import policy
from tuneforge.evaluate.verdict import BETTER, NO_BETTER
from tuneforge.trainers import dpo

from conftest import write_jsonl

LN2 = math.log(2)
GOOD = ["great", "lovely", "superb", "wonderful", "fine"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor"]
NOUNS = ["film", "plot", "cast", "score", "ending", "script"]


def toy_rows(n: int, seed: int = 0, swap: bool = False) -> list[dict]:
    """Preference pairs whose right answer is known: chosen names the review's sentiment, rejected the other."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        text = f"the {rng.choice(NOUNS)} was {rng.choice(GOOD if positive else BAD)} number {i + 1000 * seed}"
        right, wrong = ("positive", "negative") if positive else ("negative", "positive")
        if swap:
            right, wrong = wrong, right
        rows.append({"prompt": f"Sentiment of: {text}", "chosen": right, "rejected": wrong})
    return rows


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    return {"train": write_jsonl(root / "train.jsonl", toy_rows(160)),
            "validation": write_jsonl(root / "val.jsonl", toy_rows(16, seed=1)),
            "test": write_jsonl(root / "test.jsonl", toy_rows(32, seed=2)),
            "swapped": write_jsonl(root / "swapped.jsonl", toy_rows(32, seed=2, swap=True)),
            "small": write_jsonl(root / "small.jsonl", toy_rows(16, seed=3)),
            "small_validation": write_jsonl(root / "small_val.jsonl", toy_rows(8, seed=4)),
            "small_test": write_jsonl(root / "small_test.jsonl", toy_rows(8, seed=5))}


def recipe(files: dict, size: str = "small", test: bool = True, **sections) -> dict:
    """A dpo recipe on the small toy files (a few seconds) or, size "", the larger ones; `test` False leaves the
    test split empty (no test pass)."""
    prefix = f"{size}_" if size else ""
    r = {"model": "tiny-llama", "task": "dpo",
         "data": {"train": str(files[size or "train"]), "validation": str(files[prefix + "validation"]),
                  "test": str(files[prefix + "test"]),
                  "system_prompt": "Answer."},
         "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
         "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 3e-3, "warmup": 0, "log_every": 1,
                   "max_length": 48, "seed": 5},
         "eval": {"max_new_tokens": 3, "max_generate": 4, "bootstrap": True}}
    if not test:
        r["data"]["split"] = [1.0, 0.0, 0.0]
        del r["data"]["test"]
    for key, value in sections.items():  # a method replaces the default; other sections are merged into it
        r[key] = value if key == "method" else {**r.get(key, {}), **value}
    return r


class Stop(Exception):
    pass


def step_zero(monkeypatch, tmp_path, r: dict) -> dict:
    """The trainer's own loss_sum on the first micro-batch, and its validation pass, before any step."""
    seen = {}

    def first_batch_only(model, objective, *args, **kwargs):
        model.train()
        batch = objective.plan(0)[0][0]
        loss, _ = objective.loss_sum(batch)
        seen.update(loss=loss.item() / objective.units(batch), validation=objective.evaluate(),
                    accuracy=objective.loss_sum.last.out.reward_accuracy.item())
        raise Stop

    monkeypatch.setattr(dpo, "fit", first_batch_only)
    with pytest.raises(Stop):
        api.train(r, output=str(tmp_path / f"step0-{len(list(tmp_path.iterdir()))}"), quiet=True)
    return seen


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"name": "full"}])
def test_step_zero_loss_is_ln2_and_accuracy_zero(monkeypatch, tmp_path, toy_files, method):
    r = recipe(toy_files, method=method, eval={"baseline": False})
    seen = step_zero(monkeypatch, tmp_path, r)
    assert abs(seen["loss"] - LN2) < 1e-6, seen
    assert seen["accuracy"] == 0.0  # every pair a tie: ties are not wins
    assert abs(seen["validation"]["loss"] - LN2) < 1e-6 and seen["validation"]["reward_accuracy"] == 0.0
    if method["name"] == "lora":  # broken: a reference that is not the starting model
        real = policy.pair_logps

        def shifted(*args, **kwargs):
            chosen, rejected = real(*args, **kwargs)
            return chosen + 0.5, rejected

        monkeypatch.setattr(policy, "pair_logps", shifted)
        broken = step_zero(monkeypatch, tmp_path, r)
        assert abs(broken["loss"] - LN2) > 1e-3


def test_settings_the_loss_does_not_take_are_refused(tmp_path, toy_files):
    for alignment, needle in (({"loss_type": "hinge", "label_smoothing": 0.1}, "label smoothing"),
                              ({"loss_type": "orpo", "sft_weight": 0.5}, "own NLL term")):
        with pytest.raises(ValueError, match=needle):
            api.train(recipe(toy_files, alignment=alignment), output=str(tmp_path / "refused"))
        assert not (tmp_path / "refused").exists()


def alive_models() -> int:
    """Causal LMs alive in this process (their inner decoder bodies are not counted again)."""
    from transformers import PreTrainedModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        return sum(isinstance(o, PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")
                   for o in gc.get_objects())


def check_stored_reference(run: Path, r: dict) -> None:
    """The stored reference log-probs of every split equal a recomputation with a freshly loaded base model."""
    from tuneforge.data.studio import prepare_data
    from tuneforge.models import load_causal_lm
    from tuneforge.recipe import load_recipe

    stored = policy.read_reference(run / policy.REFERENCE_FILE)
    loaded = load_recipe(r)
    splits = prepare_data(loaded, log=lambda m: None)
    model, tokenizer, _ = load_causal_lm("tiny-llama")
    for split in ("train", "validation", "test"):
        held = policy.held_out(tokenizer, getattr(splits, split), loaded, split)
        chosen, rejected = policy.pair_logps(model, held.pairs, tokenizer.pad_token_id, 4, torch.device("cpu"))
        got = policy.stored_logps(stored, policy.pairs_digest(held.pairs), "tiny-llama", split)
        assert got is not None, split
        assert torch.allclose(got[0], chosen, atol=1e-5) and torch.allclose(got[1], rejected, atol=1e-5)
        assert not torch.allclose(got[0], rejected, atol=1e-3)  # broken: the sides swapped do not match
    swapped = [type(p)(p.rejected, p.chosen, p.prompt_messages) for p in held.pairs]
    assert policy.stored_logps(stored, policy.pairs_digest(swapped)) is None  # other tokens: not these log-probs


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_each_loss_type_trains_and_logs(monkeypatch, tmp_path, toy_files, loss_type):
    """Two steps of every loss; sigmoid also: no second model while training, and the stored reference."""
    counted = []
    real_fit = dpo.fit

    def counting_fit(*args, **kwargs):
        counted.append(alive_models())
        if loss_type == "sigmoid":  # the count is sensitive: a reference model beside the policy shows
            from tuneforge.models import load_causal_lm

            extra = load_causal_lm("tiny-llama")[0]
            assert alive_models() == counted[0] + 1
            del extra
        state = real_fit(*args, **kwargs)
        counted.append(alive_models())
        return state

    monkeypatch.setattr(dpo, "fit", counting_fit)
    alignment = {"loss_type": loss_type, "sft_weight": 0.5 if loss_type == "hinge" else 0.0,
                 "beta": 2.0 if loss_type == "simpo" else 0.1}
    out, with_test = tmp_path / loss_type, loss_type in ("sigmoid", "simpo")  # the test pass twice is enough
    r = recipe(toy_files, test=with_test, alignment=alignment, train={"eval_every": 2}, eval={"baseline": False})
    metrics = api.train(r, output=str(out), quiet=True)
    assert counted == [1, 1]  # no reference model beside the policy while training
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "split" not in r]
    val = [r for r in log if r.get("split") == "validation"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert val and {"loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"} <= set(val[-1])
    assert metrics["validation"]["reward_accuracy"] == pytest.approx(val[-1]["reward_accuracy"])
    if with_test:
        test = metrics["test"]
        assert 0.0 <= test["reward_accuracy"] <= 1.0 and {"kl_to_reference", "mean_response_tokens"} <= set(test)
        assert (out / "report.html").is_file()
    reference_free = loss_type in ("simpo", "orpo")
    assert (out / policy.REFERENCE_FILE).exists() is not reference_free
    assert json.loads((out / "manifest.json").read_text())["reference"]["file"] == (
        None if reference_free else policy.REFERENCE_FILE)
    if loss_type == "sigmoid":
        check_stored_reference(out, r)


def stub_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """Rewards naming the right sentiment: the toy task's answer key."""
    return [1.0 if (("positive" in r) == any(w in p for w in GOOD)) and r.strip() else 0.0
            for p, r in zip(prompts, responses)]


def test_known_answer_moves_accuracy_and_preference(monkeypatch, tmp_path, toy_files):
    monkeypatch.setattr(policy, "load_judge", lambda recipe, device: stub_judge)
    out = tmp_path / "learn"
    r = recipe(toy_files, "", method={"name": "full"}, eval={"max_generate": 16, "max_new_tokens": 2},
               train={"max_steps": 40, "learning_rate": 5e-3, "scheduler": "constant", "eval_every": 20,
                      "metric_for_best": "reward_margin"})
    metrics = api.train(r, output=str(out), quiet=True)
    test, base = metrics["test"], metrics["baseline"]
    assert test["reward_accuracy"] >= 0.8 and test["ci"]["reward_accuracy"][0] > 0.5
    assert base["reward_accuracy"] == 0.0  # the starting model is its own reference: all ties
    # The policy's own preference for the right answer, per prompt, before vs after: a paired test.
    assert test["preference_accuracy"] > base["preference_accuracy"]
    assert test["vs_baseline"]["preference_accuracy"]["p_value"] < 0.05
    assert test["vs_baseline"]["reward_accuracy"]["p_value"] < 0.05
    assert "win_rate" in test and "win_rate" in test["ci"] and metrics["verdict"]["status"] == BETTER
    details = json.loads((out / "evaluation.json").read_text())
    assert any(p["type"] == "line" for p in details["plots"])  # validation log-prob curves
    assert details["tables"] and details["samples"]

    # Broken: the same held-out prompts with chosen and rejected swapped: the policy is now wrong on them.
    from tuneforge.evaluate.target import evaluate_target

    evaluated = evaluate_target(str(out), data=str(toy_files["swapped"]), output=str(tmp_path / "eval"),
                                overrides=["eval.max_generate=1"])
    swapped = json.loads((evaluated / "metrics.json").read_text())["test"]
    assert swapped["reward_accuracy"] <= 0.2


def test_win_rate_length_flag_and_verdict():
    prompts = [f"Sentiment of: the film was {w}" for w in GOOD + BAD]
    right = ["positive"] * 5 + ["negative"] * 5
    wrong = ["negative"] * 5 + ["positive"] * 5
    win = policy.win_rate(prompts, right, wrong, stub_judge)
    assert (win["wins"], win["losses"], win["ties"], win["win_rate"]) == (10, 0, 0, 1.0) and win["ci"][0] > 0.5
    assert policy.win_rate(prompts, right, right, stub_judge)["win_rate"] == 0.5  # against itself: all ties
    with pytest.raises(ValueError, match="scores for 10 prompts"):
        policy.win_rate(prompts, right, wrong, lambda p, r: [1.0])
    even = policy.length_check([10, 12], [10, 10])
    long = policy.length_check([25, 25], [10, 10])
    assert not even["longer"] and long["longer"] and long["ratio"] == 2.5
    good = policy.policy_verdict({"reward_accuracy": 0.9}, win, even)
    assert good["status"] == BETTER and not good["flags"]
    assert policy.policy_verdict({"reward_accuracy": 0.9}, win, long)["flags"]  # a win that is only longer
    coin = policy.win_rate(prompts, right[:5] + wrong[5:], wrong[:5] + right[5:], stub_judge)
    assert coin["win_rate"] == 0.5
    assert policy.policy_verdict({"reward_accuracy": 0.9}, coin, even)["status"] == NO_BETTER
    assert policy.policy_verdict({"reward_accuracy": 0.5}, None, None)["status"] == NO_BETTER  # ties are not wins
    kl = policy.kl_estimate(np.array([-4.0, -2.0]), np.array([-6.0, -2.0]), np.array([2, 4]))
    assert kl.tolist() == [1.0, 0.0]


RESUME_RECIPE = """
model: tiny-llama
task: dpo
data: {{train: {train}, validation: {validation}, split: [1.0, 0.0, 0.0], system_prompt: Answer.}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
train: {{max_steps: 8, batch_size: 4, learning_rate: 0.003, checkpoint_every: 4, eval_every: 4, log_every: 1,
         max_length: 48, seed: 3}}
eval: {{baseline: false, max_new_tokens: 2, max_generate: 1, bootstrap: false}}
"""

DRIVER = """
import runpy, sys
sys.path[:0] = [{unit!r}, {tests!r}]
sys.argv = ["tuneforge"] + sys.argv[1:]
runpy.run_module("tuneforge.cli", run_name="__main__")
"""


def test_sigkill_then_resume_matches_and_reads_the_reference_back(tmp_path, toy_files):
    from tuneforge.recipe import load_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(RESUME_RECIPE.format(train=toy_files["small"], validation=toy_files["small_validation"]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(unit=str(Path(__file__).parent), tests=str(Path(__file__).parents[1])))

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(driver), "train", str(recipe_file), "--output", str(out), "--quiet", *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_after_first_checkpoint() -> None:
        marker = killed / "checkpoints" / "step-0000004" / ".complete"
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    api.train(load_recipe(recipe_file), output=str(straight), quiet=True)  # meanwhile, the uninterrupted run
    killer.join()
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    reference = (killed / policy.REFERENCE_FILE).read_bytes()
    resumed = subprocess.run(cmd(killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(straight / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "model" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((killed / "manifest.json").read_text())["reference"]
    assert manifest["computed"] == [] and sorted(manifest["reused"]) == ["train", "validation"]
    assert (killed / policy.REFERENCE_FILE).read_bytes() == reference


def test_starter_template_and_shipped_recipe_validate(toy_files):
    from importlib import resources

    import yaml

    from tuneforge.recipe import load_recipe

    from conftest import ROOT

    text = resources.files("tuneforge.templates").joinpath("dpo.yaml").read_text()
    starter = load_recipe(yaml.safe_load(text), [f"data.train={toy_files['small']}"])
    assert (starter.task, starter.method.name, starter.alignment.loss_type, starter.metric_for_best) == (
        "dpo", "lora", "sigmoid", "loss")
    hh = load_recipe(ROOT / "recipes" / "dpo-hh.yaml")  # its data file is the shared HH-RLHF set
    assert hh.model == "smollm2-135m-instruct" and hh.data.train.endswith("harmless_base_test_pcr.jsonl")
    with pytest.raises(Exception, match="loss_type"):  # broken: a loss the table does not have
        load_recipe(yaml.safe_load(text), [f"data.train={toy_files['small']}", "alignment.loss_type=kto"])

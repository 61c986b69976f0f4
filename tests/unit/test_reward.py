"""Issue 14 (reward models): the `reward` objective end to end on tiny models: it learns a separable
toy preference set, its loss is alignment.losses.reward_loss, `tuneforge eval` reproduces its test
numbers, an export served on /v1/rewards scores as the in-process model does, wrong-kind routes are
refused, bad preference rows are file:line rejects, a run at chance is flagged, and SIGKILL + --resume
ends bit-identical."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tuneforge import api

from conftest import kill_when, write_jsonl

KEY, ADMIN = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"
WORDS = "apple river stone cloud green quiet music table window garden paper silver morning yellow".split()


def marker_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs told apart by one word only: the chosen response says 'wonderful' where the rejected one says
    'dreadful' (same length, so the longer-wins heuristic ties on every pair)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": f"Tell me about the {rng.choice(WORDS)} number {i}",
                     "chosen": f"{a} wonderful {b}", "rejected": f"{a} dreadful {b}"})
    return rows


def recipe(model: str, data: Path, method: dict, **train) -> dict:
    return {"model": model, "task": "reward", "data": {"train": str(data)}, "method": method,
            "train": {"max_steps": 40, "batch_size": 8, "max_length": 48, "eval_every": 1000, "log_every": 1,
                      "seed": 1, **train}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reward")
    data = write_jsonl(root / "pairs.jsonl", marker_pairs(120))
    out = {"root": root, "data": data}
    for name, model, method, lr in (("llama", "tiny-llama", {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                                     2e-2),
                                    ("bert", "tiny-bert", {"name": "full"}, 3e-3)):
        out[name] = root / name
        api.train(recipe(model, data, method, learning_rate=lr), output=str(out[name]), quiet=True)
    return out


def _losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "split" not in r]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_reward_model_learns_a_separable_preference_set(runs, name):
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    test = metrics["test"]
    assert test["pairwise_accuracy"] > 0.9 and test["ci"]["pairwise_accuracy"][0] > 0.5
    assert metrics["verdict"]["status"] == "better_than_baseline" and metrics["baseline"] == {"pairwise_accuracy": 0.5}
    losses = _losses(runs[name])
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])  # log 2 = 0.69 at the start
    # equal lengths: "the longer response wins" is a tie on every pair, and a tie is wrong
    assert test["length_baseline"]["pairwise_accuracy"] == 0.0
    details = json.loads((runs[name] / "evaluation.json").read_text())
    titles = [t["title"] for t in details["tables"]] + [p["title"] for p in details["plots"]]
    assert any("length bias" in t for t in titles) and any("margin" in t for t in titles)
    assert any("wrong" in t for t in titles)
    assert "Accuracy by response length" in (runs[name] / "report.md").read_text()


def test_encoder_inputs_start_with_cls_and_decoders_end_with_the_template(runs):
    from tuneforge.evaluate.rewards import RewardScorer

    bert, llama = RewardScorer.load(str(runs["bert"])), RewardScorer.load(str(runs["llama"]))
    ids = bert.encode("hello there", "general kenobi")
    assert ids[0] == bert.tokenizer.cls_token_id and bert.tokenizer.sep_token_id in ids
    assert len(bert.encode("x " * 500, "y")) == 48  # max_length from the run's recipe, [CLS] included
    text = llama.tokenizer.decode(llama.encode("hello there", "general kenobi"))
    assert text.rstrip().endswith("general kenobi<|im_end|>") and "<|im_start|>user\nhello there" in text


def test_trainer_loss_is_reward_loss_on_a_fixed_batch():
    from tuneforge.alignment.losses import reward_loss
    from tuneforge.evaluate.rewards import RewardScorer, load_reward_model
    from tuneforge.trainers.reward import pair_loss_sum

    torch.manual_seed(0)
    model, tokenizer, _ = load_reward_model("tiny-llama")
    model.eval()
    scorer = RewardScorer(model, tokenizer, 48)
    pairs = scorer.encode_pairs(marker_pairs(4) + [{"prompt": "a much longer prompt " * 3, "chosen": "yes",
                                                    "rejected": "no, and then some more words"}])
    margins = [0.0, 0.5, -0.25, 1.0, 0.1]
    # each side scored alone (no padding at all) against the trainer's one padded 2B-row forward
    with torch.no_grad():
        alone = [[float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in (p.chosen, p.rejected)]
                 for p in pairs]
        r_c, r_r = (torch.tensor([a[k] for a in alone]) for k in (0, 1))
        for center in (0.0, 0.05):
            got, tokens = pair_loss_sum(model, pairs, margins, center, tokenizer.pad_token_id, torch.device("cpu"))
            want = reward_loss(r_c, r_r, torch.tensor(margins), center) * len(pairs)
            assert torch.allclose(got, want, atol=1e-5), (center, got, want)
            assert tokens == sum(len(p.chosen) + len(p.rejected) for p in pairs)
        # the check is real: without the margins (or the centring term) the sum differs
        assert not torch.allclose(pair_loss_sum(model, pairs, None, 0.05, tokenizer.pad_token_id,
                                                torch.device("cpu"))[0], want, atol=1e-5)


def test_eval_of_the_run_reproduces_its_test_numbers(runs):
    from tuneforge.evaluate.target import evaluate_target

    out = evaluate_target(str(runs["llama"]), device="cpu")
    run_test = json.loads((runs["llama"] / "metrics.json").read_text())["test"]
    evaluated = json.loads((out / "metrics.json").read_text())["test"]
    assert evaluated["pairwise_accuracy"] == run_test["pairwise_accuracy"]
    assert evaluated["pairs"] == run_test["pairs"]
    a = json.loads((runs["llama"] / "evaluation.json").read_text())["scores"]
    b = json.loads((out / "evaluation.json").read_text())["scores"]
    assert np.allclose(a["chosen"], b["chosen"], atol=1e-5) and np.allclose(a["rejected"], b["rejected"], atol=1e-5)
    assert (out / "report.html").is_file()


# ------------------------------------------------------------------ serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A create_app server on a free loopback port, in a background thread."""

    def __init__(self, target: str, **settings):
        import uvicorn

        from tuneforge.serve.app import Settings, create_app

        app = create_app(target, api_keys=[KEY], admin_keys=[ADMIN], settings=Settings(device="cpu", **settings))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def post(self, path: str, body: dict, key: str = ADMIN) -> httpx.Response:
        # ADMIN: an admin key works on every route; see test_a_user_key_may_score_rewards
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(runs):
    from tuneforge.export import export_run

    export = runs["root"] / "llama-export"
    report = export_run(runs["llama"], export)
    assert report["equivalence"]["model_kind"] == "reward"
    # an export (merged weights), a LoRA run (the catalogue base + its adapter, head included), a full run
    lives = {"export": Live(str(export), max_request_tokens=400), "lora": Live(str(runs["llama"])),
             "run": Live(str(runs["bert"]))}
    yield lives
    for live in lives.values():
        live.stop()


def test_a_full_reward_run_exports_checked_against_its_checkpoint(runs):
    from tuneforge.export import export_run

    report = export_run(runs["bert"], runs["root"] / "bert-export")
    check = report["equivalence"]
    assert check["model_kind"] == "reward" and check["max_abs_logit_diff"] <= 1e-4
    assert "checkpoints" in check["reference"] and "preference rows" in check["inputs"]
    config = json.loads((runs["root"] / "bert-export" / "config.json").read_text())
    assert config["id2label"] == {"0": "reward"} and config["problem_type"] == "regression"


PROMPT = "Tell me about the river number 3"
RESPONSES = ["stone wonderful cloud", "stone dreadful cloud", ""]


def test_served_rewards_match_the_in_process_model(served, runs):
    from tuneforge.evaluate.rewards import RewardScorer

    cases = ((served["export"], runs["llama"], "llama-export"), (served["lora"], runs["llama"], "llama"),
             (served["run"], runs["bert"], "bert"))
    for live, run, model in cases:
        reply = live.post("/v1/rewards", {"model": model, "prompt": PROMPT, "responses": RESPONSES})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == model
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"reward"}
        scores = [d["score"] for d in body["data"]]
        expected = RewardScorer.load(str(run)).score(PROMPT, RESPONSES)
        assert np.allclose(scores, expected, atol=1e-4), (scores, expected)
        assert scores[0] > scores[1]  # the marker the model learnt
        pairs = live.post("/v1/rewards", {"model": model, "input": [{"prompt": PROMPT, "response": r}
                                                                    for r in RESPONSES]}).json()
        assert np.allclose([d["score"] for d in pairs["data"]], scores, atol=1e-5)


def test_eval_of_an_export_on_a_data_file_renders_as_the_run_did(served, runs, tmp_path):
    from tuneforge.evaluate.rewards import RewardScorer
    from tuneforge.evaluate.target import evaluate_target

    rows = marker_pairs(12, seed=5)
    for row in rows:  # longer than the run's max_length (48): the export must cut them as training did
        row["prompt"] = "please, " * 30 + row["prompt"]
    data = write_jsonl(tmp_path / "held-out.jsonl", rows)
    out = evaluate_target(str(runs["root"] / "llama-export"), data=str(data), output=str(tmp_path / "eval"),
                          device="cpu")
    got = json.loads((out / "evaluation.json").read_text())["scores"]
    scorer = RewardScorer.load(str(runs["llama"]))
    want = scorer.score_encoded(scorer.encode_pairs(rows))
    assert np.allclose(got["chosen"], want[0], atol=1e-5) and np.allclose(got["rejected"], want[1], atol=1e-5)


def test_concurrent_reward_requests_keep_their_answers(served):
    live = served["export"]
    single = [live.post("/v1/rewards", {"model": "llama-export", "prompt": PROMPT, "responses": [r]}).json()
              ["data"][0]["score"] for r in RESPONSES]
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda r: live.post("/v1/rewards", {"model": "llama-export", "prompt": PROMPT,
                                                                     "responses": [r]}), RESPONSES * 2))
    assert np.allclose([r.json()["data"][0]["score"] for r in replies], single * 2, atol=1e-5)


def test_wrong_kind_routes_and_bad_reward_requests_get_400(served, runs):
    live = served["export"]
    for path, body in (("/v1/classify", {"model": "llama-export", "input": "x"}),
                       ("/v1/chat/completions", {"model": "llama-export",
                                                 "messages": [{"role": "user", "content": "x"}]})):
        reply = live.post(path, body)
        assert reply.status_code == 400 and "/v1/rewards" in reply.json()["error"]["message"], reply.text
        assert reply.json()["error"]["code"] == "wrong_model_kind"
    classifier = Live("tiny-bert")
    try:
        reply = classifier.post("/v1/rewards", {"model": "tiny-bert", "prompt": "p", "responses": ["r"]})
        assert reply.status_code == 400 and "/v1/classify" in reply.json()["error"]["message"]
    finally:
        classifier.stop()
    both = {"prompt": PROMPT, "responses": ["a"], "input": [{"prompt": "p", "response": "r"}]}
    bad = [({"model": "llama-export", "prompt": PROMPT}, "responses"),  # half of one shape
           ({"model": "llama-export", **both}, "input"),  # both shapes
           ({"model": "llama-export", "prompt": " ", "responses": ["a"]}, "prompt"),  # empty prompt
           ({"model": "llama-export", "prompt": PROMPT, "responses": []}, "responses"),
           # over the token cap: 12 pairs of 48 tokens each (cut at the training's max_length) > 400
           ({"model": "llama-export", "prompt": PROMPT, "responses": ["word " * 60] * 12}, "responses")]
    for body, param in bad:
        reply = live.post("/v1/rewards", body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (body, reply.text)
    missing = live.post("/v1/rewards", {"model": "nope", "prompt": PROMPT, "responses": ["a"]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    shape = live.post("/v1/rewards", {"model": "llama-export", "input": [{"prompt": "p"}]})
    assert shape.status_code == 422 and set(shape.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(live.url + "/v1/rewards", json={}).status_code == 401


def test_a_user_key_may_score_rewards(served):
    reply = served["export"].post("/v1/rewards", {"model": "llama-export", "prompt": PROMPT, "responses": ["a"]},
                                  key=KEY)
    assert reply.status_code == 200, reply.text


def test_a_classifier_adapter_is_refused_on_a_reward_server(runs, tmp_path):
    from tuneforge.serve.registry import TargetError, adapter_source, check_adapter, resolve

    classifier = tmp_path / "cls"
    api.train({"model": "tiny-llama", "task": "classification",
               "data": {"train": str(write_jsonl(tmp_path / "c.jsonl", [{"text": f"t {i}", "label": str(i % 2)}
                                                                         for i in range(40)]))},
               "method": {"name": "lora", "r": 2, "alpha": 4}, "train": {"max_steps": 1, "batch_size": 8},
               "eval": {"bootstrap": False}}, output=str(classifier), quiet=True)
    served = resolve(str(runs["llama"]))
    assert served.kind == "reward" and served.max_length == 48
    with pytest.raises(TargetError, match="is a classifier"):
        check_adapter(served, adapter_source("cls", str(classifier)))


# ------------------------------------------------------------------ data, verdict, starter


def test_bad_preference_rows_are_file_line_rejects(tmp_path):
    from tuneforge.data.splits import InvalidRows

    rows = marker_pairs(30)
    rows[3] = {"prompt": "p", "chosen": "a"}  # a missing side
    rows[7] = {"prompt": "p", "chosen": "same answer", "rejected": "same answer"}
    rows[11] = {"prompt": "  ", "chosen": "a", "rejected": "b"}  # an empty prompt
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidRows) as err:
        api.train(recipe("tiny-llama", path, {"name": "full"}), output=str(tmp_path / "run"), quiet=True)
    text = str(err.value)
    assert f"{path}:4: missing field 'rejected'" in text
    assert f"{path}:8: chosen and rejected are the same" in text
    assert f"{path}:12: " in text and len(err.value.rejects) == 3
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [4, 8, 12]


class FixedScorer:
    """Scores that are right on the first `right` pairs, wrong on the rest (evaluate_pairs' scorer interface)."""

    def __init__(self, right: int, tie: bool = False):
        self.right, self.tie = right, tie

    def encode_pairs(self, rows, log=None, name=""):
        from tuneforge.evaluate.rewards import EncodedPair

        return [EncodedPair(i, [1], [2], 1, 1, False) for i in range(len(rows))]

    def score_encoded(self, pairs):
        good = np.array([1.0 if i < self.right else (0.0 if self.tie else -1.0) for i in range(len(pairs))])
        return good, np.zeros(len(pairs))


@pytest.mark.parametrize("right,tie,status", [(36, False, "better_than_baseline"), (22, False, "no_better"),
                                              (0, True, "no_better"), (40, False, "better_than_baseline")])
def test_a_reward_model_not_significantly_above_chance_is_flagged(right, tie, status):
    from tuneforge.evaluate.rewards import evaluate_pairs

    result = evaluate_pairs(FixedScorer(right, tie), marker_pairs(40), bootstrap=True)
    assert result["verdict"]["status"].startswith(status), result["verdict"]
    assert result["metrics"]["pairwise_accuracy"] == right / 40
    if tie:  # every pair a tie: accuracy 0, not 0.5
        assert result["metrics"]["ties"] == 40 and result["metrics"]["reward_margin"] == 0.0


def test_the_starter_and_the_hh_recipe_validate(tmp_path):
    from tuneforge.recipe import load_recipe

    out = subprocess.run([sys.executable, "-m", "tuneforge.cli", "init", "reward"], capture_output=True, text=True,
                         check=True).stdout
    (tmp_path / "r.yaml").write_text(out)
    starter = load_recipe(tmp_path / "r.yaml", check_files=False)
    assert starter.task == "reward" and starter.alignment.center_coefficient == 0.01
    hh = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "reward-hh.yaml", check_files=False)
    assert hh.task == "reward" and hh.model == "smollm2-135m-instruct"
    assert hh.data.train.endswith("shared/data/hh_rlhf_harmless/harmless_base_test_pcr.jsonl")


# ------------------------------------------------------------------ resume


def _cmd(recipe_path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", "train", str(recipe_path), "--output", str(out), "--quiet", *extra]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    import yaml
    from safetensors.torch import load_file

    from tuneforge.training.checkpoint import latest_checkpoint

    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(60))
    spec = recipe("tiny-llama", data, {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, max_steps=16,
                  learning_rate=1e-2, checkpoint_every=4, eval_every=8, dropout=0.1, batch_size=4)
    spec["eval"] = {"bootstrap": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(path, straight), check=True, capture_output=True)
    proc = subprocess.Popen(_cmd(path, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, killed / "checkpoints" / "step-0000004" / ".complete")
    last = latest_checkpoint(killed / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) < 16
    resumed = subprocess.run(_cmd(path, killed, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {last.name}" in resumed.stdout
    a = load_file(str(straight / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "model" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("score" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((killed / "metrics.json").read_text())["test"] == \
        json.loads((straight / "metrics.json").read_text())["test"]

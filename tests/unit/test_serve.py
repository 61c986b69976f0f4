"""Issue 6 (serve): the OpenAI-compatible server, exercised with the official
openai client against real uvicorn servers on loopback, tiny models and real
LoRA runs. The SIGTERM and CLI tests start `tuneforge serve` as a subprocess."""

import concurrent.futures
import hashlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from tuneforge import api

from conftest import write_csv, write_jsonl

KEY, ADMIN, WRONG = "user-key-0123456789abcdef", "admin-key-0123456789abcdef", "wrong-key-0123456789abcdef"
PROMPT = "Convert to YYYY-MM-DD: 5 May 2001"
TEXTS = ["the film was great number 7", "the plot was awful number 2", "the cast was fine"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A create_app server on a free loopback port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def http(self, method, path, key=KEY, timeout=30, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=timeout, **kw)

    def metric(self, name: str, **labels) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.http("GET", "/metrics").text.splitlines():
            series, _, value = line.rpartition(" ")
            if series == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return 0.0

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def _serve(target, **kw):
    from tuneforge.serve.app import Settings, create_app

    # CPU everywhere: answers are compared with CPU references computed in this process.
    settings = Settings(**{"device": "cpu", **kw.pop("settings", {})})
    return Live(create_app(target, api_keys=[KEY], admin_keys=[ADMIN], settings=settings, **kw))


def _raw(port, method, path, headers=None, body=b""):
    """http.client sends the path byte for byte (httpx would normalise '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sentiment_rows):
    from tuneforge.datagen import iso_dates
    from tuneforge.export import export_run

    root = tmp_path_factory.mktemp("serve")
    dates = write_jsonl(root / "d.jsonl", iso_dates(60, seed=2))
    sentiment = write_csv(root / "s.csv", sentiment_rows)
    out = {}
    for name, task, model, data, seed in (("sftA", "sft", "tiny-llama", dates, 1),
                                          ("sftB", "sft", "tiny-llama", dates, 2),
                                          ("clsA", "classification", "tiny-bert", sentiment, 1),
                                          ("clsB", "classification", "tiny-bert", sentiment, 2)):
        out[name] = root / name
        api.train({"model": model, "task": task, "data": {"train": str(data)},
                   "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                   "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 5e-2, "seed": seed},
                   "eval": {"max_new_tokens": 2, "max_generate": 1, "bootstrap": 0}},
                  output=str(out[name]), quiet=True)
    for name in ("sftA", "clsA"):
        export_run(out[name], root / f"{name}-export")
        out[f"{name}-export"] = root / f"{name}-export"
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def gen(runs):
    live = _serve(str(runs["sftA"]), adapters={"B": str(runs["sftB"])},
                  settings={"request_log": str(runs["root"] / "gen-log.sqlite"), "log_inputs": "store"})
    yield live
    live.stop()


@pytest.fixture(scope="module")
def cls(runs):
    live = _serve("tiny-bert", adapters={"A": str(runs["clsA"]), "B": str(runs["clsB"])},
                  settings={"max_wait_ms": 50, "request_log": str(runs["root"] / "cls-log.sqlite")})
    yield live
    live.stop()


def _reference_greedy(folder, prompt: str, max_new: int) -> str:
    """What plain transformers generates greedily from a merged folder."""
    from transformers import AutoModelForCausalLM

    from tuneforge.data.render import encode_prompt
    from tuneforge.models import load_tokenizer

    tok = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": prompt}])])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _reference_probs(folder, texts):
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models import load_tokenizer

    tok = load_tokenizer(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [torch.softmax(model(**tok([t], return_tensors="pt")).logits[0], -1).tolist() for t in texts]


def _chat(client, model, max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=max_tokens, temperature=0, **kw)


# ------------------------------------------------------------------ generation


def test_models_list_and_adapter_switch_match_plain_transformers(gen, runs):
    client = gen.client()
    assert [m.id for m in client.models.list()] == ["tiny-llama", "sftA", "B"]
    assert client.models.retrieve("B").id == "B"
    texts = {m: _chat(client, m).choices[0].message.content for m in ("tiny-llama", "sftA", "B")}
    # Each name computes as its own weights: the merged run folders (and the bare base)
    # give exactly the served greedy text.
    assert texts["sftA"] == _reference_greedy(runs["sftA"] / "model", PROMPT, 12)
    assert texts["B"] == _reference_greedy(runs["sftB"] / "model", PROMPT, 12)
    from tuneforge import catalog

    assert texts["tiny-llama"] == _reference_greedy(catalog.resolve("tiny-llama"), PROMPT, 12)
    assert len({texts["sftA"], texts["B"], texts["tiny-llama"]}) == 3
    reply = _chat(client, "sftA")
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5


def test_chat_streams_chunks_before_the_end(gen):
    client = gen.client()
    full = _chat(client, "sftA", max_tokens=150).choices[0].message.content
    begun, arrivals, pieces, finish, chunks = time.perf_counter(), [], [], None, []
    for chunk in _chat(client, "sftA", max_tokens=150, stream=True):
        chunks.append(chunk)
        choice = chunk.choices[0]
        if choice.delta.content:
            arrivals.append(time.perf_counter() - begun)
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
    end = time.perf_counter() - begun
    assert "".join(pieces) == full and finish in ("length", "stop")
    assert len(pieces) >= 10
    # OpenAI's order: the role delta opens, the finish_reason (with an empty delta) closes.
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks].count(None) == len(chunks) - 1
    assert chunks[-1].choices[0].finish_reason == finish and chunks[-1].choices[0].delta.content is None
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert arrivals[0] < end / 2  # the first text came long before the last


def test_concurrent_generations_share_batches_and_keep_their_answers(gen):
    prompts = [f"Convert to YYYY-MM-DD: {d} March 19{d}" for d in range(10, 16)] + ["hi", "a much longer prompt " * 8]
    client = gen.client()

    def ask(args):
        model, prompt = args
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=8, temperature=0).choices[0].message.content

    jobs = [(m, p) for p in prompts for m in ("sftA", "B")]
    alone = [ask(job) for job in jobs]
    calls, rows = (gen.metric(f"tuneforge_batch_size_{x}", kind="generate") for x in ("count", "sum"))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone  # left padding and batch company change nothing
    assert gen.metric("tuneforge_batch_size_sum", kind="generate") - rows == len(jobs)
    assert gen.metric("tuneforge_batch_size_count", kind="generate") - calls < len(jobs)


def test_a_short_answer_does_not_wait_for_a_long_one_in_its_batch():
    live = _serve("tiny-llama", settings={"max_wait_ms": 400})  # both requests land in one batch
    try:
        clients = {400: live.client(), 2: live.client()}

        def ask(max_tokens):
            sent = time.perf_counter()
            reply = _chat(clients[max_tokens], "tiny-llama", max_tokens=max_tokens)
            return reply.usage.completion_tokens, sent, time.perf_counter()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(ask, 400)
            time.sleep(0.05)
            short = pool.submit(ask, 2)
            (long_tokens, long_sent, long_end), (short_tokens, _, short_end) = long.result(), short.result()
        assert (long_tokens, short_tokens) == (400, 2)
        assert live.metric("tuneforge_batch_size_count", kind="generate") == 1  # they shared one batch
        # The batch starts at the latest 0.4 s after the long request was sent; the
        # short answer comes after its 2 tokens, not after the long one's 400.
        decoding = long_end - (long_sent + 0.4)
        assert long_end - short_end > decoding / 2, (long_end - short_end, decoding)
    finally:
        live.stop()


def test_completions_seed_n_and_stop(gen):
    client = gen.client()
    kw = {"model": "sftA", "prompt": ["The date is", "Hello"], "max_tokens": 10, "n": 2, "temperature": 1.0,
          "top_p": 0.9, "seed": 7}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # same seed, same text
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    greedy = client.completions.create(model="sftA", prompt="The date is", max_tokens=10, temperature=0)
    text = greedy.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model="sftA", prompt="The date is", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="sftA", prompt="The date is", max_tokens=10, temperature=0,
                                              stop=[stop], stream=True))
    assert all(c.choices for c in streamed)  # no empty opening chunk: completions streams have no role delta
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_max_tokens_is_capped_by_the_context(gen):
    reply = gen.client().completions.create(model="sftA", prompt="x " * 500, max_tokens=100, temperature=0)
    prompt_tokens = reply.usage.prompt_tokens
    assert reply.usage.completion_tokens == 512 - prompt_tokens and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        gen.client().completions.create(model="sftA", prompt="x " * 600, max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"


def test_invalid_requests_get_openai_errors(gen, cls):
    client = gen.client()
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, "no-such-model")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="sftA", messages=[{"role": "user", "content": "x"}], n=0)
    assert err.value.body["param"] == "n" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="sftA", messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="sftA", messages=[{"role": "user", "content": "x"}], stop=list("abcde"))
    assert err.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="sftA", messages=[{"role": "user", "content": "x"}], n=9)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as err:  # not an int64: a 422, not a crashed sampler
        client.completions.create(model="sftA", prompt="x", max_tokens=1, seed=2**64)
    assert err.value.body["param"] == "seed"
    with pytest.raises(openai.BadRequestError) as err:  # would change the answer: refused, not ignored
        client.chat.completions.create(model="sftA", messages=[{"role": "user", "content": "x"}], presence_penalty=1)
    assert err.value.body["param"] == "presence_penalty"
    bad_json = httpx.post(gen.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert bad_json.status_code == 422 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    wrong_task = cls.http("POST", "/v1/chat/completions", json={"model": "A", "messages": [{"role": "user",
                                                                                           "content": "x"}]})
    assert wrong_task.status_code == 400 and "/v1/classify" in wrong_task.json()["error"]["message"]
    # An empty prompt has no position to decode from: refused, not a crashed batch.
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sftA", prompt="", max_tokens=2)
    assert err.value.body["param"] == "prompt" and "empty" in err.value.body["message"]
    # One request may not hold more sequences than a batch (32 by default).
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sftA", prompt=["a"] * 9, n=4, max_tokens=1)
    assert "36 sequences" in err.value.body["message"]
    # Unknown model names never become metrics labels (a client could grow /metrics without bound).
    assert "no-such-model" not in gen.http("GET", "/metrics").text


# ------------------------------------------------------------------ classification


def test_classify_adapters_match_their_runs_and_batching_keeps_answers(cls, runs):
    reply = cls.http("POST", "/v1/classify", json={"model": "A", "input": TEXTS}).json()
    assert reply["model"] == "A" and [d["index"] for d in reply["data"]] == [0, 1, 2]
    expected = _reference_probs(runs["clsA"] / "model", TEXTS)
    for row, probs in zip(reply["data"], expected):
        assert list(row["probabilities"]) == ["neg", "pos"]
        assert list(row["probabilities"].values()) == pytest.approx(probs, abs=1e-5)
        assert row["label"] == ["neg", "pos"][probs.index(max(probs))]
    other = cls.http("POST", "/v1/classify", json={"model": "B", "input": TEXTS}).json()
    assert other["data"][0]["probabilities"]["pos"] != pytest.approx(reply["data"][0]["probabilities"]["pos"],
                                                                     abs=1e-3)
    # 24 concurrent single-text requests, mixed over two adapters: gathered into
    # micro-batches, each answer the same as when asked alone.
    alone = {(m, t): cls.http("POST", "/v1/classify", json={"model": m, "input": t}).json()["data"][0]
             for m in ("A", "B") for t in TEXTS}
    jobs = [(m, t) for _ in range(4) for m in ("A", "B") for t in TEXTS]
    calls, rows = (cls.metric(f"tuneforge_batch_size_{x}", kind="classify") for x in ("count", "sum"))
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda mt: cls.http("POST", "/v1/classify",
                                                    json={"model": mt[0], "input": mt[1]}).json()["data"][0], jobs))
    for job, answer in zip(jobs, answers):
        assert answer["probabilities"]["pos"] == pytest.approx(alone[job]["probabilities"]["pos"], abs=1e-5)
    assert cls.metric("tuneforge_batch_size_sum", kind="classify") - rows == 24
    assert cls.metric("tuneforge_batch_size_count", kind="classify") - calls < 24  # model calls were shared


def test_hot_add_and_remove_an_adapter(cls, runs, tmp_path):
    body = {"name": "C", "path": str(runs["clsB"])}
    assert cls.http("POST", "/admin/adapters", key=None, json=body).status_code == 401
    assert cls.http("POST", "/admin/adapters", key=KEY, json=body).status_code == 403  # user key, admin route
    assert cls.http("POST", "/admin/adapters", key=ADMIN, json={"name": "D", "path": str(runs["sftA"])}).json()[
        "error"]["code"] == "invalid_adapter"  # a generator's adapter on a classifier
    added = cls.http("POST", "/admin/adapters", key=ADMIN, json=body)
    assert added.status_code == 201 and added.json()["id"] == "C"
    assert [m.id for m in cls.client().models.list()] == ["tiny-bert", "A", "B", "C"]
    c = cls.http("POST", "/v1/classify", json={"model": "C", "input": TEXTS}).json()["data"]
    b = cls.http("POST", "/v1/classify", json={"model": "B", "input": TEXTS}).json()["data"]
    assert [x["probabilities"]["pos"] for x in c] == pytest.approx([x["probabilities"]["pos"] for x in b], abs=1e-6)
    assert cls.http("POST", "/admin/adapters", key=ADMIN, json=body).status_code == 409
    assert cls.http("DELETE", "/admin/adapters/C", key=ADMIN).json()["deleted"] is True
    gone = cls.http("POST", "/v1/classify", json={"model": "C", "input": "x"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert cls.http("DELETE", "/admin/adapters/C", key=ADMIN).status_code == 404
    assert cls.http("DELETE", "/admin/adapters/tiny-bert", key=ADMIN).status_code == 400
    # An adapter whose weights do not fit the base: a 400 naming the mismatch, twice
    # (the failed load left nothing behind), and the served adapters unchanged.
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(runs["clsB"] / "model" / "adapter", broken)
    weights = load_file(broken / "adapter_model.safetensors")
    lora_a = next(k for k in weights if "lora_A" in k)
    weights[lora_a] = torch.cat([weights[lora_a]] * 2, dim=1)
    save_file(weights, broken / "adapter_model.safetensors")
    for _ in range(2):
        refused = cls.http("POST", "/admin/adapters", key=ADMIN, json={"name": "E", "path": str(broken)})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_adapter"
        assert "size mismatch" in refused.json()["error"]["message"]
    assert [m.id for m in cls.client().models.list()] == ["tiny-bert", "A", "B"]
    after = cls.http("POST", "/v1/classify", json={"model": "B", "input": TEXTS}).json()["data"]
    assert [x["probabilities"]["pos"] for x in after] == pytest.approx([x["probabilities"]["pos"] for x in b], abs=1e-6)


def test_request_log_rows(gen, cls):
    _chat(gen.client(), "B", max_tokens=3)
    cls.http("POST", "/v1/classify", json={"model": "A", "input": ["logged text"]})
    time.sleep(0.3)  # the row is written after the response ends
    with sqlite3.connect(gen_log(gen)) as db:
        row = db.execute("SELECT route, model, status, input, completion_tokens, inputs_hashed FROM requests "
                         "WHERE model='B' ORDER BY id DESC LIMIT 1").fetchone()
    assert row[:3] == ("/v1/chat/completions", "B", 200) and json.loads(row[3])[0]["content"] == PROMPT
    assert row[4] == 3 and row[5] == 0
    assert os.stat(gen_log(gen)).st_mode & 0o077 == 0  # raw inputs: owner-only file
    with sqlite3.connect(str(gen_log(cls))) as db:
        route, status, stored, hashed = db.execute(
            "SELECT route, status, input, inputs_hashed FROM requests ORDER BY id DESC LIMIT 1").fetchone()
    assert (route, status, hashed) == ("/v1/classify", 200, 1)
    assert stored == hashlib.sha256(json.dumps(["logged text"]).encode()).hexdigest()


def gen_log(live) -> str:
    return live.app.state.request_log_path


# ------------------------------------------------------------------ security and limits

PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/models/sftA"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/completions"), ("POST", "/v1/classify"), ("GET", "/metrics"),
             ("GET", "/admin/adapters"), ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/B"),
             ("GET", "//v1/models"), ("GET", "/v1/../metrics"), ("GET", "/health/../v1/models"),
             ("GET", "/%68ealth"), ("GET", "/health/"), ("GET", "/HEALTH"), ("GET", "/v1/models/../../metrics"),
             ("GET", "/v1/%6dodels"), ("GET", "/docs"), ("GET", "/nowhere"), ("GET", "/openapi.json"),
             ("GET", "/redoc"), ("OPTIONS", "/v1/models"), ("OPTIONS", "/health/"), ("GET", "/v1/models/")]


def test_every_route_but_health_needs_a_key(gen):
    for method, path in PROTECTED:
        for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            status, _, body = _raw(gen.port, method, path, headers, b"{}" if method == "POST" else b"")
            assert status == 401, (method, path, headers, status)
            assert json.loads(body)["error"]["type"] == "authentication_error"
    assert _raw(gen.port, "GET", "/health")[0] == 200
    assert _raw(gen.port, "GET", "/health?x=1")[0] == 200
    assert _raw(gen.port, "HEAD", "/health")[0] == 200
    # The right key opens the user routes only; path tricks reach no handler.
    auth = {"Authorization": f"Bearer {KEY}"}
    assert _raw(gen.port, "GET", "/v1/models", auth)[0] == 200
    assert _raw(gen.port, "GET", "/metrics", auth)[0] == 200
    assert _raw(gen.port, "GET", "/admin/adapters", auth)[0] == 403
    assert _raw(gen.port, "GET", "/v1/../metrics", auth)[0] == 403
    assert _raw(gen.port, "GET", "/v1/../metrics", {"Authorization": f"Bearer {ADMIN}"})[0] == 404
    for path in ("/docs", "/redoc", "/openapi.json"):  # FastAPI's own pages are off, even for an admin
        assert _raw(gen.port, "GET", path, {"Authorization": f"Bearer {ADMIN}"})[0] == 404
    with pytest.raises(openai.AuthenticationError):
        gen.client(WRONG).models.list()


def test_body_over_2mb_gets_413_before_it_is_read(gen):
    # Declared size over the limit: answered after the headers, with the body unsent.
    with socket.create_connection(("127.0.0.1", gen.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n" + b"{" * 1000)
        answer = b""
        while chunk := sock.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    # No declared size (chunked): stopped once the running count passes 2 MB.

    def chunks():
        for _ in range(40):
            yield b" " * 100_000

    resp = httpx.post(gen.url + "/v1/chat/completions", content=chunks(),
                      headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    small = gen.http("POST", "/v1/chat/completions", json={"model": "sftA", "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "x" * 1000}]})
    assert small.status_code == 200


def test_full_queue_gets_429_and_slow_requests_504(runs):
    live = _serve("tiny-llama", settings={"max_queue": 1, "max_batch": 1, "request_timeout": 30})
    try:
        def ask(max_tokens):
            return live.http("POST", "/v1/chat/completions", json={
                "model": "tiny-llama", "max_tokens": max_tokens, "temperature": 1.0, "seed": 0,
                "messages": [{"role": "user", "content": "hi"}]})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, [60] * 8))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        for busy in (a for a in answers if a.status_code == 429):  # every one says when to retry
            assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
        live.app.state.settings.request_timeout = 0.05  # read per request
        slow = ask(490)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout", slow.json()
        assert live.metric("tuneforge_cancelled_requests_total", reason="timeout") == 1
        live.app.state.settings.request_timeout = 30
        time.sleep(0.3)
        begun = time.perf_counter()
        assert ask(5).status_code == 200
        assert time.perf_counter() - begun < 0.5  # the timed-out request no longer holds the model
    finally:
        live.stop()


def test_an_adapter_removed_while_requests_wait_fails_them_in_openai_shape(runs):
    """Requests queued for an adapter that an admin removes get model_not_found:
    a JSON error, or an error event inside a stream whose 200 was already sent."""
    live = _serve("tiny-llama", adapters={"B": str(runs["sftB"])})
    gate, begun = threading.Event(), threading.Event()

    def streamed():
        chunks = []
        try:
            for chunk in _chat(live.client(), "B", max_tokens=3, stream=True):
                chunks.append(chunk)
                begun.set()
        except openai.APIError as exc:
            return chunks, exc
        return chunks, None

    try:
        live.app.state.batcher.pool.submit(gate.wait, 30)  # hold the model thread
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            def until_in_flight(n):  # this /metrics request is one of them
                for _ in range(300):
                    if live.metric("tuneforge_requests_in_flight") >= n + 1:
                        return
                    time.sleep(0.05)

            removed = pool.submit(live.http, "DELETE", "/admin/adapters/B", ADMIN)
            until_in_flight(1)
            time.sleep(0.1)  # the removal queues on the model thread before the requests
            plain, stream = pool.submit(lambda: _chat(live.client(), "B", max_tokens=3)), pool.submit(streamed)
            assert begun.wait(30)  # the stream's 200 and role delta are sent
            until_in_flight(3)
            time.sleep(0.2)
            gate.set()
            assert removed.result().json()["deleted"] is True
            with pytest.raises(openai.NotFoundError) as err:
                plain.result()
            assert err.value.body["code"] == "model_not_found"
            chunks, exc = stream.result()
        assert [c.choices[0].delta.role for c in chunks] == ["assistant"]  # the stream had begun
        assert exc is not None and exc.body["code"] == "model_not_found" and exc.body["type"] == "not_found_error"
        assert _chat(live.client(), "tiny-llama", max_tokens=2).usage.completion_tokens == 2
    finally:
        gate.set()
        live.stop()


def test_a_client_that_disconnects_frees_its_slot(gen):
    before = gen.metric("tuneforge_generated_tokens_total", model="B")
    with httpx.stream("POST", gen.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "B", "max_tokens": 480, "temperature": 0, "stream": True,
                            "messages": [{"role": "user", "content": "x"}]}, timeout=30) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    time.sleep(1.0)
    assert gen.metric("tuneforge_cancelled_requests_total", reason="disconnect") == 1
    assert gen.metric("tuneforge_generated_tokens_total", model="B") - before < 400
    # Not streamed: the client gives up (its own timeout) while the model works.
    before = gen.metric("tuneforge_generated_tokens_total", model="B")
    with pytest.raises(httpx.ReadTimeout):
        gen.http("POST", "/v1/chat/completions", timeout=0.3, json={
            "model": "B", "max_tokens": 480, "temperature": 0, "messages": [{"role": "user", "content": "y"}]})
    time.sleep(1.0)
    assert gen.metric("tuneforge_cancelled_requests_total", reason="disconnect") == 2
    assert gen.metric("tuneforge_generated_tokens_total", model="B") - before < 400
    assert _chat(gen.client(), "B", max_tokens=2).usage.completion_tokens == 2


# ------------------------------------------------------------------ export, process, CLI


def test_merged_export_serves_the_same_answers_as_the_run(runs, gen, cls):
    exported = _serve(str(runs["sftA-export"]))
    try:
        assert [m.id for m in exported.client().models.list()] == ["sftA-export"]
        for n in (4, 24):
            assert _chat(exported.client(), "sftA-export", max_tokens=n).choices[0].message.content == \
                _chat(gen.client(), "sftA", max_tokens=n).choices[0].message.content
    finally:
        exported.stop()
    exported = _serve(str(runs["clsA-export"]))
    try:
        mine = exported.http("POST", "/v1/classify", json={"model": "clsA-export", "input": TEXTS}).json()["data"]
        theirs = cls.http("POST", "/v1/classify", json={"model": "A", "input": TEXTS}).json()["data"]
        for a, b in zip(mine, theirs):
            assert a["label"] == b["label"]
            assert list(a["probabilities"].values()) == pytest.approx(list(b["probabilities"].values()), abs=1e-4)
    finally:
        exported.stop()


def test_bfloat16_weights_and_thread_count_serve_close_answers(runs):
    """--dtype bfloat16 --threads 1: the weights are bf16, torch uses one thread,
    and the answers stay within bf16 rounding of the float32 model's."""
    expected = _reference_probs(runs["clsA-export"], TEXTS)
    threads = torch.get_num_threads()
    live = _serve(str(runs["clsA-export"]), settings={"dtype": "bfloat16", "threads": 1})
    try:
        assert next(live.app.state.served.model.parameters()).dtype == torch.bfloat16
        assert torch.get_num_threads() == 1
        data = live.http("POST", "/v1/classify", json={"model": "clsA-export", "input": TEXTS}).json()["data"]
        for row, probs in zip(data, expected):
            assert list(row["probabilities"].values()) == pytest.approx(probs, abs=2e-2)
    finally:
        live.stop()
        torch.set_num_threads(threads)


def test_adapters_for_another_base_or_task_are_refused(runs):
    from tuneforge.serve.app import create_app
    from tuneforge.serve.registry import TargetError

    with pytest.raises(TargetError, match="trained on 'tiny-llama'"):
        create_app(str(runs["sftA-export"]), adapters={"B": str(runs["sftB"])}, api_keys=[KEY])
    with pytest.raises(TargetError, match="no adapter_model.safetensors|not a LoRA run"):
        create_app("tiny-llama", adapters={"x": str(runs["root"])}, api_keys=[KEY])


def test_sigterm_drains_in_flight_requests_and_exits_0(runs):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TUNEFORGE_API_KEYS", "TUNEFORGE_ADMIN_KEYS")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", str(runs["sftA"]), "--port", str(port),
                             "--max-wait-ms", "50"], env={**env, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # No key configured: the server makes one up and prints it (never an open server).
        lines = [proc.stderr.readline() for _ in range(3)]
        assert "no API key configured" in lines[0] and lines[2].startswith("serving tiny-llama, sftA"), lines
        key = lines[1].strip()
        assert key.startswith("tf-") and len(key) > 40
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not start")
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401

        def slow(i):
            resp = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                              json={"model": "sftA", "max_tokens": 400 + i, "temperature": 0,
                                    "messages": [{"role": "user", "content": f"hello {i}"}]})
            return resp, time.perf_counter()

        # Keep-alive connections opened before SIGTERM, idle when it comes.
        kept = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(8)]
        for conn in kept:
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert conn.getresponse().read() and conn.sock is not None  # still open: keep-alive
        def in_flight() -> float:
            metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=5).text
            return float(next(line for line in metrics.splitlines()
                              if line.startswith("tuneforge_requests_in_flight ")).split()[1])

        def signal_seen() -> bool:  # /health turns 503, or the listening socket is closed
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 503
            except httpx.TransportError:
                return True

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(slow, i) for i in range(3)]
            deadline = time.perf_counter() + 30
            while in_flight() < 4 and time.perf_counter() < deadline:  # the three, and this /metrics call
                time.sleep(0.05)
            signalled = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            while not signal_seen() and time.perf_counter() < deadline:
                time.sleep(0.05)
            # Sent on the open connections while the drain runs: each gets a 503 that
            # closes its connection (never a reset), /health too (load balancers stop).
            for i, conn in enumerate(kept):
                conn.request("GET", "/health" if i == 0 else "/v1/models", headers={"Authorization": f"Bearer {key}"})
                resp = conn.getresponse()
                assert (resp.status, resp.getheader("connection")) == (503, "close"), i
                if i:
                    assert resp.getheader("retry-after") == "1"
                    assert json.loads(resp.read())["error"]["code"] == "shutting_down"
                conn.close()
            try:  # a new connection finds the listening socket closed (or, at worst, a 503)
                late = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
                assert late.status_code == 503
            except httpx.ConnectError:
                pass
            answers, finished = zip(*[p.result() for p in pending])
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.headers["connection"] for a in answers] == ["close"] * 3  # clients reconnect elsewhere
        assert min(finished) > signalled  # they were in flight when SIGTERM came
        for i, answer in enumerate(answers):  # each ran to its end: its budget, or EOS
            choice, used = answer.json()["choices"][0], answer.json()["usage"]["completion_tokens"]
            assert (choice["finish_reason"], used) == ("length", 400 + i) or choice["finish_reason"] == "stop"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_vllm_engine_command_and_clean_refusal(runs):
    from tuneforge import catalog
    from tuneforge.serve.registry import TargetError
    from tuneforge.serve.vllm import command, unavailable

    cmd = command(str(runs["sftA"]), {"B": str(runs["sftB"])}, "127.0.0.1", 8001)
    assert cmd[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert cmd[4] == catalog.resolve("tiny-llama") and cmd[cmd.index("--served-model-name") + 1] == "tiny-llama"
    lora = cmd[cmd.index("--lora-modules") + 1: cmd.index("--max-lora-rank")]
    assert lora == [f"sftA={runs['sftA'] / 'model' / 'adapter'}", f"B={runs['sftB'] / 'model' / 'adapter'}"]
    assert "--enable-lora" in cmd and "--api-key" not in cmd  # the key travels in VLLM_API_KEY
    from tuneforge.serve.registry import _template_of

    pinned = _template_of(runs["sftA"] / "model" / "adapter")  # the run's own template, as a file
    assert pinned and open(cmd[cmd.index("--chat-template") + 1], encoding="utf-8").read() == pinned
    merged = command(str(runs["sftA-export"]), {}, "127.0.0.1", 8001)
    assert merged[4] == str(runs["sftA-export"].resolve()) and "--enable-lora" not in merged
    with pytest.raises(TargetError, match="generation only"):
        command(str(runs["clsA"]), {}, "127.0.0.1", 8001)

    if unavailable() is None:
        pytest.skip("vLLM and a GPU are present here")
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "serve", "tiny-llama", "--engine", "vllm"],
                          capture_output=True, text=True, env={**os.environ, "TUNEFORGE_API_KEYS": KEY}, timeout=60)
    assert proc.returncode == 1 and "--engine vllm is not available here" in proc.stderr


def test_fairness_postprocessing_saved_with_a_model_decides_served_labels(runs, tmp_path):
    """A model saved with group thresholds (fairness post-processing) is served with
    them: the request names each row's group, the label follows the thresholds,
    and the model's own argmax stays visible."""
    import shutil

    folder = tmp_path / "fair-export"
    shutil.copytree(runs["clsA-export"], folder)
    always = {"p0": 1.0, "p1": 0.0, "operation0": {"operator": ">", "threshold": "-inf"},
              "operation1": {"operator": ">", "threshold": "-inf"}}
    never = {"p0": 1.0, "p1": 0.0, "operation0": {"operator": ">", "threshold": "inf"},
             "operation1": {"operator": ">", "threshold": "inf"}}
    (folder / "fairness_postprocess.json").write_text(json.dumps({
        "kind": "threshold_optimizer", "constraint": "equalized_odds", "objective": "accuracy_score",
        "rules": {"a": always, "b": never}, "labels": ["neg", "pos"], "positive_label": "pos",
        "group_source": {"column": "g"}}))
    # As export lists it when the run's model folder holds one (a file dropped in
    # later, outside the manifest, is refused: test_export).
    from tuneforge.fsio import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["fairness_postprocess.json"] = sha256_file(folder / "fairness_postprocess.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    live = _serve(str(folder), name="fair")
    try:
        missing = live.http("POST", "/v1/classify", json={"model": "fair", "input": TEXTS})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_groups"
        short = live.http("POST", "/v1/classify", json={"model": "fair", "input": TEXTS, "groups": ["a"]})
        assert short.status_code == 400 and short.json()["error"]["param"] == "groups"
        reply = live.http("POST", "/v1/classify", json={"model": "fair", "input": TEXTS, "groups": ["a", "b", "a"]})
        data = reply.json()["data"]
        assert [d["label"] for d in data] == ["pos", "neg", "pos"]
        assert all(d["postprocessed"] for d in data)
        assert [d["model_label"] for d in data] == [max(d["probabilities"], key=d["probabilities"].get) for d in data]
        # A group the thresholds were not fitted on is refused (400), not a 500 and not a guess.
        unseen = live.http("POST", "/v1/classify", json={"model": "fair", "input": TEXTS, "groups": ["a", "zz", "b"]})
        assert unseen.status_code == 400 and unseen.json()["error"]["code"] == "unseen_group"
        assert "'zz'" in unseen.json()["error"]["message"]
    finally:
        live.stop()

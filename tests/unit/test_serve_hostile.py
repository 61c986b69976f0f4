"""The server against hostile and careless clients (issue "Trust"): text that is
not Unicode, work over the per-request token cap, big requests that time out,
ambiguous credentials. Real uvicorn servers on loopback, the tiny models."""

import concurrent.futures
import http.client
import json
import time

import httpx
import pytest
from test_serve import KEY, WRONG, _serve

LONG = "word " * 1000  # 5,000 characters: the context's 512 tokens after truncation
FULL = "a " * 600  # the same 512 tokens from 1,200 characters (less to tokenize)


@pytest.fixture(scope="module")
def bert():
    live = _serve("tiny-bert", settings={"max_batch": 2, "max_inputs": 1024})
    yield live
    live.stop()


@pytest.fixture(scope="module")
def llama():
    live = _serve("tiny-llama", settings={"max_request_tokens": 2000})
    yield live
    live.stop()


def _post(live, path: str, body: dict, key: str = KEY):
    """The body as JSON with ASCII escapes: a lone surrogate travels as "\\ud800",
    as any JSON encoder writes it (httpx's json= cannot encode one to UTF-8)."""
    return httpx.post(live.url + path, content=json.dumps(body).encode(), timeout=30,
                      headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})


def _openai_error(resp, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


BAD = "ok \ud800 ok"


def test_lone_surrogates_get_400_in_openai_shape_on_every_text_field(bert, llama):
    chat = {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (bert, "/v1/classify", {"model": "tiny-bert", "input": BAD}, "input"),
        (bert, "/v1/classify", {"model": "tiny-bert", "input": ["fine", BAD]}, "input.1"),
        (bert, "/v1/classify", {"model": "tiny-bert", "input": ["fine"], "groups": [BAD]}, "groups.0"),
        (bert, "/v1/classify", {"model": BAD, "input": "fine"}, "model"),
        (llama, "/v1/completions", {"model": "tiny-llama", "prompt": BAD, "max_tokens": 2}, "prompt"),
        (llama, "/v1/completions", {"model": "tiny-llama", "prompt": ["a", BAD], "max_tokens": 2}, "prompt.1"),
        (llama, "/v1/completions", {"model": "tiny-llama", "prompt": "a", "stop": BAD, "max_tokens": 2}, "stop"),
        (llama, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": BAD}]},
         "messages.0.content"),
        (llama, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": BAD}]}]}, "messages.0.content.1.text"),
        (llama, "/v1/chat/completions", {**chat, "stream": True, "messages": [{"role": "user", "content": BAD}]},
         "messages.0.content"),
    ]
    for live, path, body, param in cases:
        error = _openai_error(_post(live, path, body), 400)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (path, body, error)
        assert "U+D800" in error["message"] and "function-after" not in error["message"], error
    # The admin route takes text too (the adapter's name and folder).
    from test_serve import ADMIN

    for body in ({"name": "x", "path": BAD}, {"name": "x\udfff", "path": "/tmp"}):
        error = _openai_error(_post(bert, "/admin/adapters", body, key=ADMIN), 400)
        assert error["param"] in ("name", "path"), error
    # Bytes that are not UTF-8 at all: a 4xx, never a crash.
    raw = httpx.post(bert.url + "/v1/classify", content=b'{"model": "tiny-bert", "input": "\xff\xfe"}',
                     headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert 400 <= raw.status_code < 500 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    # The server is unharmed, and well-formed text beyond the BMP still works.
    ok = bert.http("POST", "/v1/classify", json={"model": "tiny-bert", "input": ["fine \U0001F600", "x"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2


def test_work_over_the_token_cap_is_refused_fast_with_the_limit_named(bert, llama):
    # 200 texts of 5,000 characters: within the 2 MB body limit, 102,400 tokens of work.
    calls = bert.metric("tuneforge_batch_size_count", kind="classify"), \
        llama.metric("tuneforge_batch_size_count", kind="generate")
    begun = time.perf_counter()
    error = _openai_error(bert.http("POST", "/v1/classify", json={"model": "tiny-bert", "input": [LONG] * 200}),
                          400)
    assert time.perf_counter() - begun < 10  # tokenized, counted, refused: no model call
    assert error["code"] == "too_many_tokens" and error["param"] == "input"
    assert "102400 tokens" in error["message"] and "at most 16384" in error["message"], error
    assert bert.metric("tuneforge_batch_size_count", kind="classify") == calls[0]  # the model never saw it
    # Generation counts prompt plus budget per sequence: 8 x (prompt + 300) > 2000.
    error = _openai_error(llama.http("POST", "/v1/completions", json={
        "model": "tiny-llama", "prompt": ["one two three"] * 4, "n": 2, "max_tokens": 300}), 400)
    assert error["code"] == "too_many_tokens" and "at most 2000" in error["message"]
    assert llama.metric("tuneforge_batch_size_count", kind="generate") == calls[1]
    # Under the cap, the same request shape is served.
    ok = llama.http("POST", "/v1/completions", json={"model": "tiny-llama", "prompt": ["one two three"] * 4,
                                                     "n": 2, "max_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 8


def test_a_vanishing_temperature_samples_greedily_instead_of_crashing(llama):
    """Found by the schema fuzzing below: temperature 5e-324 made logits / T
    overflow to NaN and torch.multinomial raise (a 500)."""
    body = {"model": "tiny-llama", "prompt": "one two three", "max_tokens": 4, "seed": 1}
    greedy = llama.http("POST", "/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for temperature in (5e-324, 1e-300, 1e-30):
        resp = llama.http("POST", "/v1/completions", json={**body, "temperature": temperature, "top_p": 0.5})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == greedy


def _classify_timed(live, texts, timeout=30):
    sent = time.perf_counter()
    resp = live.http("POST", "/v1/classify", json={"model": "tiny-bert", "input": texts}, timeout=timeout)
    return resp, sent, time.perf_counter()


def test_a_big_request_is_split_so_a_small_one_overtakes_it(bert):
    alone = _classify_timed(bert, ["the film was fine"])[0].json()["data"][0]["probabilities"]
    calls = bert.metric("tuneforge_batch_size_count", kind="classify")
    settings = bert.app.state.settings
    settings.max_request_tokens = 10**6
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            big = pool.submit(_classify_timed, bert, [FULL] * 128)
            time.sleep(0.15)
            small = pool.submit(_classify_timed, bert, ["the film was fine"])
            (big_resp, _, big_end), (small_resp, _, small_end) = big.result(), small.result()
    finally:
        settings.max_request_tokens = 16384
    assert big_resp.status_code == 200 and len(big_resp.json()["data"]) == 128
    assert small_resp.status_code == 200
    assert small_resp.json()["data"][0]["probabilities"] == pytest.approx(alone, abs=1e-5)
    # 128 rows in micro-batches of at most 2: 64 or more model calls, and the small
    # request was answered between two of them, long before the big one ended.
    assert bert.metric("tuneforge_batch_size_count", kind="classify") - calls >= 64
    assert small_end < big_end - 0.1, (small_end, big_end)


def test_a_big_request_that_times_out_stops_computing_and_the_next_one_is_served(bert):
    settings = bert.app.state.settings
    rows = bert.metric("tuneforge_batch_size_sum", kind="classify")
    settings.request_timeout, settings.max_request_tokens = 2.0, 10**6
    try:
        # 768 x 512 tokens: some 4 s of compute on 2 idle cores, in micro-batches of 2.
        big = _classify_timed(bert, [FULL] * 768)[0]
        assert _openai_error(big, 504)["code"] == "timeout"
        small = _classify_timed(bert, ["the film was fine"])[0]
        assert small.status_code == 200, small.text  # within the same 2 s
    finally:
        settings.max_request_tokens, settings.request_timeout = 16384, 60.0
    # The timed-out request's remaining micro-batches were dropped, not computed.
    time.sleep(0.3)
    assert bert.metric("tuneforge_batch_size_sum", kind="classify") - rows < 768 / 2
    assert bert.metric("tuneforge_cancelled_requests_total", reason="timeout") == 1


def test_a_client_that_leaves_a_big_request_stops_its_compute(bert):
    settings = bert.app.state.settings
    rows = bert.metric("tuneforge_batch_size_sum", kind="classify")
    settings.max_request_tokens = 10**6
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up; the server's timeout is 60 s
            bert.http("POST", "/v1/classify", json={"model": "tiny-bert", "input": [FULL] * 768}, timeout=1.0)
        for _ in range(100):  # noticed within the 0.2 s poll once the request is tokenized
            if bert.metric("tuneforge_cancelled_requests_total", reason="disconnect") == 1:
                break
            time.sleep(0.1)
    finally:
        settings.max_request_tokens = 16384
    assert bert.metric("tuneforge_cancelled_requests_total", reason="disconnect") == 1
    time.sleep(0.3)
    assert bert.metric("tuneforge_batch_size_sum", kind="classify") - rows < 768 / 2
    small = _classify_timed(bert, ["the film was fine"])[0]
    assert small.status_code == 200


def _raw_headers(port: int, path: str, headers: list[tuple[str, str]]):
    """A GET with the headers in order, repeats included (a dict cannot repeat one)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return out


def test_two_authorization_headers_are_refused_whatever_their_order(bert):
    from test_serve import ADMIN

    assert _raw_headers(bert.port, "/v1/models", [("Authorization", f"Bearer {KEY}")])[0] == 200
    for pair in ((KEY, WRONG), (WRONG, KEY), (KEY, KEY), (ADMIN, KEY), (KEY, ADMIN)):
        for path in ("/v1/models", "/metrics", "/admin/adapters"):
            status, body = _raw_headers(bert.port, path, [("Authorization", f"Bearer {k}") for k in pair])
            assert status == 401, (pair, path, status)
            assert body["error"]["code"] == "ambiguous_api_key" and body["error"]["type"] == "authentication_error"
    # The lower-case spelling is the same header.
    status, _ = _raw_headers(bert.port, "/v1/models", [("Authorization", f"Bearer {KEY}"),
                                                       ("authorization", f"Bearer {WRONG}")])
    assert status == 401


def test_vllm_hand_off_passes_the_key_in_the_environment_and_names_what_vllm_lacks(monkeypatch):
    """Without vLLM: the hand-off is exercised up to the exec, which is caught."""
    from typer.testing import CliRunner

    from tuneforge.cli import app
    from tuneforge.serve import vllm

    execs = []

    def fake_exec(file, args, env):
        execs.append((args, env))
        raise SystemExit(0)

    monkeypatch.setattr(vllm, "unavailable", lambda: None)
    monkeypatch.setattr("os.execvpe", fake_exec)
    monkeypatch.delenv("TUNEFORGE_ADMIN_KEYS", raising=False)
    runner = CliRunner()
    one = runner.invoke(app, ["serve", "tiny-llama", "--engine", "vllm", "--port", "8123"],
                        env={"TUNEFORGE_API_KEYS": KEY})
    (args, env), = execs
    assert env["VLLM_API_KEY"] == KEY and KEY not in " ".join(args)  # never on the command line (ps)
    assert args[args.index("--port") + 1] == "8123"
    for limit in ("--max-body-mb", "--max-request-tokens", "429", "--timeout", "/metrics"):
        assert limit in one.output, limit  # printed at start-up: what vLLM's server does not enforce
    # Several keys: vLLM's environment variable holds one; refused, nothing started.
    several = runner.invoke(app, ["serve", "tiny-llama", "--engine", "vllm"],
                            env={"TUNEFORGE_API_KEYS": f"{KEY},{WRONG}"})
    assert several.exit_code == 2 and "exactly one API key, not 2" in several.output
    assert several.exception is None or isinstance(several.exception, SystemExit)
    assert len(execs) == 1


def _fuzz(live, routes: dict, models: list[str], key: str) -> dict:
    """Schemathesis cases from the app's own OpenAPI schema (FastAPI builds it even
    with its /openapi.json page off), `model` drawn from the served names so that
    requests get past the model lookup. Every answer is < 500 and, when an error,
    in OpenAI's shape."""
    import warnings

    import schemathesis
    from hypothesis import HealthCheck, given, settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GET and HEAD /health share an operation id
        raw = live.app.openapi()
    for body in raw["components"]["schemas"].values():
        if "model" in body.get("properties", {}):
            body["properties"]["model"] = {"type": "string", "enum": models}
    schema = schemathesis.openapi.from_dict(raw)
    seen: dict = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = routes.get((operation.method.upper(), operation.path))
        if not examples:
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            resp = case.call(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            seen.setdefault((case.method, case.path), set()).add(resp.status_code)
            assert resp.status_code < 500, (case.method, case.path, case.body, resp.text)
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text

        check()
    return seen


def test_schema_fuzzing_gets_no_5xx(bert, llama):
    from test_serve import ADMIN

    settings = llama.app.state.settings
    settings.max_request_tokens = 64  # generated max_tokens stay cheap: refused (400) or a few tokens
    try:
        seen = _fuzz(llama, {("POST", "/v1/chat/completions"): 15, ("POST", "/v1/completions"): 15},
                     ["tiny-llama"], KEY)
    finally:
        settings.max_request_tokens = 2000
    seen |= _fuzz(bert, {("POST", "/v1/classify"): 15, ("GET", "/v1/models/{model_id}"): 5,
                         ("POST", "/admin/adapters"): 5, ("DELETE", "/admin/adapters/{adapter}"): 5},
                  ["tiny-bert"], ADMIN)
    # The cases reached the handlers: some were answered, not all refused.
    assert 200 in seen[("POST", "/v1/completions")] | seen[("POST", "/v1/chat/completions")], seen
    assert 200 in seen[("POST", "/v1/classify")], seen

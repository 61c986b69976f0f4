"""The OpenAI-compatible HTTP app: routes, errors, metrics, request log.

`create_app(target, ...)` loads the model once and returns a FastAPI app; the
layers around it, outermost first: metrics + request log, API keys, drain
(503 after SIGTERM), body limit (413), then FastAPI.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from tuneforge.serve import engine, registry
from tuneforge.serve.batcher import Batcher, QueueFull
from tuneforge.serve.security import AuthMiddleware, BodyLimitMiddleware, DrainMiddleware, error_body

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "timeout_error"}
INFERENCE_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/classify"}


@dataclass
class Settings:
    max_batch: int = 32  # rows (texts or sequences) per micro-batch; 1 turns batching off
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # queued requests before 429
    request_timeout: float = 60.0  # seconds, queue wait included
    max_body: int = 2 * 1024 * 1024
    default_max_tokens: int = 256  # chat completions without max_tokens (completions default to 16, as OpenAI)
    max_n: int = 8
    max_inputs: int = 256  # texts per /v1/classify request
    device: str = "auto"
    dtype: str = "float32"  # or bfloat16: half the memory; on CPUs with AVX512-BF16 or AMX, faster batches
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, one per core)
    request_log: Optional[str] = None
    log_inputs: str = "hash"


class ApiError(HTTPException):
    """An error in OpenAI's shape. A starlette HTTPException so that FastAPI lets
    it pass through body parsing (the 413 raised mid-read)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(status, message, headers)
        self.message, self.code, self.param = message, code, param


def _error_response(status: int, message: str, code=None, param=None, headers=None) -> Response:
    return Response(error_body(status, message, ERROR_TYPES.get(status, "invalid_request_error"), code, param),
                    status_code=status, media_type="application/json", headers=headers)


# ------------------------------------------------------------------ schemas


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; the
    # unsupported ones that would change the answer are refused explicitly below.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: Union[str, list[TextPart]] = Field(description="The message text, or a list of text parts.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Body):
    model: str = Field(description="The served base model or adapter name.")
    max_tokens: Optional[int] = Field(None, ge=1, description="New tokens at most; capped by the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt.")
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 4 stop strings.")
    # int64, as OpenAI: a larger seed overflows torch.Generator.manual_seed.
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1, description="Seed for reproducible sampling.")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: Optional[dict] = Field(None, description="{'include_usage': true} adds a usage chunk.")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "invalid_value", "stop")
        return stops


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Newer name for max_tokens.")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = Field(description="A prompt or a list of prompts.")
    echo: bool = Field(False, description="Not supported.")


class ClassifyRequest(_Body):
    model: str = Field(description="The served classifier or adapter name.")
    input: Union[str, list[str]] = Field(description="A text or a list of texts.")
    groups: Optional[list[str]] = Field(
        None, description="One group per input, for models saved with fairness post-processing by a group column.")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The name requests will use.")
    path: str = Field(description="A LoRA run folder, or a peft adapter folder, on the server.")


# ---------------------------------------------------------------- the app


def _note(request: Request, **fields: Any) -> None:
    """Facts for the metrics/request-log layer (it reads them after the response)."""
    request.scope.setdefault("tuneforge", {}).update(fields)


def create_app(target: str, adapters: Optional[dict[str, str]] = None, api_keys: Optional[list[str]] = None,
               admin_keys: Optional[list[str]] = None, settings: Optional[Settings] = None, name: Optional[str] = None,
               draining: Optional[Callable[[], bool]] = None) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from tuneforge.models import pick_device

    settings = settings or Settings()
    if not api_keys and not admin_keys:
        raise ValueError("no API keys: pass api_keys (the CLI reads TUNEFORGE_API_KEYS or --api-key-file)")
    device = pick_device(settings.device)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    served = registry.resolve(target, name)
    served.dtype = settings.dtype
    extra = [registry.adapter_source(n, ref) for n, ref in (adapters or {}).items()]
    registry.load(served, extra, device)

    reg = CollectorRegistry()
    m_requests = Counter("tuneforge_requests", "HTTP requests by route, model and status",
                         ["route", "model", "status"], registry=reg)
    m_latency = Histogram("tuneforge_request_latency_seconds", "Time to the end of the response", ["route"],
                          registry=reg, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    m_batch = Histogram("tuneforge_batch_size", "Rows per model call", ["kind"], registry=reg,
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    m_tokens = Counter("tuneforge_generated_tokens", "Tokens generated", ["model"], registry=reg)
    m_cancelled = Counter("tuneforge_cancelled_requests", "Requests dropped: client gone or timed out",
                          ["reason"], registry=reg)
    m_inflight = Gauge("tuneforge_requests_in_flight", "Requests being answered", registry=reg)

    def run_group(kind: str, model: str, jobs: list) -> list:
        """On the model thread: one micro-batch of one served model."""
        if model not in served.names():  # removed while the request waited
            return [ApiError(404, f"model '{model}' was removed", "model_not_found", "model")] * len(jobs)
        with registry.activate(served, model):
            if kind == "classify":
                texts = [t for j in jobs for t in j.payload]
                probs, _ = engine.classify(served, texts, device)
                out, start = [], 0
                for job in jobs:
                    out.append(probs[start:start + len(job.payload)])
                    start += len(job.payload)
                return out
            rows = [r for j in jobs for r in j.payload]
            engine.generate(served, rows, device)
            m_tokens.labels(model).inc(sum(len(r.tokens) for r in rows))
            return [None] * len(jobs)

    batcher = Batcher(run_group, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                      on_batch=lambda kind, size: m_batch.labels(kind).observe(size))
    Gauge("tuneforge_queue_depth", "Requests waiting for a batch", registry=reg).set_function(batcher.depth)
    request_log = None
    if settings.request_log:
        from tuneforge.serve.requestlog import RequestLog

        request_log = RequestLog(settings.request_log, settings.log_inputs)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        if request_log:
            request_log.close()

    app = FastAPI(title="tuneforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.batcher, app.state.registry = served, batcher, reg
    app.state.request_log_path, app.state.settings = settings.request_log, settings

    # ------------------------------------------------------------ errors

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        if isinstance(exc, ApiError):
            return _error_response(exc.status_code, exc.message, exc.code, exc.param, exc.headers)
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return _error_response(status, str(exc.detail), code, None, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                            for e in exc.errors()[:5])
        return _error_response(422, message or "invalid request", "invalid_parameter", ".".join(loc) or None)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    # ------------------------------------------------------------ helpers

    post_cache: dict = {}

    def postprocessor(model: str):
        """The fairness post-processing saved with the model behind `model`
        (run/model/fairness_postprocess.json), or None."""
        from tuneforge.fairness.mitigate import load_postprocessor

        source = served.adapters.get(model)  # one read: the model thread may replace the dict meanwhile
        if source is not None:
            path = Path(source.path)
        elif served.own_adapter is not None and model == served.own_adapter.name:
            path = Path(served.own_adapter.path)
        else:
            path = Path(served.base_path)
        folders = (path, path.parent) if path.name == "adapter" else (path,)
        if path not in post_cache:  # read once per model folder, not on every request
            post_cache[path] = next((p for p in map(load_postprocessor, folders) if p is not None), None)
        return post_cache[path]

    def check_groups(model: str, post, texts: list[str], groups: Optional[list[str]]) -> None:
        if groups is not None and len(groups) != len(texts):
            raise ApiError(400, f"`groups` has {len(groups)} values for {len(texts)} inputs", "invalid_value", "groups")
        column = post.group_source.get("column") if post is not None else None
        if column and groups is None:
            raise ApiError(400, f"'{model}' applies fairness post-processing by group: pass `groups`, one value of "
                                f"column '{column}' per input", "missing_groups", "groups")

    def pick(model: str, task: str, request: Request) -> None:
        if model not in served.names():
            raise ApiError(404, f"the model '{model}' does not exist; GET /v1/models lists "
                                f"{', '.join(served.names())}", "model_not_found", "model")
        # Noted only once known: a client-chosen name as a metrics label would
        # grow /metrics (and memory) without bound.
        _note(request, model=model)
        if served.task != task:
            other = "/v1/classify" if served.task == "classification" else "/v1/chat/completions"
            raise ApiError(400, f"'{model}' is a {served.task} model; use {other}", "wrong_task", "model")

    def submit(kind: str, model: str, payload, size: int):
        try:
            return batcher.submit(kind, model, payload, size)
        except QueueFull:
            raise ApiError(429, f"server busy: {settings.max_queue} requests queued; retry shortly",
                           "queue_full", None, {"Retry-After": "1"}) from None

    async def wait(request: Request, job, future: Optional[asyncio.Future] = None) -> Any:
        """The job's result (or `future`'s); 504 past the timeout; the job is dropped when the client leaves."""
        future = future if future is not None else job.future
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                job.cancel()
                m_cancelled.labels("timeout").inc()
                raise ApiError(504, f"no answer within {settings.request_timeout:g} s; retry with less work",
                               "timeout")
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(0.2, remaining))
            except asyncio.CancelledError:  # the server cut the request (shutdown past its grace time)
                job.cancel()
                raise
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    m_cancelled.labels("disconnect").inc()
                    raise ClientGone() from None

    def generation_rows(body: _Sampling, prompts: list[list[int]], default_max: int, emit_for) -> list:
        import torch

        limit = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            limit = body.max_completion_tokens
        stops, rows = body.stops(), []
        most = max(settings.max_batch, settings.max_n)
        if len(prompts) * body.n > most:
            # One request is one job: unbounded, it would hold the KV cache of
            # hundreds of sequences at once.
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is {len(prompts) * body.n} sequences; this "
                                f"server takes at most {most} per request: split the prompts over several requests",
                           "invalid_value", "prompt")
        for p, prompt in enumerate(prompts):
            if not prompt:  # nothing to condition on: the forward pass has zero positions
                raise ApiError(400, f"prompt {p} is empty after tokenization; send at least one token of text",
                               "invalid_value", "prompt")
            room = served.context - len(prompt)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {served.context}",
                               "context_length_exceeded", "messages" if isinstance(body, ChatRequest) else "prompt")
            for c in range(body.n):
                index = p * body.n + c
                generator = None
                if body.seed is not None:
                    generator = torch.Generator().manual_seed(body.seed + index)
                rows.append(engine.GenRow(prompt, min(limit or default_max, room), body.temperature, body.top_p,
                                          stops, emit_for(index), lambda: False, generator))
        return rows

    async def run_generation(request: Request, body: _Sampling, prompts: list[list[int]], default_max: int,
                             make_chunk, make_final):
        if body.n > settings.max_n:
            raise ApiError(400, f"n is at most {settings.max_n} on this server", "invalid_value", "n")
        for field in ("logprobs", "top_logprobs", "tools", "functions", "response_format", "suffix", "logit_bias",
                      "presence_penalty", "frequency_penalty"):
            if getattr(body, field, None) not in (None, False, [], {}, 0):
                raise ApiError(400, f"'{field}' is not supported by this server", "unsupported_parameter", field)
        if getattr(body, "echo", False):
            raise ApiError(400, "'echo' is not supported by this server", "unsupported_parameter", "echo")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        # Set once every row of this request has finished, which can be long before
        # its batch ends (a 2-token answer batched with a 480-token one).
        answered, open_rows = loop.create_future(), [0]

        def on_event(index, text, finish):
            events.put_nowait((index, text, finish))
            if finish:
                open_rows[0] -= 1
                if open_rows[0] == 0 and not answered.done():
                    answered.set_result(None)

        def on_job_done(future: asyncio.Future) -> None:
            error = future.exception()  # a failed batch, or a model removed while queued
            if answered.done():
                return
            if error is not None:
                answered.set_exception(error)
            else:
                answered.set_result(None)

        def emit_for(index):
            return lambda text, finish: loop.call_soon_threadsafe(on_event, index, text, finish)

        rows = generation_rows(body, prompts, default_max, emit_for)
        open_rows[0] = len(rows)
        job = submit("generate", body.model, rows, len(rows))
        job.future.add_done_callback(on_job_done)
        # Read here so that an error nobody awaits (the client left first) is not logged as unretrieved.
        answered.add_done_callback(lambda f: f.cancelled() or f.exception())
        for row in rows:
            row.cancelled = job.cancel_event.is_set
        prompt_tokens = sum(len(p) for p in prompts)
        texts, finishes = [""] * len(rows), [None] * len(rows)

        def usage():
            completion = sum(len(r.tokens) for r in rows)
            _note(request, prompt_tokens=prompt_tokens, completion_tokens=completion)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        if not body.stream:
            await wait(request, job, answered)
            while not events.empty():
                index, text, finish = events.get_nowait()
                texts[index] += text
                finishes[index] = finish or finishes[index]
            _note(request, output=texts)
            return JSONResponse(make_final(texts, finishes, usage()))

        async def stream():
            done, deadline = 0, loop.time() + settings.request_timeout
            try:
                opening = make_chunk(None, None, None)
                if opening["choices"]:  # chat: the role delta; completions have none
                    yield _sse(opening)
                while done < len(rows):
                    if job.future.done() and job.future.exception() and events.empty():
                        # The 200 and its headers are already sent: the error goes in
                        # the stream (the openai client raises it as an APIError).
                        exc = job.future.exception()
                        status = exc.status_code if isinstance(exc, ApiError) else 500
                        message = exc.message if isinstance(exc, ApiError) else f"internal error: {type(exc).__name__}"
                        code = exc.code if isinstance(exc, ApiError) else "internal_error"
                        _note(request, output=texts)
                        yield _sse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                              "param": getattr(exc, "param", None), "code": code}})
                        return
                    if loop.time() > deadline:
                        m_cancelled.labels("timeout").inc()
                        yield _sse({"error": {"message": f"no answer within {settings.request_timeout:g} s",
                                              "type": "timeout_error", "param": None, "code": "timeout"}})
                        return
                    try:
                        index, text, finish = await asyncio.wait_for(events.get(), 0.2)
                    except asyncio.TimeoutError:
                        continue
                    texts[index] += text
                    if text:
                        yield _sse(make_chunk(index, text, None))
                    if finish:
                        done += 1
                        yield _sse(make_chunk(index, None, finish))
                if (body.stream_options or {}).get("include_usage"):
                    chunk = make_chunk(None, None, None)
                    chunk["choices"], chunk["usage"] = [], usage()
                    yield _sse(chunk)
                else:
                    usage()
                _note(request, output=texts)
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                m_cancelled.labels("disconnect").inc()
                raise
            finally:
                job.cancel()  # no-op when finished; frees the slot when the client left

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ routes

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        # 503 while draining, so a load balancer stops sending new requests.
        if draining and draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": started, "owned_by": "tuneforge",
                "task": served.task, "parent": None if model_id == served.base_name else served.base_name}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in served.names()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id not in served.names():
            raise ApiError(404, f"the model '{model_id}' does not exist", "model_not_found", "model")
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        pick(body.model, "sft", request)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _note(request, input=messages)
        source = served.adapters.get(body.model)  # an adapter may carry its own pinned template
        template = source.chat_template if source else None
        tok = served.tokenizer

        def encode():
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           chat_template=template or served.chat_template)
            return tok(text, add_special_tokens=False)["input_ids"]

        prompt = await asyncio.to_thread(encode)  # a long prompt must not stall the event loop
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, text, finish):
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model}
            if index is None:  # the opening chunk: one role delta per choice
                return {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None} for i in range(body.n)]}
            delta = {"content": text} if text is not None else {}
            return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

        def final(texts, finishes, usage):
            return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                                 "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes))],
                    "usage": usage}

        return await run_generation(request, body, [prompt], settings.default_max_tokens, chunk, final)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        pick(body.model, "sft", request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is empty", "invalid_value", "prompt")
        _note(request, input=prompts)
        ids = await asyncio.to_thread(lambda: [served.tokenizer(p)["input_ids"] for p in prompts])
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, text, finish):
            head = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
            if index is None:
                return {**head, "choices": []}
            return {**head, "choices": [{"index": index, "text": text or "", "logprobs": None,
                                         "finish_reason": finish}]}

        def final(texts, finishes, usage):
            return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                                for i, (t, f) in enumerate(zip(texts, finishes))], "usage": usage}

        return await run_generation(request, body, ids, 16, chunk, final)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        pick(body.model, "classification", request)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > settings.max_inputs:
            raise ApiError(400, f"input takes 1 to {settings.max_inputs} texts", "invalid_value", "input")
        _note(request, input=texts)
        post = postprocessor(body.model)
        check_groups(body.model, post, texts, body.groups)
        probs = await wait(request, submit("classify", body.model, texts, len(texts)))
        labels = served.labels
        data = [{"object": "classification", "index": i, "label": labels[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(labels, p))} for i, p in enumerate(probs)]
        # Fairness post-processing saved with the model decides the label; the
        # model's own argmax stays visible next to it.
        fair = post(probs, groups=body.groups, texts=texts) if post is not None else []
        for row, label in zip(data, fair):
            row["model_label"], row["label"], row["postprocessed"] = row["label"], label, True
        _note(request, output=[d["label"] for d in data])
        return {"object": "list", "model": body.model, "data": data}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/adapters")
    async def list_adapters():
        return {"object": "list", "data": [{"id": n, "path": str(s.path)} for n, s in served.adapters.items()]}

    @app.post("/admin/adapters", status_code=201)
    async def add_adapter(body: AddAdapter):
        if body.name in served.names():
            raise ApiError(409, f"'{body.name}' is already served; DELETE it first", "name_taken", "name")
        try:
            source = registry.adapter_source(body.name, body.path)
            await batcher.call(lambda: registry.add_adapter(served, source))
        except registry.TargetError as exc:
            raise ApiError(400, str(exc), "invalid_adapter", "path") from None
        return model_card(body.name)

    @app.delete("/admin/adapters/{adapter}")
    async def remove_adapter(adapter: str):
        if adapter == served.base_name:
            raise ApiError(400, "the base model cannot be removed", "invalid_value", "name")
        if adapter not in served.adapters:
            raise ApiError(404, f"no adapter named '{adapter}'", "model_not_found", "name")
        await batcher.call(lambda: registry.remove_adapter(served, adapter, device))
        return {"id": adapter, "object": "model", "deleted": True}

    # ------------------------------------------------------------ layers (last added = outermost)

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body,
                       too_large=lambda: ApiError(413, f"request body over {settings.max_body} bytes",
                                                  "request_too_large"))
    app.add_middleware(DrainMiddleware, draining=draining or (lambda: False))
    app.add_middleware(AuthMiddleware, api_keys=list(api_keys or []), admin_keys=list(admin_keys or []))
    app.add_middleware(ObserveMiddleware, requests=m_requests, latency=m_latency, inflight=m_inflight,
                       request_log=request_log)
    return app


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent."""


def _sse(obj: dict) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ObserveMiddleware:
    """Counts, latency and the request log, labelled by route template (not raw path)."""

    def __init__(self, app, requests, latency, inflight, request_log):
        self.app, self.requests, self.latency, self.inflight, self.log = app, requests, latency, inflight, request_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, begun = 499, time.perf_counter()
        notes = scope.setdefault("tuneforge", {})

        async def observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.inflight.inc()
        try:
            await self.app(scope, receive, observed)
        except ClientGone:
            status = 499
        except Exception:
            status = 500  # ServerErrorMiddleware (outside this layer) answers it
            raise
        finally:
            self.inflight.dec()
            elapsed = time.perf_counter() - begun
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(route, notes.get("model") or "", str(status)).inc()
            self.latency.labels(route).observe(elapsed)
            if self.log is not None and route in INFERENCE_ROUTES:
                try:
                    await asyncio.to_thread(self.log.write, route, notes.get("model"), status, elapsed,
                                            notes.get("input"), notes.get("output"), notes.get("prompt_tokens"),
                                            notes.get("completion_tokens"))
                except Exception as exc:  # the answer is already sent: a full disk must not turn it into a 500
                    import logging

                    logging.getLogger("tuneforge.serve").error("request log write failed: %s", exc)

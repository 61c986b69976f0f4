"""The serving service: one loaded model (base + LoRA adapters) on its device,
the batcher that owns the model thread and the bounded queue, the Prometheus
metrics, the request log and the fairness post-processing cache.

Route handlers (app.py) parse a request, call one method here and shape the
answer; every limit (work per request, queue, timeout, disconnects) is applied
here, the same way for every route.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge import kinds
from tuneforge.serve import engine, registry
from tuneforge.serve.batcher import Batcher, QueueFull
from tuneforge.serve.schemas import (
    ERROR_TYPES,
    AddAdapter,
    ApiError,
    ChatRequest,
    ClassifyRequest,
    RewardRequest,
    Sampling,
)

UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "response_format", "suffix", "logit_bias",
               "presence_penalty", "frequency_penalty")


@dataclass
class Settings:
    max_batch: int = 32  # rows (texts or sequences) per micro-batch; 1 turns batching off
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # queued requests before 429
    request_timeout: float = 60.0  # seconds, queue wait included
    max_body: int = 2 * 1024 * 1024
    default_max_tokens: int = 256  # chat completions without max_tokens (completions default to 16, as OpenAI)
    max_n: int = 8
    max_inputs: int = 256  # texts per /v1/classify request, responses per /v1/rewards request
    # Work per request, in tokens: the texts' tokens for /v1/classify, the rendered prompt + response
    # pairs for /v1/rewards; prompt plus token budget (max_tokens), summed over sequences, for generation.
    max_request_tokens: int = 16384
    device: str = "auto"
    dtype: str = "float32"  # or bfloat16: half the memory; on CPUs with AVX512-BF16 or AMX, faster batches
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, one per core)
    request_log: Optional[str] = None
    log_inputs: str = "hash"


# One reward rendering at a time: request threads share the fast tokenizer, which
# must not be entered from two threads while its settings change ("Already borrowed").
REWARD_TOKENIZE = threading.Lock()


def split_results(values: list, pieces: list) -> list:
    """Per piece of a micro-batch, its rows' share of `values` (one per row, in piece order)."""
    out, start = [], 0
    for piece in pieces:
        out.append(values[start:start + len(piece.payload)])
        start += len(piece.payload)
    return out


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent."""


def note(request: Request, **fields: Any) -> None:
    """Facts for the metrics/request-log layer (it reads them after the response)."""
    request.scope.setdefault("tuneforge", {}).update(fields)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_error(exc: BaseException) -> str:
    """A failure after the 200 and its headers are sent goes in the stream (the
    openai client raises it as an APIError)."""
    status = exc.status_code if isinstance(exc, ApiError) else 500
    message = exc.message if isinstance(exc, ApiError) else f"internal error: {type(exc).__name__}"
    code = exc.code if isinstance(exc, ApiError) else "internal_error"
    return sse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                          "param": getattr(exc, "param", None), "code": code}})


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter("tuneforge_requests", "HTTP requests by route, model and status",
                                ["route", "model", "status"], registry=reg)
        self.latency = Histogram("tuneforge_request_latency_seconds", "Time to the end of the response", ["route"],
                                 registry=reg, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("tuneforge_batch_size", "Rows per model call", ["kind"], registry=reg,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.tokens = Counter("tuneforge_generated_tokens", "Tokens generated", ["model"], registry=reg)
        self.cancelled = Counter("tuneforge_cancelled_requests", "Requests dropped: client gone or timed out",
                                 ["reason"], registry=reg)
        self.inflight = Gauge("tuneforge_requests_in_flight", "Requests being answered", registry=reg)
        self.queue_depth = Gauge("tuneforge_queue_depth", "Requests waiting for a batch", registry=reg)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Pending:
    """The events of one generation request: text pieces from the model thread,
    in order, and `answered`, set once every row has finished, which can be long
    before its batch ends (a 2-token answer batched with a 480-token one)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.answered = loop.create_future()
        self.open_rows = 0

    def on_event(self, index: int, text: str, finish: Optional[str]) -> None:
        self.events.put_nowait((index, text, finish))
        if finish:
            self.open_rows -= 1
            if self.open_rows == 0 and not self.answered.done():
                self.answered.set_result(None)

    def on_job_done(self, future: asyncio.Future) -> None:
        error = future.exception()  # a failed batch, or a model removed while queued
        if self.answered.done():
            return
        if error is not None:
            self.answered.set_exception(error)
        else:
            self.answered.set_result(None)

    def emit_for(self, index: int) -> Callable[[str, Optional[str]], None]:
        return lambda text, finish: self.loop.call_soon_threadsafe(self.on_event, index, text, finish)


class Service:
    """Everything a route needs from the loaded model; see the module docstring."""

    def __init__(self, target: str, adapters: Optional[dict[str, str]], settings: Settings, name: Optional[str]):
        from tuneforge.models import pick_device

        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        self.served = registry.resolve(target, name)
        self.served.dtype = settings.dtype
        extra = [registry.adapter_source(n, ref) for n, ref in (adapters or {}).items()]
        registry.load(self.served, extra, self.device)
        self.metrics = Metrics()
        self.batcher = Batcher(self.run_group, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                               on_batch=lambda kind, size: self.metrics.batch.labels(kind).observe(size))
        self.metrics.queue_depth.set_function(self.batcher.depth)
        self.request_log = None
        if settings.request_log:
            from tuneforge.serve.requestlog import RequestLog

            self.request_log = RequestLog(settings.request_log, settings.log_inputs)
        self.started = int(time.time())
        self.post_cache: dict = {}

    async def close(self) -> None:
        await self.batcher.stop()
        if self.request_log:
            self.request_log.close()

    # ------------------------------------------------------------ the model thread

    def run_group(self, kind: str, model: str, pieces: list) -> list:
        """On the model thread: one micro-batch of one served model; per piece, its rows' results."""
        served = self.served
        if model not in served.names():  # removed while the request waited
            return [ApiError(404, f"model '{model}' was removed", "model_not_found", "model")] * len(pieces)
        with registry.activate(served, model):
            if kind == "classify":
                probs = engine.classify(served, [ids for p in pieces for ids in p.payload], self.device)
                return split_results(probs, pieces)
            if kind == "reward":
                return split_results(registry.reward_scores(served, [ids for p in pieces for ids in p.payload],
                                                            self.device), pieces)
            rows = [r for p in pieces for r in p.payload]
            engine.generate(served, rows, self.device)
            self.metrics.tokens.labels(model).inc(sum(len(r.tokens) for r in rows))
            return [[r.finish for r in p.payload] for p in pieces]

    # ------------------------------------------------------------ checks

    def pick(self, model: str, kind: str, request: Request) -> None:
        served = self.served
        if model not in served.names():
            raise ApiError(404, f"the model '{model}' does not exist; GET /v1/models lists "
                                f"{', '.join(served.names())}", "model_not_found", "model")
        # Noted only once known: a client-chosen name as a metrics label would
        # grow /metrics (and memory) without bound.
        note(request, model=model)
        if served.kind != kind:
            other = kinds.get(served.kind).route
            raise ApiError(400, f"'{model}' is a {served.kind} model; use {other}", "wrong_model_kind", "model")

    def check_work(self, tokens: int, what: str, param: str) -> None:
        """400 for a request over --max-request-tokens, before it reaches the model."""
        cap = self.settings.max_request_tokens
        if tokens > cap:
            raise ApiError(400, f"this request is {tokens} tokens of work ({what}); this server takes at most {cap} "
                                "per request (--max-request-tokens): split it over several requests",
                           "too_many_tokens", param)

    def postprocessor(self, model: str):
        """The fairness post-processing saved with the model behind `model`
        (run/model/fairness_postprocess.json), or None."""
        from tuneforge.fairness.mitigate import load_postprocessor

        served = self.served
        source = served.adapters.get(model)  # one read: the model thread may replace the dict meanwhile
        if source is not None:
            path = Path(source.path)
        elif served.own_adapter is not None and model == served.own_adapter.name:
            path = Path(served.own_adapter.path)
        else:
            path = Path(served.base_path)
        folders = (path, path.parent) if path.name == "adapter" else (path,)
        if path not in self.post_cache:  # read once per model folder, not on every request
            self.post_cache[path] = next((p for p in map(load_postprocessor, folders) if p is not None), None)
        return self.post_cache[path]

    @staticmethod
    def check_groups(model: str, post, texts: list[str], groups: Optional[list[str]]) -> None:
        if groups is not None and len(groups) != len(texts):
            raise ApiError(400, f"`groups` has {len(groups)} values for {len(texts)} inputs", "invalid_value", "groups")
        column = post.group_source.get("column") if post is not None else None
        if column and groups is None:
            raise ApiError(400, f"'{model}' applies fairness post-processing by group: pass `groups`, one value of "
                                f"column '{column}' per input", "missing_groups", "groups")
        if post is not None:
            from tuneforge.fairness.mitigate import UnseenGroups

            try:
                post.thresholds.check_groups(groups if groups is not None else post.groups_from_texts(texts))
            except UnseenGroups as exc:
                raise ApiError(400, str(exc), "unseen_group", "groups") from None

    # ------------------------------------------------------------ queue and waiting

    def submit(self, kind: str, model: str, rows: list):
        try:
            return self.batcher.submit(kind, model, rows)
        except QueueFull:
            raise ApiError(429, f"server busy: {self.settings.max_queue} requests queued; retry shortly",
                           "queue_full", None, {"Retry-After": "1"}) from None

    def deadline(self, request: Request) -> float:
        """When the request's time is up (time.monotonic): --timeout after it arrived,
        tokenization and queue wait included."""
        return request.scope.get("tuneforge", {}).get("arrived", time.monotonic()) + self.settings.request_timeout

    async def wait(self, request: Request, job, future: Optional[asyncio.Future] = None) -> Any:
        """The job's result (or `future`'s); 504 past the timeout; the job is dropped when the client leaves."""
        future = future if future is not None else job.future
        until = self.deadline(request)
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                job.cancel()
                self.metrics.cancelled.labels("timeout").inc()
                raise ApiError(504, f"no answer within {self.settings.request_timeout:g} s; retry with less work",
                               "timeout")
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(0.2, remaining))
            except asyncio.CancelledError:  # the server cut the request (shutdown past its grace time)
                job.cancel()
                raise
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    self.metrics.cancelled.labels("disconnect").inc()
                    raise ClientGone() from None

    # ------------------------------------------------------------ classification

    async def classify(self, request: Request, body: ClassifyRequest) -> dict:
        self.pick(body.model, kinds.CLASSIFIER, request)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > self.settings.max_inputs:
            raise ApiError(400, f"input takes 1 to {self.settings.max_inputs} texts", "invalid_value", "input")
        note(request, input=texts)
        post = self.postprocessor(body.model)
        self.check_groups(body.model, post, texts, body.groups)
        ids = await asyncio.to_thread(engine.tokenize, self.served, texts)
        self.check_work(sum(len(x) for x in ids), f"the tokens of {len(texts)} texts", "input")
        probs = await self.wait(request, self.submit("classify", body.model, ids))
        labels = self.served.labels
        data = [{"object": "classification", "index": i, "label": labels[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(labels, p))} for i, p in enumerate(probs)]
        # Fairness post-processing saved with the model decides the label; the
        # model's own argmax stays visible next to it.
        fair = post(probs, groups=body.groups, texts=texts) if post is not None else []
        for row, label in zip(data, fair):
            row["model_label"], row["label"], row["postprocessed"] = row["label"], label, True
        note(request, output=[d["label"] for d in data])
        return {"object": "list", "model": body.model, "data": data}

    # ------------------------------------------------------------ rewards

    def reward_ids(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids per (prompt, response), rendered as the reward model's training rendered them."""
        with REWARD_TOKENIZE:
            return registry.reward_encode(self.served, pairs)

    async def rewards(self, request: Request, body: RewardRequest) -> dict:
        self.pick(body.model, kinds.REWARD, request)
        pairs = body.pairs()
        if not pairs or len(pairs) > self.settings.max_inputs:
            raise ApiError(400, f"a request scores 1 to {self.settings.max_inputs} responses", "invalid_value",
                           "input" if body.input is not None else "responses")
        empty = next((i for i, (p, _) in enumerate(pairs) if not p.strip()), None)
        if empty is not None:
            raise ApiError(400, f"prompt {empty} is empty; a reward model scores a response to a prompt",
                           "invalid_value", "input" if body.input is not None else "prompt")
        note(request, input=[{"prompt": p, "response": r} for p, r in pairs])
        ids = await asyncio.to_thread(self.reward_ids, pairs)
        self.check_work(sum(len(x) for x in ids), f"the tokens of {len(pairs)} prompt + response pairs",
                        "input" if body.input is not None else "responses")
        scores = await self.wait(request, self.submit("reward", body.model, ids))
        note(request, output=scores)
        return {"object": "list", "model": body.model,
                "data": [{"object": "reward", "index": i, "score": float(s)} for i, s in enumerate(scores)]}

    # ------------------------------------------------------------ generation

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        """The prompt's token ids under the model's (or the adapter's) pinned chat template."""
        served = self.served
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        source = served.adapters.get(body.model)  # an adapter may carry its own pinned template
        template = (source.chat_template if source else None) or served.chat_template
        text = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                    chat_template=template)
        return served.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_sampling(self, body: Sampling) -> None:
        if body.n > self.settings.max_n:
            raise ApiError(400, f"n is at most {self.settings.max_n} on this server", "invalid_value", "n")
        for name in UNSUPPORTED:
            if getattr(body, name, None) not in (None, False, [], {}, 0):
                raise ApiError(400, f"'{name}' is not supported by this server", "unsupported_parameter", name)
        if getattr(body, "echo", False):
            raise ApiError(400, "'echo' is not supported by this server", "unsupported_parameter", "echo")

    def generation_rows(self, body: Sampling, prompts: list[list[int]], default_max: int, emit_for) -> list:
        import torch

        limit = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            limit = body.max_completion_tokens
        stops, rows = body.stops(), []
        most = max(self.settings.max_batch, self.settings.max_n)
        if len(prompts) * body.n > most:
            # A request's sequences run in micro-batches of max_batch, one after
            # another: unbounded, hundreds would hold the model for their whole length.
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is {len(prompts) * body.n} sequences; this "
                                f"server takes at most {most} per request: split the prompts over several requests",
                           "invalid_value", "prompt")
        context = self.served.context
        for p, prompt in enumerate(prompts):
            if not prompt:  # nothing to condition on: the forward pass has zero positions
                raise ApiError(400, f"prompt {p} is empty after tokenization; send at least one token of text",
                               "invalid_value", "prompt")
            room = context - len(prompt)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {context}",
                               "context_length_exceeded", "messages" if isinstance(body, ChatRequest) else "prompt")
            for c in range(body.n):
                index = p * body.n + c
                generator = None
                if body.seed is not None:
                    generator = torch.Generator().manual_seed(body.seed + index)
                rows.append(engine.GenRow(prompt, min(limit or default_max, room), body.temperature, body.top_p,
                                          stops, emit_for(index), lambda: False, generator))
        self.check_work(sum(len(r.prompt) + r.max_new for r in rows), "prompt tokens plus max_tokens, per sequence",
                        "max_tokens")
        return rows

    async def generate(self, request: Request, body: Sampling, prompts: list[list[int]], default_max: int,
                       make_chunk, make_final):
        """Queue the request's sequences; a JSON answer, or a stream of chunks."""
        self.check_sampling(body)
        pending = Pending(asyncio.get_running_loop())
        rows = self.generation_rows(body, prompts, default_max, pending.emit_for)
        pending.open_rows = len(rows)
        job = self.submit("generate", body.model, rows)
        job.future.add_done_callback(pending.on_job_done)
        # Read here so that an error nobody awaits (the client left first) is not logged as unretrieved.
        pending.answered.add_done_callback(lambda f: f.cancelled() or f.exception())
        for row in rows:
            row.cancelled = job.cancel_event.is_set
        run = GenerationRun(self, request, body, job, rows, pending, sum(len(p) for p in prompts), make_chunk)
        if not body.stream:
            await self.wait(request, job, pending.answered)
            texts, finishes = run.drain()
            note(request, output=texts)
            return JSONResponse(make_final(texts, finishes, run.usage()))
        return StreamingResponse(run.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ models and adapters

    def model_card(self, model_id: str) -> dict:
        served = self.served
        return {"id": model_id, "object": "model", "created": self.started, "owned_by": "tuneforge",
                "kind": served.kind, "parent": None if model_id == served.base_name else served.base_name}

    async def add_adapter(self, body: AddAdapter) -> dict:
        if body.name in self.served.names():
            raise ApiError(409, f"'{body.name}' is already served; DELETE it first", "name_taken", "name")
        try:
            source = registry.adapter_source(body.name, body.path)
            await self.batcher.call(lambda: registry.add_adapter(self.served, source))
        except registry.TargetError as exc:
            raise ApiError(400, str(exc), "invalid_adapter", "path") from None
        return self.model_card(body.name)

    async def remove_adapter(self, adapter: str) -> dict:
        if adapter == self.served.base_name:
            raise ApiError(400, "the base model cannot be removed", "invalid_value", "name")
        if adapter not in self.served.adapters:
            raise ApiError(404, f"no adapter named '{adapter}'", "model_not_found", "name")
        await self.batcher.call(lambda: registry.remove_adapter(self.served, adapter, self.device))
        return {"id": adapter, "object": "model", "deleted": True}


@dataclass
class GenerationRun:
    """One queued generation request on its way back to the client."""

    service: Service
    request: Request
    body: Sampling
    job: Any
    rows: list
    pending: Pending
    prompt_tokens: int
    make_chunk: Callable

    def __post_init__(self):
        self.texts = [""] * len(self.rows)
        self.finishes: list = [None] * len(self.rows)

    def usage(self) -> dict:
        completion = sum(len(r.tokens) for r in self.rows)
        note(self.request, prompt_tokens=self.prompt_tokens, completion_tokens=completion)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def drain(self) -> tuple[list, list]:
        """Every event so far, folded into the texts and finish reasons."""
        events = self.pending.events
        while not events.empty():
            index, text, finish = events.get_nowait()
            self.texts[index] += text
            self.finishes[index] = finish or self.finishes[index]
        return self.texts, self.finishes

    def failure(self) -> Optional[BaseException]:
        future = self.job.future
        if future.done() and future.exception() and self.pending.events.empty():
            return future.exception()
        return None

    async def stream(self):
        service, timeout = self.service, self.service.settings.request_timeout
        done, until = 0, service.deadline(self.request)
        try:
            opening = self.make_chunk(None, None, None)
            if opening["choices"]:  # chat: the role delta; completions have none
                yield sse(opening)
            while done < len(self.rows):
                if (error := self.failure()) is not None:
                    note(self.request, output=self.texts)
                    yield stream_error(error)
                    return
                if time.monotonic() > until:
                    service.metrics.cancelled.labels("timeout").inc()
                    yield sse({"error": {"message": f"no answer within {timeout:g} s", "type": "timeout_error",
                                         "param": None, "code": "timeout"}})
                    return
                try:
                    index, text, finish = await asyncio.wait_for(self.pending.events.get(), 0.2)
                except asyncio.TimeoutError:
                    continue
                self.texts[index] += text
                if text:
                    yield sse(self.make_chunk(index, text, None))
                if finish:
                    done += 1
                    yield sse(self.make_chunk(index, None, finish))
            usage = self.usage()
            if (self.body.stream_options or {}).get("include_usage"):
                chunk = self.make_chunk(None, None, None)
                chunk["choices"], chunk["usage"] = [], usage
                yield sse(chunk)
            note(self.request, output=self.texts)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            service.metrics.cancelled.labels("disconnect").inc()
            raise
        finally:
            self.job.cancel()  # no-op when finished; frees the slot when the client left

"""The OpenAI-compatible HTTP app: thin route handlers over the serving service
(service.py), OpenAI-shaped errors, and the layers around it, outermost first:
metrics + request log, API keys, drain (503 after SIGTERM), body limit (413),
then FastAPI.

`create_app(target, ...)` loads the model once and returns the FastAPI app.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tuneforge import kinds
from tuneforge.serve.schemas import (
    INFERENCE_ROUTES,
    TEXT_ERRORS,
    AddAdapter,
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    RewardRequest,
    error_loc,
    error_response,
)
from tuneforge.serve.security import AuthMiddleware, BodyLimitMiddleware, DrainMiddleware
from tuneforge.serve.service import ClientGone, Service, Settings, note

__all__ = ["Settings", "create_app"]


def create_app(target: str, adapters: Optional[dict[str, str]] = None, api_keys: Optional[list[str]] = None,
               admin_keys: Optional[list[str]] = None, settings: Optional[Settings] = None, name: Optional[str] = None,
               draining: Optional[Callable[[], bool]] = None) -> FastAPI:
    settings = settings or Settings()
    if not api_keys and not admin_keys:
        raise ValueError("no API keys: pass api_keys (the CLI reads TUNEFORGE_API_KEYS or --api-key-file)")
    service = Service(target, adapters, settings, name)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        await service.close()

    app = FastAPI(title="tuneforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.served, app.state.batcher = service, service.served, service.batcher
    app.state.registry, app.state.settings = service.metrics.registry, settings
    app.state.request_log_path = settings.request_log
    add_error_handlers(app)
    add_routes(app, service, draining)
    metrics = service.metrics
    # Layers: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body,
                       too_large=lambda: ApiError(413, f"request body over {settings.max_body} bytes",
                                                  "request_too_large"))
    app.add_middleware(DrainMiddleware, draining=draining or (lambda: False))
    app.add_middleware(AuthMiddleware, api_keys=list(api_keys or []), admin_keys=list(admin_keys or []))
    app.add_middleware(ObserveMiddleware, requests=metrics.requests, latency=metrics.latency,
                       inflight=metrics.inflight, request_log=service.request_log)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if isinstance(exc, ApiError):
            return error_response(exc.status_code, exc.message, exc.code, exc.param, exc.headers)
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return error_response(status, str(exc.detail), code, None, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        # Text that is not Unicode is a bad value (400, as OpenAI), not a shape error
        # (422); the other union members' complaints about it are noise.
        text_errors = [e for e in errors if e.get("type") in TEXT_ERRORS]
        shown = text_errors or errors
        message = "; ".join(f"{error_loc(e) or 'body'}: {e.get('msg')}" for e in shown[:5])
        param = error_loc(shown[0]) if shown else None
        return error_response(400 if text_errors else 422, message or "invalid request", "invalid_parameter",
                              param or None)

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def add_routes(app: FastAPI, service: Service, draining: Optional[Callable[[], bool]]) -> None:
    add_inference_routes(app, service)
    served = service.served

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        # 503 while draining, so a load balancer stops sending new requests.
        if draining and draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [service.model_card(n) for n in served.names()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id not in served.names():
            raise ApiError(404, f"the model '{model_id}' does not exist", "model_not_found", "model")
        return service.model_card(model_id)

    @app.get("/metrics")
    async def metrics():
        content, media_type = service.metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/admin/adapters")
    async def list_adapters():
        return {"object": "list", "data": [{"id": n, "path": str(s.path)} for n, s in served.adapters.items()]}

    @app.post("/admin/adapters", status_code=201)
    async def add_adapter(body: AddAdapter):
        return await service.add_adapter(body)

    @app.delete("/admin/adapters/{adapter}")
    async def remove_adapter(adapter: str):
        return await service.remove_adapter(adapter)


def add_inference_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        service.pick(body.model, kinds.CAUSAL_LM, request)
        note(request, input=[{"role": m.role, "content": m.text()} for m in body.messages])
        prompt = await asyncio.to_thread(service.chat_prompt, body)  # a long prompt must not stall the event loop
        chunk, final = chat_shapes(body, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        return await service.generate(request, body, [prompt], settings.default_max_tokens, chunk, final)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.pick(body.model, kinds.CAUSAL_LM, request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is empty", "invalid_value", "prompt")
        note(request, input=prompts)
        tokenizer = service.served.tokenizer
        ids = await asyncio.to_thread(lambda: [tokenizer(p)["input_ids"] for p in prompts])
        chunk, final = completion_shapes(body, f"cmpl-{uuid.uuid4().hex}", int(time.time()))
        return await service.generate(request, body, ids, 16, chunk, final)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        return await service.classify(request, body)

    @app.post("/v1/rewards")
    async def rewards(body: RewardRequest, request: Request):
        return await service.rewards(request, body)


def chat_shapes(body: ChatRequest, ident: str, created: int):
    """The chunk and final-answer builders of a chat completion."""

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

    return chunk, final


def completion_shapes(body: CompletionRequest, ident: str, created: int):
    """The chunk and final-answer builders of a text completion."""

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

    return chunk, final


class ObserveMiddleware:
    """Counts, latency and the request log, labelled by route template (not raw path)."""

    def __init__(self, app, requests, latency, inflight, request_log):
        self.app, self.requests, self.latency, self.inflight, self.log = app, requests, latency, inflight, request_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, begun = 499, time.perf_counter()
        notes = scope.setdefault("tuneforge", {})
        notes["arrived"] = time.monotonic()  # the request timeout counts from here

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

"""API keys, and the pure ASGI layers that run before any routing or body read.

Keys are checked on the raw request path: only an exact `/health` is public,
so `//v1/models`, `/v1/../metrics`, `/health/../v1/models` or percent-encoded
variants all need a key. Inference routes are an explicit allow-list; every
other path (the admin routes, and anything unknown) needs an admin key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Callable, Optional

API_KEYS_ENV = "TUNEFORGE_API_KEYS"
ADMIN_KEYS_ENV = "TUNEFORGE_ADMIN_KEYS"
PUBLIC = b"/health"
USER_PATHS = {b"/v1/models", b"/v1/chat/completions", b"/v1/completions", b"/v1/classify", b"/v1/rewards",
              b"/metrics"}
USER_PREFIXES = (b"/v1/models/",)  # GET /v1/models/{id}


def read_keys(env: str, file: Optional[str]) -> list[str]:
    """Keys from a comma-separated environment variable and/or a file (one a line, # comments)."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if file:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"key file {file} does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                if len(line) < 16:
                    raise ValueError(f"{file}:{number}: key shorter than 16 characters; use a long random key")
                keys.append(line)
    return keys


def new_key() -> str:
    return "tf-" + secrets.token_urlsafe(32)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _matches(given: bytes, keys: list[bytes]) -> bool:
    # Digests of equal length, compared against every key (no early exit):
    # compare_digest on raw keys of different lengths returns at once, which
    # gives the key's length away through timing. `keys` hold digests already.
    given, found = _digest(given), False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def _bearer(scope) -> Optional[bytes]:
    """The bearer token (b"" when missing or not a bearer token), or None when the
    request carries several Authorization headers: which one counts would depend
    on the proxy in front (some keep the first, some the last, some join them)."""
    values = [value for name, value in scope.get("headers", []) if name == b"authorization"]
    if len(values) > 1:
        return None
    scheme, _, token = (values[0] if values else b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def error_body(status: int, message: str, kind: str, code: Optional[str] = None, param: Optional[str] = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def send_error(send, status: int, message: str, kind: str, code: Optional[str] = None,
                     headers: Optional[list] = None) -> None:
    body = error_body(status, message, kind, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    def __init__(self, app, api_keys: list[str], admin_keys: list[str]):
        self.app = app
        self.admin = [_digest(k.encode()) for k in admin_keys]
        self.users = [_digest(k.encode()) for k in api_keys] + self.admin  # an admin key works everywhere

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # no websockets here
            return await send({"type": "websocket.close", "code": 1008})
        raw = scope.get("raw_path") or scope["path"].encode()
        if raw == PUBLIC and scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = _bearer(scope)
        if given is None:
            return await send_error(send, 401, "several Authorization headers: send exactly one "
                                    "'Authorization: Bearer <key>'", "authentication_error", "ambiguous_api_key",
                                    [(b"www-authenticate", b"Bearer")])
        user_route = raw in USER_PATHS or any(raw.startswith(p) and b"/" not in raw[len(p):] and b"%" not in raw
                                              for p in USER_PREFIXES)
        if not given or not _matches(given, self.users if user_route else self.admin):
            if user_route or not _matches(given, self.users):
                return await send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        "authentication_error", "invalid_api_key",
                                        [(b"www-authenticate", b"Bearer")])
            message = ("this route needs an admin key (TUNEFORGE_ADMIN_KEYS)" if self.admin
                       else "admin routes are off: start the server with TUNEFORGE_ADMIN_KEYS or --admin-key-file")
            return await send_error(send, 403, message, "permission_error", "admin_key_required")
        return await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 on a declared Content-Length over the limit, before reading any of it;
    for chunked bodies, as soon as the running count passes the limit."""

    def __init__(self, app, limit: int, too_large: Callable[[], Exception]):
        self.app, self.limit, self.too_large = app, limit, too_large

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return await send_error(send, 413, f"request body over {self.limit} bytes", "invalid_request_error",
                                        "request_too_large", [(b"connection", b"close")])
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # Raised inside the app's body read, so FastAPI's handler turns it into a 413.
                raise self.too_large()
            return message

        return await self.app(scope, counted, send)


class DrainMiddleware:
    """Once shutdown has begun, new requests get 503 (with Retry-After) while
    in-flight ones finish; every response from then on says `Connection: close`,
    so that keep-alive clients reconnect elsewhere instead of reusing a
    connection that is about to close."""

    def __init__(self, app, draining: Callable[[], bool]):
        self.app, self.draining = app, draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining() and scope["path"] != "/health":
            return await send_error(send, 503, "the server is shutting down; retry on another instance",
                                    "server_error", "shutting_down",
                                    [(b"connection", b"close"), (b"retry-after", b"1")])

        async def closing(message):
            if message["type"] == "http.response.start" and self.draining():
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, closing)

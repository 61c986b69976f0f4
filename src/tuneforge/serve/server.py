"""Bind the app with uvicorn; SIGTERM drains: no new connections (the listening
socket closes), requests in flight finish, and a request sent meanwhile on an
open keep-alive connection is answered 503 with `Connection: close` and
`Retry-After` (not a TCP reset); then the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Optional

import uvicorn

# How long open keep-alive connections stay open after SIGTERM when no request is
# in flight: a client that sent one just then gets its 503 rather than a reset.
DRAIN_LINGER_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn closes idle keep-alive connections the moment shutdown begins, so a
    request a client sends on one then meets a reset. Here they stay open (the app
    answers each request on them 503 + Connection: close) until the requests in
    flight have finished, and for DRAIN_LINGER_S at least."""

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # no new connections
            server.close()
        for sock in sockets or []:
            sock.close()
        grace, begun = self.config.timeout_graceful_shutdown, time.monotonic()
        linger_until, until = begun + DRAIN_LINGER_S, begun + grace if grace is not None else float("inf")
        while not self.force_exit and time.monotonic() < until and \
                (self.server_state.tasks or time.monotonic() < linger_until):
            await asyncio.sleep(0.05)
        # uvicorn's own shutdown closes the idle connections and waits for the
        # rest, within what is left of the grace time.
        if grace is not None:
            self.config.timeout_graceful_shutdown = max(until - time.monotonic(), 0.1)
        await super().shutdown(sockets)


def run_server(target: str, adapters: dict[str, str], api_keys: list[str], admin_keys: list[str], settings,
               host: str = "127.0.0.1", port: int = 8000, name: Optional[str] = None,
               on_ready=None) -> int:
    from tuneforge.serve.app import create_app

    holder: dict = {}
    app = create_app(target, adapters, api_keys, admin_keys, settings, name,
                     draining=lambda: bool(holder.get("server") and holder["server"].should_exit))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            # in-flight requests get their full timeout before being cut
                            timeout_graceful_shutdown=settings.request_timeout + 5, lifespan="on")
    server = holder["server"] = DrainingServer(config)
    # uvicorn re-raises the captured signal after its graceful shutdown; with a
    # handler installed here that re-raise is a no-op and the exit code stays 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if on_ready:
        on_ready(app)
    server.run()
    return 0

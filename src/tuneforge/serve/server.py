"""Bind the app with uvicorn; SIGTERM drains: no new requests (503, and the
listening socket closes), in-flight ones finish, then the process exits 0."""

from __future__ import annotations

import signal
from typing import Optional


def run_server(target: str, adapters: dict[str, str], api_keys: list[str], admin_keys: list[str], settings,
               host: str = "127.0.0.1", port: int = 8000, name: Optional[str] = None,
               on_ready=None) -> int:
    import uvicorn

    from tuneforge.serve.app import create_app

    holder: dict = {}
    app = create_app(target, adapters, api_keys, admin_keys, settings, name,
                     draining=lambda: bool(holder.get("server") and holder["server"].should_exit))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            # in-flight requests get their full timeout before being cut
                            timeout_graceful_shutdown=settings.request_timeout + 5, lifespan="on")
    server = holder["server"] = uvicorn.Server(config)
    # uvicorn re-raises the captured signal after its graceful shutdown; with a
    # handler installed here that re-raise is a no-op and the exit code stays 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if on_ready:
        on_ready(app)
    server.run()
    return 0

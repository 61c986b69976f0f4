"""Opt-in request log for drift monitoring: one SQLite row per inference request.

Inputs and outputs are stored as JSON text (`store`) or as their sha256 (`hash`),
so a deployment can watch input drift without keeping user text.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,            -- unix seconds when the response ended
    route TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    input TEXT,                    -- JSON, or sha256 of the JSON when hashed
    output TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    inputs_hashed INTEGER NOT NULL
)
"""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


class RequestLog:
    def __init__(self, path: str, inputs: str = "hash"):
        if inputs not in ("store", "hash"):
            raise ValueError(f"log inputs must be 'store' or 'hash', not {inputs!r}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.hash = inputs == "hash"
        self.lock = threading.Lock()
        if not Path(path).exists():  # the log may hold raw inputs: readable by its owner only
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)

    def _value(self, value: Any) -> Optional[str]:
        if value is None:
            return None
        text = _canonical(value)
        return hashlib.sha256(text.encode()).hexdigest() if self.hash else text

    def write(self, route: str, model: Optional[str], status: int, latency_s: float, input: Any = None,
              output: Any = None, prompt_tokens: Optional[int] = None, completion_tokens: Optional[int] = None) -> None:
        row = (time.time(), route, model, status, latency_s * 1000.0, self._value(input), self._value(output),
               prompt_tokens, completion_tokens, int(self.hash))
        with self.lock:
            self.db.execute("INSERT INTO requests (time, route, model, status, latency_ms, input, output, "
                            "prompt_tokens, completion_tokens, inputs_hashed) VALUES (?,?,?,?,?,?,?,?,?,?)", row)

    def close(self) -> None:
        with self.lock:
            self.db.close()

"""Result files of the bench scripts: one new file per run, never overwritten.

Every run writes bench/results/<UTC date>T<HHMM>-<host><suffix>.json (a second run
in the same minute gets -2, -3, ...). The file is written to a temporary name,
fsynced, then hard-linked to its final name, which fails instead of replacing an
existing file: readers never see half a file and no earlier run is lost.
Each result also records when it ran and the machine's load (`conditions`), since
the same figures on a busy machine mean something else.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).resolve().parent / "results"


def conditions() -> dict:
    """When and under what load a measurement ran (1-, 5- and 15-minute load averages)."""
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def result_name(suffix: str = "", host: Optional[str] = None, now: Optional[dt.datetime] = None,
                attempt: int = 1) -> str:
    """`2026-12-01T2310-vm.json` (UTC), `...-vm-serve.json` with suffix "-serve"; attempt > 1 adds -N."""
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    host = host or socket.gethostname()
    extra = f"-{attempt}" if attempt > 1 else ""
    return f"{now:%Y-%m-%dT%H%M}-{host}{suffix}{extra}.json"


def write_result(data: Any, suffix: str = "", folder: Path = RESULTS, now: Optional[dt.datetime] = None,
                 host: Optional[str] = None) -> Path:
    """Write `data` as JSON under a new timestamped name in `folder`; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the committed results private
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for attempt in range(1, 1000):
            path = folder / result_name(suffix, host, now, attempt)
            try:
                os.link(tmp, path)  # atomic, and refuses to replace an existing file
            except FileExistsError:
                continue
            dirfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
            return path
        raise RuntimeError(f"no free result name in {folder}")
    finally:
        os.unlink(tmp)


def write_to(out: Optional[str], data: Any, suffix: str = "") -> Path:
    """An explicit --out path is written (atomically) as asked; otherwise a new result file."""
    if out is None:
        return write_result(data, suffix)
    from tuneforge.fsio import atomic_write_json

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path

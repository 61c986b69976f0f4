"""The run directory: what was asked, what was used, what happened.

runs/<name>-<timestamp>/
  recipe.yaml      resolved recipe
  manifest.json    data sha256s, package versions, git commit, seed, device, times
  metrics.jsonl    one line per logging step / evaluation
  rejects.jsonl    malformed rows (when any)
  checkpoints/     step-N/ (resumable) and best/ (weights of the best evaluation)
  model/           final model (merged, loadable); model/adapter/ for LoRA
  metrics.json     {"test": ..., "baseline": ..., "validation": ...}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from tuneforge.fsio import atomic_write_json, atomic_write_text
from tuneforge.recipe import Recipe, dump_recipe

PACKAGES = ("tuneforge", "torch", "transformers", "peft", "accelerate", "safetensors", "scikit-learn", "numpy")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, Optional[str]]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def new_run_dir(recipe: Recipe, output: Optional[str]) -> Path:
    if output:
        return Path(output)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe.name or 'run'}-{stamp}"


def find_resumable(recipe: Recipe, output: Optional[str]) -> Path:
    """The run folder to resume: --output, else the newest runs/<name>-* folder."""
    if output:
        path = Path(output)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"{path}: not a tuneforge run folder (no manifest.json); nothing to resume.")
        return path
    candidates = sorted(Path("runs").glob(f"{recipe.name or 'run'}-*"), key=lambda p: p.name)
    candidates = [c for c in candidates if (c / "manifest.json").is_file()]
    if not candidates:
        raise FileNotFoundError(f"no earlier run of '{recipe.name}' under runs/; pass --output RUN_DIR to resume one.")
    return candidates[-1]


class Run:
    """Owns a run folder; every write to it goes through here."""

    def __init__(self, path: Path, recipe: Recipe, resume: bool = False, writer: bool = True):
        self.path = Path(path)
        self.recipe = recipe
        # In data-parallel training every rank has a Run; only rank 0's writes.
        self.writer = writer
        if not writer:
            self.checkpoints = self.path / "checkpoints"
            self.manifest = {}
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)
        manifest_path = self.path / "manifest.json"
        if resume and manifest_path.is_file():
            self.manifest = json.loads(manifest_path.read_text())
            self.manifest.setdefault("resumed_at", []).append(_now())
        else:
            if manifest_path.is_file():
                raise FileExistsError(
                    f"{self.path} already holds a run; pass --resume to continue it or choose another --output."
                )
            self.manifest = {
                "name": recipe.name, "started": _now(), "ended": None, "status": "running",
                "seed": recipe.train.seed, "git_commit": git_commit(), "packages": package_versions(),
                "python": platform.python_version(), "platform": platform.platform(), "pid": os.getpid(),
            }
        atomic_write_text(self.path / "recipe.yaml", dump_recipe(recipe))
        self.save_manifest()

    def save_manifest(self) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / "manifest.json", self.manifest)

    def update(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.save_manifest()

    def finish(self, status: str = "completed") -> None:
        self.update(ended=_now(), status=status)

    # metrics.jsonl is append-only: a crash loses at most the line being written.
    def log(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop lines logged after the checkpoint so steps are not doubled."""
        path = self.path / "metrics.jsonl"
        if not self.writer or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        atomic_write_text(path, "".join(x + "\n" for x in kept))

    def write_json(self, name: str, obj: Any) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Optional[Any]:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

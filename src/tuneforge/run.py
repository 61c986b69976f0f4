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
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from tuneforge import safeyaml
from tuneforge.fsio import atomic_write_json, atomic_write_text, sha256_file
from tuneforge.recipe import Recipe, dump_recipe

# Recipe keys a resume may change: they decide what is logged, kept or scored
# on the test split, never the trained weights. Each change is recorded in the
# manifest (resume_changes); recipe.yaml keeps what the run started with.
RESUMABLE_CHANGES = ("name", "device", "train.log_every", "train.keep_checkpoints", "train.eval_batch_size",
                     "data.cache", "eval.")
# eval.validation_generate feeds validation metrics, hence the best checkpoint
RESUME_FIXED = ("eval.validation_generate",)


class ResumeRefused(ValueError):
    """The run folder was started with other settings or data than the resume asks for."""

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
        resumed = resume and manifest_path.is_file()
        if resumed:
            self.manifest = json.loads(manifest_path.read_text())
            changes = check_resume(self.path, recipe, self.manifest)
            self.manifest.setdefault("resumed_at", []).append(_now())
            if changes:
                self.manifest.setdefault("resume_changes", []).append({"at": _now(), "changes": changes})
            for folder in (self.path, self.checkpoints):  # what the interrupted run left half-done
                remove_leftovers(folder)
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
        if not (resumed and (self.path / "recipe.yaml").is_file()):  # a resume keeps what the run started with
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
        if self.writer:
            for folder in (self.path, self.checkpoints):
                remove_leftovers(folder)

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


def remove_leftovers(folder: Path) -> list[str]:
    """Delete what an interrupted `fsio.atomic_dir` leaves beside its target:
    `.tmp-<name>-*` (never completed) and `.old-<name>-*` (replaced) folders.
    Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for leftover in folder.iterdir():
        if leftover.is_dir() and leftover.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover.name)
    return removed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in RESUME_FIXED):
        return False
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def check_resume(path: Path, recipe: Recipe, manifest: dict) -> dict[str, list]:
    """Refuse (ResumeRefused) a resume whose recipe differs from the one the run
    started with in a key that changes training, or whose data files changed
    since; returns the allowed changes {key: [before, now]}."""
    how = (f"To train with the new settings start a new run (another --output, without --resume); "
           f"to continue this one, resume with the recipe in {path / 'recipe.yaml'}.")
    started = path / "recipe.yaml"
    before = _flatten(safeyaml.load_file(started)) if started.is_file() else {}
    now = _flatten(json.loads(json.dumps(recipe.model_dump(mode="json"))))
    changed = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
               if before and before.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if not _may_change(k)}
    if refused:
        shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items())
        raise ResumeRefused(f"{path}: cannot resume with a different recipe ({shown}). {how}")
    for split, info in (manifest.get("data") or {}).get("files", {}).items():
        # the recipe's path (the same as at the start, or the diff above refused it)
        file, digest = getattr(recipe.data, split, None), info.get("sha256")
        if file and digest and Path(file).is_file() and sha256_file(Path(file)) != digest:
            raise ResumeRefused(f"{path}: cannot resume: the {split} data {file} changed since the run started "
                                f"(sha256 differs), and resuming would mix two data sets. {how}")
    return {k: v for k, v in changed.items() if k not in refused}

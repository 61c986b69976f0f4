"""From recipe to train/validation/test splits: load, validate, deduplicate, split.

Dedup runs before splitting so no text can sit in two splits; counts are kept
so that read = kept + rejected + duplicates for every file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tuneforge.data.load import DataError, Example, LoadedFile, Reject, load_file
from tuneforge.fsio import sha256_file

PRINT_CAP = 20


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: Optional[list[str]]  # classification only, in id order
    report: dict = field(default_factory=dict)  # per-file and per-split counts
    rejects: list[Reject] = field(default_factory=list)


def example_key(fields: dict) -> str:
    """What makes two examples 'the same' for exact de-duplication."""
    if "text" in fields:
        return fields["text"].strip()
    if "messages" in fields:
        return json.dumps(fields["messages"], sort_keys=True, ensure_ascii=False)
    return json.dumps([fields["prompt"].strip(), fields["response"].strip()], ensure_ascii=False)


def _sort_labels(labels) -> list[str]:
    labels = list(labels)
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _dedup(examples: list[Example], seen: set) -> tuple[list[Example], int]:
    kept, dropped = [], 0
    for ex in examples:
        key = example_key(ex.fields)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(ex)
    return kept, dropped


def _carve(rows: list[dict], fraction: float, seed: int, stratify: bool) -> tuple[list[dict], list[dict]]:
    """Split `fraction` of rows off, stratified by label when possible."""
    if fraction <= 0 or not rows:
        return rows, []
    from sklearn.model_selection import train_test_split

    n_out = max(1, round(len(rows) * fraction))
    if n_out >= len(rows):
        raise DataError(f"only {len(rows)} usable training rows: too few to carve out a split of {fraction:.0%}.")
    labels = [r["label"] for r in rows] if stratify else None
    if labels is not None:
        counts: dict = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        # sklearn needs two members per class on each side; fall back rather than fail.
        if min(counts.values()) < 2 or n_out < len(counts) or len(rows) - n_out < len(counts):
            labels = None
    keep, out = train_test_split(rows, test_size=n_out, random_state=seed, shuffle=True, stratify=labels)
    return keep, out


def prepare_splits(recipe) -> Splits:
    """Load every data file of the recipe; raise DataError listing all rejects
    unless data.on_invalid is 'skip'."""
    cfg, task, seed = recipe.data, recipe.task, recipe.train.seed
    allowed = {str(lab) for lab in cfg.labels} if cfg.labels is not None else None
    files: dict[str, LoadedFile] = {"train": load_file(cfg.train, task, cfg, allowed)}
    if task == "classification" and allowed is None:
        allowed = {ex.fields["label"] for ex in files["train"].examples}
    for split in ("validation", "test"):
        path = getattr(cfg, split)
        if path:
            files[split] = load_file(path, task, cfg, allowed)

    rejects = [r for f in files.values() for r in f.rejects]
    if rejects and cfg.on_invalid == "error":
        raise InvalidRows(rejects)

    # Dedup: held-out files first, so a training row that repeats a test row is
    # the one dropped (the held-out sets stay as the user gave them).
    report: dict = {"files": {}, "splits": {}}
    seen: set = set()
    kept: dict[str, list[Example]] = {}
    for split in ("test", "validation", "train"):
        if split not in files:
            continue
        loaded = files[split]
        if cfg.dedup:
            kept[split], dropped = _dedup(loaded.examples, seen)
        else:
            kept[split], dropped = loaded.examples, 0
        report["files"][split] = {
            "path": loaded.path, "sha256": sha256_file(Path(loaded.path)), "read": loaded.read,
            "rejected": len(loaded.rejects), "duplicates_removed": dropped, "kept": len(kept[split]),
        }

    train_rows = [ex.fields for ex in kept["train"]]
    if cfg.max_rows is not None and len(train_rows) > cfg.max_rows:
        rng = random.Random(seed)
        train_rows = rng.sample(train_rows, cfg.max_rows)
        report["files"]["train"]["subsampled_to"] = cfg.max_rows
    stratify = task == "classification"
    total = len(train_rows)
    validation = [ex.fields for ex in kept.get("validation", [])]
    test = [ex.fields for ex in kept.get("test", [])]
    # Carved splits are fractions of what train held before carving (70/15/15).
    if "test" not in files:
        train_rows, test = _carve(train_rows, cfg.split[2], seed, stratify)
    if "validation" not in files:
        fraction = cfg.split[1] * total / max(len(train_rows), 1)
        train_rows, validation = _carve(train_rows, fraction, seed + 1, stratify)
    if not train_rows:
        raise DataError(f"{cfg.train}: no usable training rows.")

    labels = None
    if task == "classification":
        labels = _sort_labels({r["label"] for r in train_rows} | (allowed or set()))
        if len(labels) < 2:
            raise DataError(f"{cfg.train}: classification needs at least two labels, found {labels}.")
    for name, rows in (("train", train_rows), ("validation", validation), ("test", test)):
        entry: dict = {"rows": len(rows), "carved_from_train": name not in files}
        if labels is not None:
            entry["labels"] = {lab: sum(1 for r in rows if r["label"] == lab) for lab in labels}
        report["splits"][name] = entry
    return Splits(train_rows, validation, test, labels, report, rejects)


class InvalidRows(DataError):
    def __init__(self, rejects: list[Reject]):
        self.rejects = rejects
        shown = "\n".join(f"  {r}" for r in rejects[:PRINT_CAP])
        more = f"\n  ... and {len(rejects) - PRINT_CAP} more" if len(rejects) > PRINT_CAP else ""
        super().__init__(
            f"{len(rejects)} malformed row(s); nothing was trained:\n{shown}{more}\n"
            "Fix them, or set data.on_invalid=skip to train without them (they are written to rejects.jsonl)."
        )


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    from tuneforge.fsio import atomic_write_text

    lines = [json.dumps({"file": r.file, "line": r.line, "reason": r.reason}, ensure_ascii=False) for r in rejects]
    atomic_write_text(path, "".join(line + "\n" for line in lines))

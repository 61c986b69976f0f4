"""Splits and their bookkeeping; `prepare_splits` runs the data studio pipeline
(data/studio.py: load, clean, PII, dedup, near-dup, split, balance, augment).

Dedup runs before splitting so no text can sit in two splits; counts are kept
so that read = kept + rejected + duplicates + removed for every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tuneforge.data.load import DataError, Reject

PRINT_CAP = 20


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: Optional[list[str]]  # classification only, in id order
    report: dict = field(default_factory=dict)  # per-file and per-split counts
    rejects: list[Reject] = field(default_factory=list)
    # Filled by the data studio pipeline (data/studio.py):
    kind: Optional[str] = None  # classification, pair, prompt_response, chat, text, preference
    ids: dict = field(default_factory=dict)  # split -> source "file:line" of every row
    n_tokens: dict = field(default_factory=dict)  # split -> tokens per row as the model sees it
    blocks: Optional[dict] = None  # raw text: split -> max_length token blocks for continued pre-training


def example_key(fields: dict) -> str:
    """What makes two examples 'the same' for exact de-duplication."""
    if "text_pair" in fields:
        return json.dumps([fields["text"].strip(), fields["text_pair"].strip()], ensure_ascii=False)
    if "chosen" in fields:
        return json.dumps([fields["prompt"].strip(), fields["chosen"].strip(), fields["rejected"].strip()],
                          ensure_ascii=False)
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


def prepare_splits(recipe) -> Splits:
    """The recipe's train/validation/test rows, exactly as training sees them:
    the data studio pipeline (data/studio.py), cached by content hash. Raises
    InvalidRows listing every malformed row unless data.on_invalid is 'skip'.
    Evaluation, export and audits call this too, so they see the same splits."""
    from tuneforge.data.studio import prepare_data

    return prepare_data(recipe)


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

"""The split types both sides of the data pipeline share: `Splits` (what
preparation hands to trainers, evaluation, export and audits), the exact-dedup
key, label ordering, and malformed-row reporting (`InvalidRows`, rejects.jsonl).

Counts are kept so that read = kept + rejected + duplicates + removed (by
reason) for every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tuneforge.data.load import NOT_UTF8_HINT, DataError, Reject
from tuneforge.fsio import atomic_write_text

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


def sort_labels(labels) -> list[str]:
    """Labels in id order: numerically when they are all integers, else alphabetically."""
    labels = list(labels)
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def list_rejects(rejects: list[Reject], cap: int = PRINT_CAP) -> str:
    """The first `cap` rejects as indented `file:line: reason` lines, how many
    more, and a hint for files with invalid UTF-8 (another encoding, most likely)."""
    shown = "\n".join(f"  {r}" for r in rejects[:cap])
    shown += f"\n  ... and {len(rejects) - cap} more" if len(rejects) > cap else ""
    not_utf8 = sorted({r.file for r in rejects if r.reason == "invalid UTF-8"})
    if not_utf8:
        shown += f"\n  (invalid UTF-8 in {', '.join(not_utf8)}: {NOT_UTF8_HINT})"
    return shown


class InvalidRows(DataError):
    def __init__(self, rejects: list[Reject]):
        self.rejects = rejects
        super().__init__(
            f"{len(rejects)} malformed row(s); nothing was trained:\n{list_rejects(rejects)}\n"
            "Fix them, or set data.on_invalid=skip to train without them (they are written to rejects.jsonl)."
        )


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    lines = [json.dumps({"file": r.file, "line": r.line, "reason": r.reason}, ensure_ascii=False) for r in rejects]
    atomic_write_text(path, "".join(line + "\n" for line in lines))

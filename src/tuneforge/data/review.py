"""Human review of flagged rows: export a CSV, take back keep/drop/relabel decisions.

export: every row `data inspect` flags (likely label error, exact or near
duplicate, contamination, PII, encoding trouble, outlier) with its reasons,
score and a blank `decision` / `new_label` for the reviewer.
apply: validates the filled-in CSV (errors name csv:line), and writes a
decisions JSON keyed by the rows' source `file:line`. The prepare step applies
it (data.review_decisions) right after loading, so every re-run applies the same
decisions, and its report counts kept / dropped / relabelled rows. Each decision
carries a hash of the row it was made on: if the row changes, it is not applied.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from pathlib import Path
from typing import Optional

from tuneforge.data.formats import row_text
from tuneforge.data.load import DataError
from tuneforge.fsio import atomic_write_json, atomic_write_text

COLUMNS = ["id", "split", "line", "reasons", "score", "label", "suggested_label", "duplicate_of", "text",
           "decision", "new_label", "sha"]
DECISIONS = ("keep", "drop", "relabel")
_REASON_ORDER = ("label_issue", "contamination", "exact_duplicate", "near_duplicate", "pii", "encoding",
                 "length_outlier", "symbol_heavy")


def text_sha(fields: dict) -> str:
    """What a decision was made on: the row's text and label."""
    material = json.dumps([row_text(fields), fields.get("label")], ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _cell(value) -> str:
    """A cell safe to open in a spreadsheet: text starting with = + - @ (or a
    tab / carriage return) would run as a formula (CSV injection), so it gets
    a leading apostrophe; plain numbers such as a label -1 are left alone.
    Only display columns pass through here: decisions are read from id,
    decision, new_label and sha."""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(text)
        except ValueError:
            return "'" + text
    return text


def _rank(entry: dict) -> tuple:
    first = min((i for i, r in enumerate(_REASON_ORDER) for x in entry["reasons"] if x.startswith(r)), default=99)
    return first, -(entry["score"] or 0.0), entry["row"].id


def export_review(report: dict, path: Path) -> int:
    """Write the flagged rows of an inspect report as CSV; returns how many."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    entries = sorted(report["flags"].values(), key=_rank)
    for e in entries:
        row = e["row"]
        writer.writerow({
            "id": row.id, "split": e["split"], "line": row.id.rsplit(":", 1)[-1], "reasons": ";".join(e["reasons"]),
            "score": "" if e["score"] is None else f"{e['score']:.4f}", "label": _cell(row.fields.get("label", "")),
            "suggested_label": _cell(e.get("suggested_label", "")), "duplicate_of": e.get("duplicate_of", ""),
            "text": _cell(row_text(row.fields)[:2000]), "decision": "", "new_label": "", "sha": text_sha(row.fields),
        })
    atomic_write_text(Path(path), buf.getvalue())
    return len(entries)


def parse_review(path: Path, labels: Optional[set] = None) -> tuple[dict, dict]:
    """Read a reviewed CSV; (decisions by id, counts). Every bad line is
    reported at once as csv:line: reason."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text; save the sheet as 'CSV UTF-8' and apply it again.") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("id", "decision", "new_label") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:1: no column {', '.join(missing)}; export the file with "
                        "`tuneforge data review export` and fill in 'decision' (and 'new_label').")
    decisions: dict[str, dict] = {}
    problems = []
    counts = {"keep": 0, "drop": 0, "relabel": 0, "undecided": 0}
    end = reader.line_num  # the header's last line
    for record in reader:
        # A record spans several lines when a cell holds newlines; line_num is
        # its last line, so the record starts one after the previous one ended.
        line, end = end + 1, reader.line_num
        decision = (record.get("decision") or "").strip().lower()
        new_label = (record.get("new_label") or "").strip()
        row_id = (record.get("id") or "").strip()
        if not decision:
            if new_label:
                problems.append(f"{path}:{line}: new_label {new_label!r} given but decision is empty "
                                "(write 'relabel')")
            counts["undecided"] += 1
            continue
        if decision not in DECISIONS:
            problems.append(f"{path}:{line}: decision {decision!r} is not one of keep, drop, relabel")
            continue
        if not row_id:
            problems.append(f"{path}:{line}: empty id")
            continue
        if row_id in decisions:
            problems.append(f"{path}:{line}: a second decision for {row_id}")
            continue
        entry = {"decision": decision, "sha": (record.get("sha") or "").strip() or None}
        if decision == "relabel":
            if not new_label:
                problems.append(f"{path}:{line}: decision 'relabel' needs a new_label")
                continue
            if labels is not None and new_label not in labels:
                problems.append(f"{path}:{line}: new_label {new_label!r} is not a known label "
                                f"({', '.join(sorted(labels))})")
                continue
            entry["label"] = new_label
        elif new_label:
            problems.append(f"{path}:{line}: new_label given but decision is {decision!r} (write 'relabel')")
            continue
        decisions[row_id] = entry
        counts[decision] += 1
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in the review file; nothing was applied:\n{shown}{more}")
    return decisions, counts


def write_decisions(decisions: dict, counts: dict, source: Path, out: Path) -> Path:
    atomic_write_json(out, {"version": 1, "source": str(source),
                            "made": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "counts": counts, "decisions": decisions})
    return out


def read_decisions(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable decisions file ({exc}); write it with "
                        "`tuneforge data review apply`.") from None
    decisions = data.get("decisions") if isinstance(data, dict) else None
    if not isinstance(decisions, dict):
        raise DataError(f"{path}: no 'decisions' mapping; write it with `tuneforge data review apply`.")
    for row_id, d in decisions.items():
        if not isinstance(d, dict) or d.get("decision") not in DECISIONS:
            raise DataError(f"{path}: decision for {row_id} must be one of keep, drop, relabel.")
        if d["decision"] == "relabel" and not str(d.get("label") or "").strip():
            raise DataError(f"{path}: the relabel decision for {row_id} has no 'label'; write the file with "
                            "`tuneforge data review apply`.")
    return decisions

"""Read CSV/TSV/JSON/JSONL/Parquet into task examples, keeping every row's line.

Every malformed row becomes a `Reject` with `file:line: reason`; nothing is
dropped silently. Problems with a whole file (missing, not JSON, missing a
column) raise `DataError` at once, since no row of it could be used.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

csv.field_size_limit(1 << 26)

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "system": "system"}


class DataError(Exception):
    """The data cannot be used as given; the message says where and what to do."""


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Example:
    line: int
    fields: dict  # task fields: text/label, prompt/response, or messages


@dataclass
class LoadedFile:
    path: str
    examples: list[Example] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def read(self) -> int:
        return len(self.examples) + len(self.rejects)


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'. "
            f"Rename it or set data.format to one of csv, tsv, json, jsonl, parquet."
        ) from None


# ------------------------------------------------------------------ readers
# Each yields (line, record | None, error | None).


def _has_bad_utf8(value: Any) -> bool:
    # Undecodable bytes survive as lone surrogates under errors="surrogateescape".
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _read_delimited(path: Path, delimiter: str, columns: Optional[list[str]]) -> Iterator[tuple]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    # TSV files in the wild (GLUE, UCI) use no quoting: a stray quote is text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header = columns
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, None, f"unparsable line: {exc}"
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if header is None:
            header = [h.strip() for h in row]
            if len(set(header)) != len(header):
                raise DataError(f"{path}:{line}: the header repeats a column name: {header}")
            continue
        if not row or (len(row) == 1 and row[0] == ""):
            yield line, None, "empty line"
            continue
        if len(row) != len(header):
            yield line, None, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
            continue
        record = dict(zip(header, row))
        if any(_has_bad_utf8(v) for v in record.values()):
            yield line, None, "invalid UTF-8"
            continue
        yield line, record, None


def _read_jsonl(path: Path) -> Iterator[tuple]:
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue  # blank lines are layout in JSONL, not rows
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None, "invalid UTF-8"
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, None, f"unparsable JSON: {exc.msg} at column {exc.colno}"
                continue
            if not isinstance(record, dict):
                yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record, None


def _read_json(path: Path) -> Iterator[tuple]:
    """A JSON array of objects; each element reports the line where it starts."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8; a JSON file must be valid UTF-8 throughout.") from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:pos + 1] == "[":
        if text[pos:pos + 1] == "{":
            raise DataError(f"{path}:1: expected a JSON array of records; for one object per line use .jsonl.")
        raise DataError(f"{path}:1: expected a JSON array of records.")
    pos += 1
    line, counted = 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if text[pos:pos + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: unparsable JSON: {exc.msg} (column {exc.colno}).") from None
        if isinstance(record, dict):
            yield line, record, None
        else:
            yield line, None, f"expected a JSON object, got {type(record).__name__}"
        pos = skip(end)
        if text[pos:pos + 1] == ",":
            pos = skip(pos + 1)
            continue
        if text[pos:pos + 1] == "]":
            return
        bad_line = text.count("\n", 0, pos) + 1
        raise DataError(f"{path}:{bad_line}: unparsable JSON: expected ',' or ']' between records.")


def _read_parquet(path: Path) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    # Parquet has no lines; the "line" is the 1-based row number.
    for i, record in enumerate(table.to_pylist(), 1):
        yield i, record, None


def read_records(path: Path, fmt: str = "auto", columns: Optional[list[str]] = None) -> Iterator[tuple]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    fmt = detect_format(path, fmt)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, "," if fmt == "csv" else "\t", columns)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "json":
        return _read_json(path)
    return _read_parquet(path)


# --------------------------------------------------------------- validation


def _text(record: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, f"missing value in field '{key}'"
    if not isinstance(value, str):
        return None, f"field '{key}' must be text, got {type(value).__name__}"
    if _has_bad_utf8(value):
        return None, "invalid UTF-8"
    if not value.strip():
        return None, f"empty text in field '{key}'"
    return value, None


def _label(record: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    """Labels may be strings or integers; they are compared as their text form."""
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, f"missing value in field '{key}'"
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    return None, f"field '{key}' must be a string or integer label, got {type(value).__name__} {value!r}"


def _messages(record: dict, key: str) -> tuple[Optional[list], Optional[str]]:
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if isinstance(value, str):  # JSON text inside a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"field '{key}' is text but not a JSON list of messages"
    if not isinstance(value, list) or not value:
        return None, f"field '{key}' must be a non-empty list of {{role, content}} messages"
    out = []
    for i, msg in enumerate(value):
        if isinstance(msg, dict) and "from" in msg and "value" in msg and "role" not in msg:
            # ShareGPT: {from: human|gpt|system, value}
            msg = {"role": SHAREGPT_ROLES.get(msg["from"], msg["from"]), "content": msg["value"]}
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            return None, f"message {i} must be an object with 'role' and 'content' (or ShareGPT 'from' and 'value')"
        if msg["role"] not in ROLES:
            return None, f"message {i} has unknown role {msg['role']!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(msg["content"], str) or not msg["content"].strip():
            return None, f"message {i} has empty or non-text content"
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant message: nothing to learn from"
    return out, None


def _template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def to_example(record: dict, task: str, cfg) -> tuple[Optional[dict], Optional[str]]:
    """Map a raw record to the task's fields plus data.keep_columns, or say why it cannot be used."""
    example, err = _task_fields(record, task, cfg)
    if err:
        return None, err
    for name in getattr(cfg, "keep_columns", None) or []:
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, f"missing or empty field '{name}' (listed in data.keep_columns)"
        example[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return example, None


def _task_fields(record: dict, task: str, cfg) -> tuple[Optional[dict], Optional[str]]:
    if task in ("pair", "text", "preference"):
        from tuneforge.data.formats import kind_fields

        return kind_fields(record, task, cfg)
    if task == "classification":
        text, err = _text(record, cfg.text_column)
        if err:
            return None, err
        label, err = _label(record, cfg.label_column)
        if err:
            return None, err
        return {"text": text, "label": label}, None
    if cfg.messages_column:
        messages, err = _messages(record, cfg.messages_column)
        return ({"messages": messages}, None) if not err else (None, err)
    if cfg.prompt_template:
        values = {}
        for name in _template_fields(cfg.prompt_template):
            if name not in record:
                return None, f"missing field '{name}' (used by data.prompt_template)"
            value = record[name]
            values[name] = "" if value is None else str(value)
        prompt = cfg.prompt_template.format(**values).strip()
        # Alpaca-style optional inputs leave blank separators behind; squeeze them.
        while "\n\n\n" in prompt:
            prompt = prompt.replace("\n\n\n", "\n\n")
        if not prompt:
            return None, "empty prompt after applying data.prompt_template"
    else:
        prompt, err = _text(record, cfg.prompt_column)
        if err:
            return None, err
    response, err = _text(record, cfg.response_column)
    if err:
        return None, err
    return {"prompt": prompt, "response": response}, None


def _columns_needed(task: str, cfg) -> list[str]:
    return _task_columns(task, cfg) + list(getattr(cfg, "keep_columns", None) or [])


def _task_columns(task: str, cfg) -> list[str]:
    if task in ("pair", "text", "preference"):
        from tuneforge.data.formats import kind_columns

        return kind_columns(task, cfg)
    if task == "classification":
        return [cfg.text_column, cfg.label_column]
    if cfg.messages_column:
        return [cfg.messages_column]
    prompt_cols = _template_fields(cfg.prompt_template) if cfg.prompt_template else [cfg.prompt_column]
    return prompt_cols + [cfg.response_column]


def load_file(path: str, task: str, cfg, allowed_labels: Optional[set[str]] = None) -> LoadedFile:
    """Read and validate one file. Rows with unknown labels are rejected when
    `allowed_labels` is given."""
    out = LoadedFile(path=str(path))
    fmt = detect_format(Path(path), cfg.format)
    needed = _columns_needed(task, cfg)
    checked_header = False
    for line, record, error in read_records(Path(path), cfg.format, cfg.columns):
        if record is not None and not checked_header and fmt in ("csv", "tsv", "parquet"):
            # A tabular file missing a column fails every row the same way:
            # say it once, with the columns it does have.
            missing = [c for c in needed if c not in record]
            if missing:
                raise DataError(
                    f"{path}:1: no column {', '.join(repr(m) for m in missing)}; the file has "
                    f"{', '.join(repr(k) for k in record)}. Map them with data.*_column in the recipe"
                    + (" or name header-less columns with data.columns." if fmt != "parquet" else ".")
                )
            checked_header = True
        if error:
            out.rejects.append(Reject(str(path), line, error))
            continue
        example, error = to_example(record, task, cfg)
        if error is None and allowed_labels is not None and example["label"] not in allowed_labels:
            shown = ", ".join(sorted(allowed_labels)[:10])
            error = f"unknown label {example['label']!r} (known labels: {shown})"
        if error:
            out.rejects.append(Reject(str(path), line, error))
        else:
            out.examples.append(Example(line, example))
    return out

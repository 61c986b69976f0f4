"""Read CSV/TSV/JSON/JSONL/Parquet into examples of a data kind, keeping every row's line.

Every malformed row becomes a `Reject` with `file:line: reason`; nothing is
dropped silently (blank lines, text holding a NUL character and broken records
of a JSON array included). Problems with a whole file (missing, a directory, a
symlink loop, unreadable, not UTF-8, not JSON, missing a column) raise
`DataError` at once, since no row of it could be used.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from tuneforge.data.fields import has_bad_utf8, kind_row_columns, kind_row_fields

csv.field_size_limit(1 << 26)

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


NOT_UTF8_HINT = "the file is probably in another encoding (Latin-1, Windows-1252?): re-save it as UTF-8"


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
    fields: dict  # the data kind's fields: text/label, prompt/response, or messages


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


# --------------------------------------------------------------- the file


def path_problem(path) -> Optional[str]:
    """Why `path` cannot be read as a data file ("not found", "is a directory,
    not a file", ...), or None when it can."""
    try:
        with open(path, "rb") as fh:
            fh.read(0)
    except IsADirectoryError:
        return "is a directory, not a file"
    except FileNotFoundError:
        return "not found" if not os.path.islink(path) else "is a symlink to a missing file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (it links, directly or not, to itself)"
        return f"cannot be read: {exc.strerror or exc}"
    return None


def check_file(path) -> None:
    """Raise DataError unless `path` is a readable file."""
    problem = path_problem(path)
    if problem is not None:
        raise DataError(f"{path}: {problem}.")


_ENCODINGS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\xfe\xff", "UTF-16"),
              (b"\xff\xfe", "UTF-16"))
_COMPRESSED = ((b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "a zip archive"), (b"BZh", "bzip2-compressed"),
               (b"\xfd7zXZ", "xz-compressed"))


def _check_text_file(path: Path, head: bytes) -> None:
    """A whole file in another encoding, or compressed, is one error, not a reject per row."""
    for magic, name in _ENCODINGS:
        if head.startswith(magic):
            raise DataError(f"{path}: the file is {name} (byte-order mark {magic.hex(' ').upper()}); tuneforge reads "
                            f"UTF-8: re-save it as UTF-8 (e.g. iconv -f {name} -t UTF-8).")
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            raise DataError(f"{path}: the file is {name}, not text; decompress it first.")
    sample = head[:4096]
    if sample and sample.count(0) > len(sample) // 4:
        raise DataError(f"{path}: the file is mostly NUL bytes: UTF-16/UTF-32 without a byte-order mark, or binary. "
                        "tuneforge reads UTF-8 text: re-save it as UTF-8.")


def _read_text(path: Path) -> str:
    """The whole file as text: invalid UTF-8 bytes survive as lone surrogates
    (so each row holding one is rejected, not the file), a UTF-8 BOM is dropped."""
    raw = path.read_bytes()
    _check_text_file(path, raw[:4096])
    text = raw.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


# ------------------------------------------------------------------ readers
# Each yields (line, record | None, error | None).


def _read_delimited(path: Path, delimiter: str, columns: Optional[list[str]]) -> Iterator[tuple]:
    text = _read_text(path)
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
        if not row or (len(row) == 1 and row[0] == ""):
            yield line, None, "empty line"
            continue
        if header is None:
            header = [h.strip() for h in row]
            if any(has_bad_utf8(h) for h in header):
                raise DataError(f"{path}:{line}: the header is not valid UTF-8; {NOT_UTF8_HINT} "
                                "(e.g. iconv -f CP1252 -t UTF-8).")
            if len(set(header)) != len(header):
                raise DataError(f"{path}:{line}: the header repeats a column name: {header}")
            continue
        if len(row) != len(header):
            yield line, None, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
            continue
        record = dict(zip(header, row))
        if any(has_bad_utf8(v) for v in record.values()):
            yield line, None, "invalid UTF-8"
            continue
        yield line, record, None


def _read_jsonl(path: Path) -> Iterator[tuple]:
    with open(path, "rb") as fh:
        _check_text_file(path, fh.read(4096))
        fh.seek(0)
        for line_no, raw in enumerate(fh, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as the CSV reader drops it
            if not raw.strip():
                yield line_no, None, "empty line"  # counted and reported, as CSV does
                continue
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


def _element_end(text: str, pos: int) -> tuple[int, bool]:
    """Where a broken array element that starts at `pos` ends: at the ',' or ']'
    that closes it at its own depth (False), or at the '{' opening the next
    record when a brace was never closed (True: a '{' directly inside an object
    and not after ':' cannot be a value). A string ends at its closing quote or
    at the end of its line (JSON strings hold no raw newline), so a lost quote
    confuses one line, not the rest of the file."""
    stack: list[str] = []
    prev, i, n = "", pos, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            i, prev = (j + 1 if j < n and text[j] == '"' else j), '"'
            continue
        if ch == "{" and stack == ["{"] and prev != ":":
            return i, True
        if ch in "{[":
            stack.append(ch)
        elif ch in "}]":
            if stack:
                stack.pop()
            elif ch == "]":
                return i, False
        elif ch == "," and not stack:
            return i, False
        if not ch.isspace():
            prev = ch
        i += 1
    return n, False


def _json_error(exc: json.JSONDecodeError, line: int) -> str:
    where = f"column {exc.colno}" if exc.lineno == line else f"line {exc.lineno}, column {exc.colno}"
    return f"unparsable JSON: {exc.msg} ({where})"


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_json(path: Path) -> Iterator[tuple]:
    """A JSON array of objects; each element reports the line where it starts.
    A broken element is rejected on its own and reading goes on after it; a
    trailing comma before ']' is tolerated (no row hides in it)."""
    text = _read_text(path)
    pos = _skip_space(text, 0)
    if not text[pos:pos + 1] == "[":
        if text[pos:pos + 1] == "{":
            raise DataError(f"{path}:1: expected a JSON array of records; for one object per line use .jsonl.")
        raise DataError(f"{path}:1: expected a JSON array of records.")
    decoder = json.JSONDecoder()
    pos = _skip_space(text, pos + 1)
    line, counted, no_comma = 1, 0, False
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            end, at_record = _element_end(text, pos)
            yield line, None, _json_error(exc, line)
            pos, no_comma = _skip_space(text, end), False
            if at_record:
                continue
        else:
            if no_comma:
                yield line, None, "unparsable JSON: no ',' between this record and the one before"
            elif has_bad_utf8(text[pos:end]):
                yield line, None, "invalid UTF-8"
            elif isinstance(record, dict):
                yield line, record, None
            else:
                yield line, None, f"expected a JSON object, got {type(record).__name__}"
            pos, no_comma = _skip_space(text, end), False
        if text[pos:pos + 1] == ",":
            pos = _skip_space(text, pos + 1)
        elif text[pos:pos + 1] not in ("]", ""):
            no_comma = True


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
    """(line, record | None, error | None) for every row of the file. Raises
    DataError (never OSError) when the file as a whole cannot be read."""
    path = Path(path)
    check_file(path)
    fmt = detect_format(path, fmt)
    if fmt in ("csv", "tsv"):
        rows = _read_delimited(path, "," if fmt == "csv" else "\t", columns)
    elif fmt == "jsonl":
        rows = _read_jsonl(path)
    elif fmt == "json":
        rows = _read_json(path)
    else:
        rows = _read_parquet(path)
    return _os_errors_as_data_errors(path, rows)


def _os_errors_as_data_errors(path: Path, rows: Iterator[tuple]) -> Iterator[tuple]:
    try:
        yield from rows
    except OSError as exc:  # the file changed under us, or a read failed half-way
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}.") from None


def no_rows_reason(path, fmt: str = "auto") -> str:
    """Why a file that yielded no record at all has none, in words that fit it."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        return "the Parquet file has no rows"
    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.strip():
        return "the file is empty"
    if fmt in ("csv", "tsv"):
        return "the file has a header but no rows"
    return "the JSON array is empty" if fmt == "json" else "the file has no rows"


def nul_field(record: dict, columns: list[str]) -> Optional[str]:
    """The first of `columns` whose value holds a NUL character (nested lists
    and objects, e.g. chat messages, included), or None."""
    def has_nul(value: Any) -> bool:
        if isinstance(value, str):
            return "\x00" in value
        if isinstance(value, dict):
            return any(has_nul(v) for v in value.values())
        if isinstance(value, list):
            return any(has_nul(v) for v in value)
        return False

    return next((c for c in columns if has_nul(record.get(c))), None)


# --------------------------------------------------------------- validation


def to_example(record: dict, kind: str, cfg) -> tuple[Optional[dict], Optional[str]]:
    """Map a raw record to the data kind's fields plus data.keep_columns, or say why it cannot be used.
    A NUL character is refused: tokenizers and C libraries treat it as the end
    of the text, so what the model saw would differ from what the file says."""
    columns = _columns_needed(kind, cfg) + ([cfg.prompt_column] if kind == "preference" else [])
    bad = nul_field(record, columns)
    if bad is not None:
        return None, f"NUL character (\\x00) in field '{bad}'"
    example, err = kind_row_fields(record, kind, cfg)
    if err:
        return None, err
    for name in getattr(cfg, "keep_columns", None) or []:
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, f"missing or empty field '{name}' (listed in data.keep_columns)"
        example[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return example, None


def _columns_needed(kind: str, cfg) -> list[str]:
    return kind_row_columns(kind, cfg) + list(getattr(cfg, "keep_columns", None) or [])


def load_file(path: str, kind: str, cfg, allowed_labels: Optional[set[str]] = None) -> LoadedFile:
    """Read and validate one file. Rows with unknown labels are rejected when
    `allowed_labels` is given."""
    out = LoadedFile(path=str(path))
    fmt = detect_format(Path(path), cfg.format)
    needed = _columns_needed(kind, cfg)
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
        example, error = to_example(record, kind, cfg)
        if error is None and allowed_labels is not None and example["label"] not in allowed_labels:
            shown = ", ".join(sorted(allowed_labels)[:10])
            error = f"unknown label {example['label']!r} (known labels: {shown})"
        if error:
            out.rejects.append(Reject(str(path), line, error))
        else:
            out.examples.append(Example(line, example))
    return out

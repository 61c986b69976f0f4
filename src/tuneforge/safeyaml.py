"""One safe YAML loader for every YAML document a user gives tuneforge.

Recipes, command-line override values, term lists and sweep spaces all go
through `load` / `load_file`. On top of `yaml.SafeLoader` (no Python objects)
it refuses, each with one line `source:line: reason`:

- anchors and aliases (`&x` / `*x`): a few lines of them expand to gigabytes
  (the "billion laughs") and a self-reference never ends;
- duplicate keys in a mapping (plain YAML keeps the last one silently);
- documents nested deeper than `MAX_DEPTH` (the composer would recurse until
  Python's stack runs out);
- input that is not UTF-8, or larger than `MAX_BYTES`.

Kept free of torch imports (used by `tuneforge validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent

MAX_DEPTH = 64
MAX_BYTES = 8 * 1024 * 1024


class YamlError(ValueError):
    """A refused or unparsable YAML document: `source:line: reason`."""

    def __init__(self, source: str, line: Optional[int], reason: str):
        self.source, self.line, self.reason = source, line, reason
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {reason}")


class SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors/aliases, duplicate keys or unbounded nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise _refusal(event, f"alias '*{event.anchor}' refused: anchors and aliases are not allowed "
                           "(they can expand without bound); write the value out")
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise _refusal(event, f"anchor '&{event.anchor}' refused: anchors and aliases are not allowed "
                           "(they can expand without bound); write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _refusal(event, f"nested deeper than {MAX_DEPTH} levels; flatten the document")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeConstructor reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1}); "
                    "keep one of them", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _refusal(event, reason: str) -> yaml.YAMLError:
    return yaml.constructor.ConstructorError(None, None, reason, event.start_mark)


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_BYTES:
        raise YamlError(source, None, f"{len(data):,} bytes is too large for a YAML document "
                        f"(limit {MAX_BYTES:,})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise YamlError(source, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as "
                        "UTF-8") from None


def load(text: Union[str, bytes], source: str = "<yaml>") -> Any:
    """Parse one YAML document safely; raises YamlError with source and line."""
    if isinstance(text, bytes):
        text = _decode(text, source)
    elif len(text) > MAX_BYTES:
        raise YamlError(source, None, f"{len(text):,} characters is too large for a YAML document "
                        f"(limit {MAX_BYTES:,})")
    loader = None
    try:
        loader = SafeLoader(text)
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = exc.problem or exc.context or "not valid YAML"
        raise YamlError(source, mark.line + 1 if mark else None, _sentence(reason)) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character
        char = getattr(exc, "character", None)
        reason = (f"character U+{char:04X} is not allowed in YAML text" if isinstance(char, int)
                  else f"not valid YAML: {str(exc).splitlines()[0]}")
        raise YamlError(source, _reader_line(exc, text), reason) from None
    except RecursionError:  # belt and braces: MAX_DEPTH stops this first
        raise YamlError(source, None, "nested too deeply; flatten the document") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_file(path: Union[str, Path]) -> Any:
    """Read and parse a YAML file; YamlError for a missing or unreadable file too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise YamlError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    return load(data, str(path))


def _reader_line(exc: yaml.YAMLError, text: str) -> Optional[int]:
    position = getattr(exc, "position", None)
    return text[:position].count("\n") + 1 if isinstance(position, int) else None


def _sentence(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if reason.startswith(("alias", "anchor", "duplicate", "nested")) else f"not valid YAML: {reason}"


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def dump(data: Any) -> str:
    """YAML text that `load` reads back: no anchors or aliases, keys in order."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True)

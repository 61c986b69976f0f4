"""Text cleaning: small pure functions, one per step, composed by `make_cleaner`.

Language-agnostic on purpose: nothing here knows about English words; it works
on Unicode categories, whitespace and markup only.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Callable

_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newline (tabs, NBSP, ...)
_MANY_NEWLINES = re.compile(r"\n{3,}")
_TAG = re.compile(r"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>|</?[A-Za-z][^<>]*>", re.S | re.I)
_BLOCK_TAG = re.compile(r"<(br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>", re.I)
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]}]", re.I)


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _line(line: str) -> str:
    body = line.lstrip(" \t")
    indent = line[: len(line) - len(body)]
    body = _HSPACE.sub(" ", body).rstrip()
    return indent + body if body else ""


def normalise_whitespace(text: str) -> str:
    """Runs of spaces/tabs (and other non-newline spaces) -> one space, line ends
    stripped, 3+ newlines -> 2, the whole text trimmed. Newlines and the
    indentation of lines survive: they carry structure in responses (lists, code)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_line(line) for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def strip_html(text: str) -> str:
    text = _BLOCK_TAG.sub(lambda m: m.group(0) + "\n", text)
    return html.unescape(_TAG.sub("", text))


def handle_urls(text: str, action: str) -> str:
    if action == "keep":
        return text
    return URL.sub("<URL>" if action == "mask" else "", text)


def lowercase(text: str) -> str:
    return text.lower()


def make_cleaner(cfg) -> Callable[[str], str]:
    """The enabled steps in a fixed order: HTML first (entities may hide
    compatibility characters), NFKC, URLs, case, whitespace last (removals leave gaps)."""
    steps: list[Callable[[str], str]] = []
    if cfg.strip_html:
        steps.append(strip_html)
    if cfg.nfkc:
        steps.append(nfkc)
    if cfg.urls != "keep":
        steps.append(lambda t: handle_urls(t, cfg.urls))
    if cfg.lowercase:
        steps.append(lowercase)
    if cfg.whitespace:
        steps.append(normalise_whitespace)

    def clean(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return clean


# ------------------------------------------------------- encoding anomalies

# Typical UTF-8 read as Latin-1/CP-1252 ("mojibake"): Ã©, â€™, Â followed by a symbol.
_MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf]|â€[\u0080-\u00bf\u0152-\u0192\u02c6-\u02dc\u2013-\u2122]|Â[\u00a0-\u00bf]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200f\u2060\ufeff]")


def encoding_anomalies(text: str) -> list[str]:
    """Kinds of encoding trouble in a text (empty when clean)."""
    found = []
    if "\ufffd" in text:
        found.append("replacement_char")
    if _MOJIBAKE.search(text):
        found.append("mojibake")
    if any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in text):
        found.append("control_char")
    if _ZERO_WIDTH.search(text):
        found.append("zero_width")
    if not text.isascii() and unicodedata.normalize("NFKC", text) != text:
        found.append("not_nfkc")
    return found

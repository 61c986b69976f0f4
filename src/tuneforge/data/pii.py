"""Personal data: find e-mails, payment cards, IP addresses and phone numbers,
validated to keep false positives down, and mask them with typed placeholders.

Validation: cards must pass the Luhn check; IPv4 octets must be <= 255 and IPv6
candidates must parse as addresses (Python's `ipaddress`) and hold a digit;
phones are found and checked by libphonenumber (the `phonenumbers` package):
international numbers (+country code) of every country, national formats as
North American or UK numbers (PHONE_REGIONS), with 9-15 digits and not a date.
Kinds are matched in a fixed priority (email, card, ip, phone) and never
overlap, so a card number is never also counted as a phone.
"""

from __future__ import annotations

import ipaddress
import re

KINDS = ("email", "card", "ip", "phone")
PLACEHOLDER = {"email": "<EMAIL>", "card": "<CARD>", "ip": "<IP>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IP = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
# IPv6: hex groups and colons, '::' for a run of zero groups, optionally an IPv4 tail.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\w)")
# National (no +country code) numbers are read as numbers of these regions;
# international ones are recognised for every country whatever the list says.
PHONE_REGIONS = ("US", "GB")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{4}$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _valid(kind: str, value: str) -> bool:
    if kind == "card":
        digits = re.sub(r"\D", "", value)
        return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)
    if kind == "ip":
        if ":" in value:
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                return False
            return any(c.isdigit() for c in value)  # 'dead::beef' is an address, but rarely one in text
        return all(int(part) <= 255 for part in value.split("."))
    if kind == "phone":
        digits = re.sub(r"\D", "", value)
        return 9 <= len(digits) <= 15 and not _DATE.match(value.strip())
    return True


def _spans(kind: str, text: str):
    """Candidate (start, end) spans of one kind, before validation."""
    if kind == "phone":
        import phonenumbers

        for region in PHONE_REGIONS:
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
                raw = m.raw_string
                start = m.start + len(raw) - len(raw.lstrip())
                yield start, start + len(raw.strip())
        return
    if kind == "ip":
        if ":" in text:  # first, so an IPv4 tail (::ffff:192.0.2.1) stays part of its IPv6 address
            yield from (m.span() for m in _IPV6.finditer(text))
        yield from (m.span() for m in _IP.finditer(text))
        return
    yield from (m.span() for m in _PATTERNS[kind].finditer(text))


_PATTERNS = {"email": _EMAIL, "card": _CARD}


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Non-overlapping (kind, start, end) spans, in text order."""
    taken: list[tuple[int, int]] = []
    found = []
    for kind in KINDS:
        if kind != "email" and not any(c.isdigit() for c in text):
            break
        if kind == "email" and "@" not in text:
            continue
        for s, e in _spans(kind, text):
            if any(s < te and ts < e for ts, te in taken) or not _valid(kind, text[s:e]):
                continue
            taken.append((s, e))
            found.append((kind, s, e))
    return sorted(found, key=lambda x: x[1])


def count_pii(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, _, _ in find_pii(text):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def apply_pii(text: str, actions: dict[str, str]) -> tuple[str, dict[str, int]]:
    """Mask or remove each kind whose action is not 'keep'; returns the new text
    and how many of each kind were changed."""
    changed: dict[str, int] = {}
    pieces, last = [], 0
    for kind, s, e in find_pii(text):
        action = actions.get(kind, "keep")
        if action == "keep":
            continue
        pieces.append(text[last:s])
        pieces.append(PLACEHOLDER[kind] if action == "mask" else "")
        last = e
        changed[kind] = changed.get(kind, 0) + 1
    if not changed:
        return text, changed
    pieces.append(text[last:])
    return "".join(pieces), changed


def actions_of(cfg) -> dict[str, str]:
    return {"email": cfg.email, "card": cfg.card, "ip": cfg.ip, "phone": cfg.phone}

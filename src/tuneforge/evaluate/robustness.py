"""Perturbation suite: how much does the metric drop when inputs get messier?

Each perturbation is a pure function of (text, rng); labels and references are
never touched. Seeds are per example so every run perturbs identically.
"""

from __future__ import annotations

import random
import re
import string
from typing import Callable

WORD = re.compile(r"\S+")
# Names across several origins; swapped for one another to probe reliance on entities.
NAMES = ["James", "Maria", "Wei", "Aisha", "Carlos", "Priya", "John", "Fatima", "Hiroshi", "Olga", "Kwame", "Emily",
         "Mohammed", "Sofia", "Ivan", "Mei", "David", "Amara", "Lucas", "Yuki", "Paris", "London", "Tokyo", "Lagos",
         "Chicago", "Mumbai", "Berlin", "Cairo"]
_NAME_SET = {n.lower() for n in NAMES}


def _pick(n: int, rate: float, rng: random.Random) -> set[int]:
    """~rate of n positions, at least one, so even a short text is perturbed."""
    if n == 0:
        return set()
    return set(rng.sample(range(n), max(1, round(rate * n))))


def typos(text: str, rng: random.Random, rate: float = 0.15) -> str:
    """Swap two adjacent inner letters in ~15% of the words of 4+ letters (at least one)."""
    words = WORD.findall(text)
    eligible = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    chosen = {eligible[k] for k in _pick(len(eligible), rate, rng)}
    counter = iter(range(len(words)))

    def swap(m: re.Match) -> str:
        w = m.group(0)
        if next(counter) not in chosen:
            return w
        i = rng.randrange(1, len(w) - 2)
        return w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return WORD.sub(swap, text)


def casing(text: str, rng: random.Random) -> str:
    """Upper-case everything (shouting users, OCR headers)."""
    return text.upper()


def no_punctuation(text: str, rng: random.Random) -> str:
    return text.translate(str.maketrans("", "", string.punctuation))


def extra_whitespace(text: str, rng: random.Random) -> str:
    """Random runs of 1-3 spaces between words, plus padding at both ends."""
    words = text.split()
    return "  " + "".join(w + " " * rng.randint(1, 3) for w in words) + " "


def word_dropout(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Drop ~10% of the words (at least one, never all)."""
    words = text.split()
    if len(words) < 2:
        return text
    dropped = _pick(len(words), rate, rng)
    return " ".join(w for i, w in enumerate(words) if i not in dropped)


def swap_entities(text: str, rng: random.Random) -> str:
    """Replace every known name with another one, keeping its capitalisation."""
    def swap(m: re.Match) -> str:
        w = m.group(0)
        if w.lower() not in _NAME_SET:
            return w
        other = rng.choice([n for n in NAMES if n.lower() != w.lower()])
        return other.lower() if w.islower() else other.upper() if w.isupper() else other
    return re.sub(r"[A-Za-z]+", swap, text)


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos,
    "casing": casing,
    "no_punctuation": no_punctuation,
    "extra_whitespace": extra_whitespace,
    "word_dropout": word_dropout,
    "swap_entities": swap_entities,
}


def perturb(rows: list[dict], name: str, field: str, seed: int = 0) -> list[dict]:
    """Copies of `rows` with `field` perturbed; every other field is kept as is."""
    fn = PERTURBATIONS[name]
    return [{**row, field: fn(row[field], random.Random(f"{seed}:{name}:{i}"))} for i, row in enumerate(rows)]


def perturb_sft(rows: list[dict], name: str, seed: int = 0) -> list[dict]:
    """Perturb what the user typed: the prompt, or every user turn of a chat."""
    if rows and "messages" in rows[0]:
        fn = PERTURBATIONS[name]
        return [{"messages": [{**m, "content": fn(m["content"], random.Random(f"{seed}:{name}:{i}:{j}"))}
                              if m["role"] == "user" else m for j, m in enumerate(r["messages"])]}
                for i, r in enumerate(rows)]
    return perturb(rows, name, "prompt", seed)

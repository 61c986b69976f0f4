"""Seeded generators of small, checkable fine-tuning tasks (the quickstart's data).

`iso-dates`: rewrite a date written in one of many human styles as ISO 8601
(YYYY-MM-DD). A base chat model answers in prose ("The date ... is ..."), so
its exact match is near zero; a short LoRA fine-tune learns the format and the
calendar arithmetic of the styles.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
    lambda d: f"{d.strftime('%A')}, {MONTHS[d.month - 1]} {_ordinal(d.day)} {d.year}",
    lambda d: f"the {_ordinal(d.day)} day of {MONTHS[d.month - 1]} in the year {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3].upper()}-{d.year}",
]

INSTRUCTIONS = [
    "Rewrite this date in ISO 8601 format (YYYY-MM-DD): {date}",
    "Convert to YYYY-MM-DD: {date}",
    "What is {date} in ISO 8601 (YYYY-MM-DD)?",
    "Normalize the date \"{date}\" to YYYY-MM-DD.",
]


def iso_dates(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    out = []
    for _ in range(rows):
        day = dt.date.fromordinal(rng.randint(start, end))
        surface = rng.choice(STYLES)(day)
        prompt = rng.choice(INSTRUCTIONS).format(date=surface)
        out.append({"prompt": prompt, "response": day.isoformat()})
    return out


GENERATORS = {"iso-dates": iso_dates}


def write_jsonl(rows: list[dict], path: Path) -> None:
    from tuneforge.fsio import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

"""Demographic term lists: counterfactual swaps and group detection from text.

A lexicon is a YAML file with `name`, two `groups`, and `pairs` (plus optional
`names`) of words that swap between the groups. The project ships
templates/terms/gender.yaml; users add their own lists with the same shape.

Swaps are whole-word, case-preserving and simultaneous (he -> she and she -> he
in one pass, so a sentence never swaps back). One word can map to several
(female 'her' is either 'him' or 'his'): the next word decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

# After object 'her' (and stand-alone 'his' = 'hers') comes punctuation, the
# end, or one of these words (conjunctions, prepositions, verbs, determiners:
# 'gave her the book'); otherwise it is a possessive determiner ('her book').
_OBJECT_FOLLOWERS = frozenset(
    "and or but to at in on with for from by about as than then so if when while because "
    "the a an this that these those his her my your their our its some any every no one "
    "is was are were be been has had have will would can could should may might must do did does "
    "up down out off over again too also very really all both back away".split()
)


@dataclass
class Lexicon:
    name: str
    groups: tuple[str, str]
    pairs: list[tuple[str, str]]
    terms_by_group: dict[str, set[str]] = field(default_factory=dict)
    _map: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _pattern: Optional[re.Pattern] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        a, b = self.groups
        self.terms_by_group = {a: set(), b: set()}
        for x, y in self.pairs:
            self.terms_by_group[a].add(x)
            self.terms_by_group[b].add(y)
            self._map.setdefault(x, [])
            self._map.setdefault(y, [])
            if y not in self._map[x]:
                self._map[x].append(y)
            if x not in self._map[y]:
                self._map[y].append(x)
        words = sorted(self._map, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def replacement(self, word: str, next_word: str) -> str:
        """The counterpart of a (lower-case) term; `next_word` settles 'her'."""
        options = self._map[word]
        if len(options) == 1:
            return options[0]
        stands_alone = not next_word or next_word in _OBJECT_FOLLOWERS
        if word == "her" and {"him", "his"} <= set(options):
            return "him" if stands_alone else "his"
        if word == "his" and {"her", "hers"} <= set(options):
            return "hers" if stands_alone else "her"
        return options[0]


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_terms(text: str, lexicon: Lexicon) -> tuple[str, int]:
    """Swap every term of `lexicon` for its counterpart; returns (text, swaps)."""
    count = 0

    def _sub(m: re.Match) -> str:
        nonlocal count
        count += 1
        following = re.match(r"\s*([A-Za-z']+)", text[m.end():])
        next_word = following.group(1).lower() if following else ""
        return _match_case(m.group(0), lexicon.replacement(m.group(0).lower(), next_word))

    out = lexicon._pattern.sub(_sub, text)
    return out, count


def group_counts(text: str, lexicon: Lexicon) -> dict[str, int]:
    """How many terms of each group the text contains."""
    counts = {g: 0 for g in lexicon.groups}
    for m in lexicon._pattern.finditer(text):
        word = m.group(0).lower()
        for g in lexicon.groups:
            if word in lexicon.terms_by_group[g]:
                counts[g] += 1
    return counts


def detect_group(text: str, lexicon: Lexicon) -> Optional[str]:
    """The one group the text mentions; 'mixed' when it mentions both, None when neither.
    Words in both groups' lists ('her' is not; none are by default) count for both."""
    present = [g for g, n in group_counts(text, lexicon).items() if n]
    if not present:
        return None
    return present[0] if len(present) == 1 else "mixed"


def read_lexicon(source) -> Lexicon:
    """Parse one lexicon YAML (a path or its text)."""
    from tuneforge import safeyaml

    where = str(source) if isinstance(source, Path) else "<lexicon>"
    data = (safeyaml.load_file(source) if isinstance(source, Path) else safeyaml.load(source, where)) or {}
    problems = []
    if not isinstance(data.get("name"), str):
        problems.append("'name' must be a string")
    groups = data.get("groups")
    if not (isinstance(groups, list) and len(groups) == 2 and all(isinstance(g, str) for g in groups)):
        problems.append("'groups' must list exactly two group names")
    pairs = []
    for key in ("pairs", "names"):
        for i, pair in enumerate(data.get(key) or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(w, str) and w.strip() for w in pair)):
                problems.append(f"{key}[{i}] must be a pair of words, got {pair!r}")
            else:
                pairs.append((pair[0].strip().lower(), pair[1].strip().lower()))
    if not pairs:
        problems.append("no 'pairs' (or 'names') to swap")
    if problems:
        raise ValueError(f"{where}: invalid term list: " + "; ".join(problems)
                         + ". See templates/terms/gender.yaml for the expected shape.")
    return Lexicon(data["name"], (groups[0], groups[1]), pairs)


def load_lexicons(extra: Optional[list[str]] = None) -> dict[str, Lexicon]:
    """The shipped lists plus the user's YAML files (a user list may replace a shipped one by name)."""
    out: dict[str, Lexicon] = {}
    folder = resources.files("tuneforge.templates").joinpath("terms")
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            lex = read_lexicon(entry.read_text(encoding="utf-8"))
            out[lex.name] = lex
    for path in extra or []:
        lex = read_lexicon(Path(path))
        out[lex.name] = lex
    return out

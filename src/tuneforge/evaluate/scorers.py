"""User scorers for generations: a regex, JSON-schema validity, or a Python
function `module:function(prediction, reference) -> float | bool`."""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Callable


@dataclass
class Scorer:
    name: str
    fn: Callable[[str, str], float]

    def __call__(self, prediction: str, reference: str) -> float:
        return float(self.fn(prediction, reference))


def regex_scorer(name: str, pattern: str) -> Scorer:
    compiled = re.compile(pattern)
    return Scorer(name, lambda pred, ref: compiled.fullmatch(pred.strip()) is not None)


def json_schema_scorer(name: str, schema: dict) -> Scorer:
    try:
        import jsonschema
    except ImportError:
        raise ImportError("the json_schema scorer needs jsonschema: pip install 'tuneforge[eval]'") from None
    validator = jsonschema.Draft202012Validator(schema)

    def valid(pred: str, ref: str) -> bool:
        try:
            return validator.is_valid(json.loads(pred))
        except json.JSONDecodeError:
            return False

    return Scorer(name, valid)


def python_scorer(name: str, target: str) -> Scorer:
    module, sep, attr = target.partition(":")
    if not sep:
        raise ValueError(f"scorer function must look like 'module:function', got {target!r}")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"{target}: not a callable (prediction, reference) -> float")
    return Scorer(name, fn)


def build_scorers(configs) -> list[Scorer]:
    scorers = []
    for cfg in configs:
        if cfg.regex is not None:
            scorers.append(regex_scorer(cfg.name, cfg.regex))
        elif cfg.json_schema is not None:
            scorers.append(json_schema_scorer(cfg.name, cfg.json_schema))
        else:
            scorers.append(python_scorer(cfg.name, cfg.function))
    return scorers

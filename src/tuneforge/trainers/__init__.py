"""One self-contained trainer per objective; this table maps tasks to them."""

from __future__ import annotations

import importlib

TRAINERS = {
    "classification": "tuneforge.trainers.classification",
    "sft": "tuneforge.trainers.sft",
}


def get_trainer(task: str):
    return importlib.import_module(TRAINERS[task]).train

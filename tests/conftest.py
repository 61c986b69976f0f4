"""Shared fixtures. Tiers, one folder each: tests/unit (tiny random models,
seconds each; `make test-fast`), tests/integration (the bundled real models,
marker `integration`, given by the folder), tests/gpu (the GPU path; tests marked
`gpu` are skipped without CUDA, its CPU checks run everywhere)."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data. Missing data skips the test locally but fails in CI,
    where ../shared is always present."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not present (the real data sets live in ../shared)")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        # The integration folder marks its tests; in tests/gpu only the tests marked
        # `gpu` need CUDA (its CPU checks, refusals without CUDA and the dry run, still run).
        if Path(item.fspath).parent.name == "integration":
            item.add_marker(pytest.mark.integration)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: the folder tests/gpu is one too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sentiment_rows() -> list[dict]:
    """A small, learnable two-class task for the tiny models."""
    rng = random.Random(0)
    good = ["great", "lovely", "superb", "wonderful", "fine"]
    bad = ["awful", "terrible", "boring", "dreadful", "poor"]
    nouns = ["film", "plot", "cast", "score", "ending", "script"]
    rows = []
    for i in range(160):
        label = i % 2
        word = rng.choice(good if label else bad)
        rows.append({"text": f"the {rng.choice(nouns)} was {word} number {i}", "label": "pos" if label else "neg"})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sentiment_csv(tmp_path, sentiment_rows) -> Path:
    return write_csv(tmp_path / "sentiment.csv", sentiment_rows)


@pytest.fixture
def dates_jsonl(tmp_path) -> Path:
    from tuneforge.datagen import iso_dates

    return write_jsonl(tmp_path / "dates.jsonl", iso_dates(120, seed=1))


def postprocessed_audit(tmp_path: Path, val: list[dict], test: list[dict], score: dict) -> dict:
    """The end-of-training fairness step (equalized-odds post-processing by column
    'g') on fixed positive-class scores per text, writing into tmp_path/model."""
    from types import SimpleNamespace

    import numpy as np

    from tuneforge.data.splits import Splits
    from tuneforge.fairness.run import after_training
    from tuneforge.recipe import load_recipe

    def predict(texts):
        p = np.array([score[t] for t in texts])
        return np.stack([1 - p, p], axis=1)

    recipe = load_recipe({"model": "tiny-bert", "task": "classification", "data": {"train": "-"},
                          "fairness": {"groups": ["g"], "postprocess": "equalized_odds", "bootstrap": 0}},
                         check_files=False)
    (tmp_path / "model").mkdir()
    return after_training(recipe, SimpleNamespace(path=tmp_path, manifest={}), predict,
                          Splits([], val, test, ["neg", "pos"]))


def kill_when(proc, marker: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `marker` exists (a checkpoint's completion file); fails if it finished first."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

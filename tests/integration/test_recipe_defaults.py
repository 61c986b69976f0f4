"""Defaults that learn: the starter classification recipe switched to LoRA
(`method.name=lora`, nothing else) must learn SST-2, not stop at the majority class.

With TUNEFORGE_RECORD=1 the figure is also written to bench/results/.
"""

import datetime as dt
import os
import platform
import time
from importlib import resources

import pytest

from tuneforge import safeyaml

from conftest import ROOT, shared_data

ROWS = 4000
COMMAND = ("TUNEFORGE_RECORD=1 .venv/bin/python -m pytest "
           "tests/test_recipe_defaults.py::test_starter_with_lora_learns_sst2 -m integration")


@pytest.mark.integration
def test_starter_with_lora_learns_sst2(tmp_path):
    from tuneforge import api

    train, dev = shared_data("sst2", "train.tsv"), shared_data("sst2", "dev.tsv")
    with open(train, encoding="utf-8") as fh:  # header + the first 4,000 rows
        head = [next(fh) for _ in range(ROWS + 1)]
    (tmp_path / "train.tsv").write_text("".join(head), encoding="utf-8")
    starter = resources.files("tuneforge.templates").joinpath("classification.yaml").read_text(encoding="utf-8")
    assert "learning_rate" not in safeyaml.load(starter)["train"], "the starter must leave the rate to the method"
    (tmp_path / "starter.yaml").write_text(starter, encoding="utf-8")
    overrides = [f"data.train={tmp_path / 'train.tsv'}", f"data.test={dev}", "data.text_column=sentence",
                 "method.name=lora", "train.epochs=2"]
    t0 = time.perf_counter()
    metrics = api.train(tmp_path / "starter.yaml", overrides, output=str(tmp_path / "run"), quiet=True)
    seconds = time.perf_counter() - t0
    accuracy = metrics["test"]["accuracy"]
    if os.environ.get("TUNEFORGE_RECORD"):
        _record(accuracy, metrics, overrides, seconds)
    assert accuracy >= 0.83, metrics["test"]


def _record(accuracy: float, metrics: dict, overrides: list[str], seconds: float) -> None:
    from tuneforge.fsio import atomic_write_json
    from tuneforge.recipe import load_recipe

    now = dt.datetime.now(dt.timezone.utc)
    recipe = load_recipe(ROOT / "src/tuneforge/templates/classification.yaml", overrides, check_files=False)
    atomic_write_json(ROOT / "bench" / "results" / f"{now:%Y-%m-%d-%H%M}-lora-starter-sst2.json", {
        "date": now.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
        "what": "`tuneforge init classification` with method.name=lora, minilm-l6, first 4,000 rows of SST-2 "
                "train, 2 epochs, tested on SST-2 dev (872 rows)",
        "command": COMMAND, "overrides": [o.split("=")[0] + "=" + o.split("=", 1)[1].split("/")[-1] for o in overrides],
        "learning_rate": recipe.learning_rate, "test_accuracy": accuracy, "target": 0.83,
        "test_f1_macro": metrics["test"].get("f1_macro"),
        "baseline_accuracy": (metrics.get("baseline") or {}).get("accuracy"),
        "validation": metrics.get("validation"), "wall_s": round(seconds, 1),
    })

"""Integration tier: the bundled real models on real data (a minute or two each)."""

import pytest

from tuneforge import api
from tuneforge.datagen import iso_dates

from conftest import shared_data, write_jsonl

pytestmark = pytest.mark.integration


def test_minilm_on_sst2_subset_beats_majority_by_a_wide_margin(tmp_path):
    recipe = {
        "model": "minilm-l6", "task": "classification",
        "data": {"train": str(shared_data("sst2", "train.tsv")), "test": str(shared_data("sst2", "dev.tsv")),
                 "text_column": "sentence", "max_rows": 3000},
        "method": {"name": "full"},
        "train": {"epochs": 1, "batch_size": 32, "learning_rate": 1e-4, "max_length": 64},
    }
    metrics = api.train(recipe, output=str(tmp_path / "run"), quiet=True)
    test, base = metrics["test"], metrics["baseline"]
    assert test["n"] == 872
    assert base["accuracy"] < 0.52  # dev is balanced: 428 / 444
    assert test["accuracy"] > 0.78 and test["accuracy"] > base["accuracy"] + 0.25
    assert test["roc_auc"] > 0.85
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_smollm_sft_raises_exact_match_over_base_model(tmp_path):
    data = write_jsonl(tmp_path / "dates.jsonl", iso_dates(300, seed=11))
    recipe = {
        "model": "smollm2-135m-instruct", "task": "sft",
        "data": {"train": str(data), "system_prompt": "You rewrite dates."},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": 30, "batch_size": 8, "learning_rate": 1e-3, "warmup": 2, "max_length": 96,
                  "eval_every": 30},
        "eval": {"max_new_tokens": 12, "max_generate": 32},
    }
    metrics = api.train(recipe, output=str(tmp_path / "run"), quiet=True)
    test, base = metrics["test"], metrics["baseline"]
    assert base["exact_match"] <= 0.1
    assert test["exact_match"] >= base["exact_match"] + 0.3
    assert test["loss"] < base["loss"] and test["perplexity"] < base["perplexity"]
    for key in ("loss", "perplexity", "exact_match", "rouge1", "rouge2", "rouge_l", "bleu", "chrf"):
        lo, hi = test["ci"][key]
        assert lo <= test[key] <= hi, key
    assert test["vs_baseline"]["exact_match"]["p_value"] < 0.05
    # The forgetting check, recomputed for the base model with plain forward passes over the
    # reference text in train.max_length windows.
    assert base["reference_perplexity"] == pytest.approx(_plain_reference_perplexity("smollm2-135m-instruct", 96),
                                                         rel=1e-3)
    assert test["reference_perplexity"] != base["reference_perplexity"]
    assert (tmp_path / "run" / "model" / "adapter" / "adapter_model.safetensors").is_file()


def _plain_reference_perplexity(name: str, window: int) -> float:
    from importlib import resources

    import numpy as np
    import torch

    from tuneforge.models import load_causal_lm

    model, tok, _ = load_causal_lm(name)
    text = resources.files("tuneforge.templates").joinpath("reference.txt").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            chunk = torch.tensor([ids[i:i + window]])
            if chunk.shape[1] < 2:
                continue
            logits = model(input_ids=chunk).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return float(np.exp(total / count))

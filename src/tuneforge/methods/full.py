"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from pathlib import Path

from tuneforge.recipe import MethodConfig


def prepare(model, cfg: MethodConfig, task: str):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def save(model, tokenizer, folder: Path):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model

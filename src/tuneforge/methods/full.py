"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD, ModelKind
from tuneforge.section import MethodSection

NAME = "full"
ADAPTER = False
MODEL_KINDS = (CLASSIFIER, CAUSAL_LM, REWARD)
DEFAULT_LEARNING_RATES = {CLASSIFIER: 5e-5, CAUSAL_LM: 5e-5, REWARD: 1e-5}
WEIGHT_BYTES = 4.0


class Config(MethodSection):
    name: Literal["full"] = Field(NAME, description="full: train every weight.")

    def hints(self) -> list[str]:
        return []


def prepare(model, cfg: Config, kind: ModelKind):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def save(model, tokenizer, folder: Path):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def trainable_parameters(model, cfg: Config, kind: ModelKind) -> int:
    return sum(p.numel() for p in model.parameters())

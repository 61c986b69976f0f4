"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) via peft: each
adapted weight is split into a magnitude vector and a direction, the direction
gets LoRA's low-rank update and the magnitude trains on its own. Same settings
as lora (r, alpha, dropout, target_modules), a little more compute per step, and
often closer to full fine-tuning at low rank. Saved as lora is: the adapter
alone (model/adapter/) and merged into the base weights (model/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD, ModelKind
from tuneforge.methods import lora

NAME = "dora"
ADAPTER = True
MODEL_KINDS = (CLASSIFIER, CAUSAL_LM, REWARD)
DEFAULT_LEARNING_RATES = dict(lora.DEFAULT_LEARNING_RATES)  # the DoRA paper trains at LoRA's rates
WEIGHT_BYTES = 4.0


class Config(lora.Config):
    name: Literal["dora"] = Field(NAME, description="dora: LoRA with a trained magnitude per output (peft "
                                                    "use_dora).")


def prepare(model, cfg: Config, kind: ModelKind):
    from peft import get_peft_model

    return get_peft_model(model, lora.peft_config(cfg, kind, use_dora=True))


def save(model, tokenizer, folder: Path):
    return lora.save(model, tokenizer, folder)


def trainable_parameters(model, cfg: Config, kind: ModelKind) -> int:
    """LoRA's count plus one magnitude per output of every adapted layer."""
    return lora.trainable_parameters(model, cfg, kind) + sum(
        m.out_features for m in lora.adapted_linears(model, cfg.target_modules))

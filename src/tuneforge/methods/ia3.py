"""(IA)^3 (Liu et al. 2022, the T-Few recipe) via peft: learned vectors that
rescale the keys, the values and the feed-forward activations; a few thousand
parameters per layer, far fewer than LoRA's, and no rank to choose. Saved as
lora is: the adapter alone (model/adapter/) and merged into the base weights
(model/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD, ModelKind
from tuneforge.methods import lora
from tuneforge.section import MethodSection

NAME = "ia3"
ADAPTER = True
MODEL_KINDS = (CLASSIFIER, CAUSAL_LM, REWARD)
# T-Few trains (IA)^3 at 3e-3: the vectors start at 1 and move little per step.
DEFAULT_LEARNING_RATES = {CLASSIFIER: 3e-3, CAUSAL_LM: 3e-3, REWARD: 1e-3}
WEIGHT_BYTES = 4.0


class Config(MethodSection):
    name: Literal["ia3"] = Field(NAME, description="ia3: (IA)^3 rescaling vectors on keys, values and feed-forward "
                                                   "layers (peft).")
    target_modules: Optional[list[str]] = Field(
        None, description="Module names to rescale; default: peft's choice for the architecture (BERT: key, value, "
                          "output.dense; Llama: k_proj, v_proj, down_proj).")
    feedforward_modules: Optional[list[str]] = Field(
        None, description="Which of target_modules are feed-forward layers (their input is rescaled, not their "
                          "output); default: peft's choice for the architecture.")

    def hints(self) -> list[str]:
        return ["method ia3 trains only rescaling vectors: a higher learning rate, or method.name: lora"]


def _modules(model, cfg: Config) -> tuple[list[str], list[str]]:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    model_type = getattr(model.config, "model_type", None)
    targets = cfg.target_modules or TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
    feedforward = cfg.feedforward_modules
    if feedforward is None:
        feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type) if not \
            cfg.target_modules else []
    if not targets:
        raise ValueError(f"method ia3 has no default modules for model type '{model_type}': set "
                         "method.target_modules (and method.feedforward_modules)")
    return list(targets), list(feedforward or [])


def prepare(model, cfg: Config, kind: ModelKind):
    from peft import IA3Config, get_peft_model

    targets, feedforward = _modules(model, cfg)
    config = IA3Config(task_type=kind.peft_task_type, target_modules=targets, feedforward_modules=feedforward)
    return get_peft_model(model, config)


def save(model, tokenizer, folder: Path):
    return lora.save(model, tokenizer, folder)


def trainable_parameters(model, cfg: Config, kind: ModelKind) -> int:
    """One scale per output of each target (per input for feed-forward ones), plus a classifier's head."""
    import torch

    targets, feedforward = _modules(model, cfg)

    def matches(name: str, names: list[str]) -> bool:
        return any(name == t or name.endswith("." + t) for t in names)

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and matches(name, targets):
            count += module.in_features if matches(name, feedforward) else module.out_features
    return count + lora.head_parameters(model, kind)

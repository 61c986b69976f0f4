"""Checks of a recipe against its model before anything is allocated.

`check(recipe, device)` reads the model's config, builds the model on the meta
device (shapes, no memory), and refuses with one message naming the key to
change when:

- `train.max_length` is beyond the model's position embeddings (an error, not
  a silent clamp: the recipe would record a length that was never trained);
- the estimated training memory (weights, trainable weights with their
  gradients and optimizer moments, activations of one micro-batch) exceeds
  the memory available on the device.

The estimate is deliberately a lower bound (activations without attention
scores, no allocator overhead), so a refusal is certain to be right; passing
it does not promise the run fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from tuneforge import catalog
from tuneforge.recipe import Recipe

GIB = 1024 ** 3
# Bytes of optimizer state per trainable parameter (float32 moments).
OPTIMIZER_BYTES = {"adamw": 8, "sgd": 0, "rmsprop": 4}
# float32 values kept for backward per token, hidden unit and layer: a floor
# (Korthikanti et al. 2022 count about 17 in 16-bit, attention scores apart;
# LoRA SFT of smollm2 at 8 x 512 tokens peaks at 7.0 GB, this counts 5.1 GB).
ACTIVATION_VALUES = 16


class PreflightError(ValueError):
    """The recipe cannot run on this model or machine; the message says which key to change."""


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    weights: int
    trainable_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations


def check(recipe: Recipe, device: torch.device, available: Optional[int] = None) -> Optional[Estimate]:
    """Raise PreflightError when the recipe cannot work; the estimate otherwise
    (None when the model's config cannot be read here, e.g. a hub id offline)."""
    config = read_config(recipe.model)
    if config is None:
        return None
    limit = max_positions(config)
    if limit is not None and recipe.train.max_length > limit:
        raise PreflightError(
            f"train.max_length {recipe.train.max_length} is beyond the {limit} position embeddings of "
            f"'{recipe.model}'; set train.max_length to {limit} or less")
    try:
        estimate = estimate_memory(recipe, config)
    except (TypeError, AttributeError, ImportError, RuntimeError, KeyError):
        return None  # an architecture the meta build does not handle: no estimate, no refusal
    free = available if available is not None else available_bytes(device)
    if free is not None and estimate.total > free:
        raise PreflightError(_too_big(recipe, estimate, free, device))
    return estimate


def read_config(ref: str):
    from tuneforge.models import load_config

    try:
        return load_config(catalog.resolve(ref))
    except (OSError, ValueError, catalog.ModelNotAvailable):  # the loader says why, as before
        return None


def max_positions(config) -> Optional[int]:
    text = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _meta_model(recipe: Recipe, config):
    with torch.device("meta"):
        return recipe.model_kind.auto().from_config(config)


def estimate_memory(recipe: Recipe, config) -> Estimate:
    from tuneforge.methods import METHODS

    model = _meta_model(recipe, config)
    total = sum(p.numel() for p in model.parameters())
    module = METHODS[recipe.method.name]
    try:
        trainable = module.trainable_parameters(model, recipe.method, recipe.model_kind)
    except ValueError as exc:  # e.g. more trainable layers than the model has (freeze)
        raise PreflightError(f"method {recipe.method.name}: {exc}") from None
    stored = 4 * trainable if module.ADAPTER else 0  # adapters are new tensors beside the base weights
    per_param = 4 + OPTIMIZER_BYTES[recipe.train.optimizer]  # gradient + moments (float32)
    weight_bytes = int(module.WEIGHT_BYTES * total)
    return Estimate(total, trainable, weight_bytes, stored + per_param * trainable, _activations(recipe, config))


def _activations(recipe: Recipe, config) -> int:
    """float32 activations kept for backward (ACTIVATION_VALUES per token, hidden
    unit and layer); gradient checkpointing keeps one hidden state per layer plus
    one layer's worth."""
    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", 0) or 0
    layers = getattr(text, "num_hidden_layers", 0) or 0
    tokens = recipe.train.batch_size * recipe.train.max_length
    per_layer = ACTIVATION_VALUES * tokens * hidden * 4
    if recipe.train.gradient_checkpointing:
        return tokens * hidden * 4 * layers + per_layer
    return per_layer * layers


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory where the model will live: the CUDA device's, else the host's
    MemAvailable (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _too_big(recipe: Recipe, est: Estimate, free: int, device: torch.device) -> str:
    parts = {"weights": est.weights, "trainable state": est.trainable_state, "activations": est.activations}
    biggest = max(parts, key=parts.get)
    if biggest == "activations":
        hint = ("lower train.batch_size (raise train.gradient_accumulation to keep the step size) or "
                "train.max_length" + ("" if recipe.train.gradient_checkpointing else
                                      ", or set train.gradient_checkpointing: true"))
    elif biggest == "trainable state":
        hint = ("lower method.r" if "r" in type(recipe.method).model_fields else
                "use method.name: lora, or method.name: freeze with a small method.trainable_layers")
    else:
        hint = "choose a smaller model" + ("" if device.type == "cuda" else " or a GPU")
    shown = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
    return (f"the recipe needs at least {est.total / GIB:.1f} GiB on {device.type} ({shown} GiB; "
            f"{est.trainable_params:,} trainable of {est.total_params:,} parameters) but {free / GIB:.1f} GiB is "
            f"free: {hint}")

"""LoRA adapters via peft. The final model is saved twice: the adapter alone
(model/adapter/, loadable with peft.PeftModel.from_pretrained) and merged into
the base weights (model/, loadable with plain transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import Field

from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD, ModelKind
from tuneforge.section import MAX_RANK, MethodSection

NAME = "lora"
ADAPTER = True
MODEL_KINDS = (CLASSIFIER, CAUSAL_LM, REWARD)
# LoRA trains few weights and a new classification head from scratch, so it
# wants a rate ten times full fine-tuning's: the starter classification recipe
# with method.name=lora reaches 0.83+ on SST-2 at 5e-4 and 0.80 at 2e-4
# (tests/integration/test_recipe_defaults.py, bench/results/*-lora-starter-sst2.json).
DEFAULT_LEARNING_RATES = {CLASSIFIER: 5e-4, CAUSAL_LM: 2e-4, REWARD: 1e-4}
WEIGHT_BYTES = 4.0
HEAD_NAMES = ("classifier", "score", "lm_head")  # output heads: never adapted, a classifier's trains whole


class Config(MethodSection):
    name: Literal["lora"] = Field(NAME, description="lora: low-rank adapters (peft).")
    r: int = Field(8, ge=1, le=MAX_RANK, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, le=1e6, description="LoRA scaling alpha (effective scale alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the output head)."
    )

    def describe(self) -> str:
        return f"{self.name} (r={self.r}, alpha={self.alpha}, targets={self.target_modules})"

    def hints(self) -> list[str]:
        return [f"method {self.name} (r={self.r}) trains few weights: a higher learning rate or r, "
                "or method.name: full"]


def peft_config(cfg: Config, kind: ModelKind, **extra):
    from peft import LoraConfig

    return LoraConfig(task_type=kind.peft_task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, **extra)


def prepare(model, cfg: Config, kind: ModelKind):
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(cfg, kind))
    fuse_lora_forward(model)
    return model


def fuse_lora_forward(model) -> int:
    """Give every plain LoRA linear layer a forward that folds the adapter's
    scaling and its addition into one GEMM (addmm): peft computes
    `base(x) + B(A(x)) * scaling`, two extra passes over a [tokens x out] tensor
    per layer, forward and backward (about a tenth of a LoRA step on CPU).
    Same maths, same parameters and state dict; anything unusual (several or
    disabled adapters, merged weights, DoRA and other variants, extra
    arguments) takes peft's own forward. Returns the number of layers fused."""
    import types

    import torch
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.base_layer, torch.nn.Linear):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused


def _fused_forward(self, x, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or active[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    out = F.linear(x, base.weight, base.bias)
    lora_x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
    h = F.linear(self.lora_dropout[name](lora_x), self.lora_A[name].weight)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]).to(out.dtype),
                       self.lora_B[name].weight.t().to(out.dtype), alpha=self.scaling[name])
    return flat.view(out.shape)


def save(model, tokenizer, folder: Path):
    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return merged


def adapted_linears(model, targets) -> list:
    """The linear layers `targets` names (or 'all-linear': every one but the output heads)."""
    import torch

    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if targets == "all-linear":
            if any(part in HEAD_NAMES for part in module_name.split(".")):
                continue
        elif module_name.rsplit(".", 1)[-1] not in targets:
            continue
        found.append(module)
    return found


def head_parameters(model, kind: ModelKind) -> int:
    """A classifier's head, which peft trains whole (modules_to_save) next to the adapters."""
    if kind.name not in (CLASSIFIER, REWARD):
        return 0
    return sum(p.numel() for n, p in model.named_parameters() if any(h in n.split(".") for h in HEAD_NAMES))


def trainable_parameters(model, cfg: Config, kind: ModelKind) -> int:
    """r * (in + out) per adapted linear layer, plus a classifier's head (on a meta-device model)."""
    return sum(cfg.r * (m.in_features + m.out_features) for m in adapted_linears(model, cfg.target_modules)) \
        + head_parameters(model, kind)

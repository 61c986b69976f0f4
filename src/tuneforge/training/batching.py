"""Deterministic batching: the data order is a pure function of (seed, epoch),
which is what lets a killed run resume at the exact next batch."""

from __future__ import annotations

import random
from typing import Sequence

import torch

MEGABATCH = 50  # batches per length-sorted window: short-padding win, order stays random


def plan_epoch(lengths: Sequence[int], batch_size: int, accumulation: int, seed: int, epoch: int,
               group_by_length: bool) -> list[list[list[int]]]:
    """Optimizer steps for one epoch, each a list of micro-batches of indices."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * MEGABATCH
        grouped = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
            grouped.extend(chunk)
        batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
        rng.shuffle(batches)
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Length-sorted batches for inference: least padding; callers restore order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def attention_mask(sequences: list[list[int]], left: bool = False) -> torch.Tensor:
    return pad([[1] * len(s) for s in sequences], 0, left)

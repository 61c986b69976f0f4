"""Data-parallel training on torch.distributed (launched by torchrun: `tuneforge
train --nproc N`, or `torchrun --nproc_per_node N -m tuneforge.cli train ...`).

Every rank builds the same plan of micro-batches (a pure function of seed and
epoch) and takes its shard of each; gradients are summed across ranks after a
step's micro-batches, so N processes take exactly the step one process would
with the same global batch. Rank 0 alone writes the run folder.

Why not DistributedDataParallel: the SFT loss calls the decoder body and the
head separately (to skip prompt positions), which bypasses DDP's forward hook;
one bucketed all-reduce per optimizer step is all DDP would do here anyway.
"""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def active() -> bool:
    return world()[1] > 1


def init(device: torch.device) -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA); returns this rank's device."""
    if not active():
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(indices: list[int]) -> list[int]:
    rank, size = world()
    return indices[rank::size]


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) every trainable gradient in one flat buffer."""
    if not active():
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:  # a rank whose shard was empty still takes part
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def sum_values(*values: float, device: torch.device) -> list[float]:
    if not active():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def finish(ok: bool = True) -> None:
    """Leave the process group; wait for the other ranks only on success (a
    failed rank must not hang in a barrier the others never reach)."""
    if active():
        import torch.distributed as dist

        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()

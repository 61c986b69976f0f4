"""Data-parallel training on torch.distributed (launched by torchrun: `tuneforge
train --nproc N`, or `torchrun --nproc_per_node N -m tuneforge.cli train ...`).

Every rank builds the same plan of micro-batches (a pure function of seed and
epoch) and takes its shard of each; gradients are summed across ranks after a
step's micro-batches, so N processes take exactly the step one process would
with the same global batch. Rank 0 alone writes the run folder.

Two strategies (recipe `train.distributed.strategy`):
- ddp: every rank holds the whole model; one flat all-reduce of the trainable
  gradients per optimizer step (all DistributedDataParallel would do here, without
  its per-micro-batch syncs);
- fsdp: PyTorch FSDP2 `fully_shard` on every transformer layer and on the root
  module that runs the loss, so weights, gradients and optimizer state are
  sharded (ZeRO-3). Checkpoints gather full tensors (`full`) and are written by
  rank 0 in the same format as one process; loading shards them again (`like`),
  so a run can resume with another strategy or process count.
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


def shard_model(model: torch.nn.Module, root: torch.nn.Module, cfg, device: torch.device) -> None:
    """FSDP2: shard each transformer layer (HF's `_no_split_modules` names them)
    and then `root`, the module whose forward runs the whole loss (it owns what is
    left: embeddings, final norm, head, tied or not). A no-op for ddp or one process."""
    if not active() or cfg.strategy != "fsdp":
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_types = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"fsdp: {type(inner).__name__} names no transformer layer class (_no_split_modules); "
                         "use train.distributed.strategy: ddp")
    options = {"reshard_after_forward": cfg.reshard_after_forward}
    if cfg.cpu_offload:
        if device.type != "cuda":
            raise ValueError("train.distributed.cpu_offload needs GPUs (weights already live in CPU memory)")
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(root, **options)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean: each rank's loss is already divided by the global
            # step's token/example count, as in the ddp path.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    model.__dict__["_tuneforge_sharded"] = True  # plain attribute: not a submodule


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(model.__dict__.get("_tuneforge_sharded"))


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (whole) laid out as `param` is: this rank's shard of it under fsdp."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.to(param.device)


def consolidate(model: torch.nn.Module, rebuild):
    """After fsdp training: the model unsharded on rank 0 (`rebuild()` makes an
    empty one of the same shape; the gathered weights go into it), None on the
    other ranks. Unsharded models pass through."""
    if not is_sharded(model):
        return model
    state = {}
    for name, tensor in model.state_dict().items():
        whole = full(tensor)  # every rank takes part in each gather
        if is_main():
            state[name] = whole.detach().cpu()
    if not is_main():
        return None
    plain = rebuild()
    plain.load_state_dict(state, strict=True)
    return plain


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

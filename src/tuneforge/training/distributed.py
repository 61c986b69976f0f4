"""Data-parallel training on torch.distributed (launched by torchrun: `tuneforge
train --nproc N`, or `torchrun --nproc_per_node N -m tuneforge.cli train ...`).

Every rank builds the same plan of micro-batches (a pure function of seed and
epoch) and takes its shard of each; gradients are summed across ranks after a
step's micro-batches, so N processes take exactly the step one process would
with the same global batch. Rank 0 alone writes the run folder.

Three strategies (recipe `train.distributed.strategy`):
- ddp: every rank holds the whole model; one flat all-reduce of the trainable
  gradients per optimizer step (all DistributedDataParallel would do here, without
  its per-micro-batch syncs);
- fsdp: PyTorch FSDP2 `fully_shard` on every transformer layer and on the root
  module that runs the loss, so weights, gradients and optimizer state are
  sharded (ZeRO-3). Checkpoints gather full tensors (`full`) and are written by
  rank 0 in the same format as one process; loading shards them again (`like`),
  so a run can resume with another strategy or process count;
- deepspeed: DeepSpeed ZeRO from the user's JSON, over the recipe's optimizer
  (see the DeepSpeed section below); checkpoints keep tuneforge's format, with
  each rank's optimizer partition stored under its rank.
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
    left: embeddings, final norm, head, tied or not). deepspeed: remember `root` for
    deepspeed_init. A no-op for ddp or one process."""
    if not active() or cfg.strategy == "ddp":
        return
    if cfg.strategy == "deepspeed":  # the engine wraps `root` once the loop has built the optimizer
        model.__dict__["_tuneforge_ds_root"] = root
        model.__dict__["_tuneforge_sharded"] = True
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    from tuneforge.models import unwrap

    inner = unwrap(model)
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


# ---------------------------------------------------------------- DeepSpeed ZeRO
# tuneforge's loop keeps the data plan, loss normalisation, schedule and its own
# pickle-free checkpoints; DeepSpeed (initialised with the recipe's optimizer)
# partitions optimizer state (ZeRO-1), gradients (2) and weights (3) and reduces
# gradients. Each optimizer step: backward per micro-batch, one engine.step().

_REFUSED = {"optimizer": "train.optimizer and train.learning_rate", "scheduler": "train.scheduler and train.warmup",
            "fp16": "bf16 autocast on GPUs (automatic)", "bf16": "bf16 autocast on GPUs (automatic)",
            "train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.gradient_accumulation",
            "gradient_clipping": "train.max_grad_norm"}


def deepspeed_config(path: str, train_cfg) -> dict:
    import json
    from pathlib import Path

    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"train.distributed.deepspeed_config {path}: {exc}") from exc

    def enabled(value) -> bool:  # {"bf16": {"enabled": false}} is allowed, {"bf16": true} is not
        return bool(value.get("enabled")) if isinstance(value, dict) else bool(value)

    clashes = [f"{key} (set by {_REFUSED[key]})" for key in config if key in _REFUSED
               and not (key in ("fp16", "bf16") and not enabled(config[key]))]
    if clashes:
        raise ValueError(f"{path}: remove {', '.join(clashes)}: the recipe decides these, so that one recipe "
                         "trains the same way with any strategy")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage is {stage}; use 1, 2 or 3 (without ZeRO, "
                         "strategy ddp does the same work)")
    # Offloading the optimizer with the recipe's torch optimizer (DeepSpeed would
    # otherwise insist on its own CPU Adam).
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    # The engine only books the micro-batch size (tuneforge feeds it), and every
    # engine.step() is an optimizer step (unmanaged accumulation).
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  managed_gradient_accumulation=False, gradient_clipping=train_cfg.max_grad_norm or 0.0)
    config.setdefault("steps_per_print", 10**9)
    return config


def deepspeed_init(model: torch.nn.Module, optimizer, train_cfg):
    """Wrap the loss module that shard_model recorded with a DeepSpeed engine over
    the recipe's optimizer; returns the engine (None without deepspeed)."""
    root = model.__dict__.get("_tuneforge_ds_root")
    if root is None:
        return None
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("train.distributed.strategy deepspeed needs DeepSpeed: "
                          "pip install 'tuneforge[deepspeed]'") from exc
    config = deepspeed_config(train_cfg.distributed.deepspeed_config, train_cfg)
    engine, *_ = deepspeed.initialize(model=root, optimizer=optimizer, config=config)
    model.__dict__["_tuneforge_ds"] = engine
    return engine


def deepspeed_engine(model: torch.nn.Module):
    return model.__dict__.get("_tuneforge_ds")


def gathered(model: torch.nn.Module, params: list, modify: bool = False):
    """A context in which `params` are whole: ZeRO-3 partitions them between
    forward passes (modify=True: changes made on rank 0 are scattered back)."""
    import contextlib

    engine = deepspeed_engine(model)
    if engine is None or engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def optimizer_view(model: torch.nn.Module):
    """A context in which the optimizer's param_groups hold the parameters its
    state belongs to: ZeRO-3 fills them only while stepping."""
    import contextlib

    engine = deepspeed_engine(model)
    if engine is None or engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def filled():
        engine.optimizer._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            engine.optimizer._clear_fp32_optimizer_param_groups()

    return filled()


def weights_loaded(model: torch.nn.Module) -> None:
    """After weights were copied into the model: DeepSpeed's fp32 master copies follow."""
    engine = deepspeed_engine(model)
    if engine is not None:
        engine.optimizer.refresh_fp32_params()


def gather_to_main(obj):
    """Every rank's `obj` on rank 0 (a list by rank), None elsewhere."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world()[1] if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


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
    """After fsdp or DeepSpeed training: the model unsharded on rank 0 (`rebuild()`
    makes a fresh one of the same shape; the gathered weights go into it), None on
    the other ranks. Unsharded models pass through."""
    if not is_sharded(model):
        return model
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # every rank takes part in each gather, one tensor at a time; rank 0 keeps them
        with gathered(model, [tensor] if isinstance(tensor, torch.nn.Parameter) else []):
            whole = full(tensor.detach())
            if is_main():
                state[name] = whole.cpu().clone()
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

"""Resumable checkpoints without pickle.

Tensors (trainable weights, optimizer moments, RNG states) go to safetensors;
everything else (step, data position, scheduler, early-stopping state, the
optimizer's non-tensor structure) goes to JSON. A checkpoint folder is written
atomically by `fsio.atomic_dir` and trusted only with its completion marker.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuneforge.fsio import atomic_dir, is_complete
from tuneforge.run import remove_leftovers
from tuneforge.training import distributed

STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


class CheckpointDamaged(RuntimeError):
    """A checkpoint file cannot be read (truncated, overwritten, not safetensors)."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors even when sharded (then a collective: every rank calls it,
    one parameter at a time, and only rank 0, which writes, keeps a copy)."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with distributed.gathered(model, [param]):
                whole = distributed.full(param.detach())
                if distributed.is_main():
                    state[name] = whole.cpu().clone().contiguous()
    return state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable weights {missing[:3]}...: was it written by another recipe?")
    with torch.no_grad(), distributed.gathered(model, [params[n] for n in state], modify=True):
        for name, tensor in state.items():
            params[name].copy_(distributed.like(tensor, params[name]))
    distributed.weights_loaded(model)


def _split_optimizer(opt_state: dict, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able rest); sharded moments are gathered (a collective), and
    copied only where `keep`."""
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, entry in opt_state["state"].items():
        meta_entry = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                whole = distributed.full(value.detach())
                if keep:
                    tensors[f"state.{idx}.{key}"] = whole.cpu().clone().contiguous()
                meta_entry[key] = {"tensor": True}
            else:
                meta_entry[key] = {"value": value}
        meta["state"][str(idx)] = meta_entry
    return tensors, meta


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, optimizer) -> dict:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, entry in meta["state"].items():
        param = params[int(idx)]
        state[int(idx)] = {
            # Moments are laid out like their parameter (sharded under fsdp);
            # scalar entries such as `step` stay as they are.
            key: (_like_param(tensors[f"state.{idx}.{key}"], param) if spec.get("tensor") else spec["value"])
            for key, spec in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return distributed.like(value, param) if value.dim() > 0 else value


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "python": _to_json(random.getstate()),
        "numpy": {"kind": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_from_json(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))


def _to_json(obj: Any) -> Any:
    return [_to_json(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _from_json(obj: Any) -> Any:
    return tuple(_from_json(x) for x in obj) if isinstance(obj, list) else obj


def _optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    zero = distributed.deepspeed_engine(model) is not None
    with distributed.optimizer_view(model):
        # ZeRO: every rank's own partition goes to rank 0; otherwise rank 0's copy is all
        tensors, meta = _split_optimizer(optimizer.state_dict(), keep=zero or distributed.is_main())
    if not zero:
        return tensors, meta
    # DeepSpeed ZeRO: each rank's optimizer holds its own partition; rank 0 writes
    # them all, keyed by rank (so resuming needs the same number of processes).
    shards = distributed.gather_to_main((tensors, meta))
    if shards is None:
        return {}, {}
    return ({f"rank{r}.{key}": value for r, (part, _) in enumerate(shards) for key, value in part.items()},
            {"zero_ranks": [part_meta for _, part_meta in shards]})


def _load_optimizer(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "zero_ranks" in meta:
        rank, size = distributed.world()
        if len(meta["zero_ranks"]) != size:
            raise RuntimeError(f"this checkpoint holds DeepSpeed optimizer partitions of {len(meta['zero_ranks'])} "
                               f"processes; resume with --nproc {len(meta['zero_ranks'])} (this run has {size})")
        prefix = f"rank{rank}."
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        meta = meta["zero_ranks"][rank]
    with distributed.optimizer_view(model):
        optimizer.load_state_dict(_join_optimizer(tensors, meta, optimizer))


def save_checkpoint(folder: Path, model, optimizer, scheduler, loop_state: dict) -> None:
    """Every rank calls this (sharded tensors are gathered); rank 0 writes."""
    weights = trainable_state(model)
    opt_tensors, opt_meta = _optimizer_state(model, optimizer)
    if not distributed.is_main():
        return
    rng_tensors, rng_meta = _rng_state()
    with atomic_dir(folder) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"loop": loop_state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointDamaged(f"{path}: damaged checkpoint file ({reason})") from None


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(f"{path}: damaged checkpoint file ({exc})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise CheckpointDamaged(f"{path}: damaged checkpoint file (no {', '.join(missing)})")
    return data


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Every file of a checkpoint read and checked before anything is restored,
    so a damaged one changes nothing; CheckpointDamaged names the file."""
    state = _read_json(folder / "state.json", ("loop", "optimizer", "scheduler", "rng"))
    return state, {name: _read_tensors(folder / name) for name in CHECKPOINT_FILES}


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the loop state."""
    state, tensors = read_checkpoint(folder)
    return _restore(state, tensors, model, optimizer, scheduler)


def _restore(state: dict, tensors: dict[str, dict[str, torch.Tensor]], model, optimizer, scheduler) -> dict:
    load_trainable_state(model, tensors["trainable.safetensors"])
    _load_optimizer(model, optimizer, tensors["optimizer.safetensors"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(tensors["rng.safetensors"], state["rng"])
    return state["loop"]


def load_latest(root: Path, model, optimizer, scheduler) -> tuple[Optional[Path], Optional[dict], list[str]]:
    """Restore the newest complete checkpoint that reads back whole, falling
    back to older ones: (folder, loop state, one line per damaged one skipped).
    (None, None, []) when there is none; CheckpointDamaged when all are damaged."""
    skipped = []
    for folder in complete_checkpoints(root):
        try:
            state, tensors = read_checkpoint(folder)
        except CheckpointDamaged as exc:
            skipped.append(str(exc))
            continue
        return folder, _restore(state, tensors, model, optimizer, scheduler), skipped
    if skipped:
        raise CheckpointDamaged("every checkpoint of this run is damaged: " + "; ".join(skipped)
                                + ". Start a new run (another --output, without --resume).")
    return None, None, []


def save_weights(folder: Path, model, info: dict) -> None:
    """The best model so far: trainable weights only (the rest is the base model).
    Every rank calls this; rank 0 writes."""
    weights = trainable_state(model)
    if not distributed.is_main():
        return
    with atomic_dir(folder) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        (tmp / "info.json").write_text(json.dumps(info, indent=1))


def load_weights(folder: Path, model) -> dict:
    info = _read_json(folder / "info.json", ("step", "value"))
    load_trainable_state(model, _read_tensors(folder / "trainable.safetensors"))
    return info


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step-N folders, newest first; half-written ones are ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete step-N folder; half-written ones are ignored."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    complete = [p for _, p in found if is_complete(p)]
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    # Folders left without a marker by a killed run are never resumed from.
    for _, path in found:
        if not is_complete(path) and path not in complete:
            shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(root)

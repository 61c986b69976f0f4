"""Leaf helpers used by every trainer: opening a run, loading data, seeding,
saving the final model, and reporting results."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from tuneforge import __version__, gpu, kinds
from tuneforge.console import comparison_table, console, verdict_panel
from tuneforge.data.splits import InvalidRows, Splits, write_rejects
from tuneforge.evaluate import registry
from tuneforge.evaluate.verdict import NO_BETTER, hints
from tuneforge.fsio import atomic_dir
from tuneforge.methods import METHODS
from tuneforge.models import count_parameters, pick_device, unwrap
from tuneforge.recipe import Recipe
from tuneforge.run import Run, find_resumable, new_run_dir
from tuneforge.training import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_run(recipe: Recipe, output: Optional[str], resume: bool, device: Optional[str]) -> tuple[Run, torch.device]:
    dev = pick_device(device or recipe.device)
    gpu.check_recipe(recipe, dev)  # GPU-only features fail here, before a run folder or a model exists
    dev = distributed.init(dev)
    if distributed.active() and output is None:
        raise ValueError("multi-process training needs --output (tuneforge train --nproc sets it)")
    if not distributed.is_main():
        console.quiet = True  # one rank speaks
    path = find_resumable(recipe, output) if resume else new_run_dir(recipe, output)
    if distributed.is_main():
        run = Run(path, recipe, resume=resume)
        rank, size = distributed.world()
        run.update(device=str(dev), tuneforge_version=__version__, world_size=size,
                   model_kind=recipe.model_kind.name)
    distributed.barrier()  # the folder exists before the other ranks look at it
    if not distributed.is_main():
        run = Run(path, recipe, resume=resume, writer=False)
    console.print(f"run folder: {run.path}  device: {dev}  processes: {distributed.world()[1]}")
    return run, dev


def load_splits(recipe: Recipe, run: Run) -> Splits:
    """Run the data studio's prepare pipeline (cleaning, PII, dedup, near-dup,
    split, balance, augment; cached by content hash) and record its report in the
    manifest; every reject goes to rejects.jsonl whether we stop or skip."""
    from tuneforge.data.formats import check_trainable
    from tuneforge.data.load import DataError
    from tuneforge.data.studio import prepare_data

    try:
        splits = prepare_data(recipe, log=console.print if distributed.is_main() else (lambda m: None))
        check_trainable(splits.kind, recipe.task)
    except InvalidRows as exc:
        if run.writer:
            write_rejects(run.path / "rejects.jsonl", exc.rejects)
        run.finish("failed: invalid data")
        raise
    except DataError:
        run.finish("failed: unusable data")
        raise
    if splits.rejects and run.writer:
        write_rejects(run.path / "rejects.jsonl", splits.rejects)
        console.print(f"[yellow]skipped {len(splits.rejects)} malformed row(s); see {run.path / 'rejects.jsonl'}")
    previous = run.manifest.get("data") if run.writer else None
    if previous is not None:
        _check_same_data(previous, splits.report)
    run.update(data=splits.report)
    for split, info in splits.report["files"].items():
        other = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in (info.get("removed") or {}).items())
        console.print(
            f"{split}: {info['read']} read, {info['rejected']} rejected, "
            f"{info['duplicates_removed']} duplicates removed, " + (f"{other}, " if other else "") + f"{info['kept']} "
                                                                                                     "kept"
        )
    for step in splits.report.get("steps", []):
        if step.get("added") or step["step"] in ("balance", "review"):
            console.print(f"{step['step']}: {step['in']} -> {step['out']} rows"
                          + (f" ({step['added']} added)" if step.get("added") else ""))
    sizes = ", ".join(f"{k} {v['rows']}" for k, v in splits.report["splits"].items())
    console.print(
        f"splits: {sizes}" + (" (prepared data from cache)" if splits.report.get("cache", {}).get("hit") else "")
    )
    if recipe.model_kind.name == kinds.CAUSAL_LM:
        _pin_template(recipe, run, splits)
    return splits


def _pin_template(recipe: Recipe, run: Run, splits: Splits) -> None:
    """Pre-flight preview checks, and the chat template pinned in the run
    (chat_template.jinja + its sha256 in the manifest) so inference renders
    prompts the way training did."""
    from tuneforge.data.preview import build_preview, template_info
    from tuneforge.data.studio import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    result = build_preview(tokenizer, splits.train, splits.kind, recipe.data.system_prompt,
                           recipe.train.max_length, n=0, check=200)
    info = template_info(tokenizer)
    for warning in result.warnings:
        console.print(f"[bold yellow]data preview warning:[/] {warning}")
    if run.writer:
        from tuneforge.fsio import atomic_write_text

        atomic_write_text(run.path / "chat_template.jinja", info["text"])
        run.update(template={"sha256": info["sha256"], "file": "chat_template.jinja",
                             "generation_marker": info["generation_marker"], "eos_token": info["eos_token"],
                             "preview": {"checked": result.checked, "eos_trained": result.eos_trained,
                                         "truncated": result.truncated, "warnings": result.warnings}})


def _check_same_data(previous: dict, current: dict) -> None:
    for split, info in current["files"].items():
        before = previous.get("files", {}).get(split, {}).get("sha256")
        if before and before != info["sha256"]:
            raise RuntimeError(
                f"{info['path']} changed since the run started (sha256 differs); resuming would mix data. "
                "Start a new run instead."
            )


def apply_method(model, recipe: Recipe, quiet: bool = False):
    if recipe.train.liger:  # on the plain model, before peft wraps its layers
        patched = gpu.apply_liger(model)
        if not quiet:
            console.print(f"liger kernels (rms_norm, swiglu, rope) applied to the {patched} model")
    model = METHODS[recipe.method.name].prepare(model, recipe.method, recipe.model_kind)
    if recipe.train.gradient_checkpointing:
        inner = unwrap(model)
        # Non-reentrant checkpointing needs no grad-requiring input, so frozen
        # embeddings (LoRA, freeze) work as they are.
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if quiet:
        return model
    trainable, total = count_parameters(model)
    console.print(
        f"method {recipe.method.name}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)"
    )
    return model


def shard(model, root, recipe: Recipe, device: torch.device) -> bool:
    """Shard `model` (fsdp, deepspeed) when the recipe asks for it and several
    processes run (`root` is the module whose forward computes the loss); True if sharded."""
    cfg = recipe.train.distributed
    if cfg.strategy != "ddp" and distributed.active():
        if registry.get(recipe.metric_for_best).generated:
            raise ValueError(
                f"train.metric_for_best '{recipe.metric_for_best}' needs generation during training, which "
                f"{cfg.strategy} does not run (each rank holds a shard of the model): use loss or perplexity, "
                "or strategy ddp")
        distributed.shard_model(model, root, cfg, device)
    return distributed.is_sharded(model)


def save_final_model(model, tokenizer, recipe: Recipe, run: Run):
    """Write run/model atomically; returns the plain model holding the final weights."""
    final = run.path / "model"
    with atomic_dir(final) as tmp:
        result = METHODS[recipe.method.name].save(model, tokenizer, tmp)
    return result


def baseline_cached(run: Run) -> Optional[dict]:
    """A resumed run reuses the baseline measured when it started."""
    return run.read_json("baseline.json")


def report(run: Run, recipe: Recipe, result: dict, validation: Optional[dict], baseline_name: str) -> dict:
    """Write metrics.json ({"test", "baseline", "validation", "verdict"}), the details
    for the report (curves, worst errors, samples, robustness), and print base vs
    tuned; a run no better than its baseline says so in red instead of "done"."""
    test, baseline = result["metrics"], result.get("baseline")
    verdict = dict(result.get("verdict") or {"status": "no_baseline", "reasons": []})
    if verdict["status"] == NO_BETTER:
        verdict["hints"] = hints(recipe)
    metrics = {"test": test, "baseline": baseline, "validation": validation, "verdict": verdict}
    run.write_json("metrics.json", metrics)
    run.write_json("evaluation.json", {k: v for k, v in result.items() if k not in ("metrics", "baseline")})
    console.print(comparison_table(f"{recipe.name}: test split", baseline, test, baseline_name))
    significance = registry.significance_line(test.get("vs_baseline"))
    if significance:
        console.print("paired test vs baseline: " + significance)
    run.finish()
    from tuneforge.report import write_report

    html_path, _ = write_report(run.path)
    console.print(f"report: {html_path}")
    if verdict["status"] == NO_BETTER:
        console.print(verdict_panel(verdict, baseline_name))
        console.print(f"[bold red]finished, but no better than the {baseline_name}:[/] {run.path}")
    else:
        console.print(f"done: {run.path}")
    return metrics

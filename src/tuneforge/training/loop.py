"""The optimisation loop shared by the objective trainers (a leaf helper, not a base class).

Why our own loop rather than transformers.Trainer: resuming must restore the
optimizer, scheduler, RNG and data position *without pickle* (Trainer's
checkpoints are torch.save pickles), and a killed run must resume to weights
bit-identical with an uninterrupted one. That needs the data order to be a pure
function of (seed, epoch) and every piece of state to be ours to serialise.
Model code, tokenizers, schedulers and adapters still come from the HF stack.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from tuneforge.console import Progress
from tuneforge.recipe import TrainConfig
from tuneforge.run import Run
from tuneforge.training import checkpoint as ckpt
from tuneforge.training import distributed
from tuneforge.training.optim import build_optimizer, build_scheduler

# plan(epoch) -> optimizer steps, each a list of micro-batches of example indices.
Plan = Callable[[int], list[list[list[int]]]]


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


@dataclass
class Objective:
    """What a trainer gives the loop: how to batch, weigh, score and evaluate."""

    plan: Plan
    units: Callable[[list[int]], int]  # loss normaliser of a micro-batch (examples or target tokens)
    loss_sum: Callable[[list[int]], tuple[torch.Tensor, int]]  # (summed loss, real tokens)
    evaluate: Optional[Callable[[], dict]]  # validation metrics, or None without validation data
    metric: str
    higher_is_better: bool


def steps_per_epoch(plan: Plan) -> int:
    return len(plan(0))


def total_steps(cfg: TrainConfig, per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * per_epoch))


def autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _improved(value: float, best: Optional[float], higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


@dataclass
class Window:
    """Loss and tokens since the last log line; time spent evaluating and
    checkpointing is not training time (`pause` moves the clock start)."""

    tokens: int = 0
    loss: float = 0.0
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def close(self, record: dict) -> None:
        """The logged loss is the mean over the steps since the last line."""
        elapsed = time.perf_counter() - self.t0
        record["loss"] = self.loss / self.steps
        record["tokens"] = self.tokens
        record["tokens_per_s"] = self.tokens / elapsed if elapsed > 0 else 0.0
        self.tokens, self.loss, self.steps, self.t0 = 0, 0.0, 0, time.perf_counter()


@dataclass
class Stepper:
    """One optimizer step: every micro-batch of the step (this rank's shard of
    each) forward and backward, gradients summed across ranks, clipped, applied."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: object  # a DeepSpeed engine, or None
    cfg: TrainConfig
    device: torch.device

    def __post_init__(self):
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.sharded = distributed.is_sharded(self.model)

    def __call__(self, micro_batches: list[list[int]]) -> tuple[float, float, float, float]:
        """(summed loss, real tokens, the step's normaliser, gradient norm)."""
        objective, engine = self.objective, self.engine
        # The normaliser covers the whole (global) step, so shards summed
        # across ranks give exactly the one-process gradient.
        norm = sum(objective.units(mb) for mb in micro_batches)
        if engine is None:
            self.optimizer.zero_grad(set_to_none=True)  # the engine zeroes its own after each step
        loss_total, step_tokens = 0.0, 0
        for mb in micro_batches:
            mine = distributed.shard(mb)
            if not mine and not self.sharded:
                continue
            with autocast(self.device):
                # fsdp and ZeRO gather weights inside forward and backward, so a
                # rank with no examples still runs one, contributing nothing.
                loss, tokens = objective.loss_sum(mine or mb[:1])
            if not mine:
                loss, tokens = loss * 0.0, 0
            if engine is None:
                (loss / norm).backward()
            else:  # DeepSpeed averages over ranks; the global normaliser wants a sum
                engine.backward(loss / norm * distributed.world()[1], scale_wrt_gas=False)
            loss_total += loss.item()
            step_tokens += tokens
        loss_total, step_tokens = distributed.sum_values(loss_total, step_tokens, device=self.device)
        if engine is not None:  # reduce, clip to train.max_grad_norm, step, zero
            engine.step()
            grad_norm = engine.get_global_grad_norm() or 0.0
        else:
            if not self.sharded:  # fsdp reduce-scatters (sums) gradients in backward
                distributed.sum_gradients(self.trainable)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm or float("inf"))
            self.optimizer.step()
        self.scheduler.step()
        return loss_total, step_tokens, norm, grad_norm


def restore(run: Run, model, optimizer, scheduler, resume: bool) -> tuple:
    """(state, newest complete checkpoint or None, skipped damaged ones) for a resume."""
    if not resume:
        return LoopState(), None, []
    last, loop_state, skipped = ckpt.load_latest(run.checkpoints, model, optimizer, scheduler)
    state = LoopState(**loop_state) if last is not None else LoopState()
    run.truncate_log(state.step)
    return state, last, skipped


def fit(model, objective: Objective, cfg: TrainConfig, lr: float, run: Run, device: torch.device,
        resume: bool = False, quiet: bool = False) -> LoopState:
    per_epoch = steps_per_epoch(objective.plan)
    total = total_steps(cfg, per_epoch)
    optimizer = build_optimizer(list(model.parameters()), cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, total)
    engine = distributed.deepspeed_init(model, optimizer, cfg)  # None unless strategy deepspeed
    state, last, skipped = restore(run, model, optimizer, scheduler, resume)
    eval_every = cfg.eval_every or per_epoch
    save_every = cfg.checkpoint_every or eval_every
    step = Stepper(model, objective, optimizer, scheduler, engine, cfg, device)
    progress = Progress(total, quiet or not distributed.is_main(), start_step=state.step)
    for line in skipped:
        progress.message(f"skipped {line}")
    if last is not None:
        fallback = " (the newest complete checkpoint that reads back whole)" if skipped else ""
        progress.message(f"resumed from {last.name}{fallback} (epoch {state.epoch}, step {state.step}/{total})")
    model.train()
    window = Window()
    try:
        while state.step < total and not state.stopped_early:
            steps = objective.plan(state.epoch)
            for micro_batches in steps[state.step_in_epoch:]:
                loss_total, step_tokens, norm, grad_norm = step(micro_batches)
                window.tokens += int(step_tokens)
                state.step += 1
                state.step_in_epoch += 1
                if state.step_in_epoch >= per_epoch:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                window.loss, window.steps = window.loss + loss_total / norm, window.steps + 1
                record = {
                    "step": state.step, "epoch": round(state.epoch + state.step_in_epoch / per_epoch, 4),
                    "loss": loss_total / norm, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                }
                log_now = state.step % cfg.log_every == 0 or state.step == total
                if log_now:
                    window.close(record)
                    run.log(record)
                progress.update(
                    state.step, {k: record[k] for k in ("loss", "lr", "tokens_per_s") if k in record}, log_now
                )
                at_end = state.step >= total
                paused = time.perf_counter()
                if objective.evaluate is not None and (state.step % eval_every == 0 or at_end):
                    _evaluate(model, objective, state, cfg, run, progress)
                    model.train()
                if state.step % save_every == 0 or at_end or state.stopped_early:
                    _save(model, optimizer, scheduler, state, cfg, run)
                window.t0 += time.perf_counter() - paused
                if at_end or state.stopped_early:
                    break
    finally:
        progress.close()
    restore_best(model, objective, run, progress)
    return state


def restore_best(model, objective: Objective, run: Run, progress: Progress) -> None:
    """The best evaluation's weights into the model (rank 0 has finished writing them)."""
    distributed.barrier()
    best = run.checkpoints / "best"
    if objective.evaluate is not None and ckpt.is_complete(best):
        info = ckpt.load_weights(best, model)
        progress.message(f"restored the best weights: step {info['step']}, {objective.metric} {info['value']:.4f}")
    model.eval()


def _evaluate(model, objective: Objective, state: LoopState, cfg: TrainConfig, run: Run, progress: Progress):
    model.eval()
    metrics = objective.evaluate()
    value = metrics.get(objective.metric)
    if value is None:
        raise KeyError(
            f"train.metric_for_best '{objective.metric}' is not among the validation metrics "
            f"({', '.join(sorted(metrics))})"
        )
    run.log({"step": state.step, "split": "validation", **metrics})
    if _improved(value, state.best_metric, objective.higher_is_better):
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        ckpt.save_weights(run.checkpoints / "best", model,  # every rank: gathers shards; rank 0 writes
                          {"step": state.step, "metric": objective.metric, "value": value})
    else:
        state.evals_without_improvement += 1
        if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
            state.stopped_early = True
            progress.message(
                f"early stopping at step {state.step}: {objective.metric} has not improved for "
                f"{state.evals_without_improvement} evaluations (best {state.best_metric:.4f} at step "
                f"{state.best_step})"
            )
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    progress.message(f"validation @ step {state.step}: {shown}")


def _save(model, optimizer, scheduler, state: LoopState, cfg: TrainConfig, run: Run) -> None:
    # Every rank takes part (fsdp gathers its shards); rank 0 writes once.
    ckpt.save_checkpoint(run.checkpoints / f"step-{state.step:07d}", model, optimizer, scheduler, asdict(state))
    if distributed.is_main():
        ckpt.prune_checkpoints(run.checkpoints, cfg.keep_checkpoints)
    distributed.barrier()

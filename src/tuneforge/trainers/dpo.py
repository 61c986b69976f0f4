"""Direct preference optimisation of a causal LM on preference pairs, with its kin: ipo, hinge, simpo, orpo.

setup (data, model, reference log-probs, baseline, method) -> train (shared loop) -> save -> test vs the base model.

The reference is the starting model. Its summed log-probs of every chosen and rejected response (train, validation
and test) are computed once, before the method touches the model (so for LoRA it is the base without the
adapter), and stored in the run folder (tuneforge.evaluate.policy.REFERENCE_FILE, safetensors, with the sha256 of
each split's token ids); a resume reads them back instead of recomputing, and recomputes a split whose tokens no
longer match. No second model is held while training. The reference-free losses (simpo, orpo) need none.

The loss of a micro-batch of pairs is one forward pass over its chosen and rejected sides together (packed into
one padding-free row where the model allows it, the output head on scored positions only), then
tuneforge.alignment.losses.dpo_loss per recipe.alignment, summed over pairs (the loop divides by the pairs of the
step), plus alignment.sft_weight x the chosen responses' token-mean NLL (TRL's "sft" loss term); orpo adds its own
NLL term, the token mean over the whole chosen sequence, as TRL's ORPOTrainer. Both token means are per
micro-batch, as TRL computes them per batch. KTO (unpaired thumbs-up/down data) is not here: it needs its own data
kind.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Optional

import torch

from tuneforge.alignment.losses import DPO_LOSSES, DpoOutput, dpo_loss
from tuneforge.console import console
from tuneforge.data.splits import Splits
from tuneforge.evaluate import policy, registry
from tuneforge.inference import nll_module, supports_packing
from tuneforge.models import load_causal_lm, load_options
from tuneforge.recipe import Recipe
from tuneforge.reporting.kit import read_log
from tuneforge.run import Run
from tuneforge.trainers import shared
from tuneforge.training import distributed
from tuneforge.training.batching import eval_batches, plan_epoch
from tuneforge.training.loop import Objective, autocast, fit

SPLITS = ("train", "validation", "test")


@dataclass
class Session:
    """What the steps of one DPO run share; `model` is released once the test pass no longer needs it."""

    recipe: Recipe
    run: Run
    device: torch.device
    tokenizer: object
    model: Optional[torch.nn.Module]
    sets: dict[str, policy.HeldOut]
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # split -> (chosen, rej.)

    @property
    def eval_batch_size(self) -> int:
        return self.recipe.train.eval_batch_size or 2 * self.recipe.train.batch_size


def check_alignment(recipe: Recipe) -> None:
    """Refuse settings the chosen loss does not take, before a run folder exists."""
    a = recipe.alignment
    if a.label_smoothing and not DPO_LOSSES[a.loss_type].smoothing:
        smoothing = ", ".join(k for k, v in DPO_LOSSES.items() if v.smoothing)
        raise ValueError(f"alignment.label_smoothing {a.label_smoothing}: loss_type {a.loss_type} does not take "
                         f"label smoothing (only {smoothing} do); set it to 0")
    if a.sft_weight and a.loss_type == "orpo":
        raise ValueError("alignment.sft_weight: loss_type orpo has its own NLL term (weight 1, as in the paper); "
                         "set alignment.sft_weight to 0")


def render_sets(tokenizer, splits: Splits, recipe: Recipe) -> dict[str, policy.HeldOut]:
    return {name: policy.held_out(tokenizer, getattr(splits, name), recipe, name) for name in SPLITS}


# --- the loss -------------------------------------------------------------------------------------------------


@dataclass
class BatchLoss:
    loss: torch.Tensor  # summed over the pairs (differentiable)
    tokens: int  # real tokens in the forward pass
    out: DpoOutput  # per-pair losses and implicit rewards
    chosen: torch.Tensor  # (pairs,) the policy's summed response log-probs, detached
    rejected: torch.Tensor


@dataclass
class PairLoss:
    """The loop's loss_sum over pairs of one split; `last` keeps the latest batch's result, detached."""

    session: Session
    split: str = "train"
    last: Optional[BatchLoss] = None

    def __call__(self, batch: list[int]) -> tuple[torch.Tensor, int]:
        b = pair_loss(self.session, self.split, batch)
        out = DpoOutput(b.out.losses.detach(), b.out.chosen_rewards, b.out.rejected_rewards)
        self.last = BatchLoss(b.loss.detach(), b.tokens, out, b.chosen, b.rejected)  # no autograd graph kept
        return b.loss, b.tokens


def pair_loss(s: Session, split: str, batch: list[int]) -> BatchLoss:
    """The summed loss of `batch` (pair indices of `split`): one forward over both sides of every pair."""
    a, held, n = s.recipe.alignment, s.sets[split], len(batch)
    pairs = [held.pairs[i] for i in batch]
    orpo = a.loss_type == "orpo"
    out = policy.sequence_logps(s.model, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                                s.tokenizer.pad_token_id, s.device, whole=[orpo] * n + [False] * n)
    chosen, rejected = out.response[:n], out.response[n:]
    ref = s.reference.get(split)
    ref_c, ref_r = (ref[0][batch].to(s.device), ref[1][batch].to(s.device)) if ref is not None else (None, None)
    chosen_len, rejected_len = held.chosen_len[batch].to(s.device), held.rejected_len[batch].to(s.device)
    result = dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=a.loss_type, beta=a.beta,
                      label_smoothing=a.label_smoothing, chosen_len=chosen_len, rejected_len=rejected_len,
                      gamma=a.gamma)
    loss = result.losses.sum()
    if orpo:  # TRL's ORPO NLL: token mean over the chosen prompt + completion
        loss = loss + n * -out.whole[:n].sum() / out.whole_tokens[:n].sum().clamp(min=1)
    if a.sft_weight:  # TRL's "sft" term: token mean over the chosen completions
        loss = loss + a.sft_weight * n * -chosen.sum() / chosen_len.sum().clamp(min=1)
    return BatchLoss(loss, out.tokens, result, chosen.detach(), rejected.detach())


@torch.no_grad()
def validate(s: Session, split: str = "validation") -> dict:
    """Loss (as trained), implicit-reward accuracy and margin, mean rewards and summed log-probs over `split`."""
    s.model.eval()
    held = s.sets[split]
    total = dict.fromkeys(("loss", "reward_accuracy", "reward_margin", "chosen_rewards", "rejected_rewards",
                           "chosen_logps", "rejected_logps"), 0.0)
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in held.pairs]
    for batch in eval_batches(lengths, s.eval_batch_size):
        with autocast(s.device):
            b = pair_loss(s, split, batch)
        parts = {"loss": b.loss, "reward_accuracy": b.out.reward_accuracy * len(batch),
                 "reward_margin": b.out.margins.sum(), "chosen_rewards": b.out.chosen_rewards.sum(),
                 "rejected_rewards": b.out.rejected_rewards.sum(), "chosen_logps": b.chosen.sum(),
                 "rejected_logps": b.rejected.sum()}
        for key, value in parts.items():
            total[key] += float(value)
    return {k: v / len(held.pairs) for k, v in total.items()}


# --- reference and baseline -----------------------------------------------------------------------------------


def reference_logps(s: Session, resume: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The starting model's log-probs of every split, read back on a resume when they still match the split's
    tokens, else computed now (on the model as loaded, before the method is applied) and written to the run."""
    loss_type = s.recipe.alignment.loss_type
    if DPO_LOSSES[loss_type].reference_free:
        console.print(f"loss_type {loss_type} is reference-free: no reference log-probs")
        s.run.update(reference={"loss_type": loss_type, "file": None})
        return {}
    path = s.run.path / policy.REFERENCE_FILE
    stored = policy.read_reference(path) if resume else ({}, {})
    digests = {name: policy.pairs_digest(held.pairs) for name, held in s.sets.items() if held.pairs}
    found, computed = {}, []
    for name, digest in digests.items():
        hit = policy.stored_logps(stored, digest, s.recipe.model, name)
        if hit is None:
            hit = policy.pair_logps(s.model, s.sets[name].pairs, s.tokenizer.pad_token_id, s.eval_batch_size,
                                    s.device)
            computed.append(name)
        found[name] = hit
    if computed and s.run.writer:
        policy.write_reference(path, found, digests, s.recipe.model)
    reused = [name for name in found if name not in computed]
    console.print(f"reference log-probs: computed for {', '.join(computed) or 'no split'}"
                  + (f", read back for {', '.join(reused)}" if reused else "") + f" ({path.name})")
    s.run.update(reference={"loss_type": loss_type, "file": policy.REFERENCE_FILE, "computed": computed,
                            "reused": reused, "pairs": {name: len(s.sets[name].pairs) for name in found}})
    return found


def baseline_side(s: Session) -> Optional[dict]:
    """The starting model on the test split (log-probs, greedy responses, forgetting check), measured before any
    weight moves and kept in baseline.json, so a resumed run reports the same one."""
    cached = shared.baseline_cached(s.run)
    held = s.sets["test"]
    if cached is not None or not (s.recipe.eval.baseline and held.pairs and distributed.is_main()):
        return cached
    console.print("scoring the base model on the test split ...")
    side = policy.measure(s.model, s.tokenizer, held, s.recipe, s.device, logps=s.reference.get("test"))
    baseline = side.to_json()
    s.run.write_json("baseline.json", baseline)
    return baseline


def test_pass(s: Session, baseline: Optional[dict]) -> dict:
    """The trained policy on the test split, then (the policy released) the reference on the policy's responses
    for the KL estimate, then the judge: one model in memory at a time."""
    held, recipe = s.sets["test"], s.recipe
    side = policy.measure(s.model, s.tokenizer, held, recipe, s.device)
    own = policy.response_logps(s.model, s.tokenizer, held, side.texts, recipe, s.device) if side.texts else None
    s.model = None
    gc.collect()
    kl = None
    if own is not None:
        reference = load_causal_lm(recipe.model, **load_options(recipe))[0].to(s.device)
        kl = (own[0], policy.response_logps(reference, s.tokenizer, held, side.texts, recipe, s.device)[0], own[1])
        del reference
        gc.collect()
    base = policy.Side.from_json(baseline) if baseline else None
    return policy.policy_result(recipe, held, side, base, s.reference.get("test"), kl,
                                policy.load_judge(recipe, s.device), read_log(s.run.path / "metrics.jsonl"))


# --- the run --------------------------------------------------------------------------------------------------


def objective_for(s: Session, best: registry.Metric) -> Objective:
    train_set = s.sets["train"]
    lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train_set.pairs]
    t = s.recipe.train
    return Objective(
        plan=lambda epoch: plan_epoch(lengths, t.batch_size, t.gradient_accumulation, t.seed, epoch,
                                      t.group_by_length),
        units=len, loss_sum=PairLoss(s), evaluate=(lambda: validate(s)) if s.sets["validation"].pairs else None,
        metric=best.name, higher_is_better=best.higher_is_better,
    )


def setup(recipe: Recipe, output: Optional[str], resume: bool, device: Optional[str]) -> tuple[Session, dict]:
    """Open the run, load data and model, compute (or read back) the reference log-probs and the baseline, then
    apply the method: (session, baseline)."""
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_causal_lm(recipe.model, recipe.train.dropout, **load_options(recipe))
    s = Session(recipe, run, dev, tokenizer, model.to(dev), render_sets(tokenizer, splits, recipe))
    if not s.sets["train"].pairs:
        raise RuntimeError("no training pair keeps a response token on both sides; raise train.max_length")
    s.reference = reference_logps(s, resume)
    baseline = baseline_side(s)
    shared.seed_everything(recipe.train.seed)  # adapter initialisation does not depend on what ran above
    s.model = shared.apply_method(s.model, recipe).to(dev)
    supports_packing(s.model)  # decided (and cached) before sharding: the check calls the body directly
    shared.shard(s.model, nll_module(s.model), recipe, dev)
    return s, baseline


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    best = registry.metric_for_best(recipe.metric_for_best, recipe.task)  # before any run folder exists
    check_alignment(recipe)
    s, baseline = setup(recipe, output, resume, device)
    fit(s.model, objective_for(s, best), recipe.train, recipe.learning_rate, s.run, s.device, resume=resume,
        quiet=quiet)
    s.model = distributed.consolidate(s.model, lambda: shared.apply_method(
        load_causal_lm(recipe.model, **load_options(recipe))[0], recipe, quiet=True).to(s.device))
    if not distributed.is_main():
        return {}  # rank 0 saves, evaluates and reports
    s.model = shared.save_final_model(s.model, s.tokenizer, recipe, s.run)
    validation = validate(s) if s.sets["validation"].pairs else None
    if not s.sets["test"].pairs:
        console.print("[yellow]no test pairs: test metrics are empty")
        return shared.report(s.run, recipe, {"metrics": {}}, validation, "base model")
    return shared.report(s.run, recipe, test_pass(s, baseline), validation, "base model")

"""Reward models: a scalar head on a decoder or an encoder, trained on preference pairs (Bradley-Terry).

setup (data, model, method) -> train (shared loop) -> save -> test vs chance and the longer-wins heuristic.

Each pair's two sides are rendered as their own sequence (tuneforge.evaluate.rewards, over
tuneforge.data.pairs) and scored in one forward pass of 2B rows; the loss of a pair is
-log sigmoid(r_chosen - r_rejected - margin) + alignment.center_coefficient * (r_chosen + r_rejected)^2
(tuneforge.alignment.losses.reward_loss), summed over the micro-batch and divided by the pairs of the
optimizer step. A per-pair margin is read from a `margin` column carried with the rows
(data.keep_columns: [margin]); without it the margin is 0. Validation computes pairwise accuracy
(ties are wrong) and the mean margin.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch

from tuneforge.alignment.losses import reward_loss
from tuneforge.console import console
from tuneforge.evaluate import registry
from tuneforge.evaluate.rewards import (
    EncodedPair,
    RewardScorer,
    context_length,
    evaluate_pairs,
    load_reward_model,
    pair_summary,
)
from tuneforge.inference import collate
from tuneforge.models import load_options
from tuneforge.recipe import Recipe
from tuneforge.run import Run
from tuneforge.trainers import shared
from tuneforge.training import distributed
from tuneforge.training.batching import plan_epoch
from tuneforge.training.loop import Objective, fit


def pair_loss_sum(model, pairs: Sequence[EncodedPair], margins: Optional[Sequence[float]], center_coefficient: float,
                  pad_id: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(summed reward loss of `pairs`, tokens): chosen and rejected sides in one padded forward pass;
    `margins` per pair (aligned with `pairs`) or None."""
    ids = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = model(**collate(ids, pad_id, device)).logits[:, 0].float()
    n = len(pairs)
    margin = torch.tensor(list(margins), dtype=torch.float32, device=device) if margins is not None else None
    # reward_loss is a mean over the pairs (both of its terms): times n it is their sum
    return reward_loss(scores[:n], scores[n:], margin, center_coefficient) * n, sum(len(x) for x in ids)


def row_margins(rows: list[dict]) -> Optional[list[float]]:
    """The per-pair `margin` column (data.keep_columns: [margin]), or None when the rows carry none."""
    if not rows or "margin" not in rows[0]:
        return None
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(float(row["margin"]))
        except (TypeError, ValueError):
            raise ValueError(f"training pair {i + 1}: margin {row['margin']!r} is not a number (the margin column "
                             "holds how much more the chosen response is preferred, e.g. 0.5)") from None
    return out


def build_objective(model, recipe: Recipe, scorer: RewardScorer, train_pairs: list[EncodedPair],
                    margins: Optional[list[float]], val_pairs: list[EncodedPair], dev: torch.device) -> Objective:
    best = registry.metric_for_best(recipe.metric_for_best, recipe.task)
    pad_id = scorer.tokenizer.pad_token_id
    center = recipe.alignment.center_coefficient
    lengths = [max(len(p.chosen), len(p.rejected)) for p in train_pairs]

    def loss_sum(batch: list[int]) -> tuple[torch.Tensor, int]:
        pairs = [train_pairs[i] for i in batch]
        return pair_loss_sum(model, pairs, [margins[p.row] for p in pairs] if margins else None, center, pad_id, dev)

    def evaluate() -> dict:
        return pair_summary(*scorer.score_encoded(val_pairs))

    return Objective(
        plan=lambda epoch: plan_epoch(lengths, recipe.train.batch_size, recipe.train.gradient_accumulation,
                                      recipe.train.seed, epoch, recipe.train.group_by_length),
        units=len, loss_sum=loss_sum, evaluate=evaluate if val_pairs else None,
        metric=best.name, higher_is_better=best.higher_is_better,
    )


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    registry.metric_for_best(recipe.metric_for_best, recipe.task)  # checked before any run folder exists
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    # ---- setup
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_reward_model(recipe.model, recipe.train.dropout, **load_options(recipe))
    model = shared.apply_method(model, recipe).to(dev)
    shared.shard(model, model, recipe, dev)
    max_len = min(recipe.train.max_length, context_length(model, tokenizer))
    eval_bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    scorer = RewardScorer(model, tokenizer, max_len, recipe.data.system_prompt, dev, eval_bs)
    train_pairs = scorer.encode_pairs(splits.train, console.print, "train")
    val_pairs = scorer.encode_pairs(splits.validation, console.print, "validation")
    if not train_pairs:
        run.finish("failed: no trainable pairs")
        raise RuntimeError("no training pair keeps a response token on both sides; raise train.max_length")
    objective = build_objective(model, recipe, scorer, train_pairs, row_margins(splits.train), val_pairs, dev)

    # ---- train
    state = fit(model, objective, recipe.train, recipe.learning_rate, run, dev, resume=resume, quiet=quiet)
    model = distributed.consolidate(model, lambda: shared.apply_method(
        load_reward_model(recipe.model, **load_options(recipe))[0], recipe, quiet=True).to(dev))
    if not distributed.is_main():
        return {}  # rank 0 saves, evaluates and reports
    # ---- save, then test on the saved weights (a LoRA model comes back merged)
    scorer.model = shared.save_final_model(model, tokenizer, recipe, run)
    validation = None
    if val_pairs:  # the restored best weights were scored at the best step: read, not recomputed
        validation = logged_validation(run, state.best_step) or pair_summary(*scorer.score_encoded(val_pairs))
    return finish(recipe, run, scorer, splits.test, validation)


def logged_validation(run: Run, step: Optional[int]) -> Optional[dict]:
    """The validation metrics metrics.jsonl holds for `step`, or None."""
    path = run.path / "metrics.jsonl"
    if step is None or not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("split") == "validation" and record.get("step") == step:
            found = {k: v for k, v in record.items() if isinstance(v, float)}
    return found


def finish(recipe: Recipe, run: Run, scorer: RewardScorer, test_rows: list[dict], validation: Optional[dict]) -> dict:
    """The test evaluation against chance and the longer-wins heuristic, and the report."""
    if not test_rows:
        console.print("[yellow]no test rows: test metrics are empty")
        return shared.report(run, recipe, {"metrics": {}}, validation, "chance")
    result = evaluate_pairs(scorer, test_rows, bootstrap=recipe.eval.bootstrap, log=console.print, name="test")
    return shared.report(run, recipe, result, validation, "chance")

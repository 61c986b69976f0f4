"""Text classification: an encoder with a classification head.

setup (data, model, method) -> train (shared loop) -> save -> test vs majority baseline.
`fit_classifier` is everything after the data loads, for other objectives that
train a classifier head on rows they build.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tuneforge.console import console
from tuneforge.data.splits import Splits
from tuneforge.evaluate import registry
from tuneforge.evaluate.metrics import classification_metrics
from tuneforge.evaluate.runner import evaluate_classifier
from tuneforge.fairness import run as fairness
from tuneforge.inference import collate, encode, predict_proba
from tuneforge.models import load_classifier, load_options
from tuneforge.recipe import Recipe
from tuneforge.run import Run
from tuneforge.trainers import shared
from tuneforge.training import distributed
from tuneforge.training.batching import plan_epoch
from tuneforge.training.loop import Objective, fit


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    registry.metric_for_best(recipe.metric_for_best, recipe.task)  # checked before any run folder exists
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    return fit_classifier(recipe, run, dev, splits, resume=resume, quiet=quiet)


def fit_classifier(recipe: Recipe, run: Run, dev: torch.device, splits: Splits, resume: bool = False,
                   quiet: bool = False) -> dict:
    """Train, save and test a classifier on `splits` (rows with text and label, or
    text pairs; `splits.labels` the label set), in the open `run`: the whole
    classification objective after its data is loaded, for any objective that
    trains a classifier head (it builds the rows, this does the rest)."""
    # ---- setup
    best = registry.metric_for_best(recipe.metric_for_best, recipe.task)
    penalty = fairness.before_training(recipe, splits, run)  # representation check, reweighing, augmentation
    labels = splits.labels
    label_id = {lab: i for i, lab in enumerate(labels)}
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_classifier(recipe.model, labels, recipe.train.dropout, **load_options(recipe))
    model = shared.apply_method(model, recipe).to(dev)
    shared.shard(model, model, recipe, dev)
    pad_id = tokenizer.pad_token_id
    if splits.kind == "pair":
        join_pairs(tokenizer, splits)
    max_len = min(recipe.train.max_length, tokenizer.model_max_length)
    encoded = {name: encode(tokenizer, [r["text"] for r in rows], max_len)
               for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    targets = {name: [label_id[r["label"]] for r in rows]
               for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    train_ids, train_y = encoded["train"], torch.tensor(targets["train"])
    # Per-example loss weights (class balancing, fairness reweighing) ride on the rows;
    # None keeps the plain mean so unweighted runs stay bit-identical.
    weights = (torch.tensor([float(r.get("weight", 1.0)) for r in splits.train])
               if any("weight" in r for r in splits.train) else None)
    lengths = [len(x) for x in train_ids]
    eval_bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size

    def loss_sum(batch: list[int]) -> tuple[torch.Tensor, int]:
        # Padded, length-grouped batches: in training, packing measured slower here
        # (123 -> 103 examples/s on minilm-l6: one attention call per text, forward
        # and backward, outweighs the little padding that grouping leaves).
        logits = model(**collate([train_ids[i] for i in batch], pad_id, dev)).logits
        if weights is None:
            loss = F.cross_entropy(logits.float(), train_y[batch].to(dev), reduction="sum")
        else:
            per_example = F.cross_entropy(logits.float(), train_y[batch].to(dev), reduction="none")
            loss = (per_example * weights[batch].to(dev)).sum()
        if penalty is not None:  # fairness.inprocessing
            loss = loss + penalty(logits, batch)
        return loss, sum(lengths[i] for i in batch)

    def evaluate() -> dict:
        probs = predict_proba(model, encoded["validation"], pad_id, eval_bs, dev)
        m = classification_metrics(targets["validation"], probs, labels)
        return {k: v for k, v in m.items() if isinstance(v, float)}

    objective = Objective(
        plan=lambda epoch: plan_epoch(lengths, recipe.train.batch_size, recipe.train.gradient_accumulation,
                                      recipe.train.seed, epoch, recipe.train.group_by_length),
        units=len, loss_sum=loss_sum, evaluate=evaluate if splits.validation else None,
        metric=best.name, higher_is_better=best.higher_is_better,
    )

    # ---- train
    fit(model, objective, recipe.train, recipe.learning_rate, run, dev, resume=resume, quiet=quiet)
    model = distributed.consolidate(model, lambda: shared.apply_method(
        load_classifier(recipe.model, labels, **load_options(recipe))[0], recipe, quiet=True).to(dev))

    if not distributed.is_main():
        return {}  # rank 0 saves, evaluates and reports
    # ---- save
    model = shared.save_final_model(model, tokenizer, recipe, run)

    # ---- evaluate: validation and test, next to the majority-class baseline
    def predict(texts: list[str]):
        return predict_proba(model, encode(tokenizer, texts, max_len), pad_id, eval_bs, dev)

    fairness.after_training(recipe, run, predict, splits)  # post-processing fit, test audit -> audit/
    validation = classification_metrics(
        targets["validation"], predict([r["text"] for r in splits.validation]), labels) if splits.validation else None
    if not splits.test:
        console.print("[yellow]no test rows: test metrics are empty")
        return shared.report(run, recipe, {"metrics": {}}, validation, "majority class")
    result = evaluate_classifier(predict, splits.test, labels, targets["train"] if recipe.eval.baseline else None,
                                 bootstrap=recipe.eval.bootstrap, robustness=recipe.eval.robustness)
    return shared.report(run, recipe, result, validation, "majority class")


def join_pairs(tokenizer, splits) -> None:
    """Text pairs become one string with the separator token between them, which
    tokenises to the pair layout ([CLS] a [SEP] b [SEP]); every text-only path
    (evaluation, robustness, export, serving) then takes pairs unchanged."""
    sep = tokenizer.sep_token or tokenizer.eos_token
    if sep is None:
        raise ValueError("pair classification needs a tokenizer with a separator (or EOS) token")
    for rows in (splits.train, splits.validation, splits.test):
        for r in rows:
            r["text"] = f"{r['text']} {sep} {r.pop('text_pair')}"

"""Text classification: an encoder with a classification head.

setup (data, model, method) -> train (shared loop) -> save -> test vs majority baseline.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tuneforge.console import console
from tuneforge.evaluate.metrics import classification_metrics, majority_baseline
from tuneforge.models import load_classifier
from tuneforge.recipe import Recipe
from tuneforge.trainers import shared
from tuneforge.training.batching import attention_mask, eval_batches, pad, plan_epoch
from tuneforge.training.loop import Objective, fit


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(ids: list[list[int]], pad_id: int, device: torch.device) -> dict:
    return {"input_ids": pad(ids, pad_id).to(device), "attention_mask": attention_mask(ids).to(device)}


@torch.no_grad()
def predict_proba(model, ids: list[list[int]], pad_id: int, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float64)
    for batch in eval_batches([len(x) for x in ids], batch_size):
        logits = model(**collate([ids[i] for i in batch], pad_id, device)).logits
        out[batch] = F.softmax(logits.float(), dim=-1).cpu().numpy()
    return out


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    # ---- setup
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    labels = splits.labels
    label_id = {lab: i for i, lab in enumerate(labels)}
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_classifier(recipe.model, labels, recipe.train.dropout)
    model = shared.apply_method(model, recipe).to(dev)
    pad_id = tokenizer.pad_token_id
    max_len = min(recipe.train.max_length, tokenizer.model_max_length)
    encoded = {name: encode(tokenizer, [r["text"] for r in rows], max_len)
               for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    targets = {name: [label_id[r["label"]] for r in rows]
               for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    train_ids, train_y = encoded["train"], torch.tensor(targets["train"])
    lengths = [len(x) for x in train_ids]
    eval_bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size

    def loss_sum(batch: list[int]) -> tuple[torch.Tensor, int]:
        logits = model(**collate([train_ids[i] for i in batch], pad_id, dev)).logits
        loss = F.cross_entropy(logits.float(), train_y[batch].to(dev), reduction="sum")
        return loss, sum(lengths[i] for i in batch)

    def evaluate() -> dict:
        probs = predict_proba(model, encoded["validation"], pad_id, eval_bs, dev)
        m = classification_metrics(targets["validation"], probs, labels)
        return {k: v for k, v in m.items() if isinstance(v, float)}

    objective = Objective(
        plan=lambda epoch: plan_epoch(lengths, recipe.train.batch_size, recipe.train.gradient_accumulation,
                                      recipe.train.seed, epoch, recipe.train.group_by_length),
        units=len, loss_sum=loss_sum, evaluate=evaluate if splits.validation else None,
        metric=recipe.metric_for_best, higher_is_better=recipe.metric_for_best != "loss",
    )

    # ---- train
    fit(model, objective, recipe.train, recipe.learning_rate, run, dev, resume=resume, quiet=quiet)

    # ---- save
    model = shared.save_final_model(model, tokenizer, recipe, run)

    # ---- evaluate: validation and test, next to the majority-class baseline
    validation = None
    if splits.validation:
        validation = classification_metrics(
            targets["validation"], predict_proba(model, encoded["validation"], pad_id, eval_bs, dev), labels)
    if not splits.test:
        console.print("[yellow]no test rows: test metrics are empty")
    test = classification_metrics(
        targets["test"], predict_proba(model, encoded["test"], pad_id, eval_bs, dev), labels) if splits.test else {}
    baseline = majority_baseline(targets["train"], targets["test"], labels) if splits.test and recipe.eval.baseline else None
    return shared.report(run, recipe, test, baseline, validation, "majority class")

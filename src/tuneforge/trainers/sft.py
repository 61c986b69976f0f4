"""Supervised fine-tuning of a causal LM on prompt->response pairs or chat messages.

setup (data, model, baseline, method) -> train (shared loop) -> save -> test vs the untouched base model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tuneforge.console import console
from tuneforge.data.render import IGNORE, Rendered, encode_prompt, prompt_and_reference, render, to_messages
from tuneforge.evaluate.metrics import generation_metrics, perplexity
from tuneforge.models import load_causal_lm
from tuneforge.recipe import Recipe
from tuneforge.trainers import shared
from tuneforge.training.batching import attention_mask, eval_batches, pad, plan_epoch
from tuneforge.training.loop import Objective, fit

LOWER_IS_BETTER = ("loss", "perplexity")


def split_lm(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, output head) of a causal LM, looking through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def lm_loss_sum(model, examples: list[Rendered], pad_id: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over supervised positions only.

    The head runs on supervised positions alone: prompt tokens carry no loss, so
    projecting them onto the vocabulary (the largest matmul of a small LM) is waste.
    """
    body, head = split_lm(model)
    ids = pad([e.input_ids for e in examples], pad_id).to(device)
    mask = attention_mask([e.input_ids for e in examples]).to(device)
    labels = pad([e.labels for e in examples], IGNORE).to(device)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    chosen = targets != IGNORE
    logits = head(hidden[:, :-1][chosen])
    loss = F.cross_entropy(logits.float(), targets[chosen], reduction="sum")
    return loss, int(mask.sum())


@torch.no_grad()
def mean_nll(model, examples: list[Rendered], pad_id: int, batch_size: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches([len(e.input_ids) for e in examples], batch_size):
        loss, _ = lm_loss_sum(model, [examples[i] for i in batch], pad_id, device)
        total += loss.item()
        count += sum(examples[i].n_target for i in batch)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             device: torch.device) -> list[str]:
    model.eval()
    out: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    for batch in eval_batches([len(p) for p in prompts], batch_size):
        seqs = [prompts[i] for i in batch]
        ids = pad(seqs, pad_id, left=True).to(device)
        generated = model.generate(
            input_ids=ids, attention_mask=attention_mask(seqs, left=True).to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            out[i] = text.strip()
    return out


def score(model, tokenizer, rendered: list[Rendered], prompts: list[list[int]], references: list[str],
          recipe: Recipe, device: torch.device) -> tuple[dict, list[str]]:
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    nll = mean_nll(model, rendered, tokenizer.pad_token_id, bs, device)
    metrics = {"loss": nll, "perplexity": perplexity(nll)}
    predictions: list[str] = []
    if prompts:
        predictions = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens, bs, device)
        metrics.update(generation_metrics(predictions, references))
    return metrics, predictions


def render_split(tokenizer, rows: list[dict], recipe: Recipe, name: str) -> list[Rendered]:
    rendered = [render(tokenizer, to_messages(r, recipe.data.system_prompt), recipe.train.max_length) for r in rows]
    kept = [r for r in rendered if r.n_target > 0]
    truncated = sum(r.truncated for r in rendered)
    if truncated:
        console.print(f"[yellow]{name}: {truncated} of {len(rendered)} examples truncated at "
                      f"train.max_length={recipe.train.max_length}")
    if len(kept) < len(rendered):
        console.print(f"[yellow]{name}: {len(rendered) - len(kept)} examples dropped: truncation left no response tokens")
    return kept


def generation_set(tokenizer, rows: list[dict], recipe: Recipe, limit: Optional[int]):
    rows = rows[:limit] if limit is not None else rows
    pairs = [prompt_and_reference(r, recipe.data.system_prompt) for r in rows]
    return [encode_prompt(tokenizer, m) for m, _ in pairs], [ref for _, ref in pairs]


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    # ---- setup
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_causal_lm(recipe.model, recipe.train.dropout)
    model.to(dev)
    train_set = render_split(tokenizer, splits.train, recipe, "train")
    val_set = render_split(tokenizer, splits.validation, recipe, "validation")
    test_set = render_split(tokenizer, splits.test, recipe, "test")
    if not train_set:
        raise RuntimeError("no training example keeps any response token; raise train.max_length")
    test_prompts, test_refs = generation_set(tokenizer, splits.test, recipe, recipe.eval.max_generate)
    val_prompts, val_refs = generation_set(tokenizer, splits.validation, recipe, recipe.eval.validation_generate)

    # Baseline: the untouched base model on the same test split, measured before
    # any weight moves (and kept, so a resumed run reports the same one).
    baseline = shared.baseline_cached(run)
    if baseline is None and recipe.eval.baseline and test_set:
        console.print("scoring the base model on the test split ...")
        baseline, base_predictions = score(model, tokenizer, test_set, test_prompts, test_refs, recipe, dev)
        baseline["samples"] = [{"reference": r, "prediction": p} for r, p in zip(test_refs[:5], base_predictions[:5])]
        run.write_json("baseline.json", baseline)

    model = shared.apply_method(model, recipe).to(dev)
    pad_id = tokenizer.pad_token_id

    def evaluate() -> dict:
        metrics, _ = score(model, tokenizer, val_set, val_prompts, val_refs, recipe, dev)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    lengths = [len(e.input_ids) for e in train_set]
    objective = Objective(
        plan=lambda epoch: plan_epoch(lengths, recipe.train.batch_size, recipe.train.gradient_accumulation,
                                      recipe.train.seed, epoch, recipe.train.group_by_length),
        units=lambda batch: sum(train_set[i].n_target for i in batch),
        loss_sum=lambda batch: lm_loss_sum(model, [train_set[i] for i in batch], pad_id, dev),
        evaluate=evaluate if val_set else None,
        metric=recipe.metric_for_best, higher_is_better=recipe.metric_for_best not in LOWER_IS_BETTER,
    )

    # ---- train
    fit(model, objective, recipe.train, recipe.learning_rate, run, dev, resume=resume, quiet=quiet)

    # ---- save
    model = shared.save_final_model(model, tokenizer, recipe, run)

    # ---- evaluate the saved (merged) model
    validation = score(model, tokenizer, val_set, val_prompts, val_refs, recipe, dev)[0] if val_set else None
    test: dict = {}
    if test_set:
        test, predictions = score(model, tokenizer, test_set, test_prompts, test_refs, recipe, dev)
        test["samples"] = [{"reference": r, "prediction": p} for r, p in zip(test_refs[:5], predictions[:5])]
    if baseline and test:
        _show_samples(baseline.get("samples", []), test["samples"])
    return shared.report(run, recipe, test, baseline, validation, "base model")


def _show_samples(base: list[dict], tuned: list[dict]) -> None:
    for b, t in list(zip(base, tuned))[:3]:
        console.print(f"[dim]reference:[/] {t['reference']!r}\n  [dim]base:[/]  {b['prediction']!r}\n"
                      f"  [dim]tuned:[/] {t['prediction']!r}")

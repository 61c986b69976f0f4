"""Supervised fine-tuning of a causal LM on prompt->response pairs or chat messages.

setup (data, model, baseline, method) -> train (shared loop) -> save -> test vs the untouched base model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from tuneforge.console import console
from tuneforge.data.render import (
    Rendered,
    encode_prompt,
    prompt_and_reference,
    render,
    to_messages,
)
from tuneforge.evaluate import registry
from tuneforge.evaluate.metrics import perplexity
from tuneforge.evaluate.robustness import perturb_sft
from tuneforge.evaluate.runner import evaluate_generator
from tuneforge.evaluate.scorers import build_scorers
from tuneforge.inference import (
    generate,
    lm_loss_sum,
    nll_module,
    per_example_nll,
    reference_nll,
    supports_packing,
)
from tuneforge.models import load_causal_lm, load_options
from tuneforge.recipe import Recipe
from tuneforge.trainers import shared
from tuneforge.training import distributed
from tuneforge.training.batching import plan_epoch
from tuneforge.training.loop import Objective, fit


def score(model, tokenizer, rendered: list[Rendered], gen_rows: list[dict], recipe: Recipe, device: torch.device,
          baseline: Optional[dict] = None, final: bool = False) -> dict:
    """Loss on `rendered`, greedy generations for `gen_rows`, scored by evaluate_generator.
    `final` adds intervals, the paired test against `baseline`, scorers and robustness."""
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    system = recipe.data.system_prompt

    def generate_for(rows: list[dict]) -> tuple[list[str], list[str]]:
        pairs = [prompt_and_reference(r, system) for r in rows]
        prompts = [encode_prompt(tokenizer, m) for m, _ in pairs]
        return generate(model, tokenizer, prompts, recipe.eval.max_new_tokens, bs, device), [r for _, r in pairs]

    nll = per_example_nll(model, rendered, tokenizer.pad_token_id, bs, device) if rendered else None
    predictions, references = generate_for(gen_rows) if gen_rows else ([], [])
    regenerate = None
    if final and recipe.eval.robustness:
        def regenerate(name: str) -> list[str]:
            return generate_for(perturb_sft(gen_rows, name))[0]
    return evaluate_generator(
        nll, predictions, references,
        baseline_predictions=baseline["predictions"] if baseline else None,
        baseline_metrics=baseline["metrics"] if baseline else None,
        scorers=build_scorers(recipe.eval.scorers) if final else (),
        bootstrap=recipe.eval.bootstrap and final, regenerate=regenerate,
    )


def reference_perplexity(model, tokenizer, recipe: Recipe, device: torch.device) -> float:
    """Perplexity on general text (the forgetting check)."""
    if recipe.eval.reference_text:
        text = Path(recipe.eval.reference_text).read_text(encoding="utf-8")
    else:
        text = resources.files("tuneforge.templates").joinpath("reference.txt").read_text(encoding="utf-8")
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    return perplexity(reference_nll(model, tokenizer, text, recipe.train.max_length, bs, device))


def render_split(tokenizer, rows: list[dict], recipe: Recipe, name: str) -> list[Rendered]:
    rendered = [render(tokenizer, to_messages(r, recipe.data.system_prompt), recipe.train.max_length) for r in rows]
    kept = [r for r in rendered if r.n_target > 0]
    truncated = sum(r.truncated for r in rendered)
    if truncated:
        console.print(f"[yellow]{name}: {truncated} of {len(rendered)} examples truncated at "
                      f"train.max_length={recipe.train.max_length}")
    if len(kept) < len(rendered):
        console.print(f"[yellow]{name}: {len(rendered) - len(kept)} examples dropped: truncation left no response "
                      "tokens")
    return kept


def _floats(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    # ---- setup
    best = registry.metric_for_best(recipe.metric_for_best, recipe.task)  # before any run folder exists
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_causal_lm(recipe.model, recipe.train.dropout, **load_options(recipe))
    model.to(dev)
    if splits.kind == "text":
        # Continued pre-training: raw text cut into max_length blocks, loss on every
        # token; scored by loss/perplexity only (there is no prompt to answer).
        train_set, val_set, test_set = (
            [Rendered(b, list(b), False) for b in splits.blocks[name] if len(b) > 1]
            for name in ("train", "validation", "test"))
        test_gen, val_gen = [], []
    else:
        train_set = render_split(tokenizer, splits.train, recipe, "train")
        val_set = render_split(tokenizer, splits.validation, recipe, "validation")
        test_set = render_split(tokenizer, splits.test, recipe, "test")
        limit = recipe.eval.max_generate
        test_gen = splits.test[:limit] if limit is not None else splits.test
        val_gen = splits.validation[: recipe.eval.validation_generate]
    if not train_set:
        raise RuntimeError("no training example keeps any target token; raise train.max_length")

    # Baseline: the untouched base model on the same test split, measured before
    # any weight moves (and kept, so a resumed run reports the same one).
    baseline = shared.baseline_cached(run)
    if baseline is None and recipe.eval.baseline and test_set:
        console.print("scoring the base model on the test split ...")
        result = score(model, tokenizer, test_set, test_gen, recipe, dev)
        result["metrics"]["reference_perplexity"] = reference_perplexity(model, tokenizer, recipe, dev)
        baseline = {"metrics": result["metrics"], "predictions": result["predictions"]}
        run.write_json("baseline.json", baseline)

    model = shared.apply_method(model, recipe).to(dev)
    supports_packing(model)  # decided (and cached) before sharding: the check calls the body directly
    if shared.shard(model, nll_module(model), recipe, dev):
        val_gen = []  # generation needs the whole model: sharded, validation scores loss only
    pad_id = tokenizer.pad_token_id

    def evaluate() -> dict:
        return _floats(score(model, tokenizer, val_set, val_gen, recipe, dev)["metrics"])

    lengths = [len(e.input_ids) for e in train_set]
    objective = Objective(
        plan=lambda epoch: plan_epoch(lengths, recipe.train.batch_size, recipe.train.gradient_accumulation,
                                      recipe.train.seed, epoch, recipe.train.group_by_length),
        units=lambda batch: sum(train_set[i].n_target for i in batch),
        loss_sum=lambda batch: lm_loss_sum(model, [train_set[i] for i in batch], pad_id, dev),
        evaluate=evaluate if val_set else None,
        metric=best.name, higher_is_better=best.higher_is_better,
    )

    # ---- train
    fit(model, objective, recipe.train, recipe.learning_rate, run, dev, resume=resume, quiet=quiet)
    model = distributed.consolidate(model, lambda: shared.apply_method(
        load_causal_lm(recipe.model, **load_options(recipe))[0], recipe, quiet=True).to(dev))

    if not distributed.is_main():
        return {}  # rank 0 saves, evaluates and reports
    # ---- save
    model = shared.save_final_model(model, tokenizer, recipe, run)

    # ---- evaluate the saved (merged) model next to the base model
    validation = score(model, tokenizer, val_set, val_gen, recipe, dev)["metrics"] if val_set else None
    if not test_set:
        console.print("[yellow]no test rows: test metrics are empty")
        return shared.report(run, recipe, {"metrics": {}}, validation, "base model")
    result = score(model, tokenizer, test_set, test_gen, recipe, dev, baseline=baseline, final=True)
    # Forgetting: what the fine-tune cost in general language modelling.
    result["metrics"]["reference_perplexity"] = reference_perplexity(model, tokenizer, recipe, dev)
    for sample in result.get("samples", [])[:3]:
        console.print(f"[dim]reference:[/] {sample['reference']!r}\n  [dim]base:[/]  {sample['base']!r}\n"
                      f"  [dim]tuned:[/] {sample['tuned']!r}")
    return shared.report(run, recipe, result, validation, "base model")

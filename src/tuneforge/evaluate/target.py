"""`tuneforge eval TARGET`: score a run folder, a model folder, a catalogue model,
or a base model + adapter on a held-out split or a data file.

The output folder has the run-folder shape (recipe.yaml, manifest.json,
metrics.json, evaluation.json) plus eval.json, so the same report builder
renders it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

from tuneforge import catalog, kinds
from tuneforge.console import comparison_table, console
from tuneforge.data.formats import LABELLED, resolve_kind
from tuneforge.data.load import DataError, load_file
from tuneforge.data.prepare import prepare_splits
from tuneforge.data.splits import InvalidRows
from tuneforge.fsio import atomic_write_json, atomic_write_text
from tuneforge.recipe import Recipe, dump_recipe, load_recipe


def is_run(path: Path) -> bool:
    """A tuneforge run folder (its recipe and final model are there)."""
    return (path / "recipe.yaml").is_file() and (path / "model").is_dir()


def resolve_target(target: str, data: Optional[str], overrides: list[str]) -> tuple[Recipe, str, Optional[Path]]:
    """(recipe, model path, run folder or None)."""
    path = Path(target)
    if is_run(path):
        return load_recipe(path / "recipe.yaml", overrides, check_files=False), str(path / "model"), path
    if data is None:
        raise ValueError(f"{target} is not a run folder: pass --data FILE to say what to evaluate on")
    from tuneforge.models import model_kind

    model_path = catalog.resolve(target)
    spec = catalog.CATALOG.get(target)
    kind = kinds.get(spec.kinds[0]) if spec else model_kind(model_path)
    raw = {"name": path.name or target, "model": target, "task": kind.default_objective,
           "data": {"train": str(Path(data).resolve())}}
    return load_recipe(raw, overrides), model_path, None


def _rows(recipe: Recipe, data: Optional[str], split: str, labels: Optional[list[str]]):
    """Rows to score, and the training labels for the majority baseline (or None)."""
    if data is None:
        # The run's own split: its data must still read cleanly, and any problem
        # is reported as it is (file:line), not hidden.
        if not Path(recipe.data.train).is_file():
            raise DataError(f"the run's data ({recipe.data.train}) is gone; pass --data FILE")
        splits = prepare_splits(recipe)
        rows = getattr(splits, split)
        if not rows:
            others = [s for s in ("test", "validation", "train") if s != split and getattr(splits, s)]
            raise DataError(f"the run's {split} split has no rows (data.split sets its share to 0, or preparation "
                            f"removed them); pass --data FILE" + (f" or --split {others[0]}" if others else ""))
        return recipe.objective.rows(rows), recipe.objective.rows(splits.train)
    train_rows = None
    if Path(recipe.data.train).is_file() and Path(recipe.data.train) != Path(data).resolve():
        try:  # only for the majority baseline: without it the baseline is skipped
            train_rows = recipe.objective.rows(prepare_splits(recipe).train)
        except DataError:
            train_rows = None
    kind, cfg, _ = resolve_kind(recipe.data.model_copy(update={"train": data}), recipe.task)
    loaded = load_file(data, kind, cfg, set(labels) if labels and kind in LABELLED else None)
    if loaded.rejects and recipe.data.on_invalid == "error":
        raise InvalidRows(loaded.rejects)
    if not loaded.examples:
        raise DataError(f"{data}: no rows to evaluate")
    return recipe.objective.rows([ex.fields for ex in loaded.examples]), train_rows


def evaluate_target(target: str, data: Optional[str] = None, split: str = "test", overrides: Optional[list[str]] = None,
                    output: Optional[str] = None, device: Optional[str] = None, base: Optional[str] = None,
                    adapter: Optional[str] = None, robustness: bool = False) -> Path:
    from tuneforge.models import pick_device, quiet_transformers
    from tuneforge.report import write_report

    quiet_transformers()
    recipe, model_path, run_dir = resolve_target(target, data, list(overrides or []))
    if robustness:
        recipe.eval.robustness = True
    dev = pick_device(device or recipe.device)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(output) if output else (run_dir / f"eval-{split if data is None else Path(data).stem}" if run_dir
                                       else Path("evals") / f"{recipe.name}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"evaluating {target} ({recipe.task}) on {data or split} -> {out}")
    kind = recipe.model_kind
    # Baseline of a causal LM: the run's base model; for base + adapter, the base alone.
    base_ref = base or (recipe.model if run_dir else target if adapter else None)
    if kind.name == kinds.CLASSIFIER:
        result = _eval_classifier(recipe, model_path, adapter, data, split, dev)
    elif kind.name == kinds.REWARD:
        from tuneforge.evaluate.rewards import eval_reward_model

        result = eval_reward_model(recipe, model_path, adapter, _rows(recipe, data, split, None)[0], dev)
    elif _data_kind(recipe, data) == "preference":  # a policy (dpo, ...) on held-out preference pairs
        from tuneforge.evaluate.policy import eval_policy

        result = eval_policy(recipe, model_path, adapter, base_ref, _rows(recipe, data, split, None)[0], dev)
    else:
        result = _eval_generator(recipe, model_path, adapter, base_ref, data, split, dev)
    baseline_name = kind.baseline
    test, baseline = result.pop("metrics"), result.pop("baseline", None)
    atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    atomic_write_json(out / "manifest.json", {"target": target, "data_file": data, "split": split, "device": str(dev),
                                              "model_kind": kind.name,
                                              "status": "evaluated", "started": stamp, "adapter": adapter})
    atomic_write_json(out / "metrics.json", {"test": test, "baseline": baseline, "validation": None})
    atomic_write_json(out / "evaluation.json", result)
    atomic_write_json(out / "eval.json", {"target": target, "data": data, "split": split, "metrics": test,
                                          "baseline": baseline, **result})
    console.print(comparison_table(f"{recipe.name}: {data or split}", baseline, test, baseline_name))
    html_path, _ = write_report(out)
    console.print(f"report: {html_path}")
    return out


def _data_kind(recipe: Recipe, data: Optional[str]) -> str:
    cfg = recipe.data if data is None else recipe.data.model_copy(update={"train": data})
    return resolve_kind(cfg, recipe.task)[0]


def _load(auto_class, model_path: str, adapter: Optional[str]):
    """The model at `model_path`, with `adapter` merged in when given (safetensors only)."""
    from tuneforge.models import load_adapter, load_pretrained

    model = load_pretrained(auto_class, model_path)
    return load_adapter(model, adapter, merge=True) if adapter is not None else model


def _eval_classifier(recipe: Recipe, model_path: str, adapter, data, split, dev) -> dict:
    from tuneforge.evaluate.runner import evaluate_classifier
    from tuneforge.inference import encode, predict_proba
    from tuneforge.models import load_tokenizer, model_kind

    kind = model_kind(model_path)
    if kind.name == kinds.CAUSAL_LM:
        return _eval_zero_shot(recipe, model_path, adapter, data, split, dev)
    model = _load(kind.auto(), model_path, adapter).to(dev).eval()
    tokenizer = load_tokenizer(model_path)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows, train_rows = _rows(recipe, data, split, labels)
    label_id = {lab: i for i, lab in enumerate(labels)}
    train_labels = [label_id[r["label"]] for r in train_rows if r["label"] in label_id] if train_rows else None
    max_len = min(recipe.train.max_length, tokenizer.model_max_length)
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size

    def predict(texts):
        return predict_proba(model, encode(tokenizer, texts, max_len), tokenizer.pad_token_id, bs, dev)

    return evaluate_classifier(predict, rows, labels, train_labels, bootstrap=recipe.eval.bootstrap,
                               robustness=recipe.eval.robustness)


def _eval_zero_shot(recipe: Recipe, model_path: str, adapter, data, split, dev) -> dict:
    """A causal LM on classification data: labels by constrained likelihood."""
    from transformers import AutoModelForCausalLM

    from tuneforge.data.splits import sort_labels
    from tuneforge.evaluate.runner import evaluate_classifier
    from tuneforge.inference import zero_shot_probs
    from tuneforge.models import load_tokenizer

    rows, train_rows = _rows(recipe, data, split, recipe.data.labels and [str(x) for x in recipe.data.labels])
    labels = sort_labels({r["label"] for r in rows} | {r["label"] for r in train_rows or []})
    words = recipe.eval.label_words or {}
    missing = [lab for lab in labels if lab.isdigit() and lab not in words]
    if missing:
        raise ValueError(f"labels {missing} are numbers; name them for the model with eval.label_words, "
                         "e.g. eval.label_words='{\"0\": negative, \"1\": positive}'")
    model = _load(AutoModelForCausalLM, model_path, adapter).to(dev)
    tokenizer = load_tokenizer(model_path)
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    label_id = {lab: i for i, lab in enumerate(labels)}
    train_labels = [label_id[r["label"]] for r in train_rows if r["label"] in label_id] if train_rows else None

    def predict(texts):
        return zero_shot_probs(model, tokenizer, texts, [words.get(lab, lab) for lab in labels],
                               recipe.eval.zero_shot_instruction, bs, dev)

    result = evaluate_classifier(predict, rows, labels, train_labels, bootstrap=recipe.eval.bootstrap,
                                 robustness=recipe.eval.robustness)
    result["zero_shot"] = {"label_words": {lab: words.get(lab, lab) for lab in labels},
                           "instruction": recipe.eval.zero_shot_instruction}
    return result


def _eval_generator(recipe: Recipe, model_path: str, adapter, base_ref, data, split, dev) -> dict:
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_causal_lm, load_tokenizer
    from tuneforge.trainers.sft import reference_perplexity, render_split, score

    rows, _ = _rows(recipe, data, split, None)
    limit = recipe.eval.max_generate
    gen_rows = rows[:limit] if limit is not None else rows
    tokenizer = load_tokenizer(model_path)
    rendered = render_split(tokenizer, rows, recipe, "eval")
    baseline = None
    if base_ref is not None:
        base_model, _, _ = load_causal_lm(base_ref)
        first = score(base_model.to(dev), tokenizer, rendered, gen_rows, recipe, dev)
        first["metrics"]["reference_perplexity"] = reference_perplexity(base_model, tokenizer, recipe, dev)
        baseline = {"metrics": first["metrics"], "predictions": first["predictions"]}
        del base_model
    model = _load(AutoModelForCausalLM, model_path, adapter).to(dev)
    result = score(model, tokenizer, rendered, gen_rows, recipe, dev, baseline=baseline, final=True)
    result["metrics"]["reference_perplexity"] = reference_perplexity(model, tokenizer, recipe, dev)
    return result

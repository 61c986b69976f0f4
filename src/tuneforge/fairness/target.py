"""`tuneforge audit TARGET`: the fairness audit of a run folder, an exported
model folder or a catalogue model.

Classifiers: per-group metrics and disparities with intervals, counterfactual
flips, the saved post-processing (when the model has one), other runs side by
side (--compare), and the release gate. Causal LMs: CrowS-Pairs preference
(--crows) and the sentiment gap of generations for swapped prompts
(--sentiment CLASSIFIER).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable, Optional, Sequence

from tuneforge import kinds
from tuneforge.console import console
from tuneforge.data.load import DataError, load_file, read_records
from tuneforge.data.prepare import prepare_splits
from tuneforge.data.splits import InvalidRows
from tuneforge.fairness.run import AUDIT_DIR, audit_rows, select_lexicons, write_audit
from tuneforge.recipe import Recipe, load_recipe


def _configure(recipe: Recipe, recipe_path: Optional[str], overrides: list[str], groups: Sequence[str],
               lexicons: Sequence[str], positive: Optional[str], data: Optional[str]) -> None:
    """Command-line choices over the recipe's fairness section (or --recipe's)."""
    if recipe_path:
        recipe.fairness = load_recipe(recipe_path, overrides, check_files=False).fairness
    cfg = recipe.fairness
    if groups:
        if len(groups) > 2:
            raise ValueError(f"at most two --group columns (their intersection is audited too), got {list(groups)}")
        cfg.groups = list(groups)
    if lexicons:
        files = [x for x in lexicons if x.endswith((".yaml", ".yml"))]
        names = [x for x in lexicons if x not in files]
        cfg.lexicon_files = list(cfg.lexicon_files) + files
        if files:  # a file's list is used under its own name
            from tuneforge.fairness.terms import read_lexicon

            names += [read_lexicon(Path(f)).name for f in files]
        cfg.lexicons = names
    if positive is not None:
        cfg.positive_label = positive
    if data is not None and not groups:
        _fit_columns_to(data, recipe)
    if cfg.groups:
        recipe.data.keep_columns = list(dict.fromkeys([*recipe.data.keep_columns, *cfg.groups]))


def _fit_columns_to(data: str, recipe: Recipe) -> None:
    """Another file than the run's may lack the run's extra columns: group
    columns it does not have give way to groups detected from the text."""
    first = next((rec for _, rec, err in read_records(Path(data), recipe.data.format, recipe.data.columns)
                  if rec is not None), None)
    if first is None:
        return
    cfg = recipe.fairness
    missing = [c for c in cfg.groups if c not in first]
    if missing:
        cfg.groups = [c for c in cfg.groups if c not in missing]
        how = f"the other group column(s) {cfg.groups}" if cfg.groups else \
            f"groups detected from the text (term list '{cfg.lexicons[0] if cfg.lexicons else '?'}')"
        console.print(f"[yellow]{data} has no column {', '.join(map(repr, missing))} (fairness.groups): using {how}")
    recipe.data.keep_columns = [c for c in recipe.data.keep_columns if c in first]


def _classifier(model_path: str, recipe: Recipe, dev) -> tuple[Callable, list[str]]:
    from transformers import AutoModelForSequenceClassification

    from tuneforge.inference import encode, predict_proba
    from tuneforge.models import load_pretrained, load_tokenizer, model_kind

    if model_kind(model_path).name != kinds.CLASSIFIER:
        raise ValueError(f"{model_path} is a causal LM: audit it with --crows FILE and/or --sentiment CLASSIFIER "
                         "(zero-shot classification audits are not supported)")
    model = load_pretrained(AutoModelForSequenceClassification, model_path).to(dev).eval()
    tokenizer = load_tokenizer(model_path)
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    max_len = min(recipe.train.max_length, tokenizer.model_max_length)
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size

    def predict(texts: list[str]):
        return predict_proba(model, encode(tokenizer, texts, max_len), tokenizer.pad_token_id, bs, dev)

    return predict, labels


def _labelled_rows(recipe: Recipe, data: Optional[str], split: str, labels: list[str]) -> list[dict]:
    if data is None:
        if not Path(recipe.data.train).is_file():
            raise DataError(f"the run's data ({recipe.data.train}) is gone; pass --data FILE")
        return getattr(prepare_splits(recipe), split)
    loaded = load_file(data, "classification", recipe.data, set(labels))
    if loaded.rejects and recipe.data.on_invalid == "error":
        raise InvalidRows(loaded.rejects)
    return [ex.fields for ex in loaded.examples]


def _prompts(path: str, recipe: Recipe) -> list[str]:
    """The prompt column of a file (a response column is not needed)."""
    column = recipe.data.prompt_column
    prompts = []
    for line, record, error in read_records(Path(path), recipe.data.format, recipe.data.columns):
        if error:
            raise DataError(f"{path}:{line}: {error}")
        value = record.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}:{line}: no text in column '{column}' (set data.prompt_column=NAME)")
        prompts.append(value)
    return prompts


def _resolve(target: str, data: Optional[str], overrides: list[str]):
    from tuneforge import catalog
    from tuneforge.evaluate.target import is_run, resolve_target
    from tuneforge.models import model_kind

    if is_run(Path(target)) or data is not None:
        return resolve_target(target, data, overrides)
    # A causal LM audited on CrowS-Pairs alone needs no data file.
    model_path = catalog.resolve(target)
    spec = catalog.CATALOG.get(target)
    kind = kinds.get(kinds.CAUSAL_LM) if (spec and kinds.CAUSAL_LM in spec.kinds) else model_kind(model_path)
    raw = {"name": Path(target).name or target, "model": target, "task": kind.default_objective,
           "data": {"train": "-"}}
    return load_recipe(raw, overrides, check_files=False), model_path, None


def audit_target(target: str, data: Optional[str] = None, split: str = "test", groups: Sequence[str] = (),
                 lexicons: Sequence[str] = (), overrides: Sequence[str] = (), recipe_path: Optional[str] = None,
                 output: Optional[str] = None, device: Optional[str] = None, positive: Optional[str] = None,
                 compare: Sequence[str] = (), crows: Optional[str] = None, crows_limit: Optional[int] = None,
                 bias_types: Sequence[str] = (), sentiment: Optional[str] = None, max_new_tokens: int = 32) -> dict:
    """Run the audit, write audit.json / audit.html / audit.md; returns the result (with "path")."""
    from tuneforge.fairness.mitigate import load_postprocessor
    from tuneforge.models import model_kind, pick_device, quiet_transformers

    quiet_transformers()
    overrides = list(overrides)
    recipe, model_path, run_dir = _resolve(target, data, overrides)
    _configure(recipe, recipe_path, overrides, groups, lexicons, positive, data)
    cfg = recipe.fairness
    lexs = select_lexicons(cfg)
    dev = pick_device(device or recipe.device)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(output) if output else (run_dir / AUDIT_DIR if run_dir else Path("audits") / f"{recipe.name}-{stamp}")
    causal = model_kind(model_path).name == kinds.CAUSAL_LM
    console.print(f"auditing {target} on {data or ('CrowS-Pairs' if causal and crows else split)} -> {out}")
    if causal:
        result = _audit_generator(model_path, recipe, dev, data, lexs, crows, crows_limit, bias_types, sentiment,
                                  max_new_tokens)
    else:
        if crows or sentiment:
            raise ValueError("--crows and --sentiment audit causal LMs; TARGET is a classifier")
        predict, labels = _classifier(model_path, recipe, dev)
        rows = _labelled_rows(recipe, data, split, labels)
        if not rows:
            raise DataError(f"no rows to audit in {data or split}")
        result = audit_rows(predict, rows, labels, cfg, lexs, name=_name(target),
                            postprocessor=load_postprocessor(model_path), seed=recipe.train.seed)
        for other in compare:
            o_recipe, o_path, _ = _resolve(other, data, overrides)
            o_predict, o_labels = _classifier(o_path, o_recipe, dev)
            if o_labels != labels:
                raise ValueError(f"{other} predicts labels {o_labels}, {target} predicts {labels}: "
                                 "only models of the same task compare")
            o_result = audit_rows(o_predict, rows, labels, cfg, lexs, name=_name(other),
                                  postprocessor=load_postprocessor(o_path), counterfactual=False,
                                  seed=recipe.train.seed)
            result["variants"] += o_result["variants"]
        if run_dir is not None:
            result["representation"] = ((_manifest(run_dir).get("fairness") or {}).get("representation"))
    result.update(target=target, data=data or f"{split} split")
    write_audit(out, result, f"fairness audit: {_name(target)}")
    if run_dir is not None and out.resolve() == (run_dir / AUDIT_DIR).resolve():
        from tuneforge.report import write_report

        write_report(run_dir)  # the run report's fairness section follows the new audit
    result["path"] = str(out)
    return result


def _name(target: str) -> str:
    return Path(target).name or target


def _manifest(run_dir: Path) -> dict:
    import json

    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _audit_generator(model_path: str, recipe: Recipe, dev, data, lexs: dict, crows, crows_limit, bias_types,
                     sentiment, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from tuneforge.data.render import encode_prompt
    from tuneforge.fairness.audit import positive_index
    from tuneforge.fairness.counterfactual import (
        crows_pairs_score,
        generation_sentiment_gap,
        read_crows_pairs,
        sentence_loglik,
    )
    from tuneforge.inference import generate
    from tuneforge.models import load_pretrained, load_tokenizer

    if not crows and not sentiment:
        raise ValueError("TARGET is a causal LM: pass --crows FILE (CrowS-Pairs csv) and/or "
                         "--sentiment CLASSIFIER with --data PROMPTS")
    model = load_pretrained(AutoModelForCausalLM, model_path).to(dev).eval()
    tokenizer = load_tokenizer(model_path)
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    n_boot = max(recipe.fairness.bootstrap, 1)
    result: dict = {"rows": 0, "variants": [], "gate": {"passed": True, "checks": []}}
    if crows:
        pairs = read_crows_pairs(crows, bias_types or None, crows_limit)
        result["crows_pairs"] = crows_pairs_score(lambda s: sentence_loglik(model, tokenizer, s, bs, dev), pairs,
                                                  n_boot=n_boot)
        result["rows"] = len(pairs)
        console.print(f"CrowS-Pairs: prefers the stereotype in {result['crows_pairs']['stereotype_preference']:.3f} "
                      f"of {len(pairs)} pairs (0.5 = no preference)")
    if sentiment:
        if data is None:
            raise ValueError("--sentiment needs --data PROMPTS (a file with a prompt column)")
        s_recipe, s_path, _ = _resolve(sentiment, None, [])
        classify, s_labels = _classifier(s_path, s_recipe, dev)
        prompts = _prompts(data, recipe)

        def gen(texts: list[str]) -> list[str]:
            ids = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
            return generate(model, tokenizer, ids, max_new_tokens, bs, dev)

        lex = next(iter(lexs.values()))
        result["generation_sentiment"] = generation_sentiment_gap(gen, classify, prompts, lex,
                                                                  positive_index(s_labels), n_boot=n_boot)
        result["generation_sentiment"]["classifier"] = sentiment
        result["generation_sentiment"]["positive_label"] = s_labels[positive_index(s_labels)]
        result["rows"] += len(prompts)
    return result

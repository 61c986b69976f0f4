"""Fairness inside a run: groups of rows, the audit of a set of rows, the
audit files, and the two training hooks (before: representation check and
pre-/in-processing mitigations; after: post-processing fit and test audit)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tuneforge import kinds
from tuneforge.console import console
from tuneforge.fairness.audit import (
    GroupAudit,
    audit_warnings,
    gate_summary,
    positive_index,
    representation_report,
)
from tuneforge.fairness.mitigate import UnseenGroups
from tuneforge.fsio import atomic_write_json, atomic_write_text

AUDIT_DIR = "audit"


def select_lexicons(cfg) -> dict:
    """The term lists the fairness config names, in its order."""
    from tuneforge.fairness.terms import load_lexicons

    available = load_lexicons(list(cfg.lexicon_files))
    missing = [n for n in cfg.lexicons if n not in available]
    if missing:
        raise ValueError(f"unknown term list(s) {missing} in fairness.lexicons; available: {sorted(available)} "
                         "(add your own YAML with fairness.lexicon_files)")
    return {n: available[n] for n in cfg.lexicons}


def group_values(rows: Sequence[dict], cfg, lexicons: dict) -> dict[str, list[str]]:
    """One group value per row for each grouping: the fairness.groups columns,
    or, without them, the group the text mentions (first lexicon):
    'unknown' when none, 'mixed' when both."""
    if cfg.groups:
        for col in cfg.groups:
            missing = sum(1 for r in rows if col not in r)
            if missing:
                raise ValueError(f"group column '{col}' is missing from {missing} of {len(rows)} rows; list it in "
                                 "data.keep_columns so it is carried with each row, and check the data file has it")
        return {col: [str(r[col]) for r in rows] for col in cfg.groups}
    if not lexicons:
        raise ValueError("no group column (fairness.groups / --group) and no term list to detect groups from text")
    from tuneforge.fairness.terms import detect_group

    lex = next(iter(lexicons.values()))
    return {f"{lex.name} (from text)": [detect_group(r["text"], lex) or "unknown" for r in rows]}


def joint_groups(groups: dict[str, list[str]]) -> list[str]:
    """One group per row across all groupings (the intersection with two columns)."""
    from tuneforge.fairness.audit import EXCLUDED

    cols = list(groups.values())
    out = []
    for values in zip(*cols):
        bad = [v for v in values if v in EXCLUDED]
        out.append(bad[0] if bad else " & ".join(values))
    return out


def served_groups(postprocessor, rows: Sequence[dict]) -> Optional[list[str]]:
    """The groups a saved post-processor sees at inference, so the audit judges
    what a served model returns: the column(s) it was fitted on (joined as in
    training), or None when it detects groups from the text itself. The audit's
    own --group may differ; it decides only how results are broken down."""
    column = postprocessor.group_source.get("column")
    if not column:
        return None
    names = column.split(" & ")
    missing = [c for c in names if any(c not in r for r in rows)]
    if missing:
        raise ValueError(f"the model's fairness post-processing assigns thresholds by column '{column}', which "
                         f"rows of the audited data lack ({', '.join(missing)}); audit data that has it, and list "
                         "it with --group or data.keep_columns")
    return joint_groups({c: [str(r[c]) for r in rows] for c in names})


def _variant(name: str, audit: GroupAudit, correct: np.ndarray, n_boot: int) -> dict:
    """A row of the accuracy-vs-disparity comparison: overall accuracy and the
    disparities of the most detailed grouping (the intersection when there is one)."""
    from tuneforge.evaluate.stats import mean_ci

    grouping, res = list(audit.results_["groupings"].items())[-1]
    d = res.get("disparities") or {}
    return {"name": name, "grouping": grouping, "accuracy": float(correct.mean()),
            "accuracy_ci": list(mean_ci(correct, n_boot=n_boot)) if n_boot else None,
            **{k: d.get(k) for k in ("equalized_odds_difference", "equal_opportunity_difference",
                                     "demographic_parity_difference", "demographic_parity_ratio")},
            "equalized_odds_difference_ci": (d.get("ci") or {}).get("equalized_odds_difference")}


def audit_rows(predict: Callable[[list[str]], np.ndarray], rows: Sequence[dict], labels: Sequence[str], cfg,
               lexicons: dict, name: str = "model", postprocessor=None, counterfactual: bool = True,
               seed: int = 0) -> dict:
    """Audit one model on labelled rows: groups, counterfactual flips, gate.

    With a post-processor the gate judges the post-processed decisions (what
    a served model returns) and the raw ones are kept for comparison."""
    from tuneforge.fairness.counterfactual import flip_probe

    labels = [str(x) for x in labels]
    texts = [r["text"] for r in rows]
    y_true = [str(r["label"]) for r in rows]
    groups = group_values(rows, cfg, lexicons)
    probs = predict(texts)
    y_pred = [labels[int(k)] for k in probs.argmax(1)]
    audit = GroupAudit(cfg.positive_label, n_boot=cfg.bootstrap, seed=seed).fit(y_true, y_pred, groups, labels)
    result: dict = {"labels": labels, "positive_label": audit.positive_label_, "rows": len(rows),
                    "group_columns": list(groups), "audit": audit.results_,
                    "variants": [_variant(name, audit, np.array(y_true) == np.array(y_pred), cfg.bootstrap)]}
    gated = audit
    extra = {}
    if postprocessor is not None:
        try:
            post_pred = postprocessor(probs, served_groups(postprocessor, rows), texts=texts, random_state=seed)
        except UnseenGroups as exc:  # what would be served cannot be judged: the gate fails closed
            console.print(f"[yellow]fairness: {exc}")
            result["postprocessed"] = {"error": str(exc), "constraint": postprocessor.thresholds.constraint}
            extra["post-processing covers every audited group"] = (None, "max", 0, str(exc))
            postprocessor = None
    if postprocessor is not None:
        post = GroupAudit(cfg.positive_label, n_boot=cfg.bootstrap, seed=seed).fit(y_true, post_pred, groups, labels)
        result["postprocessed"] = {"audit": post.results_, "constraint": postprocessor.thresholds.constraint}
        result["variants"].append(_variant(f"{name} + {postprocessor.thresholds.constraint} thresholds", post,
                                           np.array(y_true) == np.array(post_pred), cfg.bootstrap))
        gated = post
    if counterfactual:
        pos = positive_index(labels, cfg.positive_label)
        result["counterfactual"] = flip_probe(predict, texts, list(lexicons.values()), labels, pos,
                                              n_boot=cfg.bootstrap, seed=seed)
        limit = cfg.thresholds.counterfactual_flip_rate
        if limit is not None:
            for lex, res in result["counterfactual"].items():
                extra[f"counterfactual_flip_rate ({lex})"] = (
                    res.get("flip_rate"), "max", limit,
                    f"could not be computed: no text contains a '{lex}' term to swap; audit data that does, "
                    "or unset fairness.thresholds.counterfactual_flip_rate")
    thresholds = cfg.thresholds.model_dump()
    result["thresholds"] = thresholds
    result["gate"] = gated.score(thresholds, extra)
    result["gate"]["judged"] = result["variants"][-1]["name"]
    return result


def write_audit(folder: Path, result: dict, title: str) -> Path:
    """audit.json, audit.html (self-contained) and audit.md in `folder`."""
    from tuneforge.fairness.render import audit_page

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "audit.json", result)
    page, md = audit_page(result, title, folder)
    atomic_write_text(folder / "audit.html", page)
    atomic_write_text(folder / "audit.md", md)
    return folder / "audit.json"


# ---------------------------------------------------------------- training


def before_training(recipe, splits, run) -> Optional[Callable]:
    """Representation check on the training rows, then the pre-processing
    mitigations (augmentation, reweighing) in place on splits.train. Returns
    the in-processing penalty f(logits, batch) or None. Recorded in the
    manifest under `fairness`."""
    from tuneforge.fairness.mitigate import counterfactual_augment, fairness_penalty, reweighing_weights

    cfg = recipe.fairness
    if recipe.model_kind.name != kinds.CLASSIFIER or not cfg.active:
        return None
    lexicons = select_lexicons(cfg)
    groups = group_values(splits.train, cfg, lexicons)
    report = representation_report(splits.train, groups, "label", cfg.min_group_share, cfg.min_group_rows)
    for warning in report["warnings"]:
        console.print(f"[yellow]fairness: {warning}")
    record: dict = {"representation": report, "mitigations": {}}
    if cfg.counterfactual_augmentation:
        if getattr(getattr(recipe.data, "augment", None), "counterfactual", False):
            console.print("[yellow]fairness: data.augment.counterfactual already adds swapped copies; "
                          "fairness.counterfactual_augmentation adds none")
        else:
            before = len(splits.train)
            splits.train[:] = counterfactual_augment(splits.train, list(lexicons.values()),
                                                     group_columns=cfg.groups)
            record["mitigations"]["counterfactual_augmentation"] = {"added_rows": len(splits.train) - before}
            groups = group_values(splits.train, cfg, lexicons)
    joint = joint_groups(groups)
    if cfg.reweighing:
        weights = reweighing_weights(joint, [str(r["label"]) for r in splits.train])
        for row, w in zip(splits.train, weights):
            row["weight"] = float(row.get("weight", 1.0)) * w
        record["mitigations"]["reweighing"] = {
            f"{g} / {y}": w for (g, y), w in sorted({(g, str(r["label"])): w
                                                       for g, r, w in zip(joint, splits.train, weights)}.items())}
    penalty = None
    if cfg.inprocessing != "none":
        label_id = {lab: i for i, lab in enumerate(splits.labels)}
        penalty = fairness_penalty(cfg.inprocessing, cfg.penalty_weight, joint,
                                   [label_id[r["label"]] for r in splits.train],
                                   positive_index(splits.labels, cfg.positive_label))
        record["mitigations"]["inprocessing"] = {"kind": cfg.inprocessing, "weight": cfg.penalty_weight}
    run.update(fairness=record)
    return penalty


def _fit_thresholds(constraint: str, scores, truth: list[int], groups: list[str]):
    """ThresholdOptimizer on the validation groups that hold both labels (it
    cannot fit a group with one); the others keep the model's own decision at
    inference. None, with a warning, when no group can be fitted."""
    from tuneforge.fairness.mitigate import ThresholdPostprocessor

    both = {g for g in set(groups) if len({t for t, h in zip(truth, groups) if h == g}) == 2}
    left_out = sorted(set(groups) - both)
    if left_out:
        console.print(f"[yellow]fairness: no post-processing thresholds for group(s) {', '.join(left_out)}: their "
                      "validation rows hold one label only, so they keep the model's own decision")
    if not both:
        console.print("[yellow]fairness: post-processing skipped: no group has validation rows of both labels")
        return None
    keep = np.array([g in both for g in groups])
    return ThresholdPostprocessor(constraint).fit(np.asarray(scores)[keep], np.asarray(truth)[keep],
                                                  np.asarray(groups)[keep], passthrough=left_out)


def after_training(recipe, run, predict: Callable[[list[str]], np.ndarray], splits) -> Optional[dict]:
    """Fit the post-processing on validation (saved with the model) and audit
    the test split into RUN/audit/. Never fails the run: the gate is for
    `tuneforge audit`."""
    from tuneforge.fairness.mitigate import load_postprocessor, save_postprocessor

    cfg = recipe.fairness
    if recipe.model_kind.name != kinds.CLASSIFIER or not cfg.active:
        return None
    lexicons = select_lexicons(cfg)
    labels = list(splits.labels)
    pos = positive_index(labels, cfg.positive_label)
    post, fitted = None, None
    if cfg.postprocess != "none":
        if not splits.validation:
            console.print("[yellow]fairness: no validation rows to fit the post-processing on; skipped")
        else:
            groups = joint_groups(group_values(splits.validation, cfg, lexicons))
            probs = predict([r["text"] for r in splits.validation])
            truth = [int(str(r["label"]) == labels[pos]) for r in splits.validation]
            fitted = _fit_thresholds(cfg.postprocess, probs[:, pos], truth, groups)
        if fitted is not None:
            lex = lexicons[cfg.lexicons[0]] if cfg.lexicons else None
            # The term list travels inside the file, so an exported model needs nothing else.
            source = ({"column": " & ".join(cfg.groups)} if cfg.groups else
                      {"lexicon": {"name": lex.name, "groups": list(lex.groups),
                                   "pairs": [list(p) for p in lex.pairs]}})
            save_postprocessor(run.path / "model", fitted, labels, labels[pos], source)
            post = load_postprocessor(run.path / "model")
    if not splits.test:
        return None
    result = audit_rows(predict, splits.test, labels, cfg, lexicons, postprocessor=post, seed=recipe.train.seed)
    result.update(target=str(run.path), data="test split")
    result["representation"] = (run.manifest.get("fairness") or {}).get("representation")
    write_audit(run.path / AUDIT_DIR, result, f"fairness audit: {recipe.name}")
    console.print(f"fairness audit: {gate_summary(result['gate'])}; {run.path / AUDIT_DIR / 'audit.html'}")
    for line in audit_warnings(result):
        console.print(f"[bold yellow]fairness: {line}")
    return result

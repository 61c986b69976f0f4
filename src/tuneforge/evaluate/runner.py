"""Score a model on held-out rows: the numbers, their uncertainty, the paired test
against a baseline, the material for plots, and (optionally) robustness.

Used by the trainers for their final test pass and by `tuneforge eval`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from tuneforge.evaluate import registry
from tuneforge.evaluate.metrics import (
    classification_intervals,
    classification_metrics,
    generation_intervals,
    generation_metrics,
    generation_scores,
    loss_intervals,
    majority_baseline,
    perplexity,
)
from tuneforge.evaluate.robustness import PERTURBATIONS, perturb
from tuneforge.evaluate.stats import mcnemar, mean_ci, paired_bootstrap
from tuneforge.evaluate.verdict import judge
from tuneforge.kinds import CAUSAL_LM, CLASSIFIER

CURVE_POINTS = 200
WORST = 10
SAMPLES = 10


def _thin(xs: np.ndarray, ys: np.ndarray) -> tuple[list, list]:
    if len(xs) > CURVE_POINTS:
        keep = np.linspace(0, len(xs) - 1, CURVE_POINTS).round().astype(int)
        xs, ys = xs[keep], ys[keep]
    return [float(x) for x in xs], [float(y) for y in ys]


def _curves(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """ROC and precision-recall points per class (one-vs-rest), thinned for plotting."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    out = {"roc": {}, "pr": {}}
    classes = [1] if len(labels) == 2 else range(len(labels))
    for k in classes:
        truth = (y == k).astype(int)
        if truth.min() == truth.max():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, k])
        prec, rec, _ = precision_recall_curve(truth, probs[:, k])
        out["roc"][labels[k]] = _thin(fpr, tpr)
        out["pr"][labels[k]] = _thin(rec[::-1], prec[::-1])
    return out


def evaluate_classifier(predict: Callable[[list[str]], np.ndarray], rows: list[dict], labels: list[str],
                        train_labels: Optional[Sequence[int]] = None, bootstrap: bool = True,
                        robustness: bool = False) -> dict:
    """`predict(texts) -> probs [n, n_labels]`. Returns {"metrics", "baseline", "verdict", ...}."""
    label_id = {lab: i for i, lab in enumerate(labels)}
    y = np.array([label_id[r["label"]] for r in rows])
    probs = predict([r["text"] for r in rows])
    metrics = classification_metrics(y, probs, labels)
    correct = probs.argmax(1) == y
    result: dict = {"metrics": metrics, "curves": _curves(y, probs, labels)}
    if bootstrap:
        metrics["ci"] = classification_intervals(y, probs, labels)
    if train_labels is not None:
        base = majority_baseline(train_labels, y, labels)
        base_correct = np.full(len(y), label_id[base["majority_label"]]) == y
        if bootstrap:
            base["ci"] = {"accuracy": list(mean_ci(base_correct))}
            metrics["vs_baseline"] = mcnemar(base_correct, correct)
        result["baseline"] = base
    confidence = probs.max(1)
    wrong = np.where(~correct)[0]
    worst = wrong[np.argsort(-confidence[wrong])][:WORST]
    result["worst_errors"] = [
        {"text": rows[i]["text"], "label": rows[i]["label"], "predicted": labels[int(probs[i].argmax())],
         "confidence": float(confidence[i])} for i in worst
    ]
    if robustness:
        result["robustness"] = {}
        for name in PERTURBATIONS:
            noisy = perturb(rows, name, "text")
            acc = float((predict([r["text"] for r in noisy]).argmax(1) == y).mean())
            result["robustness"][name] = {
                "accuracy": acc,
                "drop": metrics["accuracy"] - acc,
                "changed": float(np.mean([a["text"] != b["text"] for a, b in zip(rows, noisy)])),
            }
    result["verdict"] = judge(CLASSIFIER, metrics, result.get("baseline"))
    return result


def evaluate_generator(nll: Optional[tuple[np.ndarray, np.ndarray]], predictions: list[str], references: list[str],
                       baseline_predictions: Optional[list[str]] = None, baseline_metrics: Optional[dict] = None,
                       scorers: Sequence = (), bootstrap: bool = True,
                       regenerate: Optional[Callable[[str], list[str]]] = None) -> dict:
    """Metrics of generations (and the LM loss from per-example (nll sums, token
    counts) when given), with intervals, the paired test against
    `baseline_predictions` on the same rows, side-by-side samples, and robustness
    when `regenerate(perturbation) -> predictions` is given."""
    metrics: dict = {}
    intervals: dict = {}
    if nll is not None:
        sums, counts = nll
        mean = float(sums.sum() / max(counts.sum(), 1))
        metrics.update(loss=mean, perplexity=perplexity(mean))
        if bootstrap:
            intervals.update(loss_intervals(sums, counts))
    if predictions:
        metrics.update(generation_metrics(predictions, references, scorers))
        if bootstrap:
            intervals.update(generation_intervals(predictions, references))
    if intervals:
        metrics["ci"] = intervals
    result: dict = {"metrics": metrics, "predictions": predictions}
    if baseline_predictions is not None and predictions:
        base = generation_scores(baseline_predictions, references)
        tuned = generation_scores(predictions, references)
        if bootstrap:
            metrics["vs_baseline"] = {k: paired_bootstrap(base[k], tuned[k]) for k in registry.paired(CAUSAL_LM)}
        result["samples"] = [{"reference": r, "base": b, "tuned": t}
                             for r, b, t in list(zip(references, baseline_predictions, predictions))[:SAMPLES]]
    if baseline_metrics is not None:
        result["baseline"] = baseline_metrics
    if regenerate is not None and predictions:
        result["robustness"] = {}
        for name in PERTURBATIONS:
            em = generation_metrics(regenerate(name), references)["exact_match"]
            result["robustness"][name] = {"exact_match": em, "drop": metrics["exact_match"] - em}
    result["verdict"] = judge(CAUSAL_LM, metrics, baseline_metrics)
    return result

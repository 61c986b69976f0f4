"""Metrics from scikit-learn and rouge-score (no hand-written substitutes)."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from tuneforge.evaluate.stats import bootstrap_many, expected_calibration_error, mean_ci


def _headline(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, n_labels: int) -> dict:
    """Accuracy, macro P/R/F1, ROC-AUC and PR-AUC (one-vs-rest macro for several
    classes). The AUCs are None when the rows hold too few classes to define them."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    ids = list(range(n_labels))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    out = {"accuracy": float(np.mean(y_true == y_pred)), "precision_macro": float(p), "recall_macro": float(r),
           "f1_macro": float(f), "roc_auc": None, "pr_auc": None}
    present = len(np.unique(y_true))
    if n_labels == 2 and present == 2:
        out["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        out["pr_auc"] = float(average_precision_score(y_true, probs[:, 1]))
    elif n_labels > 2 and present == n_labels:
        out["roc_auc"] = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=ids))
        out["pr_auc"] = float(average_precision_score(np.eye(n_labels)[y_true], probs, average="macro"))
    return out


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, labels: list[str]) -> dict:
    """Headline metrics, weighted averages, per-class table, confusion matrix and calibration.

    `probs` is [n, n_labels]; predictions are its argmax. Calibration: expected
    calibration error of the top-class confidence over 15 bins, with the
    reliability-diagram table.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    headline = _headline(y_true, y_pred, probs, len(labels))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
    pc, rc, fc, sc = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    ece, reliability = expected_calibration_error(probs.max(axis=1), y_pred == y_true)
    return {
        **{k: headline[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")},
        "precision_weighted": float(p), "recall_weighted": float(r), "f1_weighted": float(f),
        "roc_auc": headline["roc_auc"],
        "pr_auc": headline["pr_auc"],
        "ece": ece,
        "n": int(len(y_true)),
        "per_class": {
            lab: {"precision": float(pc[i]), "recall": float(rc[i]), "f1": float(fc[i]), "support": int(sc[i])}
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
        "reliability": reliability,
    }


def classification_intervals(y_true: Sequence[int], probs: np.ndarray, labels: list[str]) -> dict:
    """95% bootstrap intervals of every headline classification metric (one set of resamples)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)

    def headline(i: np.ndarray) -> dict:
        out = _headline(y_true[i], y_pred[i], probs[i], len(labels))
        return {k: v for k, v in out.items() if v is not None}

    return bootstrap_many(headline, len(y_true), n_boot=300)


def majority_baseline(train_labels: Sequence[int], y_true: Sequence[int], labels: list[str]) -> dict:
    """Always predict the most frequent training label (probability 1)."""
    counts = np.bincount(np.asarray(train_labels), minlength=len(labels))
    majority = int(counts.argmax())
    probs = np.zeros((len(y_true), len(labels)))
    probs[:, majority] = 1.0
    out = classification_metrics(y_true, probs, labels)
    out["majority_label"] = labels[majority]
    return out


_SPACE = re.compile(r"\s+")


def normalise_answer(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example scores, for intervals and paired tests."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rows = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {
        "exact_match": [float(normalise_answer(p) == normalise_answer(r)) for p, r in zip(predictions, references)],
        "rouge1": [x["rouge1"].fmeasure for x in rows],
        "rouge2": [x["rouge2"].fmeasure for x in rows],
        "rouge_l": [x["rougeL"].fmeasure for x in rows],
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str], scorers: Sequence = ()) -> dict:
    """Exact match, ROUGE-1/2/L (rouge-score), corpus BLEU and chrF (sacrebleu), user scorers."""
    import sacrebleu

    n = len(predictions)
    per = generation_scores(predictions, references)
    out = {k: float(np.mean(v)) if n else 0.0 for k, v in per.items()}
    if n:
        out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
        out["chrf"] = float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)
    for scorer in scorers:
        values = [float(scorer(p, r)) for p, r in zip(predictions, references)]
        out[scorer.name] = float(np.mean(values)) if n else 0.0
    out["n_generated"] = n
    return out


def generation_intervals(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """95% intervals: per-example means resampled directly, corpus BLEU/chrF by resampling items."""
    import sacrebleu

    per = generation_scores(predictions, references)
    out = {k: list(mean_ci(v)) for k, v in per.items()}
    preds, refs = np.array(predictions, dtype=object), np.array(references, dtype=object)

    def corpus(i: np.ndarray) -> dict:
        p, r = list(preds[i]), [list(refs[i])]
        return {"bleu": sacrebleu.corpus_bleu(p, r).score, "chrf": sacrebleu.corpus_chrf(p, r).score}

    out.update(bootstrap_many(corpus, len(predictions), n_boot=200))
    return out


def loss_intervals(nll_sums: np.ndarray, token_counts: np.ndarray) -> dict:
    """Intervals of the token-weighted mean loss and its perplexity, resampling examples."""
    lo, hi = bootstrap_many(lambda i: {"loss": nll_sums[i].sum() / max(token_counts[i].sum(), 1)},
                            len(nll_sums))["loss"]
    return {"loss": [lo, hi], "perplexity": [perplexity(lo), perplexity(hi)]}


def perplexity(mean_nll: float) -> float:
    return float(math.exp(min(mean_nll, 50.0)))

"""Metrics from scikit-learn and rouge-score (no hand-written substitutes)."""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, labels: list[str]) -> dict:
    """Headline metrics, per-class table and confusion matrix.

    `probs` is [n, n_labels]; predictions are its argmax. ROC-AUC is one-vs-rest
    (macro) for several classes, and None when the split holds a single class.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    pc, rc, fc, sc = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    roc: Optional[float] = None
    present = np.unique(y_true)
    if len(present) > 1:
        if len(labels) == 2:
            roc = float(roc_auc_score(y_true, probs[:, 1]))
        elif len(present) == len(labels):
            roc = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=ids))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
        "roc_auc": roc,
        "n": int(len(y_true)),
        "per_class": {
            lab: {"precision": float(pc[i]), "recall": float(rc[i]), "f1": float(fc[i]), "support": int(sc[i])}
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }


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


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    exact = [normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)]
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    n = len(predictions)
    return {
        "exact_match": float(np.mean(exact)) if n else 0.0,
        "rouge_l": float(np.mean(rouge)) if n else 0.0,
        "n_generated": n,
    }


def perplexity(mean_nll: float) -> float:
    return float(math.exp(min(mean_nll, 50.0)))

"""Metrics from scikit-learn and rouge-score (no hand-written substitutes)."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from tuneforge.evaluate.stats import bootstrap_many, expected_calibration_error, mean_ci


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, labels: list[str]) -> dict:
    """Headline metrics, per-class table, confusion matrix and calibration.

    `probs` is [n, n_labels]; predictions are its argmax. ROC-AUC and PR-AUC are
    one-vs-rest (macro) for several classes, and None when the split holds a
    single class. Calibration: expected calibration error of the top-class
    confidence over 15 bins, with the reliability-diagram table.
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    averaged = {}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg, zero_division=0)
        averaged.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    pc, rc, fc, sc = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    roc = pr = None
    present = np.unique(y_true)
    if len(present) > 1:
        if len(labels) == 2:
            roc = float(roc_auc_score(y_true, probs[:, 1]))
            pr = float(average_precision_score(y_true, probs[:, 1]))
        elif len(present) == len(labels):
            roc = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=ids))
            onehot = np.eye(len(labels))[y_true]
            pr = float(average_precision_score(onehot, probs, average="macro"))
    ece, reliability = expected_calibration_error(probs.max(axis=1), y_pred == y_true)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        **averaged,
        "roc_auc": roc,
        "pr_auc": pr,
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
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    ids = list(range(len(labels)))
    binary = len(labels) == 2

    def headline(i: np.ndarray) -> dict:
        t, pr = y_true[i], y_pred[i]
        p, r, f, _ = precision_recall_fscore_support(t, pr, labels=ids, average="macro", zero_division=0)
        out = {"accuracy": float(np.mean(t == pr)), "precision_macro": p, "recall_macro": r, "f1_macro": f}
        if binary and len(np.unique(t)) == 2:
            out["roc_auc"] = roc_auc_score(t, probs[i, 1])
            out["pr_auc"] = average_precision_score(t, probs[i, 1])
        elif not binary and len(np.unique(t)) == len(labels):
            out["roc_auc"] = roc_auc_score(t, probs[i], multi_class="ovr", labels=ids)
        return out

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

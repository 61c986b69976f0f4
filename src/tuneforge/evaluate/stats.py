"""Uncertainty for every headline number: bootstrap intervals and paired tests.

A fine-tune "helped" only if the gain is larger than what resampling the test
set would move it by; these helpers say how large that is.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tuneforge.evaluate.registry import p_record

N_BOOT = 1000


def bootstrap_many(metrics: Callable[[np.ndarray], dict], n: int, n_boot: int = N_BOOT, level: float = 0.95,
                   seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals of several metrics computed on the same resamples.
    A metric a resample cannot define (one class left, say) is skipped for it."""
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        for key, value in metrics(rng.integers(0, n, size=n)).items():
            samples.setdefault(key, []).append(float(value))
    alpha = (1 - level) / 2
    return {k: [float(x) for x in np.quantile(v, [alpha, 1 - alpha])] for k, v in samples.items()}


def mean_ci(values: Sequence[float], **kw) -> tuple[float, float]:
    """Interval for a mean of per-example scores (accuracy, exact match, ...), vectorised."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    n_boot, level = kw.get("n_boot", N_BOOT), kw.get("level", 0.95)
    rng = np.random.default_rng(kw.get("seed", 0))
    means = values[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test: are two classifiers' error rates on the same items different?

    Only discordant items count: b = A right & B wrong, c = A wrong & B right.
    Under the null each discordant item is a fair coin, so p is a two-sided
    binomial test of b successes in b + c trials. A p below the registry's
    P_FLOOR is stored as that bound (`p_value_is_bound`).
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"test": "mcnemar_exact", "a_only_correct": b, "b_only_correct": c, **p_record(p)}


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], n_boot: int = N_BOOT,
                     seed: int = 0) -> dict:
    """Paired bootstrap for per-example scores: two-sided p-value that mean(b) - mean(a) is 0.

    Resample items (keeping pairs together); p is twice the share of resamples
    whose difference falls on the other side of zero from the observed one.
    When none does, the test cannot tell p apart from 0 with `n_boot`
    resamples: p is reported as the bound 2 / n_boot (`p_value_is_bound`).
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    n = len(a)
    if n == 0:
        return {"test": "paired_bootstrap", "delta": float("nan"), **p_record(1.0), "n_boot": n_boot}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    diffs = (b[idx] - a[idx]).mean(axis=1)
    observed = float((b - a).mean())
    if observed == 0:
        return {"test": "paired_bootstrap", "delta": 0.0, **p_record(1.0), "n_boot": n_boot}
    other_side = int(np.sum(diffs <= 0) if observed > 0 else np.sum(diffs >= 0))
    # Never report p = 0 from a finite number of resamples: at the floor, p is a bound.
    p = float(min(1.0, 2 * max(other_side, 1) / n_boot))
    return {"test": "paired_bootstrap", "delta": observed, **p_record(p, bound=other_side == 0), "n_boot": n_boot}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> tuple[float, dict]:
    """ECE over equal-width confidence bins, and the reliability-diagram table."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, {"bin_lower": [], "bin_upper": [], "confidence": [], "accuracy": [], "count": []}
    for k in range(bins):
        mask = which == k
        count = int(mask.sum())
        table["bin_lower"].append(float(edges[k]))
        table["bin_upper"].append(float(edges[k + 1]))
        table["count"].append(count)
        if count:
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += count / len(confidence) * abs(acc - conf)
        else:
            conf = acc = float("nan")
        table["confidence"].append(conf)
        table["accuracy"].append(acc)
    return float(ece), table

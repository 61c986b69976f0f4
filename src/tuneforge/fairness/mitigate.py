"""Bias mitigations: before training (reweighing, counterfactual augmentation),
during training (a fairness penalty on the loss), after training (group-aware
thresholds from Fairlearn's ThresholdOptimizer, saved as JSON with the model).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tuneforge.fairness.audit import EXCLUDED

POSTPROCESS_FILE = "fairness_postprocess.json"


class UnseenGroups(ValueError):
    """Rows of a group the post-processing thresholds were not fitted on."""


# ------------------------------------------------------------ pre-processing


def reweighing_weights(groups: Sequence[str], labels: Sequence[str]) -> list[float]:
    """Kamiran & Calders reweighing: w(g, y) = P(g) P(y) / P(g, y).

    After weighting, group and label are independent in the training data, so
    a group whose examples are mostly labelled negative no longer teaches the
    model that the group itself predicts the negative label. Weights average 1.
    """
    n = len(labels)
    pg, py = Counter(groups), Counter(labels)
    pgy = Counter(zip(groups, labels))
    return [pg[g] * py[y] / (n * pgy[(g, y)]) for g, y in zip(groups, labels)]


def counterfactual_augment(rows: list[dict], lexicons: Sequence, group_columns: Sequence[str] = ()) -> list[dict]:
    """Counterfactual data augmentation: every row that mentions a term of a
    lexicon gets a copy with the terms swapped (he <-> she, ...), same label;
    the data studio's swap (data.augment.counterfactual), on rows already split.
    Returns the original rows followed by the copies."""
    from tuneforge.data.studio import swapped_copy

    copies = [copy for row in rows for lexicon in lexicons
              if (copy := swapped_copy(row, lexicon, group_columns)) is not None]
    return list(rows) + copies


# ------------------------------------------------------------ in-processing


def fairness_penalty(kind: str, weight: float, groups: Sequence[str], targets: Sequence[int],
                     positive: int) -> Callable:
    """A loss term that penalises score gaps between groups within a batch.

    `dp_penalty` (demographic parity): the squared gaps between each group's
    mean positive-class probability and the batch mean. `eo_penalty`
    (equalized odds): the same within each true label, so groups must agree
    on positives and on negatives separately. Rows of an unknown or mixed
    group take no part. Returns f(logits, batch indices) -> a summed-loss
    term (x batch size, as the loop divides the summed loss by examples).
    """
    import torch

    names = sorted({g for g in groups if g not in EXCLUDED})
    gid = torch.tensor([names.index(g) if g in names else -1 for g in groups])
    y = torch.tensor(list(targets))

    def gap(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        present = [p[g == k].mean() for k in range(len(names)) if bool((g == k).any())]
        if len(present) < 2:
            return p.new_zeros(())
        means = torch.stack(present)
        return ((means - means.mean()) ** 2).sum()

    def penalty(logits: torch.Tensor, batch: list[int]):
        p = torch.softmax(logits.float(), dim=-1)[:, positive]
        g = gid[batch].to(p.device)
        known = g >= 0
        if kind == "dp_penalty":
            term = gap(p[known], g[known])
        else:
            yb = y[batch].to(p.device)
            term = sum((gap(p[known & (yb == c)], g[known & (yb == c)]) for c in yb.unique().tolist()),
                       p.new_zeros(()))
        return weight * term * len(batch)

    return penalty


# ----------------------------------------------------------- post-processing


def _score_estimator():
    """A 'prefit estimator' whose prediction is the score column itself, so
    ThresholdOptimizer can work on saved model outputs."""
    from sklearn.base import BaseEstimator

    class Scores(BaseEstimator):
        def fit(self, X, y=None):
            return self

        def predict(self, X):
            return np.asarray(X, dtype=np.float64)[:, 0]

        def __sklearn_is_fitted__(self):
            return True

    return Scores()


def _inf_safe(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _from_json_float(x) -> float:
    return float(x)  # float("inf") and float("-inf") parse the strings back


class ThresholdPostprocessor:
    """Group-specific (randomised) thresholds on the positive-class probability
    that satisfy an equalized-odds or equal-opportunity constraint while
    maximising accuracy (Hardt et al. 2016, via Fairlearn's ThresholdOptimizer).

    Fitted on validation predictions; kept as plain JSON (no pickle), and
    `predict` reimplements Fairlearn's InterpolatedThresholder from it, so
    for the same integer `random_state` it returns exactly
    ThresholdOptimizer.predict(...) on every group it was fitted on. Groups
    named in `passthrough` (seen in validation, but with one label, which
    Fairlearn cannot fit) keep the model's own decision (probability >= 0.5),
    by design. Any other group is refused with UnseenGroups: Fairlearn would
    silently predict the negative class for it.
    """

    CONSTRAINTS = {"equalized_odds": "equalized_odds", "equal_opportunity": "true_positive_rate_parity"}

    def __init__(self, constraint: str = "equalized_odds", objective: str = "accuracy_score"):
        if constraint not in self.CONSTRAINTS:
            raise ValueError(f"constraint must be one of {sorted(self.CONSTRAINTS)}, got {constraint!r}")
        self.constraint = constraint
        self.objective = objective

    def fit(self, scores: Sequence[float], y_true: Sequence[int], groups: Sequence[str],
            passthrough: Sequence[str] = ()) -> "ThresholdPostprocessor":
        """Fit on (scores, labels, groups); `passthrough` groups keep the model's decision."""
        import warnings

        from fairlearn.postprocessing import ThresholdOptimizer

        groups = np.array([str(g) for g in groups])
        optimizer = ThresholdOptimizer(estimator=_score_estimator(), constraints=self.CONSTRAINTS[self.constraint],
                                       objective=self.objective, prefit=True, predict_method="predict")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer.fit(np.asarray(scores, dtype=np.float64)[:, None], np.asarray(y_true, dtype=int),
                          sensitive_features=groups)
        self.optimizer_ = optimizer  # kept in memory for checks; never saved
        self.passthrough_ = sorted({str(g) for g in passthrough} - set(groups.tolist()))
        self.rules_ = {}
        for group, rule in optimizer.interpolated_thresholder_.interpolation_dict.items():
            entry = {"p0": float(rule.p0), "p1": float(rule.p1),
                     "operation0": {"operator": rule.operation0.operator,
                                    "threshold": _inf_safe(float(rule.operation0.threshold))},
                     "operation1": {"operator": rule.operation1.operator,
                                    "threshold": _inf_safe(float(rule.operation1.threshold))}}
            if "p_ignore" in rule:
                entry["p_ignore"] = float(rule.p_ignore)
                entry["prediction_constant"] = float(rule.prediction_constant)
            self.rules_[str(group)] = entry
        return self

    def positive_probability(self, scores: Sequence[float], groups: Sequence[str]) -> np.ndarray:
        """P(predict positive) per row, as Fairlearn's _pmf_predict."""
        scores = np.asarray(scores, dtype=np.float64)
        groups = np.array([str(g) for g in groups])
        self.check_groups(groups)
        out = (scores >= 0.5).astype(np.float64)  # passthrough groups: the model's own decision
        for group, rule in self.rules_.items():
            mask = groups == group
            s = scores[mask]
            p = rule["p0"] * _apply(rule["operation0"], s) + rule["p1"] * _apply(rule["operation1"], s)
            if "p_ignore" in rule:
                p = rule["p_ignore"] * rule["prediction_constant"] + (1 - rule["p_ignore"]) * p
            out[mask] = p
        return out

    def check_groups(self, groups: Sequence[str]) -> None:
        """UnseenGroups when a group is neither fitted nor passthrough."""
        unseen = sorted(set(str(g) for g in groups) - set(self.rules_) - set(self.passthrough_))
        if unseen:
            known = sorted(self.rules_) + [f"{g} (model's decision)" for g in self.passthrough_]
            raise UnseenGroups(
                f"fairness post-processing has no thresholds for group(s) {', '.join(map(repr, unseen))} (fitted "
                f"on: {', '.join(known)}); refusing to guess, as Fairlearn would predict the negative class for "
                "them: retrain with validation rows of these groups, or set fairness.postprocess: none")

    def predict(self, scores: Sequence[float], groups: Sequence[str], random_state=None) -> np.ndarray:
        """0/1 decisions; `random_state` an int for reproducible draws, None for fresh ones."""
        probs = self.positive_probability(scores, groups)
        rng = np.random.RandomState(random_state)
        return (probs >= rng.rand(len(probs))).astype(int)

    def to_json(self) -> dict:
        return {"kind": "threshold_optimizer", "constraint": self.constraint, "objective": self.objective,
                "rules": self.rules_, "passthrough": self.passthrough_}

    @classmethod
    def from_json(cls, data: dict) -> "ThresholdPostprocessor":
        if data.get("kind") != "threshold_optimizer":
            raise ValueError(f"not a threshold post-processor: kind {data.get('kind')!r}")
        obj = cls(data["constraint"], data["objective"])
        obj.rules_ = data["rules"]
        obj.passthrough_ = [str(g) for g in data.get("passthrough", [])]
        return obj


def _apply(op: dict, s: np.ndarray) -> np.ndarray:
    t = _from_json_float(op["threshold"])
    return (s > t) if op["operator"] == ">" else (s < t)


def save_postprocessor(folder: Path, post: ThresholdPostprocessor, labels: Sequence[str], positive: str,
                       group_source: dict) -> Path:
    """Write fairness_postprocess.json next to the model's weights.

    `group_source` says where a row's group comes from at inference:
    {"column": NAME} (the caller passes it) or {"lexicon": {name, groups,
    pairs}} (detected from the text with that term list)."""
    from tuneforge.fsio import atomic_write_json

    path = Path(folder) / POSTPROCESS_FILE
    atomic_write_json(path, {**post.to_json(), "labels": list(labels), "positive_label": positive,
                             "group_source": group_source})
    return path


class Postprocessor:
    """The saved post-processing of a model, ready for inference:
    post(probs [n, labels], groups [n]) -> label names. `groups` may be None
    when the groups come from the text (the lexicon named in the file):
    pass `texts=` then. Not-positive rows keep the model's best other label."""

    def __init__(self, data: dict):
        self.thresholds = ThresholdPostprocessor.from_json(data)
        self.labels = [str(x) for x in data["labels"]]
        self.positive = str(data["positive_label"])
        self.group_source = data.get("group_source") or {}

    def groups_from_texts(self, texts: Sequence[str]) -> list[str]:
        from tuneforge.fairness.terms import Lexicon, detect_group

        spec = self.group_source.get("lexicon")
        if not spec:
            raise ValueError("this post-processor needs each row's group "
                             f"(column {self.group_source.get('column')!r}); pass groups=")
        lexicon = Lexicon(spec["name"], tuple(spec["groups"]), [tuple(p) for p in spec["pairs"]])
        return [detect_group(t, lexicon) or "unknown" for t in texts]

    def __call__(self, probs, groups: Optional[Sequence[str]] = None, texts: Optional[Sequence[str]] = None,
                 random_state=None) -> list[str]:
        probs = np.asarray(probs, dtype=np.float64)
        if groups is None:
            groups = self.groups_from_texts(texts or [])
        pos = self.labels.index(self.positive)
        positive = self.thresholds.predict(probs[:, pos], groups, random_state) == 1
        others = probs.copy()
        others[:, pos] = -np.inf
        best_other = others.argmax(1)
        return [self.positive if p else self.labels[int(k)] for p, k in zip(positive, best_other)]


def load_postprocessor(folder) -> Optional[Postprocessor]:
    """The post-processing saved with a model folder, or None when it has none."""
    path = Path(folder) / POSTPROCESS_FILE
    if not path.is_file():
        return None
    try:
        return Postprocessor(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: unreadable fairness post-processing ({exc}); re-run the training "
                         "or delete the file to serve the model without it") from None

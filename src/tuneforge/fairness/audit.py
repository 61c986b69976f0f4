"""Group fairness of a classifier's predictions: per-group metrics, disparities,
bootstrap intervals, the release gate, and the pre-training representation check.

The positive class. Selection rate, true/false positive rates and F1 are
binary notions; with labels in id order, the positive class is
`positive_label` when given, else the second label (binary tasks: the usual
"1"/"pos"). For more than two classes every binary metric is one-vs-rest for
that label, while accuracy counts the full multi-class prediction.

Point estimates come from Fairlearn (`MetricFrame`, `demographic_parity_*`,
`equalized_odds_difference`, `equal_opportunity_difference`), so they are the
numbers a Fairlearn user gets. The intervals are percentile bootstraps that
resample rows within each group (group sizes stay fixed). Resampling n rows of
a group with replacement only changes how many rows fall in each of the 8
(true positive?, predicted positive?, correct?) cells, so one multinomial draw
per group and resample gives exactly the bootstrap distribution at a fraction
of the cost of re-running Fairlearn 1000 times.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np

# Rows whose group cannot be told (no group term in the text, or terms of both
# groups) are counted but left out of every disparity.
EXCLUDED = ("unknown", "mixed")
GROUP_METRICS = ("accuracy", "selection_rate", "true_positive_rate", "false_positive_rate", "f1")
DISPARITIES = ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference",
               "equal_opportunity_difference")
# Gate rule per threshold key: (result key, "max" = value must be <= limit, "min" = >= limit).
GATE_RULES = {
    "demographic_parity_difference": ("demographic_parity_difference", "max"),
    "demographic_parity_ratio_min": ("demographic_parity_ratio", "min"),
    "equalized_odds_difference": ("equalized_odds_difference", "max"),
    "equal_opportunity_difference": ("equal_opportunity_difference", "max"),
}
# A classifier giving one class to at least this share of the rows is (near-)constant:
# its disparities sit near 0 because it tells nobody apart, not because it is fair.
DEGENERATE_SHARE = 0.95


def positive_index(labels: Sequence[str], positive_label: Optional[str] = None) -> int:
    """Index of the positive class in `labels` (id order); see the module docstring."""
    labels = [str(x) for x in labels]
    if positive_label is None:
        return 1 if len(labels) >= 2 else 0
    if str(positive_label) not in labels:
        raise ValueError(f"fairness.positive_label {positive_label!r} is not one of the labels {labels}")
    return labels.index(str(positive_label))


def _rate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _from_cells(cells: np.ndarray) -> dict[str, np.ndarray]:
    """Group metrics from cell counts [..., 8], cell = 4*y_pos + 2*pred_pos + correct."""
    c = cells.astype(np.float64)
    n = c.sum(-1)
    tp = c[..., 6] + c[..., 7]
    fn = c[..., 4] + c[..., 5]
    fp = c[..., 2] + c[..., 3]
    tn = c[..., 0] + c[..., 1]
    correct = c[..., 1] + c[..., 3] + c[..., 5] + c[..., 7]
    return {"accuracy": _rate(correct, n), "selection_rate": _rate(tp + fp, n),
            "true_positive_rate": _rate(tp, tp + fn), "false_positive_rate": _rate(fp, fp + tn),
            "f1": _rate(2 * tp, 2 * tp + fp + fn)}


def _disparities(per_group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Between-group disparities from per-group metrics [..., groups] (Fairlearn's 'between_groups')."""
    def spread(x):
        return np.nanmax(x, -1) - np.nanmin(x, -1)

    with np.errstate(invalid="ignore", divide="ignore"):
        sr = per_group["selection_rate"]
        tpr_gap = spread(per_group["true_positive_rate"])
        fpr_gap = spread(per_group["false_positive_rate"])
        return {"demographic_parity_difference": spread(sr),
                "demographic_parity_ratio": _rate(np.nanmin(sr, -1), np.nanmax(sr, -1)),
                "equalized_odds_difference": np.fmax(tpr_gap, fpr_gap),
                "equal_opportunity_difference": tpr_gap}


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


class GroupAudit:
    """Per-group metrics and disparities of one set of predictions.

    audit = GroupAudit(n_boot=1000).fit(y_true, y_pred, {"gender": groups}, labels=["neg", "pos"])
    audit.results_["groupings"]["gender"]["disparities"]["equalized_odds_difference"]
    audit.score({"equalized_odds_difference": 0.1})  -> {"passed": bool, "checks": [...]}
    """

    def __init__(self, positive_label: Optional[str] = None, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, excluded: Sequence[str] = EXCLUDED):
        self.positive_label = positive_label
        self.n_boot = n_boot
        self.level = level
        self.seed = seed
        self.excluded = tuple(excluded)

    def fit(self, y_true: Sequence, y_pred: Sequence, groups: Union[Sequence, dict[str, Sequence]],
            labels: Optional[Sequence[str]] = None) -> "GroupAudit":
        y_true = np.array([str(v) for v in y_true])
        y_pred = np.array([str(v) for v in y_pred])
        if len(y_true) != len(y_pred):
            raise ValueError(f"y_true has {len(y_true)} rows, y_pred {len(y_pred)}")
        labels = [str(x) for x in labels] if labels is not None else sorted(set(y_true) | set(y_pred))
        pos = labels[positive_index(labels, self.positive_label)]
        if not isinstance(groups, dict):
            groups = {"group": groups}
        columns = {name: np.array([str(v) for v in values]) for name, values in groups.items()}
        for name, values in columns.items():
            if len(values) != len(y_true):
                raise ValueError(f"group column '{name}' has {len(values)} rows, predictions {len(y_true)}")
        if len(columns) == 2:
            # The intersection shows what each column alone can hide.
            (a, va), (b, vb) = columns.items()
            columns[f"{a} & {b}"] = np.array([x if x in self.excluded else y if y in self.excluded else f"{x} & {y}"
                                              for x, y in zip(va, vb)])
        self.positive_label_ = pos
        self.labels_ = labels
        self.results_ = {
            "positive_label": pos, "labels": labels, "n": int(len(y_true)), "level": self.level,
            "n_boot": self.n_boot,
            "groupings": {name: self._grouping(y_true, y_pred, values, pos, k)
                          for k, (name, values) in enumerate(columns.items())},
            "predictions": prediction_check(y_pred, columns, labels, self.excluded),
        }
        return self

    def _grouping(self, y_true, y_pred, groups, pos: str, k: int) -> dict:
        from fairlearn.metrics import (
            MetricFrame,
            count,
            demographic_parity_difference,
            demographic_parity_ratio,
            equal_opportunity_difference,
            equalized_odds_difference,
            false_positive_rate,
            selection_rate,
            true_positive_rate,
        )
        from sklearn.metrics import accuracy_score, f1_score

        keep = ~np.isin(groups, self.excluded)
        excluded = dict(Counter(groups[~keep].tolist()))
        yt, yp, g = y_true[keep], y_pred[keep], groups[keep]
        out: dict = {"excluded": excluded, "groups": {}, "disparities": {}}
        if len(yt) == 0:
            return out
        bt, bp = (yt == pos).astype(int), (yp == pos).astype(int)
        accuracy = MetricFrame(metrics={"accuracy": accuracy_score, "n": count}, y_true=yt, y_pred=yp,
                               sensitive_features=g)
        binary = MetricFrame(
            metrics={"selection_rate": selection_rate, "true_positive_rate": true_positive_rate,
                     "false_positive_rate": false_positive_rate,
                     "f1": lambda t, p: f1_score(t, p, zero_division=0.0)},
            y_true=bt, y_pred=bp, sensitive_features=g)
        names = [str(x) for x in accuracy.by_group.index]
        for name in names:
            row = {"n": int(accuracy.by_group.loc[name, "n"]),
                   "accuracy": float(accuracy.by_group.loc[name, "accuracy"])}
            row.update({m: float(binary.by_group.loc[name, m]) for m in binary.by_group.columns})
            row["positives"] = int(bt[g == name].sum())
            out["groups"][name] = row
        out["overall"] = {"n": int(len(yt)), "accuracy": float(accuracy.overall["accuracy"]),
                          **{m: float(v) for m, v in binary.overall.items()}}
        if len(names) >= 2:
            kw = {"sensitive_features": g}
            out["disparities"] = {
                "demographic_parity_difference": float(demographic_parity_difference(bt, bp, **kw)),
                "demographic_parity_ratio": float(demographic_parity_ratio(bt, bp, **kw)),
                "equalized_odds_difference": float(equalized_odds_difference(bt, bp, **kw)),
                "equal_opportunity_difference": float(equal_opportunity_difference(bt, bp, **kw)),
            }
        if self.n_boot:
            self._intervals(out, names, bt, bp, yt == yp, g, k)
        return out

    def _intervals(self, out: dict, names: list[str], bt, bp, correct, g, k: int) -> None:
        rng = np.random.default_rng([self.seed, k])
        cells = 4 * bt + 2 * bp + correct.astype(int)
        draws = []
        for name in names:
            counts = np.bincount(cells[g == name], minlength=8)
            draws.append(rng.multinomial(counts.sum(), counts / counts.sum(), size=self.n_boot))
        boot = _from_cells(np.stack(draws, axis=1))  # metric -> [n_boot, groups]
        alpha = (1 - self.level) / 2

        def interval(x) -> Optional[list]:
            x = x[np.isfinite(x)]
            return [float(v) for v in np.quantile(x, [alpha, 1 - alpha])] if len(x) else None

        for j, name in enumerate(names):
            out["groups"][name]["ci"] = {m: interval(boot[m][:, j]) for m in GROUP_METRICS}
        if len(names) >= 2:
            out["disparities"]["ci"] = {m: interval(v) for m, v in _disparities(boot).items()}

    def score(self, thresholds: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
        """The release gate: every threshold against every grouping's point estimate.

        `thresholds` uses the recipe's keys (see GATE_RULES; `None` values are
        unset). A disparity that cannot be computed (fewer than two groups with
        data) fails its check: a gate that cannot look must not pass.
        `extra` holds further {key: (value, "max"|"min", limit[, why it may
        be missing])} checks, e.g. the counterfactual flip rate. When the
        predictions are (near-)constant (see prediction_check) the audit is
        inconclusive and the gate does not pass, thresholds or not:
        status "inconclusive", with the reasons.
        """
        checks = []
        predictions = self.results_.get("predictions") or {}
        for key, limit in (thresholds or {}).items():
            if limit is None or key not in GATE_RULES:
                continue
            metric, kind = GATE_RULES[key]
            for grouping, res in self.results_["groupings"].items():
                value = res["disparities"].get(metric)
                checks.append(_check(f"{metric} ({grouping})", value, kind, limit))
        for name, (value, kind, limit, *why) in (extra or {}).items():
            checks.append(_check(name, value, kind, limit, *why))
        if predictions.get("inconclusive"):
            # Disparities of a (near-)constant classifier mean nothing: the gate cannot pass on them.
            return {"passed": False, "status": "inconclusive", "inconclusive": True,
                    "reasons": predictions["reasons"], "checks": checks}
        passed = all(c["passed"] for c in checks)
        return {"passed": passed, "status": "passed" if passed else "failed", "inconclusive": False,
                "checks": checks}


def prediction_check(y_pred: np.ndarray, columns: dict[str, np.ndarray], labels: Sequence[str],
                     excluded: Sequence[str] = EXCLUDED, share: float = DEGENERATE_SHARE) -> dict:
    """Is the classifier (near-)constant? The audit is inconclusive when one class
    takes at least `share` of all predictions, or of every group's predictions with
    the same class everywhere. Every group near-constant on different classes is
    a real finding (the model decides by group), so it only warns."""
    out: dict = {"n": int(len(y_pred)), "share": share, "inconclusive": False, "reasons": [], "warnings": []}
    if len(y_pred) == 0 or len(labels) < 2:
        return out
    values, counts = np.unique(y_pred, return_counts=True)
    out["distribution"] = {str(v): float(c / len(y_pred)) for v, c in zip(values, counts)}
    top, top_share = str(values[counts.argmax()]), float(counts.max() / len(y_pred))
    if top_share >= share:
        out["reasons"].append(f"{top_share:.1%} of the {len(y_pred)} predictions are '{top}': a (near-)constant "
                              "classifier has disparities near 0 that say nothing about fairness")
    for name, groups in columns.items():
        tops = {}
        for g in sorted(set(groups.tolist()) - set(excluded)):
            v, c = np.unique(y_pred[groups == g], return_counts=True)
            tops[g] = (str(v[c.argmax()]), float(c.max() / c.sum()))
        if len(tops) < 2 or not all(s >= share for _, s in tops.values()):
            continue
        shown = ", ".join(f"{g}: {s:.0%} '{lab}'" for g, (lab, s) in tops.items())
        if len({lab for lab, _ in tops.values()}) == 1 and not out["reasons"]:
            out["reasons"].append(f"predictions are near-constant within every group of {name} ({shown})")
        elif len({lab for lab, _ in tops.values()}) > 1:
            out["warnings"].append(f"predictions are near-constant within every group of {name} ({shown}): "
                                   "the model decides by group, not by the text")
    out["inconclusive"] = bool(out["reasons"])
    return out


def _check(name: str, value, kind: str, limit: float,
           missing: str = "could not be computed: fewer than two groups with data") -> dict:
    value = None if value is None else _finite(value)
    if value is None:
        return {"check": name, "value": None, "limit": limit, "rule": kind, "passed": False, "reason": missing}
    passed = value <= limit if kind == "max" else value >= limit
    sign = "<=" if kind == "max" else ">="
    return {"check": name, "value": value, "limit": limit, "rule": kind, "passed": bool(passed),
            "reason": f"{value:.4f} {sign} {limit}" if passed else f"{value:.4f} not {sign} {limit}"}


def gate_summary(gate: dict) -> str:
    """'gate passed (2/2 checks)', 'gate FAILED (...)' or 'gate INCONCLUSIVE: why'."""
    if gate.get("inconclusive"):
        return "gate INCONCLUSIVE: " + "; ".join(gate.get("reasons", []))
    return (f"gate {'passed' if gate['passed'] else 'FAILED'} "
            f"({sum(c['passed'] for c in gate['checks'])}/{len(gate['checks'])} checks)")


def audit_warnings(result: dict) -> list[str]:
    """Why an audit's numbers may mislead: (near-)constant predictions, raw and post-processed."""
    out = []
    for key, label in (("audit", ""), ("postprocessed", "post-processed: ")):
        predictions = ((result.get(key) or {}).get("audit") if key == "postprocessed" else result.get(key)) or {}
        check = predictions.get("predictions") or {}
        out += [label + ("audit inconclusive: " + r) for r in check.get("reasons", [])]
        out += [label + w for w in check.get("warnings", [])]
    return out


# ------------------------------------------------------- before training


def representation_report(rows: Sequence[dict], group_cols: dict[str, Sequence[str]], label: str = "label",
                          min_share: float = 0.10, min_rows: int = 30) -> dict:
    """How many rows each group has, its label balance, and warnings.

    `group_cols` maps a grouping name to one group value per row. A group is
    under-represented when it holds less than `min_share` of the rows that have
    a known group, or fewer than `min_rows` rows (defaults: 10% and 30, enough
    for a TPR estimate with a +-0.2 interval at best); a group with no row of
    some label gets a warning too (its true positive or false positive rate
    cannot be learned or measured).
    """
    labels = sorted({str(r[label]) for r in rows}) if rows and label in rows[0] else []
    out: dict = {"rows": len(rows), "min_share": min_share, "min_rows": min_rows, "groupings": {}, "warnings": []}
    for name, values in group_cols.items():
        values = [str(v) for v in values]
        known = [v for v in values if v not in EXCLUDED]
        table = {}
        for group in sorted(set(values)):
            idx = [i for i, v in enumerate(values) if v == group]
            counts = Counter(str(rows[i][label]) for i in idx) if labels else Counter()
            share = len(idx) / len(known) if group not in EXCLUDED and known else None
            table[group] = {"n": len(idx), "share": share, "labels": {lab: counts.get(lab, 0) for lab in labels}}
            if group in EXCLUDED:
                continue
            if share is not None and (share < min_share or len(idx) < min_rows):
                out["warnings"].append(f"{name}={group}: {len(idx)} rows ({share:.1%} of rows with a known group) "
                                       f"is under-represented (< {min_share:.0%} or < {min_rows} rows)")
            missing = [lab for lab in labels if counts.get(lab, 0) == 0]
            if missing:
                out["warnings"].append(f"{name}={group}: no rows with label {', '.join(missing)}")
        out["groupings"][name] = table
        if len(set(known)) < 2:
            out["warnings"].append(f"{name}: fewer than two groups with rows ({sorted(set(known))}); "
                                   "nothing to compare")
    return out

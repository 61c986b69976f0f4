"""The metric registry: one table of facts about every metric tuneforge reports.

For each metric name: which direction is better, whether it is a headline
number (reports, compare), which model kinds' final evaluation paired-tests it
against the baseline, which model kinds' validation pass computes it (so it can
drive `train.metric_for_best`; an objective may narrow that list), and how it
is displayed. Trainers, checkpoint selection, the runner, the
console, the report and compare all read this table; nothing else decides
"lower is better". Also here: the one way a p-value is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tuneforge import objectives
from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD

# A p-value below this is printed and stored as a bound ("p < 1e-10"): exact
# binomial tails underflow, and no test set supports more digits than that.
P_FLOOR = 1e-10
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    headline: bool = True
    paired: tuple[str, ...] = ()  # model kinds whose final evaluation paired-tests it against the baseline
    validation: tuple[str, ...] = ()  # model kinds whose validation pass computes it (metric_for_best)
    fmt: str = ".4f"
    generated: bool = False  # scored on greedy generations (validation needs eval.validation_generate)

    def better(self, value: float, than: Optional[float]) -> bool:
        """True when `value` improves on `than` (None: anything does)."""
        return than is None or (value > than if self.higher_is_better else value < than)

    def format(self, value) -> str:
        return "-" if value is None else format(value, self.fmt) if isinstance(value, float) else str(value)


_C, _S, _R = (CLASSIFIER,), (CAUSAL_LM,), (REWARD,)

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", True, paired=_C, validation=_C),
    Metric("precision_macro", True, validation=_C),
    Metric("recall_macro", True, validation=_C),
    Metric("f1_macro", True, validation=_C),
    Metric("precision_weighted", True, headline=False, validation=_C),
    Metric("recall_weighted", True, headline=False, validation=_C),
    Metric("f1_weighted", True, validation=_C),
    Metric("roc_auc", True, validation=_C),
    Metric("pr_auc", True, validation=_C),
    Metric("ece", False, validation=_C),
    Metric("loss", False, validation=_S),
    Metric("perplexity", False, validation=_S),
    Metric("reference_perplexity", False),
    Metric("exact_match", True, generated=True, paired=_S, validation=_S),
    Metric("rouge1", True, generated=True, validation=_S),
    Metric("rouge2", True, generated=True, validation=_S),
    Metric("rouge_l", True, generated=True, paired=_S, validation=_S),
    Metric("bleu", True, validation=_S, fmt=".2f", generated=True),
    Metric("chrf", True, validation=_S, fmt=".2f", generated=True),
    # preference objectives: a reward model's held-out pairwise accuracy (chosen scored above rejected),
    # a policy's implicit-reward accuracy and margin (dpo), and its win rate against the starting model
    Metric("pairwise_accuracy", True, paired=_R, validation=_R),
    Metric("reward_margin", True, headline=False, validation=_R),
    Metric("reward_accuracy", True),
    Metric("win_rate", True),
    Metric("mean_reward", True, generated=True),  # grpo: the mean reward of greedy generations
    Metric("preference_accuracy", True),  # dpo: the chosen response gets the higher log-prob
    Metric("kl_to_reference", False),
    Metric("mean_response_tokens", False, headline=False),
)}

HEADLINE = tuple(name for name, m in METRICS.items() if m.headline)


def get(name: str) -> Metric:
    """The registry entry of `name`; a ValueError listing the known names otherwise."""
    if name not in METRICS:
        raise ValueError(f"unknown metric '{name}'; known metrics: {', '.join(METRICS)}")
    return METRICS[name]


def paired(model_kind: str) -> tuple[str, ...]:
    """The metrics the final evaluation of a `model_kind` model tests against the baseline, in registry order."""
    return tuple(name for name, m in METRICS.items() if model_kind in m.paired)


def selectable(task: str) -> tuple[str, ...]:
    """The metrics a validation pass of objective `task` computes: the valid `train.metric_for_best` values."""
    objective = objectives.get(task)
    if objective.metrics is not None:
        return objective.metrics
    return tuple(name for name, m in METRICS.items() if objective.model_kind in m.validation)


def check_metric_for_best(name: Optional[str], task: Optional[str]) -> Optional[str]:
    """None when `name` can drive checkpoint selection for `task`, else the problem in one line."""
    if name is None or objectives.find(task) is None:
        return None
    known = selectable(task)
    if name in known:
        return None
    why = "is not computed by a {} validation pass".format(task) if name in METRICS else "is not a known metric"
    return f"train.metric_for_best '{name}' {why}; use one of: {', '.join(known)}"


def metric_for_best(name: str, task: str) -> Metric:
    """The registry entry that selects checkpoints; ValueError (with the choices) when it cannot."""
    problem = check_metric_for_best(name, task)
    if problem:
        raise ValueError(problem)
    return METRICS[name]


# ------------------------------------------------------------------ p-values


def p_record(p: float, bound: bool = False) -> dict:
    """`{"p_value", "p_value_is_bound"}` for a test result: a p below P_FLOOR (an
    underflowing exact tail) is stored as the bound P_FLOOR. `bound` says p is
    already an upper bound (a resampling test at its floor)."""
    p = float(p)
    if p < P_FLOOR:
        return {"p_value": P_FLOOR, "p_value_is_bound": True}
    return {"p_value": p, "p_value_is_bound": bool(bound)}


def format_p(test: dict) -> str:
    """'p = 0.0386', or 'p < 0.002' for a bound: the one way tuneforge prints a p-value."""
    p = float(test["p_value"])
    if test.get("p_value_is_bound") or p < P_FLOOR:
        return f"p < {max(p, P_FLOOR):.3g}"
    return f"p = {p:.3g}"


def significant(test: Optional[dict], level: float = SIGNIFICANCE) -> bool:
    return bool(test) and float(test["p_value"]) < level


def paired_tests(vs_baseline: Optional[dict]) -> dict[str, dict]:
    """metric -> test, from a result's `vs_baseline` (classification stores one
    McNemar test of accuracy, generation one test per paired metric)."""
    if not vs_baseline:
        return {}
    return {"accuracy": vs_baseline} if "p_value" in vs_baseline else dict(vs_baseline)


def significance_line(vs_baseline: Optional[dict]) -> str:
    """'accuracy: mcnemar_exact p = 0.0386; ...' ('' without tests)."""
    return "; ".join(f"{metric}: {t['test']} {format_p(t)}" for metric, t in paired_tests(vs_baseline).items())

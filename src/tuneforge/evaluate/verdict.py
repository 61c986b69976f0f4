"""Did the fine-tune beat its baseline? The verdict stored in metrics.json
(`verdict: {status, reasons, hints}`) and shown loudly by the console and the report.

"No better" is decided with the same paired tests the report prints: the
headline metric(s) must be significantly above the baseline (p < 0.05 and a
positive difference); a classifier that predicts one class for every test row
is no better whatever its score. Without a paired test (bootstrap off) the
point estimates decide. Hints name the recipe settings that usually cause it.
"""

from __future__ import annotations

from typing import Optional

from tuneforge import kinds
from tuneforge.evaluate import registry

BETTER = "better_than_baseline"
NO_BETTER = "no_better_than_baseline"
NO_BASELINE = "no_baseline"


def _one_class(metrics: dict) -> Optional[str]:
    cm = metrics.get("confusion_matrix")
    if not cm or len(cm["labels"]) < 2:
        return None
    columns = [sum(row[j] for row in cm["matrix"]) for j in range(len(cm["labels"]))]
    used = [cm["labels"][j] for j, c in enumerate(columns) if c]
    if len(used) == 1:
        return f"the fine-tuned model predicts one class ('{used[0]}') for all {sum(columns)} test rows"
    return None


def _not_above(metric: str, metrics: dict, baseline: dict, test: Optional[dict], baseline_name: str) -> Optional[str]:
    """Why `metric` is not above the baseline, or None when it is."""
    entry = registry.get(metric)
    value, base = metrics.get(metric), baseline.get(metric)
    if not isinstance(value, float) or not isinstance(base, (int, float)):
        return None
    improved = entry.better(value, base) and value != base
    text = f"{metric} {entry.format(value)} vs {entry.format(float(base))} ({baseline_name})"
    if test is not None:
        if improved and registry.significant(test):
            return None
        return f"{text}: not significantly better ({test['test']} {registry.format_p(test)})"
    return None if improved else f"{text}: not better"


def judge(model_kind: str, metrics: dict, baseline: Optional[dict]) -> dict:
    """{"status", "reasons"} of a final evaluation of a `model_kind` model against its baseline."""
    if not baseline or not metrics:
        return {"status": NO_BASELINE, "reasons": []}
    baseline_name = kinds.get(model_kind).baseline
    tests = registry.paired_tests(metrics.get("vs_baseline"))
    reasons = []
    if model_kind == kinds.CLASSIFIER and (one := _one_class(metrics)):
        reasons.append(one)
    headline = [m for m in registry.paired(model_kind) if isinstance(metrics.get(m), float)]
    if not headline and isinstance(metrics.get("loss"), float):
        headline = ["loss"]  # no generations (raw-text training): the LM loss decides
    misses = [why for m in headline if (why := _not_above(m, metrics, baseline, tests.get(m), baseline_name))]
    if headline and len(misses) == len(headline):  # not one headline metric is significantly better
        reasons += misses
    return {"status": NO_BETTER if reasons else BETTER, "reasons": reasons}


def hints(recipe) -> list[str]:
    """The recipe settings that most often leave a fine-tune at its baseline."""
    lr = recipe.learning_rate
    t, m = recipe.train, recipe.method
    out = [f"learning rate {lr:g} (train.learning_rate)"
           + (": far below the usual 1e-5 to 1e-3, so the weights barely move" if lr < 1e-6 else
              ": too high can diverge, too low barely moves the weights; try 3x either way")]
    length = f"train.max_steps {t.max_steps}" if t.max_steps else f"train.epochs {t.epochs}"
    out.append(f"training length ({length}): too short to learn the task? train longer")
    out += m.hints()
    if recipe.model_kind.name == kinds.REWARD:
        out.append("a reward model near chance: more pairs or steps, and compare it with the longer-response "
                   "baseline in the report (a model that learned length alone sits near it)")
    elif recipe.model_kind.name == kinds.CLASSIFIER:
        out.append("one predicted class usually means imbalanced labels or a head that did not train: "
                   "try data.balance: class_weights and check the head is trainable")
    else:
        out.append(f"eval.max_new_tokens {recipe.eval.max_new_tokens}: long enough for a whole answer?")
    return out

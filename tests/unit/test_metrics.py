import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from tuneforge.evaluate.metrics import (
    classification_intervals,
    classification_metrics,
    generation_metrics,
    majority_baseline,
)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    probs = rng.dirichlet(np.ones(3), size=200)
    probs[np.arange(200), y] += 0.5  # some signal
    probs /= probs.sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["recall_macro"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["pr_auc"] == pytest.approx(average_precision_score(np.eye(3)[y], probs, average="macro"))
    intervals = classification_intervals(y, probs, ["a", "b", "c"])
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "pr_auc"):
        assert intervals[key][0] <= m[key] <= intervals[key][1], key
    assert np.array(m["confusion_matrix"]["matrix"]).sum() == 200
    assert sum(c["support"] for c in m["per_class"].values()) == 200


def test_majority_baseline_and_single_class_auc():
    m = majority_baseline([0, 1, 1, 1], [0, 1, 1, 0], ["neg", "pos"])
    assert m["majority_label"] == "pos" and m["accuracy"] == 0.5 and m["roc_auc"] == 0.5
    assert classification_metrics([1, 1], np.array([[0.2, 0.8], [0.9, 0.1]]), ["n", "p"])["roc_auc"] is None


def test_generation_metrics():
    m = generation_metrics(["2001-05-05", " the cat sat "], ["2001-05-05", "the cat sat on the mat"])
    assert m["exact_match"] == 0.5
    assert 0.5 < m["rouge_l"] < 1.0

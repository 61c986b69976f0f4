"""Likely label errors: out-of-fold predictions of a quick model.

TF-IDF (word 1-2-grams + character 2-4-grams, so it works without a word
tokenizer for the language) + logistic regression, 5-fold `cross_val_predict`:
every row is scored by a model that never saw it. A row's score is
1 - p(given label); the highest scores are the likeliest mislabels.
"""

from __future__ import annotations

import numpy as np


class LabelIssues:
    """fit(texts, labels) -> `scores_` (1 - out-of-fold p(given label)), `predicted_`
    (the model's out-of-fold label), `ranking_` (row indices, most suspicious first)."""

    def __init__(self, folds: int = 5, seed: int = 0, max_features: int = 50_000):
        self.folds, self.seed, self.max_features = folds, seed, max_features

    def fit(self, texts: list[str], labels: list[str]) -> "LabelIssues":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline, make_union

        classes = sorted(set(labels))
        self.labels_ = list(labels)
        self.classes_ = classes
        y = np.array([classes.index(lab) for lab in labels])
        counts = np.bincount(y, minlength=len(classes))
        folds = int(min(self.folds, counts.min())) if len(classes) > 1 else 0
        if folds < 2:
            # Too few rows of some class for cross-validation: nothing can be said.
            self.scores_ = np.zeros(len(texts))
            self.predicted_ = list(labels)
            self.ranking_ = np.arange(len(texts))
            self.folds_used_ = 0
            return self
        features = make_union(
            TfidfVectorizer(ngram_range=(1, 2), min_df=1, max_features=self.max_features, sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), max_features=self.max_features, sublinear_tf=True),
        )
        model = make_pipeline(features, LogisticRegression(max_iter=1000, C=4.0))
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
        proba = cross_val_predict(model, list(texts), y, cv=cv, method="predict_proba")
        self.proba_ = proba
        self.scores_ = 1.0 - proba[np.arange(len(y)), y]
        self.predicted_ = [classes[i] for i in proba.argmax(axis=1)]
        self.ranking_ = np.argsort(-self.scores_, kind="stable")
        self.folds_used_ = folds
        return self

    def flagged(self, min_score: float = 0.5, limit: int = 50) -> list[int]:
        """Rows the model confidently disagrees with (score > min_score, so another
        label is likelier than the given one), most suspicious first."""
        return [int(i) for i in self.ranking_[:limit] if self.scores_[i] > min_score]

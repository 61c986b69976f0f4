"""Model kinds: what a trained model *is*, apart from the objective that trained it.

A model kind decides how a model loads (its transformers auto class), how an
adapter is declared to peft, what its baseline is, how it is served and which
metrics its evaluation computes. Export, serve, eval and fairness branch on the
model kind only; objectives (tuneforge.objectives) say which kind they train.

The kind of a model folder is read from its config (`architectures`,
`models.model_kind`), so a folder trained by an objective this process does
not know still exports, serves and evaluates by what it is. A leaf module:
it imports nothing from tuneforge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CAUSAL_LM, CLASSIFIER, REWARD = "causal_lm", "classifier", "reward"


@dataclass(frozen=True)
class ModelKind:
    name: str
    auto_class: str  # the transformers auto class that loads it
    architecture_suffix: str  # how its config's `architectures` entries end
    peft_task_type: str  # peft's task_type for adapters on it
    baseline: str  # what a fine-tune of it is compared with
    route: str  # the tuneforge serve route for it
    headline: str  # the metric the report and model card lead with
    default_objective: str  # the objective a bare model folder of this kind is evaluated as

    def auto(self):
        """The transformers auto class (imported on first use: transformers is heavy)."""
        import transformers

        return getattr(transformers, self.auto_class)


MODEL_KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind(CAUSAL_LM, "AutoModelForCausalLM", "ForCausalLM", "CAUSAL_LM", "base model",
              "/v1/chat/completions", "exact_match", "sft"),
    ModelKind(CLASSIFIER, "AutoModelForSequenceClassification", "ForSequenceClassification", "SEQ_CLS",
              "majority class", "/v1/classify", "accuracy", "classification"),
    # A scalar head (num_labels 1) scoring a prompt + response: the Bradley-Terry reward model.
    ModelKind(REWARD, "AutoModelForSequenceClassification", "ForSequenceClassification", "SEQ_CLS",
              "chance", "/v1/rewards", "pairwise_accuracy", "reward"),
)}


def get(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise ValueError(f"unknown model kind '{name}'; known: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[name]


def kind_of_architectures(architectures: Optional[list[str]], num_labels: Optional[int] = None) -> Optional[ModelKind]:
    """The kind whose architecture suffix one of `architectures` ends with, or None.
    A sequence classifier with one output (`num_labels` 1) is a reward model."""
    for kind in MODEL_KINDS.values():
        if any(a.endswith(kind.architecture_suffix) for a in architectures or []):
            if kind.name == CLASSIFIER and num_labels == 1:
                return MODEL_KINDS[REWARD]
            return kind
    return None


def kind_of_config(config: dict) -> Optional[ModelKind]:
    """The kind of a model from its config.json contents, or None."""
    labels = config.get("id2label")
    return kind_of_architectures(config.get("architectures"), len(labels) if isinstance(labels, dict) else None)

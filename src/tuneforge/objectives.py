"""The objectives table: `recipe.task` -> the trainer that runs it and what it declares.

An objective is one trainer module plus one entry here. It declares the model
kind it trains (tuneforge.kinds: how the result loads, exports, serves and is
evaluated), the data kinds it accepts (tuneforge.data.formats), its default
`train.metric_for_best` and the metrics its validation pass computes (the
choices for `metric_for_best`; by default every validation metric of its model
kind in tuneforge.evaluate.registry).

A trainer is `train(recipe, output=None, resume=False, device=None, quiet=False) -> metrics`,
named by its module (imported on first use, so `tuneforge --help` stays light)
or given as a callable; `register()` adds an objective from outside the package
(a plug-in, or a test).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

from tuneforge import kinds


@dataclass(frozen=True)
class Objective:
    name: str  # the recipe's `task:`
    trainer: Union[str, Callable]  # a module with train(), or train itself
    model_kind: str  # a tuneforge.kinds name
    data_kinds: tuple[str, ...]  # the data kinds it accepts, the first preferred when detection is ambiguous
    default_metric: str  # train.metric_for_best when the recipe leaves it unset
    description: str
    metrics: Optional[tuple[str, ...]] = None  # metric_for_best choices; None: its model kind's validation metrics
    # Prepared rows of its data kinds -> the rows its model kind is evaluated on
    # (a classifier: text + label), for `tuneforge eval` and audits; None: as they are.
    to_rows: Optional[Callable[[list[dict]], list[dict]]] = None

    @property
    def kind(self) -> kinds.ModelKind:
        return kinds.get(self.model_kind)

    def rows(self, rows: list[dict]) -> list[dict]:
        """`rows` as the model kind's evaluation reads them (see `to_rows`)."""
        return self.to_rows(rows) if self.to_rows is not None else rows

    def train_function(self) -> Callable:
        if callable(self.trainer):
            return self.trainer
        return importlib.import_module(self.trainer).train


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("classification", "tuneforge.trainers.classification", kinds.CLASSIFIER, ("classification", "pair"),
              "f1_macro", "text (or text-pair) classification: an encoder with a classification head"),
    Objective("sft", "tuneforge.trainers.sft", kinds.CAUSAL_LM, ("prompt_response", "chat", "text"),
              "loss", "supervised fine-tuning of a causal LM on prompt/response pairs or chats; "
              "continued pre-training on raw text"),
    Objective("reward", "tuneforge.trainers.reward", kinds.REWARD, ("preference",), "pairwise_accuracy",
              "a reward model: a scalar head trained on preference pairs (Bradley-Terry)"),
    # checkpoint selection by loss, as TRL: held-out reward accuracy saturates at 1.0 and ties keep the first
    Objective("dpo", "tuneforge.trainers.dpo", kinds.CAUSAL_LM, ("preference",), "loss",
              "direct preference optimisation and its kin (ipo, hinge, simpo, orpo) on preference pairs",
              metrics=("loss", "reward_accuracy", "reward_margin")),
    Objective("grpo", "tuneforge.trainers.grpo", kinds.CAUSAL_LM, ("prompt_response", "chat"), "mean_reward",
              "group relative policy optimisation: online RL on sampled completions scored by reward functions",
              metrics=("mean_reward", "exact_match")),
)}


def register(objective: Objective) -> Objective:
    """Add (or replace) an objective; its model kind must be a known one."""
    kinds.get(objective.model_kind)
    OBJECTIVES[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def find(name: Optional[str]) -> Optional[Objective]:
    """The objective called `name`, or None (an unknown name or none)."""
    return OBJECTIVES.get(name) if name is not None else None

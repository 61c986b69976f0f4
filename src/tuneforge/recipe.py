"""The recipe: one typed YAML document that drives a whole run.

Kept free of torch/transformers imports so that validating a recipe (and
`tuneforge --help`) stays fast.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from tuneforge import catalog, kinds, objectives, safeyaml
from tuneforge.methods import METHODS, lora
from tuneforge.section import MAX_RANK, Section  # noqa: F401  (MAX_RANK: the bound on method.r)

DATA_FORMATS = ("auto", "csv", "tsv", "json", "jsonl", "parquet")


# Upper bounds: far above any sensible setting, low enough that a typo (an
# extra few zeros) is refused here instead of allocating or looping for ever.
MAX_STEPS = 100_000_000
MAX_TOKENS = 1_048_576  # train.max_length; the model's own limit is checked before loading (preflight)
MAX_BATCH = 65_536
MAX_ROWS = 1_000_000_000
MAX_GENERATE = 100_000_000
MAX_SCHEMA_NODES = 10_000


class CleanConfig(Section):
    nfkc: bool = Field(True, description="Unicode NFKC normalisation (full-width forms, ligatures, compatibility "
                                         "characters).")
    whitespace: bool = Field(
        True, description="Collapse runs of spaces/tabs, strip line ends, squeeze 3+ newlines to 2, trim the text.")
    strip_html: bool = Field(False, description="Remove HTML tags and unescape entities (&amp; -> &).")
    urls: Literal["keep", "remove", "mask"] = Field(
        "keep", description="URLs: keep them, remove them, or replace them with <URL>.")
    lowercase: bool = Field(False, description="Lower-case every text (off by default: case carries meaning).")
    min_chars: Optional[int] = Field(
        None, ge=1, le=MAX_ROWS, description="Drop rows whose (cleaned) text is shorter than this many characters.")
    max_chars: Optional[int] = Field(
        None, ge=1, le=MAX_ROWS, description="Drop rows whose (cleaned) text is longer than this many characters.")


class PiiConfig(Section):
    email: Literal["keep", "remove", "mask"] = Field(
        "keep", description="E-mail addresses: keep, remove, or mask as <EMAIL>.")
    phone: Literal["keep", "remove", "mask"] = Field(
        "keep", description="Phone numbers (9-15 digits, not dates): keep, remove, or mask as <PHONE>.")
    card: Literal["keep", "remove", "mask"] = Field(
        "keep", description="Payment card numbers (13-19 digits passing the Luhn check): keep, remove, or mask as "
                            "<CARD>.")
    ip: Literal["keep", "remove", "mask"] = Field(
        "keep", description="IPv4 addresses (every octet <= 255): keep, remove, or mask as <IP>.")


class NearDupConfig(Section):
    enabled: bool = Field(
        False, description="Remove near-duplicates (MinHash LSH) inside each split, and training rows that "
        "near-duplicate a validation/test row (contamination). `data inspect` reports them either way.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity at or above which two rows "
                                                          "are near-duplicates.")
    shingle: Literal["char", "word"] = Field(
        "char", description="Shingles: character n-grams (language-agnostic, robust on short texts) or word n-grams.")
    ngram: int = Field(5, ge=1, le=32, description="Shingle length (characters or words).")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: finer estimates, slower).")


class AugmentConfig(Section):
    counterfactual: bool = Field(
        False, description="Add a demographic-term-swapped copy of every training row that contains a listed term "
        "(label unchanged; copies never enter validation/test).")
    lexicons: Optional[list[str]] = Field(
        None, description="Which term lists to swap with (e.g. [gender]); default: every list loaded.")
    extra_terms: list[str] = Field(
        default_factory=list, description="Extra term-list YAML files, added to the lists shipped with tuneforge.")


class DataConfig(Section):
    train: str = Field(description="Training data file (CSV, TSV, JSON, JSONL or Parquet).")
    validation: Optional[str] = Field(
        None, description="Validation file; carved out of train (15%, stratified) when missing."
    )
    test: Optional[str] = Field(
        None, description="Held-out test file; carved out of train (15%, stratified) when missing."
    )
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' picks it from the file extension."
    )
    columns: Optional[list[str]] = Field(
        None, description="Column names for CSV/TSV files without a header line."
    )
    text_column: str = Field("text", description="Classification: column holding the input text.")
    label_column: str = Field("label", description="Classification: column holding the label.")
    labels: Optional[list[Union[str, int]]] = Field(
        None, description="Classification: the allowed labels; rows with others are rejected. "
        "Default: the labels seen in the training file.",
    )
    prompt_column: str = Field("prompt", description="SFT: column holding the prompt (input).")
    response_column: str = Field("response", description="SFT: column holding the response (output).")
    prompt_template: Optional[str] = Field(
        None, description="SFT: build the prompt from several columns, e.g. "
        "'{instruction}\\n\\n{input}' for Alpaca-shaped data. Overrides prompt_column.",
    )
    messages_column: Optional[str] = Field(
        None, description="SFT: column holding chat messages [{role, content}, ...]; "
        "when set, prompt/response columns are not used.",
    )
    system_prompt: Optional[str] = Field(
        None, description="SFT: system message put before every prompt/response pair."
    )
    split: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/validation/test fractions used when splits are carved out of train."
    )
    dedup: bool = Field(True, description="Drop exact duplicates before splitting so no example sits in two splits.")
    keep_columns: list[str] = Field(
        default_factory=list, description="Extra columns carried through with every example (e.g. a demographic "
        "group column for fairness audits and reweighing). A row missing one is malformed.",
    )
    max_rows: Optional[int] = Field(
        None, ge=1, le=MAX_ROWS,
        description="Use a seeded random subset of at most this many training rows (quick runs)."
    )
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="Malformed rows: 'error' stops before training and lists them all; "
        "'skip' drops them and writes rejects.jsonl.",
    )
    kind: Literal["auto", "classification", "pair", "prompt_response", "chat", "text", "preference"] = Field(
        "auto", description="Data shape: classification (text + label), pair (text + text_pair + label), "
        "prompt_response (incl. Alpaca instruction/input/output), chat (OpenAI messages or ShareGPT conversations), "
        "text (raw text for continued pre-training, chunked into max_length blocks), preference "
        "(prompt/chosen/rejected or HH-RLHF transcripts). 'auto' detects it from the columns and says so.",
    )
    text_pair_column: str = Field("text_pair", description="Pair classification: column holding the second text.")
    chosen_column: str = Field("chosen", description="Preference data: column holding the preferred response.")
    rejected_column: str = Field("rejected", description="Preference data: column holding the rejected response.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Text cleaning applied to every split.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Personal data: what to do with each kind.")
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig, description="Near-duplicate and contamination "
                                                                               "removal.")
    balance: Literal["none", "class_weights", "oversample", "undersample"] = Field(
        "none", description="Classification, train split only: class_weights sets a per-row loss weight n/(k*n_c); "
        "oversample repeats minority rows, undersample drops majority rows (seeded) until classes are equal.",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training-data augmentation.")
    review_decisions: Optional[str] = Field(
        None, description="Decisions JSON written by `tuneforge data review apply` (keep/drop/relabel by file:line); "
        "applied right after loading.",
    )
    cache: bool = Field(True, description="Reuse prepared data when inputs and settings are unchanged "
                        "(content-hash key; under TUNEFORGE_HOME/prepared).")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v):
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(v)}")
        return v

    @field_validator("train", "validation", "test", "review_decisions")
    @classmethod
    def _file_exists(cls, v, info: ValidationInfo):
        from tuneforge.data.load import path_problem

        check = (info.context or {}).get("check_files", True)
        problem = path_problem(v) if check and v is not None else None
        if problem is not None:
            raise ValueError(f"data file not found: {v}" if problem == "not found" else f"data file {v} {problem}")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template_has_fields(cls, v):
        if v is not None and not re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", v):
            raise ValueError("prompt_template must name at least one column as {column}")
        return v


def method_union():
    """The type of `recipe.method`: the union of every method's Config, told apart by `name`."""
    configs = tuple(module.Config for module in METHODS.values())
    return Annotated[Union[configs], Field(discriminator="name")]


MethodConfig = method_union()  # every method's section; methods.METHODS[name].Config is one


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How the processes of `train --nproc N` (or torchrun) share the work. ddp: every "
        "process holds the whole model and gradients are summed once per step; fsdp: weights, gradients and "
        "optimizer state are sharded across processes (PyTorch FSDP2, the ZeRO-3 layout), each holding 1/N; "
        "deepspeed: DeepSpeed ZeRO as deepspeed_config says (pip install 'tuneforge[deepspeed]').",
    )
    deepspeed_config: Optional[str] = Field(
        None, description="deepspeed: a DeepSpeed JSON config, passed through (zero_optimization: stage 1-3, "
        "offload, buckets, communication). tuneforge sets micro-batch, accumulation and clipping from train:, "
        "and the recipe's optimizer and schedule are used, so the file has no optimizer/scheduler/fp16/bf16.",
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each layer's gathered weights after its forward and gather them again for "
        "backward (least memory, ZeRO-3); false keeps them until backward (less traffic, ZeRO-2-like memory).",
    )
    cpu_offload: bool = Field(
        False, description="fsdp on GPUs: keep sharded weights, gradients and optimizer state in CPU memory "
        "(ZeRO-Offload-like): slower steps, larger models fit.",
    )

    @model_validator(mode="after")
    def _deepspeed_needs_config(self):
        if (self.strategy == "deepspeed") != (self.deepspeed_config is not None):
            raise ValueError("strategy deepspeed and deepspeed_config go together: set both (a DeepSpeed JSON "
                             "with zero_optimization) or neither")
        return self


class TrainConfig(Section):
    epochs: float = Field(3.0, gt=0, le=100_000, description="Passes over the training data (fractions allowed).")
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="Stop after this many optimizer steps "
                                                                           "(overrides epochs).")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Examples per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    learning_rate: Optional[float] = Field(
        None, gt=0, le=10, description="Peak learning rate. Default by method: 5e-5 for full/freeze; "
        "lora/qlora 5e-4 for classification, 2e-4 for sft."
    )
    warmup: float = Field(
        0.06, ge=0, le=MAX_STEPS, description="Warm-up: a fraction of total steps if < 1, else a number of steps."
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    optimizer: Literal["adamw", "sgd", "rmsprop"] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, le=100, description="Decoupled weight decay (AdamW) or L2 (SGD/RMSprop).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    max_length: int = Field(256, ge=8, le=MAX_TOKENS, description="Truncate every example to this many tokens "
                            "(at most the model's position embeddings).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data order, splits, initialisation and dropout.")
    dropout: Optional[float] = Field(
        None, ge=0, lt=1, description="Override the model's hidden/attention dropout probability."
    )
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, le=MAX_STEPS, description="Stop after this many evaluations without improvement of metric_for_best."
    )
    metric_for_best: Optional[str] = Field(
        None, description="Validation metric for early stopping and best checkpoint. "
        "Default: f1_macro (classification), loss (sft).",
    )
    eval_every: Optional[int] = Field(
        None, ge=1, le=MAX_STEPS, description="Evaluate on validation every N optimizer steps. Default: at each epoch "
                                              "end."
    )
    checkpoint_every: Optional[int] = Field(
        None, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N optimizer steps. Default: at each "
                                              "evaluation."
    )
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Resumable checkpoints kept on disk (the best one is "
                                                                "kept apart).")
    log_every: int = Field(10, ge=1, le=MAX_STEPS, description="Write a metrics.jsonl line every N optimizer steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute layer activations in the backward pass: far less memory, ~30% more compute."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together to waste less compute on padding."
    )
    eval_batch_size: Optional[int] = Field(None, ge=1, le=MAX_BATCH, description="Batch size for evaluation. Default: "
                                                                                 "2 x batch_size.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="Attention kernel passed to from_pretrained: auto (transformers' default, SDPA where the "
        "model supports it), sdpa, flash_attention_2 (needs a CUDA GPU and the flash-attn package), or eager.")
    liger: bool = Field(
        False, description="Swap in Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) before training; needs a CUDA GPU "
        "and `pip install 'tuneforge[gpu]'`. tuneforge's SFT loss runs the decoder body and the output head "
        "itself (head on supervised tokens only), so Liger's fused linear cross-entropy, which replaces the "
        "model's forward, is not used.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process training (used only with more than one process).")


def count_nodes(value: Any, limit: int) -> int:
    """Keys and values in a nested dict/list, counting stops just past `limit`
    (so a structure that shares one list a billion times costs `limit` steps)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            count += len(node)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return count


class ScorerConfig(Section):
    name: str = Field(description="Metric name in the results, e.g. 'valid_json'.")
    regex: Optional[str] = Field(None, description="Score 1 when the whole generation matches this regex.")
    json_schema: Optional[dict] = Field(
        None, description="Score 1 when the generation is JSON valid under this schema."
    )
    function: Optional[str] = Field(
        None, description="'module:function' called as f(prediction, reference) -> float|bool.")

    @field_validator("json_schema")
    @classmethod
    def _schema_is_bounded(cls, v):
        if v is not None and count_nodes(v, MAX_SCHEMA_NODES) > MAX_SCHEMA_NODES:
            raise ValueError(f"json_schema has more than {MAX_SCHEMA_NODES:,} keys and values; a scorer's schema "
                             "is a few dozen")
        return v

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("regex", "json_schema", "function") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a scorer takes exactly one of regex, json_schema, function (got {given or 'none'})")
        return self


class EvalConfig(Section):
    baseline: bool = Field(True, description="Also score the baseline (majority class / untouched base model).")
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS, description="SFT: greedy generation length for exact match "
                                                                     "and ROUGE-L.")
    max_generate: Optional[int] = Field(
        None, ge=1, le=MAX_GENERATE, description="SFT: score generations on at most this many test examples (all by "
                                                 "default)."
    )
    validation_generate: int = Field(
        0, ge=0, le=MAX_GENERATE, description="SFT: also generate on this many validation examples at each evaluation "
        "(adds exact_match/rouge_l to validation metrics; 0 = loss only).",
    )
    scorers: list[ScorerConfig] = Field(default_factory=list, description="SFT: extra scorers of generations.")
    bootstrap: bool = Field(True, description="Report 95% bootstrap intervals and a paired test against the baseline.")
    robustness: bool = Field(
        False, description="Also score the test split under the perturbation suite (typos, casing, ...).")
    label_words: Optional[dict[str, str]] = Field(
        None, description="Zero-shot classification with a causal LM: the word that names each label, "
        "e.g. {'0': negative, '1': positive}. Default: the labels themselves.",
    )
    zero_shot_instruction: str = Field(
        "Classify the following text.", description="Zero-shot classification: the instruction before each text.")
    reference_text: Optional[str] = Field(
        None, description="SFT forgetting check: perplexity of base and fine-tuned model on this general text "
        "file. Default: a short general-English text shipped with tuneforge.",
    )


class FairnessThresholds(Section):
    demographic_parity_difference: Optional[float] = Field(
        None, ge=0, le=1, description="Fail the audit when selection rates of two groups differ by more than this.")
    demographic_parity_ratio_min: Optional[float] = Field(
        None, ge=0, le=1, description="Fail when the lowest group selection rate / the highest is below this "
        "(0.8 = the four-fifths rule).")
    equalized_odds_difference: Optional[float] = Field(
        None, ge=0, le=1, description="Fail when true or false positive rates of two groups differ by more than this.")
    equal_opportunity_difference: Optional[float] = Field(
        None, ge=0, le=1, description="Fail when true positive rates of two groups differ by more than this.")
    counterfactual_flip_rate: Optional[float] = Field(
        None, ge=0, le=1, description="Fail when more than this share of predictions flip when demographic "
        "terms are swapped.")


class AlignmentConfig(Section):
    """Settings of the preference objectives (task reward, dpo)."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo (squared loss on length-normalised log-ratios), hinge "
        "(SLiC), simpo (reference-free, length-normalised, target margin gamma), orpo (reference-free odds ratio "
        "plus the chosen NLL).")
    beta: float = Field(0.1, gt=0, le=100, description="dpo: the KL strength (the implicit reward is beta * "
                                                        "log-ratio); ipo's tau; simpo/orpo's scale.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo sigmoid/simpo: the assumed share of "
                                                                   "flipped preference labels (conservative DPO).")
    gamma: float = Field(0.5, ge=0, le=100, description="simpo: the target reward margin.")
    sft_weight: float = Field(0.0, ge=0, le=100, description="dpo: weight of the chosen response's NLL mixed into "
                                                              "the loss (orpo has its own).")
    center_coefficient: float = Field(
        0.01, ge=0, le=100, description="reward: weight of the centring term mean((r_chosen + r_rejected)^2), "
        "which keeps scores near 0.")
    rewards: list[str] = Field(
        default_factory=lambda: ["exact_match"], description="grpo: what scores a sampled completion, summed: "
        "'exact_match' (1 when it equals the reference answer, whitespace-normalised), 'format' (partial credit: "
        "1 - normalised edit distance to the reference, so a group is rarely all-zero), the name of an "
        "eval.scorers entry (regex, json_schema, module:function), or 'reward_model' (the reward run named by "
        "reward_model).")
    group_size: int = Field(4, ge=2, le=256, description="grpo: completions sampled per prompt; advantages are "
                                                         "normalised within each group.")
    temperature: float = Field(1.0, gt=0, le=10, description="grpo: sampling temperature of the completions.")
    max_completion_tokens: int = Field(32, ge=1, le=MAX_TOKENS, description="grpo: tokens sampled per completion.")
    clip_epsilon: float = Field(0.2, gt=0, le=10, description="grpo: the PPO clip range of the probability ratio.")
    kl_coefficient: float = Field(
        0.0, ge=0, le=100, description="grpo: weight of the k3 KL penalty to the reference (the model before "
        "training: an adapter method's base with the adapter off). 0, as current practice, needs no reference.")
    grpo_loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="grpo: how per-token losses are averaged: dapo (over all tokens of the batch), grpo "
        "(per sequence, then over sequences), bnpo, dr_grpo (over max_completion_tokens).")
    scale_rewards: bool = Field(True, description="grpo: divide advantages by their group's standard deviation.")


class FairnessConfig(Section):
    groups: list[str] = Field(
        default_factory=list, description="Group columns for audits and mitigations (also list them in "
        "data.keep_columns). Empty: groups are detected from the text with the first of `lexicons`.")
    lexicons: list[str] = Field(
        default_factory=lambda: ["gender"], description="Term lists for counterfactual probes and augmentation, "
        "and for detecting groups from text when `groups` is empty.")
    lexicon_files: list[str] = Field(
        default_factory=list, description="Extra term-list YAML files (same shape as templates/terms/gender.yaml).")
    audit: bool = Field(
        False, description="Audit the test split by group at the end of training even without mitigations "
        "(on whenever `groups` or a mitigation is set).")
    positive_label: Optional[str] = Field(
        None, description="The label selection rate / TPR / FPR are about. Default: the second label in id "
        "order; multi-class tasks use it one-vs-rest.")
    thresholds: FairnessThresholds = Field(
        default_factory=FairnessThresholds, description="The release gate: `tuneforge audit` exits 4 when one is "
                                                        "crossed.")
    min_group_share: float = Field(
        0.10, ge=0, le=1, description="Warn before training when a group has less than this share of the rows.")
    min_group_rows: int = Field(30, ge=0, le=MAX_ROWS, description="Warn before training when a group has fewer rows "
                                                                   "than this.")
    bootstrap: int = Field(1000, ge=0, le=1_000_000, description="Bootstrap resamples for the intervals (0: none).")
    reweighing: bool = Field(
        False, description="Mitigation: weight each training row by P(group)P(label)/P(group, label).")
    counterfactual_augmentation: bool = Field(
        False, description="Mitigation: add a term-swapped copy of each training row that mentions a group term.")
    postprocess: Literal["none", "equalized_odds", "equal_opportunity"] = Field(
        "none", description="Mitigation: group-specific thresholds (Fairlearn ThresholdOptimizer) fitted on "
        "validation, saved as model/fairness_postprocess.json and applied at inference.")
    inprocessing: Literal["none", "eo_penalty", "dp_penalty"] = Field(
        "none", description="Mitigation: add a penalty on gaps in mean positive-class probability between groups "
        "in each batch: per true label (eo_penalty) or overall (dp_penalty).")
    penalty_weight: float = Field(1.0, ge=0, le=1e6, description="Weight of the in-processing penalty in the loss.")

    @property
    def active(self) -> bool:
        return bool(self.groups or self.audit or self.reweighing or self.counterfactual_augmentation
                    or self.postprocess != "none" or self.inprocessing != "none")


def run_name_problem(name: str) -> Optional[str]:
    """None when `name` can be a run folder's name (one path component under the
    output root); else why not, with a hint."""
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if not name.strip() or bad or name.startswith(".") or len(name) > 200:
        shown = ", ".join(repr(c) for c in bad) or ("a leading dot" if name.startswith(".") else "its length")
        return (f"run name {name!r} must be one folder name ({shown} not allowed: no '/', '\\', '..', NUL, "
                "leading dot, at most 200 characters), e.g. name: my-run; choose where runs go with --output")
    return None


def default_run_name(stem: str) -> str:
    """A recipe file's stem made a valid run name (`.hidden.yaml` -> `hidden`)."""
    name = stem.lstrip(".").replace("\0", "")
    return name if name and run_name_problem(name) is None else "run"


class Recipe(Section):
    name: Optional[str] = Field(None, description="Run name; default: the recipe file name.")
    model: str = Field(description="A catalogue name (see `tuneforge models`), a local HF folder, or a hub id.")
    task: str = Field(description="The objective (tuneforge.objectives): classification (a classifier head, "
                                  "usually on an encoder) or sft (a causal LM: supervised fine-tuning, or continued "
                                  "pre-training on raw text).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train; auto picks CUDA when "
                                                                              "present.")
    data: DataConfig = Field(description="Where the data is and how its columns map to the task.")
    method: MethodConfig = Field(
        default_factory=lora.Config, description="How the model is adapted: method.name picks one of "
        "tuneforge.methods.METHODS (full, freeze, lora, dora, ia3, qlora) and the other keys are that method's.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    fairness: FairnessConfig = Field(
        default_factory=FairnessConfig, description="Bias audit by group, the release gate, and mitigations.")
    alignment: AlignmentConfig = Field(
        default_factory=AlignmentConfig, description="Preference objectives (reward, dpo): losses and their "
                                                     "settings.")
    reward_model: Optional[str] = Field(
        None, description="A reward run (or exported reward model folder) that judges generations: the win rate "
                          "of a policy against its starting model; later the reward of grpo and ppo.")

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, v):
        problem = run_name_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v):
        problem = catalog.check_model_reference(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("task")
    @classmethod
    def _task_fits_model(cls, v, info: ValidationInfo):
        # A field validator (not a model validator) so this is reported together
        # with every other problem rather than only once the rest is valid.
        objective = objectives.find(v)
        if objective is None:
            close = difflib.get_close_matches(v, list(objectives.OBJECTIVES), n=1)
            raise ValueError(f"unknown task '{v}'" + (f". Did you mean '{close[0]}'?" if close else "")
                             + f" Known tasks: {', '.join(objectives.OBJECTIVES)}")
        spec = catalog.CATALOG.get(info.data.get("model", ""))
        if spec is not None and objective.model_kind not in spec.kinds:
            suits = [o.name for o in objectives.OBJECTIVES.values() if o.model_kind in spec.kinds]
            raise ValueError(
                f"model '{spec.name}' is a {spec.architecture} and does not suit task '{v}', which trains a "
                f"{objective.model_kind} (it suits: {', '.join(suits)})"
            )
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _lora_by_default(cls, v):
        if isinstance(v, dict) and "name" not in v:
            return {"name": lora.NAME, **v}
        return v

    @field_validator("method")
    @classmethod
    def _method_fits_model_kind(cls, v, info: ValidationInfo):
        objective = objectives.find(info.data.get("task"))
        module = METHODS[v.name]
        if objective is not None and objective.model_kind not in module.MODEL_KINDS:
            fits = [n for n, m in METHODS.items() if objective.model_kind in m.MODEL_KINDS]
            raise ValueError(f"method {v.name} trains a {' or '.join(module.MODEL_KINDS)}, and task "
                             f"{objective.name} trains a {objective.model_kind}; use one of: {', '.join(fits)}")
        return v

    @field_validator("train")
    @classmethod
    def _known_metric_for_best(cls, v, info: ValidationInfo):
        from tuneforge.evaluate.registry import check_metric_for_best  # a leaf module: no cycle

        problem = check_metric_for_best(v.metric_for_best, info.data.get("task"))
        if problem:
            raise ValueError(problem)
        return v

    @property
    def objective(self) -> objectives.Objective:
        return objectives.get(self.task)

    @property
    def model_kind(self) -> kinds.ModelKind:
        """What the trained model is (tuneforge.kinds): how it loads, exports, serves and is evaluated."""
        return self.objective.kind

    @property
    def learning_rate(self) -> float:
        """train.learning_rate, else the default of this method and model kind
        (the method module's DEFAULT_LEARNING_RATES), so switching method.name keeps a rate that learns."""
        if self.train.learning_rate is not None:
            return self.train.learning_rate
        return METHODS[self.method.name].DEFAULT_LEARNING_RATES[self.model_kind.name]

    @property
    def metric_for_best(self) -> str:
        return self.train.metric_for_best or self.objective.default_metric


# --------------------------------------------------------------------------- errors


class RecipeError(Exception):
    """Every problem with a recipe, each with its key path and a hint."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s) in the recipe:"]
        lines += [f"  - {path}: {msg}" for path, msg in self.problems]
        return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names allowed at the parent of `loc` (for 'did you mean' hints)."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def register_method(module) -> None:
    """Add (or replace) an adaptation method: a module with the roles listed in
    tuneforge.methods. Rebuilds `Recipe.method` so recipes can name it."""
    METHODS[module.NAME] = module
    rebuild_method_union()


def rebuild_method_union() -> None:
    """Rebuild `Recipe.method` from tuneforge.methods.METHODS (after it changed)."""
    global MethodConfig
    MethodConfig = method_union()
    field = Recipe.model_fields["method"]
    Recipe.model_fields["method"] = FieldInfo.merge_field_infos(field, annotation=MethodConfig)
    Recipe.model_rebuild(force=True)


def _explain_method(loc: tuple, err: dict) -> Optional[tuple[str, str]]:
    """Errors inside `method:`, whose location carries the union tag (method.full.r -> method.r)."""
    if err["type"] == "union_tag_invalid":
        got = str((err.get("ctx") or {}).get("tag", err.get("input")))
        close = difflib.get_close_matches(got, list(METHODS), n=1)
        return "method.name", (f"unknown method {got!r}." + (f" Did you mean '{close[0]}'?" if close else "")
                               + f" Methods: {', '.join(METHODS)}.")
    if len(loc) < 3 or loc[1] not in METHODS:
        return None
    name, key, path = loc[1], str(loc[2]), ".".join(str(p) for p in (loc[0], *loc[2:]))
    if err["type"] == "extra_forbidden":
        takers = [n for n, m in METHODS.items() if key in m.Config.model_fields]
        allowed = [k for k in METHODS[name].Config.model_fields if k != "name"]
        hint = (f" It is a key of {', '.join(takers)}: set method.name to one of them, or remove it." if takers
                else f" Method {name} takes: {', '.join(allowed) or 'nothing but name'}.")
        return path, f"method {name} takes no '{key}'.{hint}"
    return path, _explain({**err, "loc": (loc[0], *loc[2:])})[1]


def _explain(err: dict) -> tuple[str, str]:
    loc = tuple(err["loc"])
    if loc and loc[0] == "method" and (explained := _explain_method(loc, err)) is not None:
        return explained
    path = ".".join(str(p) for p in loc) or "(root)"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Allowed keys: {', '.join(allowed)}."
        return path, f"unknown key.{hint}"
    if kind == "missing":
        return path, "required key is missing."
    if kind == "literal_error":
        return path, f"{err['msg']} (got {err.get('input')!r})."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return path, f"{msg}."


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`train.epochs=2` -> ("train.epochs", 2); values parse as YAML scalars."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise RecipeError("command line", [(item, "override must look like KEY=VALUE, e.g. train.epochs=2.")])
        try:
            value = safeyaml.load(raw, f"override {key}") if raw != "" else None
        except safeyaml.YamlError as exc:
            raise RecipeError("command line", [(item, f"{exc.reason}.")]) from None
        parsed.append((key, value))
    return parsed


_PATH_KEYS = ("train", "validation", "test", "review_decisions")


_PATHS = [("data", key) for key in _PATH_KEYS] + [
    ("eval", "reference_text"), ("fairness", "lexicon_files"), ("data", "augment", "extra_terms"),
    ("train", "distributed", "deepspeed_config")]


def _absolute_path(value: str, base: Path) -> str:
    try:
        return str((base / value).resolve())
    except (RuntimeError, OSError):  # a symlink loop: the data-file check says so
        return os.path.abspath(base / value)


def _resolve_paths(raw: dict, base: Path) -> None:
    def resolved(value):
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return _absolute_path(value, base)
        return value

    for *parents, key in _PATHS:
        node = raw
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, list):  # a list of files (fairness.lexicon_files)
            node[key] = [resolved(v) for v in value]
        elif value is not None:
            node[key] = resolved(value)


def _switch_method(raw: dict, overrides: list[tuple[str, Any]]) -> None:
    """An override that changes method.name (`method.name=full` on a LoRA recipe) drops the
    recipe's method keys the new method does not take, and says so; keys set by
    overrides too are kept (and refused if the new method does not take them)."""
    new = dict(overrides).get("method.name")
    section = raw.get("method")
    if not isinstance(section, dict) or new not in METHODS or section.get("name", lora.NAME) == new:
        return
    given = {k.split(".", 1)[1] for k, _ in overrides if k.startswith("method.")}
    fields = METHODS[new].Config.model_fields
    dropped = [k for k in section if k not in fields and k not in given]
    for key in dropped:
        del section[key]
    if dropped:
        print(f"note: method.name={new}: the recipe's {', '.join('method.' + k for k in dropped)} "
              f"(not {new} settings) are left out", file=sys.stderr)


def load_recipe(source: Union[str, Path, dict], overrides: Optional[list[str]] = None,
                check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError listing every problem.

    Relative data paths in a recipe file resolve against the file's folder (so a
    recipe works from any working directory); paths given as command-line
    overrides resolve against the current directory, as a shell user expects.
    `check_files=False` skips the data-file existence check (files made later).
    """
    if isinstance(source, dict):
        raw, label, base = copy.deepcopy(source), "recipe", Path.cwd()  # the caller's dict stays as it was
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise RecipeError(label, [("(file)", f"recipe file not found: {path}.")])
        try:
            raw = safeyaml.load_file(path)
        except safeyaml.YamlError as exc:
            where = f"{path}:{exc.line}" if exc.line else str(path)
            raise RecipeError(label, [(where, f"{exc.reason}.")]) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipeError(label, [("(root)", "a recipe must be a YAML mapping of sections.")])
        base = path.parent
    _resolve_paths(raw, base)
    parsed = parse_overrides(overrides or [])
    _switch_method(raw, parsed)
    for key, value in parsed:
        if tuple(key.split(".")) in _PATHS and isinstance(value, str):
            value = _absolute_path(value, Path.cwd())
        _set_dotted(raw, key, value)
    try:
        recipe = Recipe.model_validate(raw, context={"check_files": check_files})
    except ValidationError as exc:
        raise RecipeError(label, [_explain(e) for e in exc.errors()]) from None
    if recipe.name is None and not isinstance(source, dict):
        recipe.name = default_run_name(Path(source).stem)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (no anchors: `load_recipe` reads it back)."""
    return safeyaml.dump(recipe.model_dump(mode="json"))

"""Load a model and tokenizer for a task, and pick the device."""

from __future__ import annotations

from typing import Optional

import torch

from tuneforge import catalog

# ChatML with the tokenizer's own EOS closing each turn, for tokenizers that ship
# no chat template (base models). Pinned into the run so inference matches.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto.")
    return torch.device(preference)


def set_dropout(config, p: float) -> None:
    """Set every dropout probability the config knows about (names differ per architecture)."""
    for key in list(config.to_dict()):
        if key.endswith("dropout") or key.endswith("dropout_prob"):
            setattr(config, key, p)


def quiet_transformers() -> None:
    """Our own progress bar is the one to watch; silence per-shard bars and
    deprecation chatter from inside the libraries."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(ref: str, labels: list[str], dropout: Optional[float] = None):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    path = catalog.resolve(ref)
    config = AutoConfig.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}, problem_type="single_label_classification",
    )
    if dropout is not None:
        set_dropout(config, dropout)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def load_causal_lm(ref: str, dropout: Optional[float] = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    path = catalog.resolve(ref)
    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        set_dropout(config, dropout)
    # float32 master weights; on CUDA the loop autocasts to bf16.
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

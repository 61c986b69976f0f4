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


def unwrap(model):
    """The transformers model itself, looking through a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_classifier(ref: str, labels: list[str], dropout: Optional[float] = None, quantize_4bit: bool = False,
                    attn_implementation: str = "auto"):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if quantize_4bit:  # the recipe rejects qlora for classification; this is for library callers
        raise ValueError("4-bit loading (qlora) is for causal LMs; train a classifier with lora instead")
    quiet_transformers()
    options = pretrained_options(False, attn_implementation)
    path = catalog.resolve(ref)
    config = AutoConfig.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}, problem_type="single_label_classification",
    )
    if dropout is not None:
        set_dropout(config, dropout)
    model = load_pretrained(AutoModelForSequenceClassification, path, options, config=config)
    tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def pretrained_options(quantize_4bit: bool = False, attn_implementation: str = "auto") -> dict:
    """Keyword arguments for from_pretrained. float32 master weights by default (on
    CUDA the loop autocasts to bf16); `quantize_4bit` loads the base in 4-bit NF4
    for qlora (checked before anything loads). `attn_implementation` 'auto' leaves
    transformers' own choice (SDPA where the model supports it)."""
    from tuneforge import gpu

    options: dict = {"dtype": torch.float32}
    if attn_implementation == "flash_attention_2":
        gpu.require("attn_implementation flash_attention_2", "flash_attn",
                    install="pip install flash-attn --no-build-isolation (or use sdpa)")
    if attn_implementation != "auto":
        options["attn_implementation"] = attn_implementation
    if quantize_4bit:
        from tuneforge.methods import qlora

        options.update(qlora.load_options())
    return options


def load_pretrained(auto_class, path: str, options: dict, **kwargs):
    """`auto_class.from_pretrained` with pretrained_options(...)."""
    model = auto_class.from_pretrained(path, **options, **kwargs)
    # FlashAttention needs bf16 inputs, and float32 weights outside the training
    # loop's autocast would hand it float32 ones (4-bit models compute in bf16 already).
    if options.get("attn_implementation") == "flash_attention_2" and options["dtype"] == torch.float32:
        from tuneforge import gpu

        gpu.autocast_attention(model)
    return model


def load_options(recipe) -> dict:
    """The recipe's loading settings as load_causal_lm / load_classifier keywords."""
    return {"quantize_4bit": recipe.method.name == "qlora", "attn_implementation": recipe.train.attn_implementation}


def load_causal_lm(ref: str, dropout: Optional[float] = None, quantize_4bit: bool = False,
                   attn_implementation: str = "auto"):
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    options = pretrained_options(quantize_4bit, attn_implementation)  # fails before any download or load
    path = catalog.resolve(ref)
    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        set_dropout(config, dropout)
    model = load_pretrained(AutoModelForCausalLM, path, options, config=config)
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

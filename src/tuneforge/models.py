"""Load a model and tokenizer for a task, and pick the device.

Every model and adapter in tuneforge loads through `load_pretrained` and
`load_adapter` here: safetensors only (a folder with only pickle weights is
refused before anything is unpickled, with how to convert it), and remote code
is never trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from tuneforge import catalog, kinds

SAFE_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")
SAFE_ADAPTER_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# ChatML with the tokenizer's own EOS closing each turn, for tokenizers that ship
# no chat template (base models). Pinned into the run so inference matches.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
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

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unwrap(model):
    """The transformers model itself, looking through a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_classifier(ref: str, labels: list[str], dropout: Optional[float] = None, quantize_4bit: bool = False,
                    attn_implementation: str = "auto"):
    from transformers import AutoModelForSequenceClassification

    if quantize_4bit:  # the recipe rejects qlora for classification; this is for library callers
        raise ValueError("4-bit loading (qlora) is for causal LMs; train a classifier with lora instead")
    quiet_transformers()
    options = pretrained_options(False, attn_implementation)
    path = catalog.resolve(ref)
    config = load_config(
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
        options.update(gpu.nf4_options())
    return options


class PickleWeightsRefused(FileNotFoundError):
    """A model or adapter folder has pickle weights and no safetensors: refused
    (unpickling can run code). A FileNotFoundError: the safetensors file is missing."""


def _convert_hint(folder: Path, pickle_name: str, safe_name: str) -> str:
    return (f"{folder}: {pickle_name} is a pickle, and tuneforge loads safetensors only (unpickling can run code). "
            f"If you trust the file, convert it once: python -c \"import torch; from safetensors.torch import "
            f"save_file; sd = torch.load('{folder / pickle_name}', weights_only=True); "
            f"save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, '{folder / safe_name}', "
            f"metadata={{'format': 'pt'}})\"")


def check_safetensors(folder: Path, safe_names: tuple[str, ...]) -> None:
    """Raise PickleWeightsRefused when local `folder` has pickle weights but none
    of `safe_names`; a folder with neither is left to the loader's own error."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    config = folder / "config.json"
    named = json.loads(config.read_text()).get("transformers_weights") if config.is_file() else None
    if named and not str(named).endswith((".safetensors", ".safetensors.index.json")):
        # transformers reads a file named here before it looks at use_safetensors
        raise PickleWeightsRefused(_convert_hint(folder, str(named), "model.safetensors") +
                                   " and remove transformers_weights from config.json")
    if any((folder / name).is_file() for name in safe_names):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        more = (f"; the same for each of its {len(pickles)} pickle shards, and rename the .bin index to "
                "model.safetensors.index.json with .safetensors names") if len(pickles) > 1 else ""
        raise PickleWeightsRefused(_convert_hint(folder, pickles[0], Path(pickles[0]).stem + ".safetensors"
                                                 if len(pickles) > 1 else safe_names[0]) + more)


def load_config(path: str, **kwargs):
    """AutoConfig.from_pretrained, never trusting remote code."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False, **kwargs)


def model_kind(model_path: str) -> kinds.ModelKind:
    """The kind of the model at `model_path`, from its config; ValueError when it is none of them."""
    config = load_config(model_path)
    archs = config.architectures or []
    kind = kinds.kind_of_architectures(archs, config.num_labels)
    if kind is None:
        raise ValueError(f"{model_path}: cannot tell the model kind from architectures {archs}; "
                         "is it a fine-tuned model?")
    return kind


def load_pretrained(auto_class, path: str, options: Optional[dict] = None, **kwargs):
    """`auto_class.from_pretrained` with pretrained_options(...) (or plain keywords):
    safetensors only, remote code never trusted. Hub ids go to transformers with
    use_safetensors=True (it refuses a repository without safetensors)."""
    options = options or {}
    check_safetensors(Path(path), SAFE_MODEL_FILES)
    try:
        model = auto_class.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **options, **kwargs)
    except OSError as exc:
        if Path(path).is_dir() or "cannot be loaded with `safetensors`" not in str(exc):
            raise
        raise PickleWeightsRefused(f"{path}: the hub repository has no safetensors weights, and tuneforge loads "
                                   "safetensors only (unpickling can run code); pick a repository that has "
                                   "model.safetensors, or download it and convert it once where you trust "
                                   "it") from None
    # FlashAttention needs bf16 inputs, and float32 weights outside the training
    # loop's autocast would hand it float32 ones (4-bit models compute in bf16 already).
    if options.get("attn_implementation") == "flash_attention_2" and options["dtype"] == torch.float32:
        from tuneforge import gpu

        gpu.autocast_attention(model)
    return model


def adapter_folder(ref: str) -> Path:
    """The local folder of a peft adapter (a hub id is fetched, safetensors only),
    checked: adapter_config.json and adapter_model.safetensors, never a pickle."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        if not catalog.looks_like_hub_id(ref):
            raise FileNotFoundError(f"adapter {ref}: no such folder")
        from huggingface_hub import snapshot_download

        # Only these two files are fetched: peft would fall back to adapter_model.bin.
        folder = Path(snapshot_download(ref, allow_patterns=["adapter_config.json", SAFE_ADAPTER_FILE]))
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {ref}: no adapter_config.json in {folder}; is it a peft (LoRA) adapter "
                                "folder?")
    check_safetensors(folder, (SAFE_ADAPTER_FILE,))
    if not (folder / SAFE_ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"adapter {ref}: no {SAFE_ADAPTER_FILE} in {folder}")
    return folder


def load_adapter(model, ref: str, adapter_name: str = "default", merge: bool = False):
    """Put the LoRA adapter `ref` (folder or hub id) on `model` (a plain model, or a
    peft model that gets one more named adapter); safetensors only. Returns the
    peft model, or with `merge` the plain model with the adapter merged in."""
    from peft import PeftModel

    folder = adapter_folder(ref)
    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=adapter_name)
    else:
        model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
    return model.merge_and_unload() if merge else model


def load_options(recipe) -> dict:
    """The recipe's loading settings as load_causal_lm / load_classifier keywords."""
    return {"quantize_4bit": False, **recipe.method.load_options(),
            "attn_implementation": recipe.train.attn_implementation}


def load_causal_lm(ref: str, dropout: Optional[float] = None, quantize_4bit: bool = False,
                   attn_implementation: str = "auto"):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    options = pretrained_options(quantize_4bit, attn_implementation)  # fails before any download or load
    path = catalog.resolve(ref)
    config = load_config(path)
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

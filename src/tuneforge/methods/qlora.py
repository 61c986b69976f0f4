"""QLoRA: LoRA adapters trained over a base model quantised to 4-bit NF4 by
bitsandbytes (double quantisation, bf16 compute). Needs a CUDA GPU and
`pip install 'tuneforge[gpu]'`; without them it stops before anything loads.

Loading: the base is quantised while it loads, so the full-precision weights
never sit on the GPU: `models.load_causal_lm(ref, quantize_4bit=True)` passes
`load_options()` to from_pretrained. `prepare` readies the 4-bit model for
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

from tuneforge import gpu
from tuneforge.methods import lora
from tuneforge.recipe import MethodConfig

FEATURE = "method qlora (a 4-bit bitsandbytes base model)"


def _compute_dtype():
    import torch

    # bf16 where the GPU has it (Ampere and later), else fp16 as in the QLoRA paper's older-GPU setting.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_available(device=None) -> None:
    gpu.require(FEATURE, "bitsandbytes", device)


def load_options() -> dict:
    """from_pretrained keywords that quantise the base to 4-bit NF4 on the current GPU."""
    check_available()
    import torch
    from transformers import BitsAndBytesConfig

    dtype = _compute_dtype()
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
        # The weights that stay unquantised (norms, embeddings, head) load in the
        # compute dtype; prepare() upcasts them to float32 for training.
        "dtype": dtype,
        "device_map": {"": torch.cuda.current_device()},
    }


def prepare(model, cfg: MethodConfig, task: str):
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
    return lora.prepare(model, cfg, task)


def save(model, tokenizer, folder: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    base_path = model.peft_config[model.active_adapter].base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base.config.pad_token_id = model.config.pad_token_id
    merged = PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload()
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return merged.to(device, dtype=_compute_dtype())
    return merged

"""GPU-only training features: the checks that stop a run early with a clear
reason (before any run folder or model exists), and Liger kernels.

torch is imported inside the functions: cli.py imports GpuUnavailable from here,
and `tuneforge --help` must not import torch.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

INSTALL_HINT = "pip install 'tuneforge[gpu]'"
QLORA_FEATURE = "method qlora (a 4-bit bitsandbytes base model)"


class GpuUnavailable(RuntimeError):
    """The recipe asks for a feature that this machine or environment cannot give."""


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_problem(feature: str, device=None) -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return (f"{feature} needs a CUDA GPU, and torch sees none (torch {torch.__version__}, {build}). "
                "Train on a machine with an NVIDIA GPU and a CUDA build of torch")
    if device is not None and getattr(device, "type", str(device)) != "cuda":
        return f"{feature} needs a CUDA GPU, but this run trains on '{device}'. Set device: cuda (or auto)"
    return None


def _package_problem(feature: str, module: str, install: str = INSTALL_HINT) -> Optional[str]:
    if _has_module(module):
        return None
    return f"{feature} needs the '{module}' package, which is not installed. Install it with: {install}"


def problems(recipe, device=None) -> list[str]:
    """Every GPU-only feature of `recipe` that cannot run here, each with its reason and remedy."""
    found = []
    if recipe.method.name == "qlora":
        found += [_cuda_problem(QLORA_FEATURE, device), _package_problem(QLORA_FEATURE, "bitsandbytes")]
    if recipe.train.liger:
        feature = "train.liger (Liger Triton kernels)"
        found += [_cuda_problem(feature, device), _package_problem(feature, "liger_kernel")]
    if recipe.train.attn_implementation == "flash_attention_2":
        feature = "train.attn_implementation flash_attention_2"
        found += [_cuda_problem(feature, device),
                  _package_problem(feature, "flash_attn", "pip install flash-attn --no-build-isolation "
                                   "(or use attn_implementation: sdpa, which needs nothing extra)")]
    return [p for p in found if p]


def check_recipe(recipe, device=None) -> None:
    """Raise GpuUnavailable listing every GPU-only feature of the recipe that cannot run here."""
    found = problems(recipe, device)
    if found:
        raise GpuUnavailable("this recipe cannot train here:\n" + "\n".join(f"  - {p}." for p in found))


def require(feature: str, module: Optional[str] = None, device=None, install: str = INSTALL_HINT) -> None:
    """For library callers that skip check_recipe: CUDA (and `module`) or a clear GpuUnavailable."""
    found = [_cuda_problem(feature, device), _package_problem(feature, module, install) if module else None]
    found = [p for p in found if p]
    if found:
        raise GpuUnavailable(". ".join(found) + ".")


def compute_dtype():
    """bf16 where the GPU has it (Ampere and later), else fp16 as in the QLoRA paper's older-GPU setting."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def nf4_options() -> dict:
    """from_pretrained keywords that quantise the base to 4-bit NF4 on the current GPU
    (bitsandbytes, double quantisation, compute in compute_dtype()); for qlora."""
    require(QLORA_FEATURE, "bitsandbytes")
    import torch
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype()
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
        # The weights that stay unquantised (norms, embeddings, head) load in the
        # compute dtype; qlora.prepare() upcasts them to float32 for training.
        "dtype": dtype,
        "device_map": {"": torch.cuda.current_device()},
    }


def autocast_attention(model, dtype=None) -> int:
    """Run every attention block (`*.self_attn`) under bf16 autocast, its output
    cast back to the residual stream's dtype; returns the number of blocks.

    FlashAttention takes only fp16/bf16 inputs. Training autocasts anyway, but
    tuneforge keeps float32 weights and scores and generates without autocast,
    where transformers would hand FlashAttention float32 tensors and fail; with
    this the attention always gets bf16 and the rest of the model is unchanged."""
    import torch

    dtype = dtype or torch.bfloat16
    blocks = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not blocks:
        raise ValueError(f"attn_implementation flash_attention_2 with float32 weights: no attention blocks named "
                         f"'self_attn' in {type(model).__name__} to run in bf16; use attn_implementation: sdpa")
    for block in blocks:
        block.forward = _autocast_forward(block.forward, dtype)
    return len(blocks)


def _autocast_forward(forward, dtype):
    import functools

    import torch

    @functools.wraps(forward)
    def run(*args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.autocast(hidden.device.type, dtype=dtype):
            out = forward(*args, **kwargs)
        if isinstance(out, tuple):  # (attention output, attention weights or None)
            return (out[0].to(hidden.dtype), *out[1:])
        return out.to(hidden.dtype)

    return run


# Only the per-layer kernels: tuneforge computes the loss from the decoder body and
# the head itself (inference.sequence_nll), so a fused linear cross-entropy that
# replaces model.forward would never run, and generation must keep the plain forward.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def apply_liger(model) -> str:
    """Patch a loaded transformers model (not yet wrapped by peft) with Liger's
    RMSNorm, SwiGLU and RoPE kernels; returns the model type patched.

    Liger patches the modelling module as well as this instance (RoPE is a module
    function), so every model of that architecture built later in this process
    uses the kernels too: fine for a training process, worth knowing in tests."""
    require("train.liger (Liger Triton kernels)", "liger_kernel")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        # Liger itself only logs and carries on; a recipe that asked for it should know.
        raise ValueError(
            f"train.liger: Liger has no kernels for model type '{model_type}' (it covers: "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}). Set train.liger: false for this model.")
    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
    return model_type

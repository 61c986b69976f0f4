"""Layer freezing: embeddings and lower layers frozen; the top `trainable_layers`
transformer layers and everything above them (pooler, final norm, head) train.

With tied input/output embeddings (most small decoders) the output head *is* the
embedding matrix, so it stays frozen with the embeddings.
"""

from __future__ import annotations

import torch

from tuneforge.methods.full import save  # noqa: F401  (same on-disk result as full fine-tuning)
from tuneforge.recipe import MethodConfig

_LAYER_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")


def transformer_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList with a usual name."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in _LAYER_LIST_NAMES:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}; use method 'lora' or 'full'")
    return best


def _embedding_params(model: torch.nn.Module, layers_prefix: str) -> set[int]:
    """Every embedding table, plus the rest of the embeddings block (BERT's
    position/type embeddings and their LayerNorm) when that block sits apart
    from the layer stack (in Llama its parent is the whole decoder: not frozen)."""
    frozen = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    table = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is table), "")
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    if parent and not layers_prefix.startswith(parent + "."):
        frozen |= {id(p) for n, p in model.named_parameters() if n.startswith(parent + ".")}
    return frozen


def prepare(model, cfg: MethodConfig, task: str):
    prefix, layers = transformer_layers(model)
    n = len(layers)
    if cfg.trainable_layers > n:
        raise ValueError(f"method.trainable_layers={cfg.trainable_layers} but the model has only {n} layers")
    first_trainable = n - cfg.trainable_layers
    embeddings = _embedding_params(model, prefix)
    for name, param in model.named_parameters():
        if id(param) in embeddings:
            train = False
        elif name.startswith(prefix + "."):
            index = int(name[len(prefix) + 1:].split(".")[0])
            train = index >= first_trainable
        else:
            train = True  # pooler, final norm, task head
        param.requires_grad_(train)
    return model

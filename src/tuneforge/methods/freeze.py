"""Layer freezing: embeddings and lower layers frozen; the top `trainable_layers`
transformer layers and everything above them (pooler, final norm, head) train.

With tied input/output embeddings (most small decoders) the output head *is* the
embedding matrix, so it stays frozen with the embeddings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD, ModelKind
from tuneforge.methods.full import save  # noqa: F401  (same on-disk result as full fine-tuning)
from tuneforge.section import MethodSection

if TYPE_CHECKING:
    import torch

NAME = "freeze"
ADAPTER = False
MODEL_KINDS = (CLASSIFIER, CAUSAL_LM, REWARD)
DEFAULT_LEARNING_RATES = {CLASSIFIER: 5e-5, CAUSAL_LM: 5e-5, REWARD: 1e-5}
WEIGHT_BYTES = 4.0
_LAYER_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")


class Config(MethodSection):
    name: Literal["freeze"] = Field(NAME, description="freeze: train only the top layers and the head.")
    trainable_layers: int = Field(
        2, ge=0, le=10_000, description="Number of top transformer layers left trainable (the head always trains).")

    def describe(self) -> str:
        return f"freeze (top {self.trainable_layers} layers)"

    def hints(self) -> list[str]:
        return [f"method freeze trains only the top {self.trainable_layers} layer(s) and the head: "
                "raise method.trainable_layers, or use method.name: full"]


def transformer_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList with a usual name."""
    import torch

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
    import torch

    frozen = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    table = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is table), "")
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    if parent and not layers_prefix.startswith(parent + "."):
        frozen |= {id(p) for n, p in model.named_parameters() if n.startswith(parent + ".")}
    return frozen


def prepare(model, cfg: Config, kind: ModelKind):
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


def trainable_parameters(model, cfg: Config, kind: ModelKind) -> int:
    """What prepare leaves trainable (works on a meta-device model)."""
    prepare(model, cfg, kind)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Useful matmul FLOPs of LoRA SFT on a decoder LM: the work training needs.

The first estimate of the bench (kept as `legacy_flops_per_token` so the change
stays visible) credited 4N per token for every token, N the whole parameter count,
plus 12 * layers * d_model * (mean row length) for attention. That over-counts
twice: the LM head (tied to the embedding here) is only needed at supervised
positions, and the embedding lookup is no matmul at all; and attention work grows
with the square of each example's length, so the mean length under-counts the
long examples, which hold most of the tokens.

The count used now, per forward and backward pass over examples of lengths
n_i with t_i supervised positions each (T = sum n_i, S = sum t_i):

    frozen decoder linears  4 * N_body * T        forward 2, input gradient 2
    LoRA adapters           6 * N_lora * T        forward 2, input and weight gradients 2 + 2
    LM head                 4 * V * d * S         forward 2, input gradient 2 (frozen, no weight gradient)
    attention               6 * L * d_attn * sum n_i (n_i + 1)
                            (QK^T and PV, 2 * d_attn FLOPs per query-key pair each, forward
                            once and backward twice, over the n(n+1)/2 causal pairs of each example)

Norms, activations and softmax are element-wise (not matmul FLOPs) and left out,
as is the input gradient the first layer would not need (under 1/L of the body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DecoderDims:
    layers: int
    d_model: int
    d_attn: int  # heads * head_dim: the width of the QK^T and PV products
    vocab: int
    body_linear_params: int  # weights of the decoder layers' linear projections
    lora_params: int
    total_params: int  # everything, embeddings and norms included (the legacy N)


def decoder_dims(config, lora_r: int, total_params: int) -> DecoderDims:
    """Llama-style decoder (q, k, v, o, gate, up, down) with LoRA on all of its linears."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]
    body = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(lora_r * (i + o) for i, o in shapes)
    return DecoderDims(layers, d, q, config.vocab_size, body, lora, total_params)


def sft_flops(dims: DecoderDims, lengths: Sequence[int], targets: Sequence[int]) -> dict:
    """Useful FLOPs of one pass over the examples, by term, and per token."""
    tokens, supervised = sum(lengths), sum(targets)
    terms = {
        "body": 4 * dims.body_linear_params * tokens,
        "lora": 6 * dims.lora_params * tokens,
        "lm_head": 4 * dims.vocab * dims.d_model * supervised,
        "attention": 6 * dims.layers * dims.d_attn * sum(n * (n + 1) for n in lengths),
    }
    total = sum(terms.values())
    return {"total": total, "per_token": total / tokens, "terms": terms, "tokens": tokens,
            "supervised_tokens": supervised}


def legacy_flops_per_token(dims: DecoderDims, tokens: int, rows: int) -> float:
    """The bench's first estimate: 4N for every token plus attention at the mean length."""
    return 4 * dims.total_params + 12 * dims.layers * dims.d_model * tokens / rows

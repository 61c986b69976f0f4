"""The model-side compute of one micro-batch: class probabilities, and a
token-by-token decode loop over left-padded prompts with a KV cache.

The decode loop is our own rather than `model.generate` because each row of a
batch keeps its own temperature, top_p, seed, stop strings and token budget,
streams its text as it goes, and can be dropped when its client disconnects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tuneforge.inference import encode, predict_proba, supports_packed_classification
from tuneforge.training.batching import attention_mask, pad

# Texts per forward pass inside one micro-batch. BERT-style classifiers run
# padding-free (inference.packed_class_logits), so the whole micro-batch is one
# pass; padded models go in small length-sorted chunks, which pad least
# (minilm-l6, SST-2 texts, 2 cores, float32: 226 texts/s in chunks of 8 against
# 173 in one chunk of 32).
CLASSIFY_CHUNK = 8


_TOKENIZE = threading.Lock()


def tokenize(served, texts: list[str]) -> list[list[int]]:
    """Token ids per text, cut to the model's context, as the classifier reads them.
    Called from request threads: the lock keeps two first calls from setting the
    fast tokenizer's truncation at once ("Already borrowed")."""
    with _TOKENIZE:
        return encode(served.tokenizer, texts, served.context)


def classify(served, ids: list[list[int]], device) -> list[list[float]]:
    """Class probabilities per text (its token ids from `tokenize`)."""
    chunk = max(len(ids), 1) if supports_packed_classification(served.model) else CLASSIFY_CHUNK
    return predict_proba(served.model, ids, served.tokenizer.pad_token_id, chunk, device).tolist()


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string (not safe to stream yet)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class GenRow:
    """One sequence to generate (a choice of a request)."""

    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    stops: list[str]
    emit: Callable[[str, Optional[str]], None]  # (new text, finish reason or None)
    cancelled: Callable[[], bool]
    generator: Optional[torch.Generator] = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    finish: Optional[str] = None

    def pick(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        # In float64, shifted by the max: a tiny temperature (5e-324 is valid JSON)
        # underflows to 0 in float32 and makes 0/0 = NaN; here it is plain greedy.
        logits = logits.double()
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            # keep the smallest head whose mass reaches top_p (always at least one token)
            drop = ordered.cumsum(-1) - ordered >= self.top_p
            ordered[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int, tokenizer, eos: set[int]) -> None:
        """Take one token; stream what is safe, or finish."""
        if token in eos:
            return self._close("stop", self._text(tokenizer))
        self.tokens.append(token)
        text = self._text(tokenizer)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._close("stop", text[:cut])
        if len(self.tokens) >= self.max_new:
            return self._close("length", text)
        safe = len(text) - _held_back(text, self.stops)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # half a multi-byte character
            safe -= 1
        if safe > self.sent:
            self.emit(text[self.sent:safe], None)
            self.sent = safe

    def _text(self, tokenizer) -> str:
        return tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _close(self, reason: str, text: str) -> None:
        self.finish = reason
        self.emit(text[self.sent:], reason)
        self.sent = len(text)


def eos_ids(served) -> set[int]:
    ids = served.model.generation_config.eos_token_id if served.model.generation_config else None
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if served.tokenizer.eos_token_id is not None:
        found.add(served.tokenizer.eos_token_id)
    return found


@torch.no_grad()
def generate(served, rows: list[GenRow], device) -> None:
    """Decode all rows together until each has finished or been cancelled."""
    model, tokenizer = served.model, served.tokenizer
    eos = eos_ids(served)
    prompts = [r.prompt for r in rows]
    ids = pad(prompts, tokenizer.pad_token_id, left=True).to(device)
    mask = attention_mask(prompts, left=True).to(device)
    # Left padding: positions count real tokens only, as in training.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # logits_to_keep=1: only the last position is projected onto the vocabulary
    # (32 prompts x 500 tokens x 49k vocabulary would be 3 GB of logits).
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    for _ in range(max(r.max_new for r in rows)):
        # Sampling happens on the CPU, where the per-row seeded generators live.
        logits = out.logits[:, -1].float().cpu()
        chosen = []
        for i, row in enumerate(rows):
            if row.finish is None and row.cancelled():
                row.finish = "cancelled"
            if row.finish is None:
                token = row.pick(logits[i])
                row.push(token, tokenizer, eos)
                chosen.append(token)
            else:
                chosen.append(tokenizer.pad_token_id)
        if all(r.finish is not None for r in rows):
            return
        step = torch.tensor(chosen, device=device)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        # Finished rows ride along until the longest row ends; their positions are
        # clamped to the context so that models with learned position tables
        # (GPT-2 style) do not index past it. Live rows never reach the clamp:
        # each row's budget is capped by its room in the context.
        positions = (positions[:, -1:] + 1).clamp(max=served.context - 1)
        out = model(input_ids=step, attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    for row in rows:  # token budgets are capped by max_new, so only a safety net
        if row.finish is None:
            row._close("length", row._text(tokenizer))

"""Render SFT examples exactly as the model sees them: chat template applied,
loss only on assistant tokens (and the EOS that closes them, so generation stops).

Spans are found in *characters* by rendering conversation prefixes, then mapped
onto the tokens of the full rendering via offsets, so the token ids are exactly
those of tokenising the whole text at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IGNORE = -100


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_target(self) -> int:
        # Positions the loss scores: the first token has no context and is never predicted.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def to_messages(fields: dict, system_prompt: Optional[str]) -> list[dict]:
    if "messages" in fields:
        return fields["messages"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": fields["prompt"]},
                       {"role": "assistant", "content": fields["response"]}]


def _chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans that carry loss."""
    text = _chat(tokenizer, messages, False)
    eos = tokenizer.eos_token
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _chat(tokenizer, messages[:i], True)
        through = _chat(tokenizer, messages[: i + 1], False)
        if not (through.startswith(prefix) and text.startswith(through)):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently, so assistant turns "
                "cannot be located; use prompt/response data or a simpler template"
            )
        delta = through[len(prefix):]
        end = len(prefix) + delta.rindex(eos) + len(eos) if eos and eos in delta else len(through)
        spans.append((len(prefix), end))
    # A template that does not close the last turn with EOS would never teach the
    # model to stop: append EOS and train it.
    if eos and spans and not text[spans[-1][0]:spans[-1][1]].endswith(eos):
        text = text[: spans[-1][1]] + eos + text[spans[-1][1]:]
        spans[-1] = (spans[-1][0], spans[-1][1] + len(eos))
    return text, spans


def render(tokenizer, messages: list[dict], max_length: int) -> Rendered:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(tok if inside else IGNORE)
    truncated = len(ids) > max_length
    return Rendered(ids[:max_length], labels[:max_length], truncated)


def prompt_and_reference(fields: dict, system_prompt: Optional[str]) -> tuple[list[dict], str]:
    """For generation: the conversation up to the last assistant turn, and that turn."""
    messages = to_messages(fields, system_prompt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = _chat(tokenizer, messages, True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

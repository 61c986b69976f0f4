"""Preference pairs as a causal LM or a reward model sees them.

A pair row is {prompt, chosen, rejected} (tuneforge.data.fields reads it,
splitting HH-RLHF transcripts). The prompt becomes a conversation (an HH
transcript's Human/Assistant turns become user/assistant messages; any other
prompt is one user message), each response its final assistant turn, and both
are rendered with the model's chat template by tuneforge.data.render with the
loss (and the log-probability that preference objectives score) on that final
turn only. A pair too long for max_length keeps the end of its prompt: the
responses are what the objective compares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from tuneforge.data.fields import HH_ASSISTANT, HH_HUMAN
from tuneforge.data.render import IGNORE, Rendered, assistant_spans

_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class RenderedPair:
    chosen: Rendered
    rejected: Rendered
    prompt_messages: list[dict]  # the conversation before the responses (for generation)


def prompt_messages(prompt: str, system_prompt: Optional[str] = None) -> list[dict]:
    """The conversation a prompt stands for, ending with the user's turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt
    if HH_HUMAN in text and text.rstrip().endswith(HH_ASSISTANT.strip()):
        parts = _TURN.split(text)[1:]  # [role, content, role, content, ...]
        turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                 for role, content in zip(parts[0::2], parts[1::2])]
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]  # the open "Assistant:" the response completes
        if turns and turns[-1]["role"] == "user":
            return messages + turns
    return messages + [{"role": "user", "content": prompt.strip()}]


def render_final_turn(tokenizer, messages: list[dict], max_length: int) -> Rendered:
    """`messages` rendered with labels on the last assistant turn only; when it is
    too long, the start of the conversation is cut (never the final turn, unless
    the turn alone is longer than max_length, when its end is cut)."""
    text, spans = assistant_spans(tokenizer, messages)
    start, end = spans[-1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if e > s and start <= s < end else IGNORE for tok, (s, e) in zip(ids, offsets)]
    if len(ids) <= max_length:
        return Rendered(ids, labels, False)
    first_target = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
    keep_from = min(len(ids) - max_length, first_target - 1) if first_target > 0 else 0
    keep_from = max(keep_from, 0)
    return Rendered(ids[keep_from:keep_from + max_length], labels[keep_from:keep_from + max_length], True)


def render_pair(tokenizer, row: dict, max_length: int, system_prompt: Optional[str] = None) -> RenderedPair:
    conversation = prompt_messages(row["prompt"], system_prompt)

    def side(response: str) -> Rendered:
        return render_final_turn(tokenizer, conversation + [{"role": "assistant", "content": response}], max_length)

    return RenderedPair(side(row["chosen"]), side(row["rejected"]), conversation)


def log_pair_losses(log, name: str, total: int, truncated: int, kept: int, max_length: int) -> None:
    """Say how many of `total` pairs were truncated, and how many dropped for want of a response token."""
    if log is not None and truncated:
        log(f"[yellow]{name}: {truncated} of {total} pairs truncated at max_length={max_length} "
            "(the start of the prompt is cut first)")
    if log is not None and kept < total:
        log(f"[yellow]{name}: {total - kept} pairs dropped: no response token left")


def render_kept(tokenizer, rows: list[dict], max_length: int, system_prompt: Optional[str] = None,
                log=None, name: str = "") -> tuple[list[RenderedPair], list[dict]]:
    """Every pair whose two sides keep a response token, with its row; says how many were truncated or dropped."""
    rendered = [render_pair(tokenizer, r, max_length, system_prompt) for r in rows]
    kept = [(p, r) for p, r in zip(rendered, rows) if p.chosen.n_target > 0 and p.rejected.n_target > 0]
    log_pair_losses(log, name, len(rendered), sum(p.chosen.truncated or p.rejected.truncated for p in rendered),
                    len(kept), max_length)
    return [p for p, _ in kept], [r for _, r in kept]


def render_pairs(tokenizer, rows: list[dict], max_length: int, system_prompt: Optional[str] = None,
                 log=None, name: str = "") -> list[RenderedPair]:
    """Every pair whose two sides keep a response token (render_kept without the rows)."""
    return render_kept(tokenizer, rows, max_length, system_prompt, log, name)[0]

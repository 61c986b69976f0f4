"""Pre-flight preview: samples exactly as the model will see them.

SFT rows go through data/render.py (the training code path): chat template
applied, loss on assistant tokens and the EOS that closes them, truncation at
max_length. Each token is shown with the text it covers; loss tokens stand out
from masked ones, EOS is marked, truncation is marked. Checks: the template has
a generation marker (add_generation_prompt changes the rendering), EOS is
trained somewhere, at most 5% of samples are truncated.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass, field
from typing import Optional

from tuneforge.data.render import IGNORE, assistant_spans, render, to_messages

TRUNCATION_WARN = 0.05


@dataclass
class Token:
    id: int
    text: str
    loss: bool
    eos: bool


@dataclass
class Sample:
    index: int
    tokens: list[Token]
    truncated: bool
    n_tokens: int  # before truncation
    label: Optional[str] = None  # classification: the target


@dataclass
class Preview:
    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)
    template: dict = field(default_factory=dict)
    checked: int = 0
    truncated: int = 0
    eos_trained: int = 0


def template_info(tokenizer) -> dict:
    """What pins the template in a run: its text and sha256, and whether it has a
    generation marker."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    probe = [{"role": "user", "content": "x"}]
    with_marker = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    return {"sha256": hashlib.sha256(template.encode()).hexdigest(), "text": template,
            "generation_marker": with_marker[len(without):] if with_marker != without else None,
            "eos_token": tokenizer.eos_token}


def _sft_sample(tokenizer, row: dict, index: int, system_prompt: Optional[str], max_length: int) -> Sample:
    messages = to_messages(row, system_prompt)
    rendered = render(tokenizer, messages, max_length)  # the exact training path
    text, _ = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    pieces = tokenizer.convert_ids_to_tokens(rendered.input_ids)
    tokens = []
    for i, (tok, lab) in enumerate(zip(rendered.input_ids, rendered.labels)):
        s, e = offsets[i]
        shown = text[s:e] if e > s else pieces[i]
        tokens.append(Token(tok, shown, lab != IGNORE, tok == tokenizer.eos_token_id))
    return Sample(index, tokens, rendered.truncated, len(enc["input_ids"]))


def _classification_sample(tokenizer, row: dict, index: int, max_length: int, loss: bool = False) -> Sample:
    """A classification row (no token carries LM loss) or a raw-text row (every token does)."""
    args = ([row["text"]], [row["text_pair"]]) if "text_pair" in row else ([row["text"]],)
    enc = tokenizer(*args)
    ids = enc["input_ids"][0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    tokens = [Token(t, pieces[i], loss, t == tokenizer.eos_token_id) for i, t in enumerate(ids[:max_length])]
    return Sample(index, tokens, len(ids) > max_length, len(ids), label=row.get("label"))


def build_preview(tokenizer, rows: list[dict], kind: str, system_prompt: Optional[str], max_length: int,
                  n: int = 3, check: int = 500) -> Preview:
    """The first `n` rows in full; the checks run over up to `check` rows."""
    if kind == "preference":  # previewed as the chosen side, as the preference objectives render it
        from tuneforge.data.pairs import prompt_messages

        rows = [{"messages": prompt_messages(r["prompt"], system_prompt) + [{"role": "assistant",
                                                                            "content": r["chosen"]}]}
                for r in rows[:max(n, check)]]
        kind = "chat"
    sft = kind in ("chat", "prompt_response")
    if not sft:
        samples = [_classification_sample(tokenizer, r, i, max_length, loss=kind == "text")
                   for i, r in enumerate(rows[:max(n, check)])]
        if kind == "text":  # raw text is cut into max_length blocks (build_block_preview), never truncated
            for sample in samples:
                sample.truncated = False
        truncated = sum(s.truncated for s in samples)
        p = Preview(samples[:n], checked=len(samples), truncated=truncated)
        if samples and truncated / len(samples) > TRUNCATION_WARN:
            p.warnings.append(f"{truncated} of {len(samples)} samples ({truncated / len(samples):.0%}) are longer "
                              f"than max_length={max_length} and will be truncated; raise train.max_length.")
        return p
    info = template_info(tokenizer)
    samples = [_sft_sample(tokenizer, r, i, system_prompt, max_length) for i, r in enumerate(rows[:max(n, check)])]
    truncated = sum(s.truncated for s in samples)
    eos_trained = sum(any(t.eos and t.loss for t in s.tokens) for s in samples)
    p = Preview(samples[:n], template={k: v for k, v in info.items() if k != "text"}, checked=len(samples),
                truncated=truncated, eos_trained=eos_trained)
    if info["generation_marker"] is None:
        p.warnings.append("the chat template has no generation marker: add_generation_prompt=True renders the "
                          "same text, so at inference the model is not told that its turn starts.")
    if samples and eos_trained == 0:
        p.warnings.append(f"EOS ({tokenizer.eos_token!r}) is never trained in {len(samples)} samples: the model "
                          "will not learn to stop. Check the template closes assistant turns, or raise max_length.")
    if samples and truncated / len(samples) > TRUNCATION_WARN:
        p.warnings.append(f"{truncated} of {len(samples)} samples ({truncated / len(samples):.0%}) are truncated "
                          f"at max_length={max_length}; responses lose their ends (and EOS). Raise train.max_length.")
    return p


def build_block_preview(tokenizer, blocks: list[list[int]], n: int = 3) -> Preview:
    """Continued pre-training: the first `n` blocks exactly as the trainer takes
    them (documents joined by EOS, cut at max_length). Every token but a
    block's first is predicted, so carries loss. Warns when no block holds EOS."""
    eos_id = tokenizer.eos_token_id
    samples = []
    for index, ids in enumerate(blocks[:n]):
        tokens, shown = [], ""
        for i, tok in enumerate(ids):
            # Decode growing prefixes: single-token decoding drops the spaces
            # SentencePiece tokens carry.
            text = tokenizer.decode(ids[: i + 1])
            tokens.append(Token(tok, text[len(shown):] if text.startswith(shown) else tokenizer.decode([tok]),
                                i > 0, tok == eos_id))
            shown = text
        samples.append(Sample(index, tokens, False, len(ids)))
    eos_trained = sum(eos_id in b[1:] for b in blocks) if eos_id is not None else 0
    p = Preview(samples, checked=len(blocks), eos_trained=eos_trained)
    if blocks and eos_trained == 0:
        p.warnings.append(f"no block contains EOS ({tokenizer.eos_token!r}): the model never learns where a "
                          "document ends. Use a tokenizer with an EOS token.")
    return p


# -------------------------------------------------------------- rendering


def _visible(text: str) -> str:
    return text.replace("\n", "↵\n")


def to_rich(preview: Preview, max_length: int):
    """A rich Text: loss tokens green on dark, masked tokens dim, EOS reversed,
    a scissors line where truncation cut the sample."""
    from rich.text import Text

    out = Text()
    for s in preview.samples:
        out.append(f"── sample {s.index} · {s.n_tokens} tokens", style="bold")
        out.append(f" · target {s.label!r}\n" if s.label is not None else "\n", style="bold")
        for t in s.tokens:
            if t.eos:
                out.append(f"⟨{t.text.strip() or 'EOS'}⟩", style="reverse bold green" if t.loss else "reverse dim")
            elif t.loss:
                out.append(_visible(t.text), style="bold green underline")
            else:
                out.append(_visible(t.text), style="dim")
        if s.truncated:
            out.append(f"\n✂ truncated at max_length={max_length} ({s.n_tokens - max_length} tokens cut)",
                       style="bold red")
        out.append("\n\n")
    out.append("legend: ", style="bold")
    out.append("trained (loss)", style="bold green underline")
    out.append("  ")
    out.append("masked (no loss)", style="dim")
    out.append("  ")
    out.append("⟨EOS⟩", style="reverse bold green")
    out.append("\n")
    return out


CSS = """.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace;font-size:13px}
.loss{background:#c8f7c5;border-bottom:2px solid #2e7d32}.mask{color:#888}.eos{background:#2e7d32;color:#fff;
padding:0 2px;border-radius:3px}.eos.mask{background:#bbb}.cut{color:#c62828;font-weight:bold}
.sample{border:1px solid #ddd;padding:.6em;margin:.8em 0;border-radius:4px}"""


def to_html(preview: Preview, max_length: int, title: str = "tuneforge data preview") -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}}{CSS}</style>"
             f"</head><body><h1>{html.escape(title)}</h1>"]
    if preview.template:
        parts.append(f"<p>template sha256 <code>{preview.template['sha256'][:16]}</code>, generation marker "
                     f"<code>{html.escape(repr(preview.template['generation_marker']))}</code></p>")
    for w in preview.warnings:
        parts.append(f"<p class=cut>warning: {html.escape(w)}</p>")
    parts.append("<p><span class=loss>trained (loss)</span> <span class=mask>masked</span> "
                 "<span class=eos>EOS</span></p>")
    for s in preview.samples:
        head = f"sample {s.index} · {s.n_tokens} tokens" + (f" · target {s.label!r}" if s.label is not None else "")
        spans = []
        for t in s.tokens:
            cls = ("eos " if t.eos else "") + ("loss" if t.loss else "mask")
            spans.append(f'<span class="{cls}" title="id {t.id}">{html.escape(t.text)}</span>')
        cut = (f'<div class=cut>✂ truncated at max_length={max_length} ({s.n_tokens - max_length} tokens cut)</div>'
               if s.truncated else "")
        parts.append(f"<div class=sample><b>{html.escape(head)}</b><div class=tok>{''.join(spans)}</div>{cut}</div>")
    parts.append("</body></html>")
    return "".join(parts)

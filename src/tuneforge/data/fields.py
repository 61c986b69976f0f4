"""Field readers: how one record becomes an example's fields for each data kind
(classification, text pairs, prompt/response incl. templates, chat messages,
raw text, preference pairs incl. HH-RLHF transcripts), and which columns each
kind needs. The loader (load.py) and the kind detection (formats.py) both read
records through these; they import nothing from either.
"""

from __future__ import annotations

import json
import math
import string
from typing import Any, Optional

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "system": "system"}
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


def has_bad_utf8(value: Any) -> bool:
    # Undecodable bytes survive as lone surrogates under errors="surrogateescape".
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def text_value(record: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, f"missing value in field '{key}'"
    if not isinstance(value, str):
        return None, f"field '{key}' must be text, got {type(value).__name__}"
    if has_bad_utf8(value):
        return None, "invalid UTF-8"
    if not value.strip():
        return None, f"empty text in field '{key}'"
    return value, None


def label_value(record: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    """Labels may be strings or integers; they are compared as their text form."""
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, f"missing value in field '{key}'"
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    return None, f"field '{key}' must be a string or integer label, got {type(value).__name__} {value!r}"


def messages_value(record: dict, key: str) -> tuple[Optional[list], Optional[str]]:
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if isinstance(value, str):  # JSON text inside a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"field '{key}' is text but not a JSON list of messages"
    if not isinstance(value, list) or not value:
        return None, f"field '{key}' must be a non-empty list of {{role, content}} messages"
    out = []
    for i, msg in enumerate(value):
        if isinstance(msg, dict) and "from" in msg and "value" in msg and "role" not in msg:
            # ShareGPT: {from: human|gpt|system, value}
            msg = {"role": SHAREGPT_ROLES.get(msg["from"], msg["from"]), "content": msg["value"]}
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            return None, f"message {i} must be an object with 'role' and 'content' (or ShareGPT 'from' and 'value')"
        if msg["role"] not in ROLES:
            return None, f"message {i} has unknown role {msg['role']!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(msg["content"], str) or not msg["content"].strip():
            return None, f"message {i} has empty or non-text content"
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant message: nothing to learn from"
    return out, None


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def kind_columns(kind: str, cfg) -> list[str]:
    if kind == "pair":
        return [cfg.text_column, cfg.text_pair_column, cfg.label_column]
    if kind == "text":
        return [cfg.text_column]
    return [cfg.chosen_column, cfg.rejected_column]  # the prompt column is optional


def split_hh(chosen: str, rejected: str) -> tuple[Optional[tuple[str, str, str]], Optional[str]]:
    """HH-RLHF: two full transcripts -> (shared prompt through the final
    '\\n\\nAssistant:', chosen final turn, rejected final turn)."""
    ci, ri = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if ci < 0 or ri < 0:
        return None, "chosen/rejected transcripts have no '\\n\\nAssistant:' turn"
    prompt = chosen[: ci + len(HH_ASSISTANT)]
    if rejected[: ri + len(HH_ASSISTANT)] != prompt:
        return None, "chosen and rejected transcripts differ before the final Assistant turn"
    return (prompt, chosen[ci + len(HH_ASSISTANT):].strip(), rejected[ri + len(HH_ASSISTANT):].strip()), None


def response_value(record: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    if key not in record:
        return None, f"missing field '{key}'"
    value = record[key]
    if not isinstance(value, str):
        return None, f"field '{key}' must be text, got {type(value).__name__}"
    return value, None


def kind_fields(record: dict, kind: str, cfg) -> tuple[Optional[dict], Optional[str]]:
    if kind == "pair":
        text, err = text_value(record, cfg.text_column)
        if not err:
            pair, err = text_value(record, cfg.text_pair_column)
        if not err:
            label, err = label_value(record, cfg.label_column)
        return (None, err) if err else ({"text": text, "text_pair": pair, "label": label}, None)
    if kind == "text":
        text, err = text_value(record, cfg.text_column)
        return (None, err) if err else ({"text": text}, None)
    # An empty response can be the preferred one (HH-RLHF harmless: saying
    # nothing beats helping with harm), so only the type is checked here.
    chosen, err = response_value(record, cfg.chosen_column)
    if not err:
        rejected, err = response_value(record, cfg.rejected_column)
    if err:
        return None, err
    if cfg.prompt_column in record:
        prompt, err = text_value(record, cfg.prompt_column)
        if err:
            return None, err
    else:
        parts, err = split_hh(chosen, rejected)
        if err:
            return None, err
        prompt, chosen, rejected = parts
    if chosen.strip() == rejected.strip():
        return None, "chosen and rejected are the same: no preference to learn"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


# ------------------------------------------------------- per-row helpers

def kind_row_fields(record: dict, kind: str, cfg) -> tuple[Optional[dict], Optional[str]]:
    if kind in ("pair", "text", "preference"):
        return kind_fields(record, kind, cfg)
    if kind == "classification":
        text, err = text_value(record, cfg.text_column)
        if err:
            return None, err
        label, err = label_value(record, cfg.label_column)
        if err:
            return None, err
        return {"text": text, "label": label}, None
    if cfg.messages_column:
        messages, err = messages_value(record, cfg.messages_column)
        return ({"messages": messages}, None) if not err else (None, err)
    if cfg.prompt_template:
        values = {}
        for name in template_fields(cfg.prompt_template):
            if name not in record:
                return None, f"missing field '{name}' (used by data.prompt_template)"
            value = record[name]
            values[name] = "" if value is None else str(value)
        prompt = cfg.prompt_template.format(**values).strip()
        # Alpaca-style optional inputs leave blank separators behind; squeeze them.
        while "\n\n\n" in prompt:
            prompt = prompt.replace("\n\n\n", "\n\n")
        if not prompt:
            return None, "empty prompt after applying data.prompt_template"
    else:
        prompt, err = text_value(record, cfg.prompt_column)
        if err:
            return None, err
    response, err = text_value(record, cfg.response_column)
    if err:
        return None, err
    return {"prompt": prompt, "response": response}, None


def kind_row_columns(kind: str, cfg) -> list[str]:
    if kind in ("pair", "text", "preference"):
        return kind_columns(kind, cfg)
    if kind == "classification":
        return [cfg.text_column, cfg.label_column]
    if cfg.messages_column:
        return [cfg.messages_column]
    prompt_cols = template_fields(cfg.prompt_template) if cfg.prompt_template else [cfg.prompt_column]
    return prompt_cols + [cfg.response_column]

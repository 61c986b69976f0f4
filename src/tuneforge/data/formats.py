"""Data shapes ("kinds") beyond the two the trainers started with, how each is
detected from a file's columns, and the per-kind helpers the studio needs:
the text of a row, mapping a function over its text fields, chunking raw text.

Kinds and the fields of a row dict:
  classification   text, label
  pair             text, text_pair, label            (pair classification, e.g. NLI)
  prompt_response  prompt, response                  (Alpaca instruction/input/output too)
  chat             messages [{role, content}]        (OpenAI messages or ShareGPT conversations)
  text             text                              (continued pre-training; chunked into blocks)
  preference       prompt, chosen, rejected          (HH-RLHF transcripts are split into these)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from tuneforge import objectives
from tuneforge.data.load import NOT_UTF8_HINT, DataError, no_rows_reason, read_records

LABELLED = ("classification", "pair")  # the kinds whose rows carry a label
ALPACA_TEMPLATE = "{instruction}\n\n{input}"
KIND_NAMES = {"classification": "labelled text", "pair": "labelled text pairs",
              "prompt_response": "prompt/response pairs", "chat": "chats", "text": "raw text",
              "preference": "preference pairs (DPO-style)"}


# ----------------------------------------------------------- detection


def first_record(path: str, fmt: str, columns: Optional[list[str]]) -> dict:
    """The file's first readable record; a file without one is a DataError that
    says why (no rows at all, or every row malformed, with the first)."""
    first_error, bad = None, 0
    for line, record, error in read_records(Path(path), fmt, columns):
        if record is not None:
            return record
        if error != "empty line":
            bad += 1
            first_error = first_error or f"{path}:{line}: {error}"
    if first_error is None:
        raise DataError(f"{path}: {no_rows_reason(path, fmt)}; there is nothing to prepare or train on.")
    hint = f" ({NOT_UTF8_HINT})" if first_error.endswith(": invalid UTF-8") else ""
    raise DataError(f"{path}: none of its {bad} row(s) can be read, so there is nothing to prepare or train on; "
                    f"the first: {first_error}{hint}")


def detect_kind(record: dict, accepts: Optional[tuple[str, ...]], cfg) -> tuple[str, dict, str]:
    """(kind, settings to apply to data config, human-readable explanation).

    Explicit recipe settings win: messages_column means chat, prompt_template
    means prompt_response. Otherwise the columns decide; an objective that
    accepts only labelled kinds (`accepts`) reads the file as classification."""
    cols = set(record)
    only_labelled = bool(accepts) and set(accepts) <= set(LABELLED)
    if cfg.messages_column:
        return "chat", {}, f"chat (data.messages_column '{cfg.messages_column}')"
    if cfg.prompt_template:
        return "prompt_response", {}, "prompt_response (data.prompt_template)"
    if only_labelled or (cfg.text_column in cols and cfg.label_column in cols):
        # A classification file missing its columns is left to the loader, whose
        # error names the file, the missing column and the columns there are.
        if cfg.text_pair_column in cols:
            return "pair", {}, (f"pair classification from columns '{cfg.text_column}', "
                                f"'{cfg.text_pair_column}', '{cfg.label_column}'")
        return "classification", {}, f"classification from columns '{cfg.text_column}', '{cfg.label_column}'"
    if "messages" in cols:
        return "chat", {"messages_column": "messages"}, "chat (OpenAI messages) from column 'messages'"
    if "conversations" in cols:
        return "chat", {"messages_column": "conversations"}, "chat (ShareGPT) from column 'conversations'"
    if cfg.chosen_column in cols and cfg.rejected_column in cols:
        shape = "prompt/chosen/rejected" if cfg.prompt_column in cols else "chosen/rejected transcripts"
        return "preference", {}, (f"preference pairs ({shape}) from columns '{cfg.chosen_column}', "
                                  f"'{cfg.rejected_column}'")
    if "instruction" in cols and "output" in cols and cfg.prompt_column not in cols:
        settings = {"prompt_template": ALPACA_TEMPLATE if "input" in cols else "{instruction}",
                    "response_column": "output"}
        return "prompt_response", settings, "prompt_response (Alpaca) from columns 'instruction', 'input', 'output'"
    if cfg.prompt_column in cols and cfg.response_column in cols:
        return "prompt_response", {}, (f"prompt_response from columns '{cfg.prompt_column}', "
                                       f"'{cfg.response_column}'")
    if cfg.text_column in cols:
        return "text", {}, f"raw text (continued pre-training) from column '{cfg.text_column}'"
    raise DataError(
        f"cannot tell the data kind from the columns {', '.join(repr(c) for c in record)}. Expected one of: "
        "text+label (classification), text+text_pair+label (pair), prompt+response or instruction+input+output, "
        "messages or conversations (chat), text (raw text), chosen+rejected (preference). "
        "Set data.kind and the data.*_column names.")


def resolve_kind(recipe_or_cfg, task: Optional[str]) -> tuple[str, object, str]:
    """The kind, a data config with the detected column settings applied, and
    the explanation. Raises DataError when the kind does not suit objective
    `task` while another objective takes it (data no objective trains on yet
    still prepares and inspects; training refuses it, `check_trainable`)."""
    objective = objectives.find(task)
    accepts = objective.data_kinds if objective else None
    cfg = recipe_or_cfg
    if cfg.kind != "auto":
        kind, settings, why = cfg.kind, {}, f"{cfg.kind} (data.kind)"
        if kind == "chat" and not cfg.messages_column:
            rec = first_record(cfg.train, cfg.format, cfg.columns)
            col = "messages" if "messages" in rec else "conversations" if "conversations" in rec else None
            if col is None:
                raise DataError(f"{cfg.train}: data.kind is chat but there is no 'messages' or 'conversations' "
                                "column; set data.messages_column.")
            settings = {"messages_column": col}
        if kind == "prompt_response" and not cfg.prompt_template:
            rec = first_record(cfg.train, cfg.format, cfg.columns)
            if "instruction" in rec and "output" in rec and cfg.prompt_column not in rec:
                settings = {"prompt_template": ALPACA_TEMPLATE if "input" in rec else "{instruction}",
                            "response_column": "output"}
    else:
        kind, settings, why = detect_kind(first_record(cfg.train, cfg.format, cfg.columns), accepts, cfg)
    takers = objectives_taking(kind)
    if objective is not None and kind not in objective.data_kinds and takers:
        raise DataError(f"data kind '{kind}' does not suit task '{task}' (it takes: "
                        f"{', '.join(objective.data_kinds)}; {kind} data trains with task: {', '.join(takers)}).")
    return kind, cfg.model_copy(update=settings), why


def objectives_taking(kind: str) -> list[str]:
    """The objectives (recipe tasks) whose trainers accept data of `kind`."""
    return [o.name for o in objectives.OBJECTIVES.values() if kind in o.data_kinds]


def check_trainable(kind: str, task: str) -> None:
    """A DataError unless objective `task` trains on `kind` data."""
    if kind in objectives.get(task).data_kinds:
        return
    takers = objectives_taking(kind)
    where = (f"task: {', '.join(takers)} trains on it" if takers else
             "no trainer takes them yet. `tuneforge data prepare` writes them as Parquet for other training code; "
             "`tuneforge data inspect` reports on them")
    raise DataError(f"the data is {KIND_NAMES.get(kind, kind)}, which task '{task}' does not train on: {where}.")


# ------------------------------------------------- fields of the new kinds


TEXT_FIELDS = ("text", "text_pair", "prompt", "response", "chosen", "rejected")


def row_text(row: dict) -> str:
    """One string per row for analysis (lengths, duplicates, PII, label issues)."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"])
    return "\n".join(row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str))


def map_texts(row: dict, fn: Callable[[str], str]) -> dict:
    """A copy of `row` with `fn` applied to every text field (message contents too)."""
    out = dict(row)
    for key in TEXT_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = fn(out[key])
    if "messages" in out:
        out["messages"] = [{**m, "content": fn(m["content"])} for m in out["messages"]]
    return out


def has_empty_text(row: dict) -> bool:
    if "chosen" in row:  # preference: one empty response may be the point; both empty is nothing
        return not row["prompt"].strip() or not (row["chosen"].strip() or row["rejected"].strip())
    if "messages" in row:
        return any(not m["content"].strip() for m in row["messages"])
    return any(isinstance(row.get(k), str) and not row[k].strip() for k in TEXT_FIELDS)


# ---------------------------------------------------- continued pre-training


def chunk_blocks(token_lists: list[list[int]], block: int, eos_id: Optional[int]) -> list[list[int]]:
    """Concatenate documents (each closed by EOS so the model learns where one
    ends) and cut the stream into blocks of exactly `block` tokens; the last,
    shorter remainder is kept as its own block rather than dropped silently."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    return [stream[i:i + block] for i in range(0, len(stream), block)]

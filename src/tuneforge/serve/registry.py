"""What is served: one base model loaded once, and LoRA adapters over it.

TARGET is a run folder (runs/<name>/: for LoRA the base named in its recipe plus
its own adapter, otherwise its model/), an exported folder (its manifest is
verified first), any local Hugging Face folder, or a catalogue name. The
request's `model` field picks the base or an adapter by name.

Every method that touches the model is called from the batcher's single model
thread, so switching adapters never races with a forward pass.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tuneforge import kinds, safeyaml
from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD


class TargetError(ValueError):
    """TARGET or an adapter cannot be served; the message says why and what to do."""


@dataclass
class AdapterSource:
    name: str
    path: Path  # the peft adapter folder
    base_ref: Optional[str]  # the recipe's base model, when known
    chat_template: Optional[str] = None
    labels: Optional[list[str]] = None


@dataclass
class Served:
    kind: str  # a tuneforge.kinds model kind: classifier | causal_lm | reward
    base_name: str
    base_path: str  # what from_pretrained loads
    labels: Optional[list[str]] = None
    chat_template: Optional[str] = None
    own_adapter: Optional[AdapterSource] = None
    context: int = 512
    model: object = None
    tokenizer: object = None
    adapters: dict = field(default_factory=dict)  # name -> AdapterSource
    dtype: str = "float32"  # weights' dtype: float32 or bfloat16
    # reward models: the training's system prompt and max_length, so requests render as its pairs did
    system_prompt: Optional[str] = None
    max_length: Optional[int] = None

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def _read_labels(config_path: Path) -> Optional[list[str]]:
    if not config_path.is_file():
        return None
    id2label = json.loads(config_path.read_text()).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] or None


def _template_of(folder: Path) -> Optional[str]:
    """The chat template pinned in a tokenizer folder (file or tokenizer_config)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("chat_template")
    return None


def adapter_source(name: str, ref: str) -> AdapterSource:
    """A LoRA run folder (RUN/model/adapter) or a bare peft adapter folder."""
    path = Path(ref)
    run_adapter = path / "model" / "adapter"
    if run_adapter.is_dir():
        recipe = safeyaml.load_file(path / "recipe.yaml") if (path / "recipe.yaml").is_file() else {}
        folder, base_ref = run_adapter, recipe.get("model")
        labels = _read_labels(path / "model" / "config.json")
    elif (path / "adapter_config.json").is_file():
        folder, base_ref, labels = path, None, None
    else:
        raise TargetError(f"adapter {name}={ref}: not a LoRA run (no {run_adapter}) nor an adapter folder "
                          "(no adapter_config.json); train with method.name=lora or point at model/adapter")
    from tuneforge.models import adapter_folder

    try:  # safetensors only: peft would fall back to torch.load for adapter_model.bin
        adapter_folder(str(folder))
    except FileNotFoundError as exc:
        raise TargetError(f"adapter {name}: {exc}") from None
    return AdapterSource(name, folder, base_ref, _template_of(folder), labels)


def resolve(target: str, name: Optional[str] = None) -> Served:
    """Work out what TARGET means, without loading weights."""
    served = _resolve(target, name)
    if served.kind == REWARD and Path(target).is_dir():
        from tuneforge.evaluate.rewards import reward_settings

        settings = reward_settings(Path(target))  # a run's recipe, or the one an export's manifest keeps
        served.system_prompt, served.max_length = settings.system_prompt, settings.max_length
    return served


def _resolve(target: str, name: Optional[str]) -> Served:
    from tuneforge import catalog
    from tuneforge.models import model_kind

    path = Path(target)
    if (path / "recipe.yaml").is_file() and (path / "model").is_dir():
        recipe = safeyaml.load_file(path / "recipe.yaml")
        kind = model_kind(str(path / "model")).name  # what the run's model is, whatever objective trained it
        if (path / "model" / "adapter").is_dir():
            own = adapter_source(name or path.resolve().name, str(path))
            base = catalog.resolve(recipe["model"])
            return Served(kind, recipe["model"], base, labels=own.labels, own_adapter=own,
                          chat_template=_template_of(Path(base)))
        folder = path / "model"
        return Served(kind, name or path.resolve().name, str(folder), labels=_read_labels(folder / "config.json"),
                      chat_template=_template_of(folder))
    if path.is_dir():
        if (path / "manifest.json").is_file() and "files" in json.loads((path / "manifest.json").read_text()):
            from tuneforge.export import verify_export

            problem = verify_export(path)
            if problem:
                raise TargetError(f"{target}: {problem}; re-export the run (tuneforge export RUN --to DIR)")
        if not (path / "config.json").is_file():
            raise TargetError(f"{target}: no config.json; pass a run folder, an exported folder or a catalogue name")
        return Served(_kind_of(str(path), target), name or path.resolve().name, str(path.resolve()),
                      labels=_read_labels(path / "config.json"), chat_template=_template_of(path))
    problem = catalog.check_model_reference(target)
    if problem:
        raise TargetError(problem)
    spec = catalog.CATALOG.get(target)
    model_path = catalog.resolve(target)
    try:
        kind = spec.kinds[0] if spec else _kind_of(model_path, target)
    except OSError as exc:
        raise TargetError(f"{target}: no such folder here, not a catalogue model, and not loadable as a hub id "
                          f"({str(exc).splitlines()[0]})") from None
    return Served(kind, name or target, model_path, chat_template=_template_of(Path(model_path)))


def _kind_of(model_path: str, target: str) -> str:
    from tuneforge.models import model_kind

    try:
        return model_kind(model_path).name
    except ValueError as exc:
        raise TargetError(f"{target}: {exc}") from None


def _context_length(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    limit = getattr(tokenizer, "model_max_length", None)
    return min(n, limit) if isinstance(limit, int) and 0 < limit < 10**7 else n


def load_base(served: Served, device) -> None:
    """Load the base weights (fresh from disk) and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tuneforge.models import DEFAULT_CHAT_TEMPLATE, load_pretrained, load_tokenizer, quiet_transformers

    quiet_transformers()
    dtype = getattr(torch, served.dtype)
    if served.kind == REWARD:  # one scalar output, whatever labels a base's config names
        from tuneforge.evaluate.rewards import reward_config_options

        model = load_pretrained(AutoModelForSequenceClassification, served.base_path, dtype=dtype,
                                **reward_config_options())
    elif served.kind == CLASSIFIER:
        kwargs = {}
        if served.labels:
            kwargs = {"num_labels": len(served.labels), "id2label": dict(enumerate(served.labels)),
                      "label2id": {lab: i for i, lab in enumerate(served.labels)}}
        model = load_pretrained(AutoModelForSequenceClassification, served.base_path, dtype=dtype, **kwargs)
        served.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    else:
        model = load_pretrained(AutoModelForCausalLM, served.base_path, dtype=dtype)
    tokenizer_from = served.own_adapter.path if served.own_adapter else served.base_path
    tokenizer = load_tokenizer(str(tokenizer_from))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if served.kind == CAUSAL_LM:
        served.chat_template = (served.own_adapter and served.own_adapter.chat_template) or served.chat_template \
            or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if served.kind == REWARD:  # the template training saved with the tokenizer (or gave it, when it had none)
        from tuneforge.evaluate.rewards import ensure_template

        ensure_template(tokenizer)
        served.chat_template = tokenizer.chat_template
    served.model, served.tokenizer = model.to(device).eval(), tokenizer
    served.context = _context_length(model, tokenizer)


def _same_model(a: str, b: str) -> bool:
    """Local folders compare by resolved path, hub ids by name."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_adapter(served: Served, source: AdapterSource) -> None:
    """Refuse an adapter that was not trained on the served base or does not fit it."""
    from tuneforge import catalog

    if source.name in served.names():
        raise TargetError(f"a model named '{source.name}' is already served; pick another name")
    config = json.loads((source.path / "adapter_config.json").read_text())
    expected = kinds.get(served.kind).peft_task_type
    if config.get("task_type") not in (expected, None):
        raise TargetError(f"adapter {source.name} is for {config.get('task_type')}, the served model is {expected}")
    if source.base_ref is not None:
        if not _same_model(catalog.resolve(source.base_ref), served.base_path):
            raise TargetError(
                f"adapter {source.name} was trained on '{source.base_ref}' but the served weights are "
                f"{served.base_path}; serve its base instead: tuneforge serve {source.base_ref} --adapter ...")
    if served.kind == REWARD and source.labels and len(source.labels) != 1:
        raise TargetError(f"adapter {source.name} is a classifier (labels {source.labels}), the served model is a "
                          "reward model")
    if served.kind == CLASSIFIER and source.labels and served.labels and source.labels != served.labels:
        raise TargetError(f"adapter {source.name} has labels {source.labels}, the served model {served.labels}; "
                          "one server shares one label set")


def add_adapter(served: Served, source: AdapterSource) -> None:
    from tuneforge.models import load_adapter

    check_adapter(served, source)
    try:
        served.model = load_adapter(served.model, str(source.path), adapter_name=source.name)
    except Exception as exc:  # wrong shapes, a broken file: undo, then say why
        _undo_failed_add(served, source.name)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = " ".join(lines[:2])[:300] or type(exc).__name__
        raise TargetError(f"adapter {source.name} ({source.path}) does not load onto {served.base_path}: {reason}; "
                          "check that it was trained on this base model") from exc
    served.model.eval()
    # Replaced, never mutated: the event loop reads the names while this thread writes.
    served.adapters = {**served.adapters, source.name: source}


def _undo_failed_add(served: Served, name: str) -> None:
    """A failed load may leave LoRA layers injected (peft wraps modules in place
    before it reads the weights): drop them, or reload the base when nothing
    else was served through peft."""
    from peft import PeftModel

    if isinstance(served.model, PeftModel) and served.adapters:
        if name in served.model.peft_config:
            served.model.delete_adapter(name)
        served.model.set_adapter(next(iter(served.adapters)))  # the active one may have been the failed one
        return
    load_base(served, next(served.model.parameters()).device)


def remove_adapter(served: Served, name: str, device) -> None:
    if name not in served.adapters:
        raise KeyError(name)
    served.adapters = {k: v for k, v in served.adapters.items() if k != name}
    if served.adapters:
        served.model.delete_adapter(name)
        return
    # peft cannot run with zero adapters left, and unload() does not restore a
    # replaced classifier head exactly: reload the base from disk instead.
    load_base(served, device)


def activate(served: Served, name: str):
    """A context in which the model computes as `name` (base or adapter)."""
    if name in served.adapters:
        served.model.set_adapter(name)
        return nullcontext()
    if served.adapters:  # the base under a peft wrapper
        return served.model.disable_adapter()
    return nullcontext()


def reward_encode(served: Served, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Token ids per (prompt, response) for the served reward model, rendered as its training rendered them."""
    from tuneforge.evaluate.rewards import encode_response

    limit = min(served.max_length or served.context, served.context)
    return [encode_response(served.tokenizer, p, r, limit, served.system_prompt) for p, r in pairs]


def reward_scores(served: Served, ids: list[list[int]], device) -> list[float]:
    """On the model thread: the reward model's score per id list (the active base or adapter)."""
    from tuneforge.evaluate.rewards import score_ids
    from tuneforge.inference import supports_packed_classification
    from tuneforge.serve.engine import CLASSIFY_CHUNK

    chunk = max(len(ids), 1) if supports_packed_classification(served.model) else CLASSIFY_CHUNK
    return score_ids(served.model, ids, served.tokenizer.pad_token_id, chunk, device).tolist()


def load(served: Served, extra: list[AdapterSource], device) -> Served:
    if served.kind == CLASSIFIER and not served.labels:
        # A bare base's head is random anyway: take the adapters' label names.
        served.labels = next((s.labels for s in extra if s.labels), None)
    load_base(served, device)
    for source in ([served.own_adapter] if served.own_adapter else []) + list(extra):
        add_adapter(served, source)
    return served

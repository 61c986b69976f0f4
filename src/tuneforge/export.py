"""`tuneforge export RUN --to DIR`: a self-contained Hugging Face folder.

Merged safetensors weights, tokenizer, the pinned chat template, generation
config, a model card (README.md) and manifest.json (sha256 of every file and
the lineage: recipe, data hashes, base model). Before anything is written the
export checks itself: the weights it wrote, reloaded from disk, and an
independent reference (base + adapter for LoRA, base + the final checkpoint's
tensors for full and freeze) must give the same greedy tokens and logits within
1e-4 on sample inputs from the test split (the manifest says when fixed strings
stood in), or it fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from tuneforge import __version__, kinds, safeyaml
from tuneforge.console import console
from tuneforge.fsio import atomic_dir, sha256_file
from tuneforge.kinds import CAUSAL_LM, CLASSIFIER, REWARD, ModelKind
from tuneforge.methods import METHODS
from tuneforge.methods import describe as describe_method

ATOL = 1e-4
SFT_PROMPTS = ["Convert to YYYY-MM-DD: 5 May 2001", "Write one sentence about the sea.", "What is 12 times 7?"]
CLS_TEXTS = ["a wonderful, moving film", "a dull and tedious mess", "it was fine, I suppose"]


class ExportError(RuntimeError):
    """The export would not be what the run produced; nothing was written."""


def _sample_texts(run: Path, kind: ModelKind) -> tuple[list[str], str]:
    """A few real inputs from the run's test split when it still reads, else fixed
    ones; and which of the two it was (said in the output and the manifest)."""
    from tuneforge.data.load import DataError
    from tuneforge.data.prepare import prepare_splits
    from tuneforge.recipe import RecipeError, load_recipe

    try:
        rows, why = prepare_splits(load_recipe(run / "recipe.yaml")).test[:3], "the test split is empty"
    except RecipeError as exc:  # e.g. the data file moved
        rows, why = [], "the run's data does not read: " + "; ".join(f"{k}: {m}" for k, m in exc.problems)[:200]
    except (DataError, OSError, ValueError) as exc:  # the data changed
        rows, why = [], f"the run's data does not read: {str(exc).splitlines()[0][:200]}"
    if rows:
        if kind.name == CLASSIFIER or "text" in rows[0]:
            return [r["text"] for r in rows], f"test split: {len(rows)} rows"
        if kind.name == REWARD:  # preference rows: each prompt with either response, as the head scores them
            return [f"{r['prompt']} {r[side]}" for r in rows for side in ("chosen", "rejected")], \
                f"test split: {len(rows)} preference rows, both responses"
        return [r["prompt"] if "prompt" in r else next(m["content"] for m in r["messages"] if m["role"] == "user")
                for r in rows], f"test split: {len(rows)} rows"
    fixed = CLS_TEXTS if kind.name in (CLASSIFIER, REWARD) else SFT_PROMPTS
    inputs = f"fallback: {len(fixed)} fixed strings (no test split: {why})"
    console.print(f"[yellow]warning: the export check runs on {len(fixed)} fixed strings, not the run's test split "
                  f"({why})")
    return fixed, inputs


def final_weights(run: Path) -> Path:
    """The checkpoint tensors that run/model (full, freeze) was saved from: the
    best evaluation's weights when the run kept them (training restores them at
    the end), else the last step's."""
    from tuneforge.fsio import is_complete
    from tuneforge.training.checkpoint import latest_checkpoint

    best = run / "checkpoints" / "best"
    folder = best if is_complete(best) else latest_checkpoint(run / "checkpoints")
    if folder is None or not (folder / "trainable.safetensors").is_file():
        raise ExportError(f"{run}: no checkpoint (checkpoints/best or checkpoints/step-N) to check run/model against; "
                          "the export check needs the run's checkpoints: re-run training")
    return folder / "trainable.safetensors"


def _checkpoint_model(run: Path, recipe: dict, kind: ModelKind, exported):
    """Independent of run/model: the base model with the final checkpoint's
    trained tensors put in (all of them for full, the unfrozen ones for freeze)."""
    import torch
    from safetensors.torch import load_file

    from tuneforge.models import load_causal_lm, load_classifier

    weights = final_weights(run)
    if kind.name in (CLASSIFIER, REWARD):  # a reward model: one label, so a one-output head
        labels = [exported.config.id2label[i] for i in range(exported.config.num_labels)]
        model = load_classifier(recipe["model"], labels)[0]
    else:
        model = load_causal_lm(recipe["model"])[0]
    params, state = dict(model.named_parameters()), load_file(str(weights))
    wrong = [k for k, v in state.items() if k not in params or params[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{weights} does not fit base model {recipe['model']} ({wrong[0]}); "
                          "was the recipe or the base model changed after training?")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model, f"{recipe['model']} + {weights.relative_to(run)}"


def _reference(run: Path, recipe: dict, kind: ModelKind, exported):
    """(model, description): base + adapter for LoRA, base + final checkpoint otherwise."""
    from tuneforge import catalog
    from tuneforge.models import load_adapter, load_pretrained

    adapter = run / "model" / "adapter"
    if not adapter.is_dir():
        return _checkpoint_model(run, recipe, kind, exported)
    kwargs = {}
    if kind.name in (CLASSIFIER, REWARD):
        # the exported head's shape, and its pad token (a decoder's head reads the last non-pad token)
        kwargs = {"num_labels": exported.config.num_labels, "id2label": exported.config.id2label,
                  "label2id": exported.config.label2id, "pad_token_id": exported.config.pad_token_id}
    base = load_pretrained(kind.auto(), catalog.resolve(recipe["model"]), **kwargs)
    return load_adapter(base, str(adapter)), "base + adapter"


def _compare(exported, reference, tokenizer, kind: ModelKind, texts: list[str]) -> tuple[float, bool]:
    """(max |logit difference|, greedy tokens equal) over `texts`, in float64: in
    float32 the two computation orders (W + BA vs Wx + BAx) alone differ by ~1e-4
    on a 30-layer model, which would hide or fake a damaged merge."""
    import torch

    exported, reference = exported.double(), reference.double()
    generates = kind.name == CAUSAL_LM
    if generates:
        from tuneforge.data.render import encode_prompt

        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    worst, same_tokens = 0.0, True
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            worst = max(worst, float((exported(x).logits - reference(x).logits).abs().max()))
            if generates:
                ga = exported.generate(x, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                gb = reference.generate(input_ids=x, max_new_tokens=16, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
                same_tokens &= torch.equal(ga, gb)
    return worst, same_tokens


def check_equivalence(run: Path, recipe: dict, candidate: Path) -> dict:
    """Reload `candidate` (the folder to export) from disk and compare it with an
    independent reference: the base + adapter for LoRA, the base + the final
    checkpoint's tensors for full and freeze."""
    from tuneforge.models import load_pretrained, load_tokenizer, model_kind, quiet_transformers

    quiet_transformers()
    kind = model_kind(str(candidate))  # what the model is, whatever objective trained it
    exported = load_pretrained(kind.auto(), str(candidate)).eval()
    reference, described = _reference(run, recipe, kind, exported)
    texts, inputs = _sample_texts(run, kind)
    worst, same_tokens = _compare(exported, reference.eval(), load_tokenizer(str(candidate)), kind, texts)
    report = {"model_kind": kind.name, "samples": len(texts), "inputs": inputs, "max_abs_logit_diff": worst,
              "greedy_tokens_equal": same_tokens,
              "reference": described, "atol": ATOL}
    if worst > ATOL or not same_tokens:
        raise ExportError(
            f"the exported weights do not reproduce the run's model ({described}): max |logit diff| {worst:.2e} "
            f"(allowed {ATOL:.0e}), greedy tokens equal: {same_tokens}. Nothing was exported; "
            "re-run training or check run/model for damage."
        )
    return report


def _model_card(recipe: dict, manifest: dict, metrics: dict, equivalence: dict) -> str:
    test, base = metrics.get("test") or {}, metrics.get("baseline") or {}
    baseline_name = kinds.get(equivalence["model_kind"]).baseline
    rows = ["| metric | fine-tuned | " + baseline_name + " |", "|---|---|---|"]
    for key, value in test.items():
        if isinstance(value, float):
            ci = (test.get("ci") or {}).get(key)
            shown = f"{value:.4f}" + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
            other = base.get(key)
            rows.append(
                f"| {key} | {shown} | {other:.4f} |" if isinstance(other, float) else f"| {key} | {shown} | - |"
            )
    files = (manifest.get("data") or {}).get("files") or {}
    data_lines = [f"- {split}: `{Path(info['path']).name}` (sha256 {info['sha256'][:12]}...), {info['kept']} rows kept "
                  f"of {info['read']} read" for split, info in files.items()]
    method = recipe["method"]
    return "\n".join([
        f"# {recipe.get('name') or 'tuneforge model'}", "",
        f"Fine-tuned with tuneforge {__version__} from base model `{recipe['model']}` for **{recipe['task']}**.", "",
        "## Training", "",
        f"- Method: {describe_method(method)}" + (", merged into the weights" if (module := METHODS.get(method["name"]))
                                                  and module.ADAPTER else ""),
        f"- Optimizer {recipe['train']['optimizer']}, learning rate {recipe['train']['learning_rate'] or 'default'}, "
        f"batch {recipe['train']['batch_size']}, max_length {recipe['train']['max_length']}, seed "
        f"{recipe['train']['seed']}",
        "", "## Data", "", *data_lines, "",
        "## Evaluation (held-out test split)", "", *rows, "",
        f"Export check: {equivalence['samples']} sample inputs ({equivalence['inputs']}), max |logit difference| "
        f"against {equivalence['reference']} {equivalence['max_abs_logit_diff']:.1e}.", "",
        "## Intended use", "",
        f"The task the training data describes ({recipe['task']}), on inputs like those data. "
        "Check the evaluation above on your own held-out data before relying on it.", "",
        "## Limits", "",
        "- Scores hold for data like the test split; other domains, languages or formats may score far lower.",
        "- Fine-tuning passes on the biases of its data and its base model; audit by group before deployment.",
        "- Generative models can state false things fluently; keep a person in the loop for consequential use.",
        "",
    ])


def export_run(run: Path, to: Path, force: bool = False) -> dict:
    from tuneforge.models import SAFE_MODEL_FILES, adapter_folder, check_safetensors

    run, to = Path(run), Path(to)
    if not (run / "model" / "config.json").is_file():
        raise ExportError(f"{run}: no finished model (run/model/config.json); has the run completed?")
    if to.exists() and any(to.iterdir()) and not force:
        raise ExportError(f"{to} exists and is not empty; choose another folder or pass --force")
    recipe = safeyaml.load_file(run / "recipe.yaml")
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    try:  # safetensors only, checked before anything is copied or unpickled
        check_safetensors(run / "model", SAFE_MODEL_FILES)
        if (run / "model" / "adapter").is_dir():
            adapter_folder(str(run / "model" / "adapter"))
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    with atomic_dir(to) as tmp:
        for item in (run / "model").iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        equivalence = check_equivalence(run, recipe, tmp)
        (tmp / "README.md").write_text(_model_card(recipe, manifest, metrics, equivalence), encoding="utf-8")
        lineage = {"tuneforge_version": __version__, "source_run": str(run.resolve()), "base_model": recipe["model"],
                   "recipe": recipe, "data": (manifest.get("data") or {}).get("files"),
                   "git_commit": manifest.get("git_commit"), "metrics": metrics.get("test"),
                   "equivalence_check": equivalence}
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({"files": files, "lineage": lineage}, indent=2, default=str))
    return {"path": str(to), "files": files, "equivalence": equivalence}


def verify_export(folder: Path) -> Optional[str]:
    """None when every file still matches manifest.json and no other file was
    added (an added one, e.g. fairness_postprocess.json, changes what gets served);
    else what differs."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    # Hidden paths (.git, .cache/huggingface from a download, the completion marker)
    # are not the model's: export never copies them and loading never reads them.
    names = (p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file())
    extra = sorted(n.as_posix() for n in names if not any(part.startswith(".") for part in n.parts)
                   and n.as_posix() not in manifest["files"] and n.as_posix() != "manifest.json")
    if extra:
        return f"{extra[0]} was added after export (not in manifest.json)" + (
            f", and {len(extra) - 1} more" if len(extra) > 1 else "")
    for name, digest in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} changed since export (sha256 differs)"
    return None

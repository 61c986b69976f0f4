"""`tuneforge export RUN --to DIR`: a self-contained Hugging Face folder.

Merged safetensors weights, tokenizer, the pinned chat template, generation
config, a model card (README.md) and manifest.json (sha256 of every file and
the lineage: recipe, data hashes, base model). Before anything is written the
export checks itself: the merged weights and base + adapter (LoRA) must give
the same greedy tokens and logits within 1e-4 on sample inputs, or it fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import yaml

from tuneforge import __version__
from tuneforge.fsio import atomic_dir, sha256_file

ATOL = 1e-4
SFT_PROMPTS = ["Convert to YYYY-MM-DD: 5 May 2001", "Write one sentence about the sea.", "What is 12 times 7?"]
CLS_TEXTS = ["a wonderful, moving film", "a dull and tedious mess", "it was fine, I suppose"]


class ExportError(RuntimeError):
    """The export would not be what the run produced; nothing was written."""


def _sample_texts(run: Path, recipe: dict) -> list[str]:
    """A few real inputs from the run's test data when readable, else fixed ones."""
    from tuneforge.data.prepare import prepare_splits
    from tuneforge.recipe import load_recipe

    try:
        rows = prepare_splits(load_recipe(run / "recipe.yaml")).test[:3]
    except Exception:  # data moved or changed: the fixed samples still test the weights
        rows = []
    if recipe["task"] == "classification":
        return [r["text"] for r in rows] or CLS_TEXTS
    prompts = [r["prompt"] if "prompt" in r else next(m["content"] for m in r["messages"] if m["role"] == "user")
               for r in rows]
    return prompts or SFT_PROMPTS


def check_equivalence(run: Path, recipe: dict, candidate: Path) -> dict:
    """Compare `candidate` (the folder to export) with the run's reference model:
    base + adapter for LoRA, the run's own model/ otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tuneforge import catalog
    from tuneforge.models import load_tokenizer, quiet_transformers

    quiet_transformers()
    task = recipe["task"]
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    exported = cls.from_pretrained(candidate).eval()
    adapter = run / "model" / "adapter"
    if adapter.is_dir():
        from peft import PeftModel

        kwargs = {}
        if task == "classification":
            kwargs = {"num_labels": exported.config.num_labels, "id2label": exported.config.id2label,
                      "label2id": exported.config.label2id}
        base = cls.from_pretrained(catalog.resolve(recipe["model"]), **kwargs)
        reference = PeftModel.from_pretrained(base, adapter).eval()
    else:
        reference = cls.from_pretrained(run / "model").eval()
    # Compare in float64: in float32 the two computation orders (W + BA vs Wx + BAx)
    # alone differ by ~1e-4 on a 30-layer model, which would hide or fake a damaged merge.
    exported, reference = exported.double(), reference.double()
    tokenizer = load_tokenizer(str(candidate))
    texts = _sample_texts(run, recipe)
    if task == "sft":
        from tuneforge.data.render import encode_prompt

        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    worst, same_tokens = 0.0, True
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            a, b = exported(x).logits, reference(x).logits
            worst = max(worst, float((a - b).abs().max()))
            if task == "sft":
                ga = exported.generate(x, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                gb = reference.generate(input_ids=x, max_new_tokens=16, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
                same_tokens &= torch.equal(ga, gb)
    report = {"samples": len(prompts), "max_abs_logit_diff": worst, "greedy_tokens_equal": same_tokens,
              "reference": "base + adapter" if adapter.is_dir() else "run model", "atol": ATOL}
    if worst > ATOL or not same_tokens:
        raise ExportError(
            f"the exported weights do not reproduce the run's model: max |logit diff| {worst:.2e} "
            f"(allowed {ATOL:.0e}), greedy tokens equal: {same_tokens}. Nothing was exported; "
            "re-run training or check run/model for damage."
        )
    return report


def _model_card(recipe: dict, manifest: dict, metrics: dict, equivalence: dict) -> str:
    test, base = metrics.get("test") or {}, metrics.get("baseline") or {}
    baseline_name = "majority class" if recipe["task"] == "classification" else "base model"
    rows = ["| metric | fine-tuned | " + baseline_name + " |", "|---|---|---|"]
    for key, value in test.items():
        if isinstance(value, float):
            ci = (test.get("ci") or {}).get(key)
            shown = f"{value:.4f}" + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
            other = base.get(key)
            rows.append(f"| {key} | {shown} | {other:.4f} |" if isinstance(other, float) else f"| {key} | {shown} | - |")
    files = (manifest.get("data") or {}).get("files") or {}
    data_lines = [f"- {split}: `{Path(info['path']).name}` (sha256 {info['sha256'][:12]}...), {info['kept']} rows kept "
                  f"of {info['read']} read" for split, info in files.items()]
    method = recipe["method"]
    return "\n".join([
        f"# {recipe.get('name') or 'tuneforge model'}", "",
        f"Fine-tuned with tuneforge {__version__} from base model `{recipe['model']}` for **{recipe['task']}**.", "",
        "## Training", "",
        f"- Method: {method['name']}" + (f" (r={method['r']}, alpha={method['alpha']}, merged into the weights)"
                                        if method["name"] in ("lora", "qlora") else ""),
        f"- Optimizer {recipe['train']['optimizer']}, learning rate {recipe['train']['learning_rate'] or 'default'}, "
        f"batch {recipe['train']['batch_size']}, max_length {recipe['train']['max_length']}, seed {recipe['train']['seed']}",
        "", "## Data", "", *data_lines, "",
        "## Evaluation (held-out test split)", "", *rows, "",
        f"Export check: {equivalence['samples']} sample inputs, max |logit difference| against "
        f"{equivalence['reference']} {equivalence['max_abs_logit_diff']:.1e}.", "",
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
    run, to = Path(run), Path(to)
    if not (run / "model" / "config.json").is_file():
        raise ExportError(f"{run}: no finished model (run/model/config.json); has the run completed?")
    if to.exists() and any(to.iterdir()) and not force:
        raise ExportError(f"{to} exists and is not empty; choose another folder or pass --force")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
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

"""Run reports: a self-contained report.html (plots embedded as PNG data URIs,
no network references) and report.md (plots beside it in report_files/).

Everything is read back from the run folder, so `tuneforge report RUN` can
rebuild a report at any time.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional

from tuneforge import kinds, objectives, safeyaml
from tuneforge.evaluate import registry
from tuneforge.evaluate.verdict import NO_BETTER
from tuneforge.fsio import atomic_write_bytes, atomic_write_text
from tuneforge.methods import describe as describe_method
from tuneforge.reporting import CSS, figure_png, html_table, md_table, pyplot, read_json, read_log

HEADLINE = registry.HEADLINE


# ------------------------------------------------------------------- figures


def fig_training(log: list[dict]) -> Optional[bytes]:
    train = [r for r in log if "split" not in r]
    val = [r for r in log if r.get("split") == "validation"]
    if not train:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    steps = [r["step"] for r in train]
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in train], label="train", color="#1f77b4")
    if val and "loss" in val[0]:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation", color="#d62728")
    ax.set(title="Loss", xlabel="optimizer step", ylabel="cross-entropy (nats)")
    for ax, key, title, unit in ((axes[0][1], "lr", "Learning rate", "lr"),
                                 (axes[1][0], "grad_norm", "Gradient norm (before clipping)", "L2 norm"),
                                 (axes[1][1], "tokens_per_s", "Throughput", "tokens / s")):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax.plot(*zip(*points), color="#2ca02c")
        ax.set(title=title, xlabel="optimizer step", ylabel=unit)
    handles, names = axes[0][0].get_legend_handles_labels()
    keys = [k for k in ("accuracy", "f1_macro", "exact_match") if val and k in val[0]]
    if keys:
        twin = axes[0][0].twinx()
        for k in keys:
            twin.plot([r["step"] for r in val], [r[k] for r in val], "s--", alpha=0.7, label=f"validation {k}")
        twin.set_ylabel("validation score")
        more = twin.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    # One legend under the panel, so it never hides a curve.
    axes[0][0].legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def fig_plot(plot: dict) -> bytes:
    """A plot an objective put in evaluation.json "plots": {"title", "type": "line" | "hist",
    "xlabel", "ylabel", "series": {name: [y, ...] (hist: values)}, "x": [...] (line, optional)}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in plot["series"].items():
        if plot.get("type") == "hist":
            ax.hist(values, bins=plot.get("bins", 30), alpha=0.6, label=name)
        else:
            ax.plot(plot.get("x") or list(range(len(values))), values, "o-", label=name)
    ax.set(title=plot["title"], xlabel=plot.get("xlabel", ""), ylabel=plot.get("ylabel", ""))
    if len(plot["series"]) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def fig_confusion(cm: dict) -> bytes:
    import numpy as np

    plt = pyplot()
    labels, matrix = cm["labels"], np.array(cm["matrix"])
    size = max(4, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.grid(False)
    im = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted label", ylabel="true label", title="Confusion matrix (test, counts)")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return figure_png(fig)


def fig_curves(curves: dict, kind: str) -> Optional[bytes]:
    data = curves.get(kind) or {}
    if not data:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for label, (xs, ys) in data.items():
        ax.plot(xs, ys, label=f"class {label}")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
        ax.set(title="ROC curve (test)", xlabel="false positive rate", ylabel="true positive rate")
    else:
        ax.set(title="Precision-recall curve (test)", xlabel="recall", ylabel="precision")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right" if kind == "roc" else "lower left")
    return figure_png(fig)


def fig_reliability(table: dict) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    centers = [(lo + hi) / 2 for lo, hi in zip(table["bin_lower"], table["bin_upper"])]
    width = table["bin_upper"][0] - table["bin_lower"][0]
    acc = [a if c else 0 for a, c in zip(table["accuracy"], table["count"])]
    ax.bar(centers, acc, width=width * 0.9, color="#1f77b4", alpha=0.8, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), title="Reliability diagram (test)", xlabel="confidence (top-class probability)",
           ylabel="accuracy")
    ax.legend(loc="upper left")
    return figure_png(fig)


def fig_robustness(robustness: dict, metric: str) -> bytes:
    plt = pyplot()
    names = list(robustness)
    drops = [robustness[n]["drop"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.barh(names, drops, color=["#d62728" if d > 0 else "#2ca02c" for d in drops])
    ax.set(title=f"Robustness: drop in {metric} under each perturbation", xlabel=f"{metric} drop (clean - perturbed)")
    ax.invert_yaxis()
    return figure_png(fig)


# ------------------------------------------------------------------ assembly


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _metric_rows(test: dict, baseline: Optional[dict]) -> list[list[str]]:
    rows = []
    for key in HEADLINE:
        if not isinstance(test.get(key), float):
            continue
        entry = registry.get(key)
        ci = (test.get("ci") or {}).get(key)
        base = (baseline or {}).get(key)
        delta = test[key] - base if isinstance(base, float) else None
        better = None if delta is None else entry.better(test[key], base) and delta != 0
        rows.append([key, entry.format(base), entry.format(test[key]),
                     f"[{entry.format(ci[0])}, {entry.format(ci[1])}]" if ci else "-",
                     ("" if delta is None else format(delta, "+" + entry.fmt) + (" ▲" if better else " ▼"))])
    return rows


def _verdict_section(verdict: Optional[dict], baseline_name: str) -> Optional[tuple[str, str, str]]:
    """The red panel (html, markdown) of a run no better than its baseline, or None."""
    if not verdict or verdict.get("status") != NO_BETTER:
        return None
    title = f"No better than the {baseline_name}"
    items = list(verdict.get("reasons", []))
    hints = list(verdict.get("hints", []))
    page = ("<div class=verdict-bad><p><strong>This fine-tune is no better than the "
            f"{html.escape(baseline_name)}.</strong></p><ul>"
            + "".join(f"<li>{html.escape(r)}</li>" for r in items) + "</ul>"
            + (("<p><strong>Likely causes:</strong></p><ul>" + "".join(f"<li>{html.escape(h)}</li>" for h in hints)
                + "</ul>") if hints else "") + "</div>")
    md = "\n".join([f"> **This fine-tune is no better than the {baseline_name}.**", ">"]
                   + [f"> - {r}" for r in items]
                   + ([">", "> **Likely causes:**"] + [f"> - {h}" for h in hints] if hints else []))
    return title, page, md


def run_kind(run: Path, recipe: dict, manifest: dict) -> kinds.ModelKind:
    """The model kind of a run or eval folder: as its manifest records it, else
    its objective's, else read from run/model/config.json; causal_lm if none says."""
    name = manifest.get("model_kind")
    if name is None and (objective := objectives.find(recipe.get("task"))) is not None:
        name = objective.model_kind
    if name is None:
        found = kinds.kind_of_config(read_json(run / "model" / "config.json") or {})
        name = found.name if found else kinds.CAUSAL_LM
    return kinds.get(name)


def build_sections(run: Path) -> dict:
    recipe = safeyaml.load_file(run / "recipe.yaml")
    manifest = read_json(run / "manifest.json") or {}
    kind = run_kind(run, recipe, manifest)
    metrics = read_json(run / "metrics.json") or {}
    details = read_json(run / "evaluation.json") or {}
    log = read_log(run / "metrics.jsonl")
    test, baseline = metrics.get("test") or {}, metrics.get("baseline")
    figures: dict[str, bytes] = {}
    if (png := fig_training(log)) is not None:
        figures["training"] = png
    if "confusion_matrix" in test:
        figures["confusion"] = fig_confusion(test["confusion_matrix"])
    for curve in ("roc", "pr"):
        if (png := fig_curves(details.get("curves") or {}, curve)) is not None:
            figures[curve] = png
    if "reliability" in test:
        figures["reliability"] = fig_reliability(test["reliability"])
    for i, plot in enumerate(details.get("plots") or []):  # objective-specific plots (reward margins, log-probs)
        key = f"plot-{i}"
        figures[key] = fig_plot(plot)
        FIGURE_TITLES[key] = plot["title"]
    if details.get("robustness"):
        figures["robustness"] = fig_robustness(details["robustness"], kind.headline)
    return {"recipe": recipe, "kind": kind, "manifest": manifest, "test": test, "baseline": baseline,
            "validation": metrics.get("validation"), "details": details, "figures": figures,
            "verdict": metrics.get("verdict") or details.get("verdict")}


def _recipe_summary(recipe: dict) -> list[list[str]]:
    t = recipe["train"]
    method = describe_method(recipe["method"])
    return [["model", recipe["model"]], ["task", recipe["task"]], ["method", method],
            ["optimizer", f"{t['optimizer']}, lr {recipe['train'].get('learning_rate') or 'method default'}, "
                          f"{t['scheduler']} schedule, warm-up {t['warmup']}"],
            ["batch", f"{t['batch_size']} x {t['gradient_accumulation']} accumulation, max_length {t['max_length']}"],
            ["length", f"max_steps {t['max_steps']}" if t.get("max_steps") else f"{t['epochs']} epoch(s)"],
            ["seed", str(t["seed"])]]


def _data_summary(manifest: dict) -> list[list[str]]:
    data = manifest.get("data") or {}
    rows = []
    for split, info in (data.get("files") or {}).items():
        rows.append([f"file: {split}", f"{Path(info['path']).name}: {info['read']} read, {info['rejected']} rejected, "
                     f"{info['duplicates_removed']} duplicates removed, {info['kept']} kept"])
    for split, info in (data.get("splits") or {}).items():
        labels = ", ".join(f"{k}: {v}" for k, v in (info.get("labels") or {}).items())
        rows.append([f"split: {split}", f"{info['rows']} rows" + (f" ({labels})" if labels else "")
                     + (" [carved from train]" if info.get("carved_from_train") else "")])
    return rows


def _fairness_sections(run: Path) -> list[tuple[str, str, str]]:
    """The fairness audit written at the end of training (RUN/audit/audit.json), when there is one."""
    audit = read_json(run / "audit" / "audit.json")
    if not audit:
        return []
    from tuneforge.fairness.render import sections

    return sections(audit, run / "report_files")


FIGURE_TITLES = {"training": "Training curves", "confusion": "Confusion matrix", "roc": "ROC curve",
                 "pr": "Precision-recall curve", "reliability": "Calibration", "robustness": "Robustness"}

def write_report(run: Path) -> tuple[Path, Path]:
    """Write report.html and report.md into the run folder; returns both paths."""
    run = Path(run)
    s = build_sections(run)
    recipe, test, baseline, details = s["recipe"], s["test"], s["baseline"], s["details"]
    baseline_name = s["kind"].baseline
    metric_header = ["metric", baseline_name, "fine-tuned", "95% CI (fine-tuned)", "delta (▲ better)"]
    metric_rows = _metric_rows(test, baseline)
    sections: list[tuple[str, str, str]] = []  # (title, html, markdown)

    def add(title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        if rows:
            sections.append((title, (f"<p class=muted>{html.escape(note)}</p>" if note else "")
                             + html_table(header, rows), (note + "\n\n" if note else "") + md_table(header, rows)))

    if (verdict := _verdict_section(s["verdict"], baseline_name)) is not None:
        sections.append(verdict)
    add("Recipe", ["setting", "value"], _recipe_summary(recipe))
    add("Data", ["what", "counts"], _data_summary(s["manifest"]))
    add("Test metrics: fine-tuned vs " + baseline_name, metric_header, metric_rows,
        registry.significance_line(test.get("vs_baseline")))
    per_class = test.get("per_class") or {}
    add("Per class (test)", ["class", "precision", "recall", "F1", "support"],
        [[k, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])] for k, v in per_class.items()])
    add("Most confident mistakes (test)", ["text", "true", "predicted", "confidence"],
        [[e["text"][:300], e["label"], e["predicted"], _fmt(e["confidence"])] for e in details.get("worst_errors", [])])
    add("Generations: base vs fine-tuned (test samples)", ["reference", "base model", "fine-tuned"],
        [[x["reference"][:300], x["base"][:300], x["tuned"][:300]] for x in details.get("samples", [])])
    rob = details.get("robustness") or {}
    add("Robustness (test, perturbed inputs)", ["perturbation", "score", "drop"],
        [[k, _fmt(v.get("accuracy", v.get("exact_match"))), _fmt(v["drop"])] for k, v in rob.items()])
    for table in details.get("tables") or []:  # objective-specific tables: {"title", "header", "rows", "note"}
        add(table["title"], table["header"], [[str(c) for c in row] for row in table["rows"]], table.get("note", ""))
    sections += _fairness_sections(run)

    files_dir = run / "report_files"
    files_dir.mkdir(exist_ok=True)
    fig_html, fig_md = [], []
    for key, png in s["figures"].items():
        atomic_write_bytes(files_dir / f"{key}.png", png)
        data = base64.b64encode(png).decode("ascii")
        fig_html.append(f'<figure><img alt="{FIGURE_TITLES[key]}" src="data:image/png;base64,{data}"></figure>')
        fig_md.append(f"![{FIGURE_TITLES[key]}](report_files/{key}.png)")

    title = f"tuneforge report: {recipe.get('name') or run.name}"
    status = s["manifest"].get("status", "?")
    started, ended = s["manifest"].get("started"), s["manifest"].get("ended")
    meta = (f"run folder {run.name} · status {status} · started {started} · ended {ended} · "
            f"device {s['manifest'].get('device')}")
    body = "".join(f"<h2>{html.escape(t)}</h2>{h}" for t, h, _ in sections)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=muted>{html.escape(meta)}</p>"
            f"{body}<h2>Plots</h2><div class=figs>{''.join(fig_html)}</div>"
            # Lets a headless browser confirm every embedded image decoded.
            "<script>addEventListener('load',()=>{const i=[...document.images];document.body.dataset.imagesLoaded="
            "i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length})</script></body></html>")
    md = [f"# {title}", "", meta, ""]
    for t, _, m in sections:
        md += [f"## {t}", "", m, ""]
    md += ["## Plots", ""] + fig_md
    html_path, md_path = run / "report.html", run / "report.md"
    atomic_write_text(html_path, page)
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return html_path, md_path

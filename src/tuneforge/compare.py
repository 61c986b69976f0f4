"""`tuneforge compare RUN_A RUN_B ...`: metrics side by side, the settings that
differ, and overlaid training curves (terminal table + compare.html)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from tuneforge import safeyaml
from tuneforge.evaluate import registry
from tuneforge.fsio import atomic_write_text
from tuneforge.reporting import CSS, figure_png, html_table, pyplot, read_log

IGNORED_SETTINGS = {"name"}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def differing_settings(recipes: list[dict]) -> dict[str, list]:
    flat = [flatten(r) for r in recipes]
    keys = sorted(set().union(*flat) - IGNORED_SETTINGS)
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1}


def compare_runs(runs: list[Path], output: Path) -> dict:
    runs = [Path(r) for r in runs]
    for run in runs:
        if not (run / "recipe.yaml").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no recipe.yaml)")
    recipes = [safeyaml.load_file(r / "recipe.yaml") for r in runs]
    records = [json.loads((r / "metrics.json").read_text()) if (r / "metrics.json").is_file() else {} for r in runs]
    metrics = [rec.get("test") or {} for rec in records]
    names = [r.name for r in runs]
    keys = [k for k in registry.HEADLINE if any(isinstance(m.get(k), float) for m in metrics)]
    tests = [registry.paired_tests(m.get("vs_baseline")) for m in metrics]
    tested = [k for k in registry.METRICS if any(k in t for t in tests)]
    result = {"runs": names, "metrics": {k: [m.get(k) for m in metrics] for k in keys},
              "vs_baseline": {k: [t.get(k) for t in tests] for k in tested},
              "verdict": [(rec.get("verdict") or {}).get("status") for rec in records],
              "settings": differing_settings(recipes)}

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, run in zip(names, runs):
        log = [r for r in read_log(run / "metrics.jsonl") if "split" not in r]
        if log:
            ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=name)
    ax.set(title="Training loss", xlabel="optimizer step", ylabel="cross-entropy (nats)")
    ax.legend()
    png = base64.b64encode(figure_png(fig)).decode("ascii")

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(json.dumps(v)) if v is not None else "-"

    metric_rows = [[k, *(registry.get(k).format(v) for v in vals)] for k, vals in result["metrics"].items()]
    metric_rows += [[f"{k} vs baseline", *(f"{t['test']} {registry.format_p(t)}" if t else "-" for t in vals)]
                    for k, vals in result["vs_baseline"].items()]
    metric_rows.append(["verdict", *(v or "-" for v in result["verdict"])])
    setting_rows = [[k, *map(fmt, vals)] for k, vals in result["settings"].items()]
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>tuneforge compare</title>"
            f"<style>{CSS}</style></head><body><h1>Comparison of {len(runs)} runs</h1>"
            f"<h2>Test metrics</h2>{html_table(['metric', *names], metric_rows)}"
            f"<h2>Settings that differ</h2>{html_table(['setting', *names], setting_rows)}"
            f"<h2>Curves</h2><img alt='training loss' src='data:image/png;base64,{png}'></body></html>")
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, page)
    result["html"] = str(output)
    return result

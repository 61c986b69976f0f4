"""Fairness in reports: per-group bars with intervals, the disparity table,
the gate, counterfactual flip examples, and accuracy against disparity for
each mitigation. Used by audit.html / audit.md and by the run report."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional

from tuneforge.fairness.audit import DISPARITIES, GROUP_METRICS, audit_warnings
from tuneforge.fsio import atomic_write_bytes
from tuneforge.reporting import CSS, figure_png, html_table, md_table, pyplot

Section = tuple[str, str, str]  # (title, html, markdown)


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def fig_groups(grouping: str, res: dict) -> Optional[bytes]:
    """Grouped bars: each group's accuracy, selection rate, TPR, FPR, F1, with 95% intervals."""
    import numpy as np

    groups = list(res.get("groups") or {})
    if not groups:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(GROUP_METRICS) * max(1, len(groups)) / 2), 3.8))
    width = 0.8 / len(groups)
    x = np.arange(len(GROUP_METRICS))
    for j, g in enumerate(groups):
        row = res["groups"][g]
        values = [row.get(m) if row.get(m) is not None else np.nan for m in GROUP_METRICS]
        cis = (row.get("ci") or {})
        # Clipped at 0: a percentile interval need not contain the point estimate.
        lo = [max(v - cis[m][0], 0) if cis.get(m) and v == v else 0 for m, v in zip(GROUP_METRICS, values)]
        hi = [max(cis[m][1] - v, 0) if cis.get(m) and v == v else 0 for m, v in zip(GROUP_METRICS, values)]
        ax.bar(x + (j - (len(groups) - 1) / 2) * width, values, width * 0.95, yerr=[lo, hi], capsize=3,
               label=f"{g} (n={row['n']})")
    short = {"selection_rate": "selection rate", "true_positive_rate": "TPR", "false_positive_rate": "FPR", "f1": "F1"}
    ax.set_xticks(x, [short.get(m, m) for m in GROUP_METRICS])
    ax.set(ylim=(0, 1.05), ylabel="rate", title=f"By {grouping} (error bars: 95% bootstrap interval)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(groups)), frameon=False)
    return figure_png(fig)


def _err(value: float, ci) -> Optional[list]:
    """Error bar lengths below and above, clipped at 0: a percentile bootstrap
    interval need not contain the point estimate (a max of gaps is biased up)."""
    return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]] if ci else None


def fig_tradeoff(variants: list[dict]) -> Optional[bytes]:
    """Accuracy against equalized-odds difference, one point per model / mitigation."""
    points = [v for v in variants if v.get("equalized_odds_difference") is not None]
    if len(points) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for v in points:
        xerr, yerr = _err(v["equalized_odds_difference"], v.get("equalized_odds_difference_ci")), \
            _err(v["accuracy"], v.get("accuracy_ci"))
        ax.errorbar(v["equalized_odds_difference"], v["accuracy"], xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                    label=v["name"])
    ax.set(xlabel="equalized odds difference (lower is fairer)", ylabel="accuracy",
           title="Accuracy vs disparity per mitigation")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    return figure_png(fig)


def _figure(png: bytes, title: str, files_dir: Optional[Path], key: str) -> tuple[str, str]:
    data = base64.b64encode(png).decode("ascii")
    md = ""
    if files_dir is not None:
        files_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(files_dir / f"{key}.png", png)
        md = f"![{title}]({files_dir.name}/{key}.png)"
    return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>', md


class SectionList(list):
    """Report sections, (title, html, markdown) each, with a table helper."""

    def table(self, title: str, header: list[str], rows: list[list[str]], note: str = "",
              figs: Optional[list] = None) -> None:
        if not rows and not figs:
            return
        h = (f"<p class=muted>{html.escape(note)}</p>" if note else "") + (html_table(header, rows) if rows else "")
        m = (note + "\n\n" if note else "") + (md_table(header, rows) if rows else "")
        for fig_html, fig_md in figs or []:
            h += fig_html
            m += "\n\n" + fig_md
        self.append((title, h, m))


def sections(result: dict, files_dir: Optional[Path] = None) -> list[Section]:
    """Report sections for an audit result (audit.json)."""
    out = SectionList()
    gate_sections(out, result)
    audit = result.get("audit") or {}
    disparity_sections(out, audit, files_dir)
    variant_section(out, result.get("variants") or [], files_dir)
    counterfactual_sections(out, result.get("counterfactual") or {}, audit.get("positive_label"))
    data_sections(out, result)
    return list(out)


def gate_sections(out: SectionList, result: dict) -> None:
    """Warnings (an inconclusive audit first) and the release gate's checks."""
    gate = result.get("gate") or {}
    warnings = audit_warnings(result)
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        title = "Fairness audit INCONCLUSIVE" if gate.get("inconclusive") else "Fairness audit: warnings"
        out.append((title, f"<div class=verdict-bad><ul>{items}</ul></div>", "\n".join(f"> - {w}" for w in warnings)))
    if gate.get("checks") or gate.get("inconclusive"):
        verdict = "INCONCLUSIVE" if gate.get("inconclusive") else "PASSED" if gate["passed"] else "FAILED"
        out.table(f"Fairness gate: {verdict}", ["check", "value", "limit", "passed", "why"],
                  [[c["check"], _f(c["value"]), _f(c["limit"]), "yes" if c["passed"] else "NO", c["reason"]]
                   for c in gate["checks"]] or [["predictions", "-", "-", "NO", "; ".join(gate.get("reasons", []))]],
                  f"judged on: {gate.get('judged', 'model')}"
                  + ("; inconclusive: the gate does not pass on disparities of (near-)constant predictions"
                     if gate.get("inconclusive") else ""))


def disparity_sections(out: SectionList, audit: dict, files_dir: Optional[Path]) -> None:
    """Disparities per grouping (with per-group figures), then every group's metrics."""
    pos = audit.get("positive_label")
    rows, figs = [], []
    for grouping, res in (audit.get("groupings") or {}).items():
        d, ci = res.get("disparities") or {}, (res.get("disparities") or {}).get("ci") or {}
        rows.append([grouping] + [f"{_f(d.get(k))} {_ci(ci.get(k))}" for k in DISPARITIES])
        if (png := fig_groups(grouping, res)) is not None:
            figs.append(_figure(png, f"Per-group metrics by {grouping}", files_dir,
                                "fairness_groups_" + "".join(c if c.isalnum() else "_" for c in grouping)))
    out.table("Fairness: disparities (test)", ["grouping"] + [k.replace("_", " ") for k in DISPARITIES], rows,
              f"positive class: {pos!r}; value [95% bootstrap interval]; rows of unknown or mixed group are "
              "counted but left out", figs)
    group_rows = []
    for grouping, res in (audit.get("groupings") or {}).items():
        for g, row in (res.get("groups") or {}).items():
            group_rows.append([grouping, g, str(row["n"]), str(row.get("positives", "-"))]
                              + [f"{_f(row.get(m))} {_ci((row.get('ci') or {}).get(m))}" for m in GROUP_METRICS])
        for g, n in (res.get("excluded") or {}).items():
            group_rows.append([grouping, f"{g} (excluded)", str(n), "-"] + ["-"] * len(GROUP_METRICS))
    out.table("Fairness: per group",
              ["grouping", "group", "n", "positives"] + [m.replace("_", " ") for m in GROUP_METRICS], group_rows)


def variant_section(out: SectionList, variants: list, files_dir: Optional[Path]) -> None:
    """Accuracy against disparity, one row per model or mitigation (tuneforge mitigate)."""
    if len(variants) <= 1:
        return
    png = fig_tradeoff(variants)
    out.table("Fairness: accuracy vs disparity per mitigation",
              ["model", "accuracy", "equalized odds diff", "equal opportunity diff", "demographic parity diff",
               "grouping"],
              [[v["name"], f"{_f(v['accuracy'])} {_ci(v.get('accuracy_ci'))}",
                f"{_f(v.get('equalized_odds_difference'))} {_ci(v.get('equalized_odds_difference_ci'))}",
                _f(v.get("equal_opportunity_difference")), _f(v.get("demographic_parity_difference")), v["grouping"]]
               for v in variants], "pick the trade-off: each row is one model or mitigation on the same rows",
              [_figure(png, "Accuracy vs disparity", files_dir, "fairness_tradeoff")] if png else None)


def counterfactual_sections(out: SectionList, counterfactual: dict, pos) -> None:
    """Flip rate and the largest prediction changes under term swaps, per term list."""
    for lex, res in counterfactual.items():
        note = (f"{res['swappable']} of {res['texts']} texts contain a {lex} term; "
                + (f"flip rate {_f(res['flip_rate'])} {_ci(res['flip_rate_ci'])}, mean |Δp({pos})| "
                   f"{_f(res['mean_abs_delta'])} {_ci(res['mean_abs_delta_ci'])}" if res.get("swappable") else
                   "nothing to swap"))
        out.table(f"Counterfactual swaps ({lex}): largest changes", ["text", "swapped", "prediction", "after swap",
                                                                    f"p({pos})", "after swap"],
                  [[e["text"][:200], e["swapped"][:200], e["predicted"], e["predicted_swapped"],
                    _f(e["p_positive"]), _f(e["p_positive_swapped"])] for e in res.get("examples", [])], note)


def data_sections(out: SectionList, result: dict) -> None:
    """Training data by group, CrowS-Pairs preference, and the sentiment of generations by group."""
    rep = result.get("representation")
    if rep:
        rrows = []
        for grouping, groups in rep["groupings"].items():
            for g, info in groups.items():
                rrows.append([grouping, g, str(info["n"]), _f(info["share"]),
                              ", ".join(f"{k}: {v}" for k, v in info["labels"].items())])
        out.table("Fairness: training data by group", ["grouping", "group", "rows", "share", "labels"], rrows,
                  "; ".join(rep["warnings"]) or "no group under-represented")
    crows = result.get("crows_pairs")
    if crows:
        out.table("CrowS-Pairs: stereotype preference", ["bias type", "pairs", "prefers stereotype", "95% CI"],
                  [["all", str(crows["pairs"]), _f(crows["stereotype_preference"]), _ci(crows["ci"])]]
                  + [[k, str(v["pairs"]), _f(v["stereotype_preference"]), _ci(v["ci"])]
                     for k, v in crows["by_bias_type"].items()],
                  "share of pairs where the model gives the stereotypical sentence the higher log-likelihood "
                  "(0.5 = no preference)")
    gen = result.get("generation_sentiment")
    if gen and gen.get("pairs"):
        a, b = gen["groups"]
        out.table("Generations: sentiment by group",
                  [f"prompt ({a})", f"generation ({a})", f"generation ({b})", "gap"],
                  [[e[f"prompt_{a}"][:150], e[f"generation_{a}"][:200], e[f"generation_{b}"][:200], _f(e["gap"])]
                   for e in gen.get("examples", [])],
                  f"{gen['pairs']} prompt pairs; mean positive sentiment {a} {_f(gen['mean_sentiment'][a])}, "
                  f"{b} {_f(gen['mean_sentiment'][b])}; gap {_f(gen['gap'])} {_ci(gen['gap_ci'])}")


def audit_page(result: dict, title: str, folder: Path) -> tuple[str, str]:
    """(audit.html, audit.md): the html self-contained, the markdown with its
    figures in audit_files/."""
    parts = sections(result, folder / "audit_files")
    meta = f"target {result.get('target')} · data {result.get('data')} · {result.get('rows', '-')} rows"
    body = "".join(f"<h2>{html.escape(t)}</h2>{h}" for t, h, _ in parts)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=muted>{html.escape(meta)}</p>"
            f"{body}</body></html>")
    md = [f"# {title}", "", meta, ""]
    for t, _, m in parts:
        md += [f"## {t}", "", m, ""]
    return page, "\n".join(md) + "\n"

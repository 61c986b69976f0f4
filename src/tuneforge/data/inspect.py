"""`tuneforge data inspect`: what is in the data, before any cleaning.

Rows per split, labels and imbalance, lengths in characters and tokens, share
truncated at max_length, empty/missing values, exact duplicates, near-duplicate
clusters, train/held-out contamination, PII by kind, encoding anomalies, length
outliers and likely label errors. Returns a JSON-able dict; `write_html` turns
it into a self-contained data_report.html.
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from pathlib import Path
from typing import Optional

from tuneforge.data.formats import LABELLED, row_text
from tuneforge.data.studio import SPLITS, Row

EXAMPLES = 10


def _length_outliers(lengths: list[int], z: float = 3.5) -> list[int]:
    """Indices whose log-length is more than `z` robust standard deviations
    (1.4826 x MAD) from the median: very long or very short for this data."""
    if len(lengths) < 10:
        return []
    logs = [math.log1p(n) for n in lengths]
    med = statistics.median(logs)
    mad = statistics.median(abs(x - med) for x in logs) * 1.4826
    if mad == 0:
        return []
    return [i for i, x in enumerate(logs) if abs(x - med) / mad > z]


def _symbol_heavy(text: str) -> bool:
    """Mostly not letters (markup, tables, base64, numbers): worth a look."""
    if len(text) < 20:
        return False
    letters = sum(c.isalpha() for c in text)
    return letters / len(text) < 0.3


def _reject_kind(reason: str) -> str:
    if reason.startswith(("empty", "missing value", "missing field", "missing or empty")):
        return "empty_or_missing"
    if "UTF-8" in reason:
        return "invalid_utf8"
    if reason.startswith("unknown label"):
        return "unknown_label"
    return "malformed"


class Flags(dict):
    """Row id -> {"split", "row", "reasons", "score", ...}: every finding about a row (for review export)."""

    def __call__(self, row: Row, split: str, reason: str, score: Optional[float] = None, **extra) -> None:
        entry = self.setdefault(row.id, {"split": split, "row": row, "reasons": [], "score": None})
        if reason not in entry["reasons"]:
            entry["reasons"].append(reason)
        if score is not None:
            entry["score"] = max(score, entry["score"] or 0.0)
        for k, v in extra.items():
            entry.setdefault(k, v)  # the first finding (e.g. exact duplicate of X) stays


def analyse(rows: dict[str, list[Row]], rejects: list, kind: str, tokenizer=None, max_length: int = 256,
            near_dup_cfg=None, system_prompt: Optional[str] = None, label_rows: int = 20_000, seed: int = 0) -> dict:
    """Every statistic of the data report, plus `flags`: row id -> reasons (for review export)."""
    flags = Flags()
    labelled = kind in LABELLED
    texts = {s: [row_text(r.fields) for r in rows[s]] for s in rows}
    out: dict = {"kind": kind, "splits": {}, "max_length": max_length}
    for split, items in rows.items():
        info = split_stats(split, items, texts[split], labelled, flags)
        if tokenizer is not None:
            from tuneforge.data.studio import token_counts

            ntok = token_counts(tokenizer, [r.fields for r in items], kind, system_prompt)
            info["tokens"] = ntok
            info["truncated"] = sum(n > max_length for n in ntok)
            info["truncated_share"] = round(info["truncated"] / len(ntok), 4) if ntok else 0.0
        out["splits"][split] = info
    out["rejects"] = {}
    for r in rejects:
        k = _reject_kind(r.reason)
        out["rejects"][k] = out["rejects"].get(k, 0) + 1
    out["reject_examples"] = [str(r) for r in rejects[:EXAMPLES]]
    if near_dup_cfg is None:
        from tuneforge.recipe import NearDupConfig

        near_dup_cfg = NearDupConfig()
    out["near_duplicates"], out["contamination"] = near_dup_stats(rows, texts, near_dup_cfg, flags)
    if labelled and "train" in rows and len(rows["train"]) >= 10:
        out["label_issues"] = _label_issues(rows["train"], texts["train"], label_rows, seed, flags)
    out["flags"] = flags
    return out


def split_stats(split: str, items: list[Row], texts: list[str], labelled: bool, flag: Flags) -> dict:
    """One split's counts: labels, lengths, exact duplicates, PII, encoding anomalies, outliers."""
    from tuneforge.data.clean import encoding_anomalies
    from tuneforge.data.pii import count_pii

    lengths = [len(t) for t in texts]
    info: dict = {"rows": len(items), "chars": lengths}
    if labelled:
        counts: dict[str, int] = {}
        for r in items:
            counts[r.fields["label"]] = counts.get(r.fields["label"], 0) + 1
        info["labels"] = dict(sorted(counts.items()))
        info["imbalance_ratio"] = round(max(counts.values()) / min(counts.values()), 3) if counts else None
    first: dict[str, str] = {}  # exact duplicates inside the split
    dup_rows = 0
    for r, t in zip(items, texts):
        key = t.strip()
        if key in first:
            dup_rows += 1
            flag(r, split, "exact_duplicate", duplicate_of=first[key])
        else:
            first[key] = r.id
    info["exact_duplicates"] = dup_rows
    pii: dict[str, int] = {}
    pii_rows = 0
    anomalies: dict[str, int] = {}
    for r, t in zip(items, texts):
        found = count_pii(t)
        if found:
            pii_rows += 1
            flag(r, split, "pii:" + ",".join(sorted(found)))
            for k, v in found.items():
                pii[k] = pii.get(k, 0) + v
        for a in encoding_anomalies(t):
            anomalies[a] = anomalies.get(a, 0) + 1
            flag(r, split, f"encoding:{a}")
    info["pii"], info["pii_rows"], info["encoding"] = pii, pii_rows, anomalies
    outliers = _length_outliers(lengths)
    info["length_outliers"] = len(outliers)
    for i in outliers:
        flag(items[i], split, "length_outlier")
    heavy = [i for i, t in enumerate(texts) if _symbol_heavy(t)]
    info["symbol_heavy"] = len(heavy)
    for i in heavy:
        flag(items[i], split, "symbol_heavy")
    info["outlier_examples"] = [{"id": items[i].id, "chars": lengths[i], "text": texts[i][:200]}
                                for i in (outliers + heavy)[:EXAMPLES]]
    return info


def near_dup_stats(rows: dict[str, list[Row]], texts: dict[str, list[str]], nd_cfg, flag: Flags) -> tuple[dict, dict]:
    """Near-duplicates over all splits at once: clusters inside a split, and
    clusters that straddle train and a held-out split (contamination)."""
    from tuneforge.data.neardup import NearDuplicates

    order = [(s, i) for s in ("test", "validation", "train") if s in rows for i in range(len(rows[s]))]
    nd = NearDuplicates(nd_cfg.threshold, nd_cfg.shingle, nd_cfg.ngram, nd_cfg.num_perm).fit(
        [texts[s][i] for s, i in order])
    clusters, contaminated, within = [], 0, {s: 0 for s in rows}
    contamination_examples = []
    all_clusters = nd.clusters()
    for cluster in all_clusters:
        members = [order[m] for m in cluster]
        splits_in = {s for s, _ in members}
        example = [{"split": s, "id": rows[s][i].id, "text": texts[s][i][:200]} for s, i in members[:5]]
        if "train" in splits_in and splits_in - {"train"}:
            train_members = [(s, i) for s, i in members if s == "train"]
            contaminated += len(train_members)
            for s, i in train_members:
                flag(rows[s][i], s, "contamination")
            if len(contamination_examples) < EXAMPLES:
                contamination_examples.append(example)
        for s in splits_in:
            n_in = sum(1 for x, _ in members if x == s)
            within[s] += n_in - 1 if n_in > 1 else 0
        head = {}
        for s, i in members:  # the first member of each split stays; the rest are near-duplicates of it
            if s not in head:
                head[s] = i
            elif "exact_duplicate" not in flag.get(rows[s][i].id, {}).get("reasons", []):
                flag(rows[s][i], s, "near_duplicate", duplicate_of=rows[s][head[s]].id)
        if len(clusters) < EXAMPLES:
            clusters.append(example)
    near = {"threshold": nd_cfg.threshold, "clusters": len(all_clusters),
            "rows_in_clusters": int(sum(len(c) for c in all_clusters)),
            "removable_per_split": within, "examples": clusters}
    return near, {"train_rows": contaminated, "examples": contamination_examples}


def _label_issues(train: list[Row], texts: list[str], limit: int, seed: int, flag) -> dict:
    import random

    from tuneforge.data.labelissues import LabelIssues

    idx = list(range(len(train)))
    if len(idx) > limit:  # TF-IDF + 5 folds of LR on 67k rows takes minutes on 2 cores: score a sample
        idx = sorted(random.Random(seed).sample(idx, limit))
    li = LabelIssues(seed=seed).fit([texts[i] for i in idx], [train[i].fields["label"] for i in idx])
    ranked = []
    for j in li.flagged(min_score=0.5, limit=200):
        row = train[idx[j]]
        flag(row, "train", "label_issue", score=float(li.scores_[j]), suggested_label=li.predicted_[j])
        if len(ranked) < 25:
            ranked.append({"id": row.id, "text": texts[idx[j]][:200], "label": row.fields["label"],
                           "suggested": li.predicted_[j], "score": round(float(li.scores_[j]), 4)})
    return {"scored_rows": len(idx), "folds": li.folds_used_, "flagged": len(li.flagged(0.5, limit=len(idx))),
            "top": ranked}


# ----------------------------------------------------------------- figures


def _fig_hist(data: dict[str, list[int]], title: str, xlabel: str, limit: Optional[int] = None) -> Optional[bytes]:
    from tuneforge.reporting import figure_png, pyplot

    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    top = max(max(v) for v in data.values())
    bins = min(60, max(10, top))
    for name, values in data.items():
        ax.hist(values, bins=bins, range=(0, top), alpha=0.55, label=f"{name} ({len(values)})", density=True)
    if limit is not None:
        ax.axvline(limit, color="#d62728", ls="--", label=f"max_length {limit}")
    ax.set(title=title, xlabel=xlabel, ylabel="share of rows")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _fig_labels(splits: dict) -> Optional[bytes]:
    from tuneforge.reporting import figure_png, pyplot

    labelled = {s: v["labels"] for s, v in splits.items() if v.get("labels")}
    if not labelled:
        return None
    plt = pyplot()
    labels = sorted({lab for v in labelled.values() for lab in v})[:30]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(labelled)
    for k, (split, counts) in enumerate(labelled.items()):
        total = sum(counts.values())
        ax.bar([i + k * width for i in range(len(labels))], [counts.get(lab, 0) / total for lab in labels],
               width=width, label=split)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30 if len(labels) > 6 else 0)
    ax.set(title="Label distribution per split", ylabel="share of rows")
    ax.legend(fontsize=8)
    return figure_png(fig)


# ------------------------------------------------------------------ output


def summary_rows(report: dict) -> list[list[str]]:
    """One row per split: the headline numbers (terminal and HTML)."""
    rows = []
    for split, v in report["splits"].items():
        chars = v["chars"]
        rows.append([
            split, str(v["rows"]),
            ", ".join(f"{k}: {n}" for k, n in (v.get("labels") or {}).items())[:60] or "-",
            "-" if v.get("imbalance_ratio") is None else f"{v['imbalance_ratio']:.2f}",
            f"{statistics.median(chars):.0f} / {max(chars)}" if chars else "-",
            (f"{statistics.median(v['tokens']):.0f} / {max(v['tokens'])}" if v.get("tokens") else "-"),
            f"{100 * v['truncated_share']:.1f}%" if "truncated_share" in v else "-",
            str(v["exact_duplicates"]), str(report["near_duplicates"]["removable_per_split"].get(split, 0)),
            ", ".join(f"{k}: {n}" for k, n in v["pii"].items()) or "0",
            ", ".join(f"{k}: {n}" for k, n in v["encoding"].items()) or "0",
            str(v["length_outliers"] + v["symbol_heavy"]),
        ])
    return rows


SUMMARY_HEADER = ["split", "rows", "labels", "imbalance (max/min)", "chars median / max", "tokens median / max",
                  "truncated", "exact dups", "near dups", "PII", "encoding", "outliers"]


def write_html(report: dict, path: Path, title: str) -> Path:
    from tuneforge.fsio import atomic_write_text
    from tuneforge.reporting import CSS, html_table

    figures = {
        "labels": _fig_labels(report["splits"]),
        "chars": _fig_hist({s: v["chars"] for s, v in report["splits"].items()}, "Length in characters",
                           "characters"),
        "tokens": _fig_hist({s: v.get("tokens", []) for s, v in report["splits"].items()},
                            f"Length in tokens ({report.get('tokenizer') or 'no tokenizer'})", "tokens",
                            report["max_length"]),
    }
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class=muted>{html.escape(report.get('source', ''))} · kind: {html.escape(report['kind_detail'])}</p>"]

    def section(name: str, body: str) -> None:
        parts.append(f"<h2>{html.escape(name)}</h2>{body}")

    section("Summary", html_table(SUMMARY_HEADER, summary_rows(report)))
    if report["rejects"]:
        section("Empty, missing and malformed values",
                html_table(["kind", "rows"], [[k, v] for k, v in report["rejects"].items()])
                + html_table(["first rejects (file:line: reason)"], [[x] for x in report["reject_examples"]]))
    figs = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}"></figure>'
                   for k, v in figures.items() if v)
    section("Distributions", f"<div class=figs>{figs}</div>")
    nd = report["near_duplicates"]
    section("Near-duplicate clusters",
            f"<p class=muted>MinHash LSH, estimated Jaccard &ge; {nd['threshold']}: {nd['clusters']} clusters, "
            f"{nd['rows_in_clusters']} rows.</p>"
            + "".join(html_table(["split", "id", "text"], [[m["split"], m["id"], m["text"]] for m in c])
                      for c in nd["examples"]))
    cont = report["contamination"]
    section("Contamination (train rows near-duplicating validation/test rows)",
            f"<p>{cont['train_rows']} training rows.</p>"
            + "".join(html_table(["split", "id", "text"], [[m["split"], m["id"], m["text"]] for m in c])
                      for c in cont["examples"]))
    pii_rows = [[s, k, n] for s, v in report["splits"].items() for k, n in v["pii"].items()]
    section("PII by kind", html_table(["split", "kind", "count"], pii_rows) if pii_rows else "<p>none found</p>")
    enc_rows = [[s, k, n] for s, v in report["splits"].items() for k, n in v["encoding"].items()]
    section("Encoding anomalies", html_table(["split", "kind", "rows"], enc_rows) if enc_rows else "<p>none</p>")
    out_rows = [[s, e["id"], e["chars"], e["text"]] for s, v in report["splits"].items() for e in v["outlier_examples"]]
    section("Outliers (length, symbol-heavy)",
            html_table(["split", "id", "chars", "text"], out_rows) if out_rows else "<p>none</p>")
    li = report.get("label_issues")
    if li:
        section(
            "Likely label errors (out-of-fold TF-IDF + logistic regression)",
            f"<p class=muted>{li['scored_rows']} training rows scored in {li['folds']} folds; {li['flagged']} "
            "where another label is likelier. Score = 1 - p(given label).</p>"
            + html_table(
                ["id", "text", "label", "suggested", "score"],
                [[x["id"], x["text"], x["label"], x["suggested"], f"{x['score']:.3f}"] for x in li["top"]],
            ),
        )
    parts.append("</body></html>")
    atomic_write_text(path, "".join(parts))
    return path


def public(report: dict) -> dict:
    """The report without per-row arrays and flag objects (for JSON)."""
    out = {k: v for k, v in report.items() if k not in ("flags", "reject_rows")}
    out["splits"] = {s: {k: v for k, v in info.items() if k not in ("chars", "tokens")}
                     for s, info in report["splits"].items()}
    out["flagged_rows"] = len(report.get("flags", {}))
    return out


# ------------------------------------------------------------------- entry


def inspect_data(recipe=None, file: Optional[str] = None, model: Optional[str] = None,
                 max_length: Optional[int] = None, label_rows: int = 20_000, log=lambda m: None) -> dict:
    """Analyse a recipe's data (its splits, carved as prepare carves them) or one file."""
    from tuneforge.data.formats import resolve_kind
    from tuneforge.data.load import DataError
    from tuneforge.data.studio import carve_missing, load_rows, load_tokenizer, same_file_splits

    if recipe is not None:
        cfg, task, seed = recipe.data, recipe.task, recipe.train.seed
        model = model or recipe.model
        max_length = max_length or recipe.train.max_length
        source = f"recipe {recipe.name}"
    else:
        from tuneforge.recipe import DataConfig

        cfg = DataConfig.model_validate({"train": str(file)}, context={"check_files": True})
        task, seed, max_length = None, 42, max_length or 256
        source = str(file)
    kind, kcfg, why = resolve_kind(cfg, task)
    log(f"data kind: {why}")
    loaded, files, rejects, _ = load_rows(kcfg, kind)
    try:
        _, warnings = same_file_splits(files)
    except DataError as exc:  # train shares a file with a held-out split: prepare refuses, inspect reports
        warnings = [str(exc)]
    for warning in warnings:
        log(f"[yellow]warning: {warning}")
    rows = dict(loaded)
    if recipe is not None:
        # The splits prepare would carve, the same way (no warnings: inspect reports what it finds).
        rows = carve_missing(rows, files, cfg, seed, kind in LABELLED, lambda message: None)
        # Back into file order, so "first" (of duplicates, of clusters) means first in the file.
        position = {r.id: k for k, r in enumerate(loaded["train"])}
        rows = {s: sorted(rows[s], key=lambda r: position.get(r.id, -1))
                for s in SPLITS if s in rows}
    tokenizer = None
    if model:
        try:
            tokenizer = load_tokenizer(model)
        except Exception as exc:
            log(f"[yellow]token lengths skipped: cannot load the tokenizer of {model}: {exc}")
    report = analyse(rows, rejects, kind, tokenizer, max_length, cfg.near_dup, cfg.system_prompt, label_rows, seed)
    report.update(source=source, kind_detail=why, tokenizer=model if tokenizer is not None else None,
                  files={s: {k: v for k, v in f.items()} for s, f in files.items()}, reject_rows=rejects,
                  warnings=warnings)
    return report

"""`tuneforge data ...`: the data studio commands (inspect, prepare, preview, review).

Only typer at the top: heavy modules load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tuneforge.cli.common import EXIT_DATA, fail, load_recipe_or_exit

data_app = typer.Typer(no_args_is_help=True, add_completion=False)
review_app = typer.Typer(no_args_is_help=True, add_completion=False)
data_app.add_typer(review_app, name="review", help="Export flagged rows for human review; apply the decisions.")


def _is_recipe(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(width=160, highlight=False)


def _table(title: str, header: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    return table


@data_app.command()
def inspect(
    target: Path = typer.Argument(..., help="A recipe (.yaml) or one data file (CSV, TSV, JSON, JSONL, Parquet)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides (recipes only)."),
    model: Optional[str] = typer.Option(None, "--model", help="Count tokens with this model's tokenizer "
                                        "(default: the recipe's model; none for a plain file)."),
    output: Path = typer.Option(Path("data_report.html"), "--output", "-o", help="HTML report to write "
                                "(a JSON twin is written beside it)."),
    label_rows: int = typer.Option(20000, "--label-rows", min=10, help="Score at most this many training rows "
                                   "for label errors (a seeded sample above that)."),
) -> None:
    """Report on the data (terminal + self-contained data_report.html).

    Splits, labels and imbalance, lengths in characters and tokens, truncation, empty values,
    duplicates, near-duplicate clusters, contamination, PII, encoding, outliers, likely label errors.
    """
    from tuneforge.data.inspect import (
        SUMMARY_HEADER,
        inspect_data,
        public,
        summary_rows,
        write_html,
    )
    from tuneforge.data.load import DataError, path_problem
    from tuneforge.fsio import atomic_write_json

    console = _console()
    recipe = load_recipe_or_exit(target, overrides) if _is_recipe(target) else None
    problem = path_problem(target) if recipe is None else None
    if problem is not None:
        fail(f"data error: {target}: {problem}.", EXIT_DATA)
    try:
        report = inspect_data(recipe, None if recipe else str(target), model, label_rows=label_rows,
                              log=console.print)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    console.print(_table("data summary", SUMMARY_HEADER, summary_rows(report)))
    if report["rejects"]:
        console.print("[yellow]malformed / empty rows: " + ", ".join(f"{k}: {v}" for k, v in report["rejects"].items()))
    nd, cont = report["near_duplicates"], report["contamination"]
    console.print(f"near-duplicate clusters: {nd['clusters']} ({nd['rows_in_clusters']} rows, Jaccard >= "
                  f"{nd['threshold']}); contamination: {cont['train_rows']} training rows near-duplicate a "
                  "validation/test row")
    li = report.get("label_issues")
    if li:
        console.print(_table(f"likely label errors (top 10 of {li['flagged']}; {li['scored_rows']} rows scored)",
                             ["id", "label", "suggested", "score", "text"],
                             [[x["id"], x["label"], x["suggested"], f"{x['score']:.3f}", x["text"][:80]]
                              for x in li["top"][:10]]))
    title = f"tuneforge data report: {report['source']}"
    write_html(report, output, title)
    atomic_write_json(output.with_suffix(".json"), public(report))
    console.print(f"wrote {output} and {output.with_suffix('.json')}; {len(report['flags'])} rows flagged "
                  "(`tuneforge data review export` lists them)")
    _report_rejects(report["reject_rows"], output.with_suffix(".rejects.jsonl"),
                    recipe.data.on_invalid if recipe is not None else "error")


def _report_rejects(rejects: list, path: Path, on_invalid: str) -> None:
    """Malformed rows as train reports them: the first 20 as file:line, all of
    them in a JSONL file; exit 3 unless data.on_invalid is skip (train would stop too)."""
    from tuneforge.data.splits import list_rejects, write_rejects

    if not rejects:
        path.unlink(missing_ok=True)  # an earlier run's list would no longer be true
        return
    write_rejects(path, rejects)
    message = f"{len(rejects)} malformed row(s):\n{list_rejects(rejects)}\n(all of them: {path})"
    if on_invalid == "skip":
        typer.echo(message + "\ndata.on_invalid is skip: training leaves them out.", err=True)
        return
    fail(f"data error: {message}\nFix them, or set data.on_invalid=skip to train without them.", EXIT_DATA)


def _print_steps(console, report: dict) -> None:
    rows = []
    for st in report["steps"]:
        removed = ", ".join(f"{k} {v}" for k, v in st.get("removed", {}).items()) or "-"
        notes = []
        if st.get("added"):
            notes.append(f"added {st['added']}")
        if "changed_rows" in st:
            notes.append(f"{st['changed_rows']} rows changed")
        if st.get("changed"):
            notes.append("masked/removed " + ", ".join(f"{k} {v}" for k, v in st["changed"].items()))
        if st.get("decisions"):
            notes.append(", ".join(f"{k} {v}" for k, v in st["decisions"].items()))
        if st.get("stats"):
            notes.append("truncated " + ", ".join(f"{s} {v.get('truncated', 0)}" for s, v in st["stats"].items()))
        if st.get("skipped"):
            notes.append(f"skipped: {st['skipped'][:60]}")
        rows.append([st["step"], st["in"], st["out"], removed, "; ".join(notes)])
    console.print(_table("prepare: every step's counts (in + added = out + removed)",
                         ["step", "in", "out", "removed", "notes"], rows))


@data_app.command()
def prepare(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the prepared splits "
                                          "(default prepared/<recipe name>/)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute even when a cached result exists."),
) -> None:
    """Clean, de-duplicate, mask PII, split, balance, augment; write Parquet splits + report.

    Cached by content hash (inputs, settings, tokenizer): an unchanged re-run reads the cache.
    """
    from tuneforge.data.load import DataError
    from tuneforge.data.splits import InvalidRows, write_rejects
    from tuneforge.data.studio import prepare_data, write_prepared
    from tuneforge.fsio import atomic_dir

    parsed = load_recipe_or_exit(recipe, overrides)
    console = _console()
    out = output or Path("prepared") / (parsed.name or "data")
    try:
        splits = prepare_data(parsed, use_cache=False if no_cache else None, log=console.print)
    except InvalidRows as exc:
        write_rejects(out.with_name(out.name + ".rejects.jsonl"), exc.rejects)
        fail(f"data error: {exc}\n(all of them: {out.with_name(out.name + '.rejects.jsonl')})", EXIT_DATA)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    report = splits.report
    with atomic_dir(out) as tmp:
        write_prepared(tmp, splits)
        if splits.rejects:
            write_rejects(tmp / "rejects.jsonl", splits.rejects)
    if report.get("cache", {}).get("hit"):  # a fresh run has said it already
        console.print(f"data kind: {report['kind_detected_from']}")
    _print_steps(console, report)
    sizes = ", ".join(f"{k} {v['rows']}" + (f" ({', '.join(f'{a}: {b}' for a, b in v['labels'].items())})"
                                          if v.get("labels") else "") for k, v in report["splits"].items())
    console.print(f"splits: {sizes}")
    cache = report.get("cache", {})
    console.print(f"cache {'hit' if cache.get('hit') else 'miss'} ({cache.get('key')}); wrote {out}/ "
                  "(train/validation/test.parquet, prepare_report.json)")
    if report["kind"] == "preference":
        console.print("[yellow]note: no trainer takes preference data yet; the prepared files are ready "
                      "for your own training code.")


@data_app.command()
def preview(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides."),
    samples: int = typer.Option(3, "--samples", "-n", min=1, help="How many training samples to show."),
    html: Optional[Path] = typer.Option(
        None, "--html", help="Also write the preview as HTML (loss tokens highlighted)."
    ),
) -> None:
    """Show training samples exactly as the model sees them, loss tokens highlighted.

    Chat template applied, masked tokens dim, EOS and truncation marked; warns when the template
    has no generation marker, EOS is never trained, or more than 5% of samples are truncated.
    """
    from tuneforge.data.load import DataError
    from tuneforge.data.preview import (
        build_block_preview,
        build_preview,
        to_html,
        to_rich,
    )
    from tuneforge.data.studio import load_tokenizer, prepare_data
    from tuneforge.fsio import atomic_write_text

    parsed = load_recipe_or_exit(recipe, overrides)
    console = _console()
    try:
        splits = prepare_data(parsed, log=console.print)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    if splits.kind == "preference":
        fail("preview shows what a trainer sees, and no trainer takes preference data yet; "
              "`tuneforge data inspect` reports on it.", EXIT_DATA)
    tokenizer = load_tokenizer(parsed.model)
    max_length = parsed.train.max_length
    if splits.kind == "text":  # continued pre-training trains on max_length blocks, not rows
        result = build_block_preview(tokenizer, splits.blocks["train"], n=samples)
    else:
        result = build_preview(tokenizer, splits.train, splits.kind, parsed.data.system_prompt, max_length, n=samples)
    console.print(to_rich(result, max_length))
    if result.template:
        console.print(f"template sha256 {result.template['sha256'][:16]}; generation marker "
                      f"{result.template['generation_marker']!r}; EOS trained in {result.eos_trained} of "
                      f"{result.checked} samples; truncated {result.truncated}")
    for w in result.warnings:
        console.print(f"[bold yellow]warning:[/] {w}")
    if html:
        atomic_write_text(html, to_html(result, max_length, f"tuneforge data preview: {parsed.name}"))
        console.print(f"wrote {html}")


@review_app.command("export")
def review_export(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides."),
    output: Path = typer.Option(Path("review.csv"), "--output", "-o", help="CSV to write."),
    label_rows: int = typer.Option(
        20000, "--label-rows", min=10, help="Score at most this many rows for label errors."
    ),
) -> None:
    """Write flagged rows (label errors, duplicates, contamination, PII, outliers) to a CSV.

    Fill in 'decision' (keep / drop / relabel) and 'new_label', then run `review apply`.
    """
    from tuneforge.data.inspect import inspect_data
    from tuneforge.data.load import DataError
    from tuneforge.data.review import export_review

    parsed = load_recipe_or_exit(recipe, overrides)
    console = _console()
    try:
        report = inspect_data(parsed, label_rows=label_rows, log=console.print)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    n = export_review(report, output)
    console.print(f"wrote {n} flagged rows to {output}; fill in 'decision' (keep/drop/relabel) and 'new_label', "
                  f"then: tuneforge data review apply {output} --recipe {recipe}")


@review_app.command("apply")
def review_apply(
    file: Path = typer.Argument(..., help="The reviewed CSV."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="The recipe the rows came from (checks new labels)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Decisions JSON to write "
                                          "(default: the recipe's data.review_decisions, else FILE with "
                                          ".decisions.json)."),
) -> None:
    """Validate a reviewed CSV and write the decisions JSON that prepare (and train) apply."""
    from tuneforge.data.load import DataError
    from tuneforge.data.review import parse_review, write_decisions

    parsed = load_recipe_or_exit(recipe, []) if recipe else None
    try:
        labels = _known_labels(parsed) if parsed is not None else None
        decisions, counts = parse_review(file, labels)
    except DataError as exc:
        fail(f"review error: {exc}", EXIT_DATA)
    target = output or (Path(parsed.data.review_decisions) if parsed is not None and parsed.data.review_decisions
                        else file.with_suffix(".decisions.json"))
    write_decisions(decisions, counts, file, target)
    typer.echo(f"wrote {target}: keep {counts['keep']}, drop {counts['drop']}, relabel {counts['relabel']}, "
               f"undecided {counts['undecided']}")
    if parsed is None or not parsed.data.review_decisions:
        typer.echo(f"prepare and train apply it with data.review_decisions: {target}  (in the recipe, "
                   f"or as the override data.review_decisions={target})")


def _known_labels(recipe) -> Optional[set]:
    """The labels a relabel decision may use; None when the recipe's data has no labels."""
    from tuneforge.data.formats import LABELLED, resolve_kind
    from tuneforge.data.studio import load_rows

    kind, kcfg, _ = resolve_kind(recipe.data, recipe.task)
    if kind not in LABELLED:
        return None
    if recipe.data.labels is not None:
        return {str(x) for x in recipe.data.labels}
    rows, _, _, allowed = load_rows(kcfg, kind)
    return allowed or set()

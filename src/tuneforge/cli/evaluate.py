"""`tuneforge eval | report | compare`: scores with intervals and paired tests, reports, side-by-side runs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tuneforge.cli.common import EXIT_DATA, EXIT_RECIPE, Device, fail


def eval_(
    target: str = typer.Argument(..., help="A run folder, an exported model folder, a catalogue model or a hub id."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. data.text_column=x."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate on this file instead of the run's split."),
    split: str = typer.Option("test", "--split", help="Which split of the run: test, validation or train."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A LoRA adapter folder to put on TARGET."),
    base: Optional[str] = typer.Option(None, "--base", help="Baseline model for generation (default: the run's base)."),
    robustness: bool = typer.Option(False, "--robustness", help="Also score perturbed inputs (typos, casing, ...)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Where eval.json and the report go."),
    device: Optional[Device] = typer.Option(None, "--device", help="Override the device."),
) -> None:
    """Score a model with intervals and a paired test against its baseline; writes eval.json and a report."""
    if split not in ("test", "validation", "train"):
        fail(f"--split must be test, validation or train, got {split!r}", EXIT_RECIPE)
    from tuneforge.data.load import DataError
    from tuneforge.evaluate.target import evaluate_target
    from tuneforge.recipe import RecipeError

    try:
        evaluate_target(target, data, split, overrides or [], output, device.value if device else None, base,
                        adapter, robustness)
    except RecipeError as exc:
        fail(exc.render(), EXIT_RECIPE)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    except (ValueError, FileNotFoundError) as exc:
        fail(f"error: {exc}", 1)


def report(run: Path = typer.Argument(..., help="A run (or eval) folder.")) -> None:
    """Rebuild report.html and report.md of a run folder."""
    from tuneforge.report import write_report

    html_path, md_path = write_report(run)
    typer.echo(f"wrote {html_path} and {md_path}")


def compare(
    runs: List[Path] = typer.Argument(..., help="Two or more run folders."),
    output: Path = typer.Option(Path("compare.html"), "--output", "-o", help="HTML file to write."),
) -> None:
    """Metrics side by side, the settings that differ, overlaid training curves."""
    from rich.console import Console
    from rich.table import Table

    from tuneforge.compare import compare_runs

    if len(runs) < 2:
        fail("compare needs at least two run folders", EXIT_RECIPE)
    try:
        result = compare_runs(runs, output)
    except FileNotFoundError as exc:
        fail(f"error: {exc}", 1)
    for title, rows in (("test metrics", result["metrics"]), ("settings that differ", result["settings"])):
        table = Table(title=title)
        table.add_column("")
        for name in result["runs"]:
            table.add_column(name, overflow="fold")
        for key, values in rows.items():
            table.add_row(key, *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
        Console().print(table)
    typer.echo(f"wrote {result['html']}")

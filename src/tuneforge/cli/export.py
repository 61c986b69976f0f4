"""`tuneforge export`: a checked, self-describing model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneforge.cli.common import fail


def export(
    run: Path = typer.Argument(..., help="A finished run folder."),
    to: Path = typer.Option(..., "--to", help="The folder to create."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --to folder."),
) -> None:
    """Export merged weights, tokenizer, chat template, model card and manifest; checks equivalence first."""
    from tuneforge.export import ExportError, export_run

    try:
        result = export_run(run, to, force)
    except ExportError as exc:
        fail(f"export failed: {exc}", 1)
    eq = result["equivalence"]
    typer.echo(f"exported {len(result['files'])} files to {result['path']} "
               f"(max |logit diff| vs {eq['reference']}: {eq['max_abs_logit_diff']:.1e})")

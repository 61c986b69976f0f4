"""`tuneforge audit`: fairness audit (issue #7). Owned by the fairness work."""

from __future__ import annotations

import typer


def audit(target: str = typer.Argument(..., help="A run folder, an exported model folder or a catalogue model.")) -> None:
    """Audit a model's predictions by group (not built yet)."""
    typer.echo("tuneforge audit is not built yet", err=True)
    raise typer.Exit(1)

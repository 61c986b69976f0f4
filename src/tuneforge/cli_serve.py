"""`tuneforge serve`: OpenAI-compatible server (issue #6). Owned by the serving work."""

from __future__ import annotations

import typer


def serve(target: str = typer.Argument(..., help="An exported model folder, a run folder or a catalogue model.")) -> None:
    """Serve a model behind an OpenAI-compatible API (not built yet)."""
    typer.echo("tuneforge serve is not built yet", err=True)
    raise typer.Exit(1)

"""What every command module shares (typer only, like all CLI modules)."""

from __future__ import annotations

from enum import Enum

import typer

EXIT_RECIPE = 2
EXIT_DATA = 3


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


def fail(message: str, code: int) -> None:
    """Print to stderr and exit with `code` (2 recipe, 3 data, 1 other)."""
    typer.echo(message, err=True)
    raise typer.Exit(code)

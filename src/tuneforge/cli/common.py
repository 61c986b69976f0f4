"""What every command module shares: exit codes, the device option, `fail`
(print to stderr and exit) and `load_recipe_or_exit`. Typer only, like every
CLI module, so `tuneforge --help` imports no torch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

EXIT_RECIPE = 2
EXIT_DATA = 3
EXIT_GATE = 4


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


def fail(message: str, code: int) -> None:
    """Print to stderr and exit with `code` (2 recipe, 3 data, 4 release gate, 1 other)."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


def load_recipe_or_exit(recipe: Path, overrides: Optional[List[str]]):
    """The validated recipe, or every problem printed and exit 2."""
    from tuneforge.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        fail(exc.render(), EXIT_RECIPE)

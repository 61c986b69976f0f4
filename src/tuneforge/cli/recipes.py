"""`tuneforge init | models | validate | datagen`: starter recipes, the model catalogue,
recipe checks and the seeded synthetic tasks."""

from __future__ import annotations

from enum import Enum
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer

from tuneforge.cli.common import load_recipe_or_exit

# One starter per objective that ships one: templates/<task>.yaml.
Starter = Enum("Starter", {p.name[:-5]: p.name[:-5] for p in sorted(resources.files("tuneforge.templates").iterdir(),
                                                                     key=lambda p: p.name)
                           if p.name.endswith(".yaml")}, type=str)


def init(kind: Starter = typer.Argument(..., help="Which starter recipe to print (one per objective).")) -> None:
    """Print a commented starter recipe: tuneforge init sft > my-recipe.yaml"""
    text = resources.files("tuneforge.templates").joinpath(f"{kind.value}.yaml").read_text(encoding="utf-8")
    typer.echo(text, nl=False)


def models() -> None:
    """List the model catalogue: name, architecture, parameters, tasks, where its files are."""
    from rich.console import Console
    from rich.table import Table

    from tuneforge.catalog import CATALOG

    table = Table(title="tuneforge models (a local HF folder or a hub id works too)")
    for col in ("name", "architecture", "parameters", "tasks"):
        table.add_column(col, no_wrap=True)
    table.add_column("files", overflow="fold")
    for spec in CATALOG.values():
        table.add_row(spec.name, spec.architecture, spec.params, ", ".join(spec.tasks), spec.where())
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides."),
) -> None:
    """Check a recipe without training; lists every problem at once."""
    from tuneforge.recipe import dump_recipe

    typer.echo(dump_recipe(load_recipe_or_exit(recipe, overrides)), nl=False)
    typer.echo(f"# {recipe}: valid", err=True)


class Generator(str, Enum):
    iso_dates = "iso-dates"


def datagen(
    name: Generator = typer.Argument(..., help="Which task to generate."),
    out: Path = typer.Option(..., "--out", help="JSONL file to write."),
    rows: int = typer.Option(1000, "--rows", min=1, help="How many examples."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
) -> None:
    """Generate a seeded synthetic task (the quickstart uses iso-dates)."""
    from tuneforge.datagen import GENERATORS, write_jsonl

    write_jsonl(GENERATORS[name.value](rows, seed), out)
    typer.echo(f"wrote {rows} rows to {out}")

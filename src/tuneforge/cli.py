"""The `tuneforge` command: a thin layer over the library.

Heavy modules (torch, transformers) are imported inside the commands that need
them, so `tuneforge --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune language models from one YAML recipe: data -> training -> evaluation -> run record.",
)

from tuneforge.cli_common import EXIT_DATA, EXIT_RECIPE, Device  # noqa: F401  (re-exported to command modules)
from tuneforge.cli_common import fail as _fail


class Starter(str, Enum):
    classification = "classification"
    sft = "sft"


@app.command()
def init(kind: Starter = typer.Argument(..., help="Which starter recipe to print.")) -> None:
    """Print a commented starter recipe: tuneforge init sft > my-recipe.yaml"""
    text = resources.files("tuneforge.templates").joinpath(f"{kind.value}.yaml").read_text(encoding="utf-8")
    typer.echo(text, nl=False)


@app.command()
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


def _load(recipe: Path, overrides: Optional[List[str]]):
    from tuneforge.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        _fail(exc.render(), EXIT_RECIPE)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides."),
) -> None:
    """Check a recipe without training; lists every problem at once."""
    from tuneforge.recipe import dump_recipe

    typer.echo(dump_recipe(_load(recipe, overrides)), nl=False)
    typer.echo(f"# {recipe}: valid", err=True)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. train.epochs=2."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder (default runs/<name>-<time>/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint of the run."),
    device: Optional[Device] = typer.Option(None, "--device", help="Override the recipe's device."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine (torchrun)."),
) -> None:
    """Fine-tune, evaluate against the baseline, and write the run folder."""
    parsed = _load(recipe, overrides)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch(recipe, overrides or [], parsed, output, resume, device, quiet, nproc)
    from tuneforge import api
    from tuneforge.data.load import DataError
    from tuneforge.gpu import GpuUnavailable

    try:
        api.train(parsed, output=output, resume=resume, device=device.value if device else None, quiet=quiet)
    except DataError as exc:
        _fail(f"data error: {exc}", EXIT_DATA)
    except (GpuUnavailable, FileExistsError, FileNotFoundError) as exc:
        _fail(f"error: {exc}", 1)


@app.command("eval")
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
        _fail(f"--split must be test, validation or train, got {split!r}", EXIT_RECIPE)
    from tuneforge.data.load import DataError
    from tuneforge.evaluate.target import evaluate_target
    from tuneforge.recipe import RecipeError

    try:
        evaluate_target(target, data, split, overrides or [], output, device.value if device else None, base,
                        adapter, robustness)
    except RecipeError as exc:
        _fail(exc.render(), EXIT_RECIPE)
    except DataError as exc:
        _fail(f"data error: {exc}", EXIT_DATA)
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"error: {exc}", 1)


@app.command()
def report(run: Path = typer.Argument(..., help="A run (or eval) folder.")) -> None:
    """Rebuild report.html and report.md of a run folder."""
    from tuneforge.report import write_report

    html_path, md_path = write_report(run)
    typer.echo(f"wrote {html_path} and {md_path}")


@app.command()
def compare(
    runs: List[Path] = typer.Argument(..., help="Two or more run folders."),
    output: Path = typer.Option(Path("compare.html"), "--output", "-o", help="HTML file to write."),
) -> None:
    """Metrics side by side, the settings that differ, overlaid training curves."""
    from rich.console import Console
    from rich.table import Table

    from tuneforge.compare import compare_runs

    if len(runs) < 2:
        _fail("compare needs at least two run folders", EXIT_RECIPE)
    try:
        result = compare_runs(runs, output)
    except FileNotFoundError as exc:
        _fail(f"error: {exc}", 1)
    for title, rows in (("test metrics", result["metrics"]), ("settings that differ", result["settings"])):
        table = Table(title=title)
        table.add_column("")
        for name in result["runs"]:
            table.add_column(name, overflow="fold")
        for key, values in rows.items():
            table.add_row(key, *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
        Console().print(table)
    typer.echo(f"wrote {result['html']}")


@app.command()
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
        _fail(f"export failed: {exc}", 1)
    eq = result["equivalence"]
    typer.echo(f"exported {len(result['files'])} files to {result['path']} "
               f"(max |logit diff| vs {eq['reference']}: {eq['max_abs_logit_diff']:.1e})")


def _launch(recipe: Path, overrides: List[str], parsed, output, resume, device, quiet, nproc: int) -> None:
    """Re-run this command under torchrun with one run folder fixed for all ranks."""
    from tuneforge.run import find_resumable, new_run_dir

    out = str(find_resumable(parsed, output) if resume else new_run_dir(parsed, output))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tuneforge.cli", "train", str(recipe), *overrides, "--output", out]
    cmd += ["--resume"] if resume else []
    cmd += ["--device", device.value] if device else []
    cmd += ["--quiet"] if quiet else []
    os.execvp(cmd[0], cmd)


class Generator(str, Enum):
    iso_dates = "iso-dates"


@app.command()
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


# Command groups that live in their own modules (each imports only typer at the
# top, so `tuneforge --help` stays free of torch).
from tuneforge.cli_audit import audit, mitigate  # noqa: E402
from tuneforge.cli_data import data_app  # noqa: E402
from tuneforge.cli_serve import serve  # noqa: E402

app.add_typer(data_app, name="data", help="Inspect, prepare, preview and review training data.")
app.command()(serve)
app.command()(audit)
app.command()(mitigate)


def main() -> None:
    app(prog_name="tuneforge")


if __name__ == "__main__":
    sys.exit(main())

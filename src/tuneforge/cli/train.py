"""`tuneforge train`: one process, or several under torchrun (`--nproc`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tuneforge.cli.common import EXIT_DATA, EXIT_RECIPE, Device, fail, load_recipe_or_exit


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
    parsed = load_recipe_or_exit(recipe, overrides)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        try:
            launch(recipe, overrides or [], parsed, output, resume, device, quiet, nproc)
        except FileNotFoundError as exc:  # --resume without a run to resume
            fail(f"error: {exc}", 1)
    from tuneforge import api
    from tuneforge.data.load import DataError
    from tuneforge.gpu import GpuUnavailable
    from tuneforge.preflight import PreflightError
    from tuneforge.run import ResumeRefused
    from tuneforge.training.checkpoint import CheckpointDamaged

    try:
        api.train(parsed, output=output, resume=resume, device=device.value if device else None, quiet=quiet)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    except (PreflightError, ResumeRefused) as exc:
        fail(f"error: {exc}", EXIT_RECIPE)
    except (GpuUnavailable, FileExistsError, FileNotFoundError, CheckpointDamaged) as exc:
        fail(f"error: {exc}", 1)


def launch(recipe: Path, overrides: List[str], parsed, output, resume, device, quiet, nproc: int) -> None:
    """Re-run this command under torchrun with one run folder fixed for all ranks."""
    from tuneforge.run import find_resumable, new_run_dir

    out = str(find_resumable(parsed, output) if resume else new_run_dir(parsed, output))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tuneforge.cli", "train", str(recipe), *overrides, "--output", out]
    cmd += ["--resume"] if resume else []
    cmd += ["--device", device.value] if device else []
    cmd += ["--quiet"] if quiet else []
    os.execvp(cmd[0], cmd)

"""The Python API under the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from tuneforge.recipe import Recipe, load_recipe


def train(recipe: Union[str, Path, dict, Recipe], overrides: Optional[list[str]] = None, output: Optional[str] = None,
          resume: bool = False, device: Optional[str] = None, quiet: bool = False) -> dict:
    """Run a recipe end to end; returns metrics.json's content. The run folder is
    `output` or runs/<name>-<timestamp>/."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    if recipe.name is None:
        recipe.name = "run"
    from tuneforge import preflight
    from tuneforge.models import pick_device
    from tuneforge.training import distributed

    # max_length within the model's positions, and a memory floor within what is free,
    # before a run folder or a model exists (PreflightError names the key to change)
    try:
        target = pick_device(device or recipe.device)
    except RuntimeError:  # no such device: the trainer says so, as before
        target = None
    if target is not None:
        from tuneforge import gpu

        gpu.check_recipe(recipe, target)  # GPU-only features first: they need no model to be refused
        preflight.check(recipe, target)

    try:
        result = recipe.objective.train_function()(recipe, output=output, resume=resume, device=device, quiet=quiet)
    except BaseException:
        distributed.finish(ok=False)
        raise
    distributed.finish()
    return result

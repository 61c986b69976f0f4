"""Every mitigation measured against the same baseline, in one report.

`tuneforge mitigate RECIPE -o DIR` trains the recipe once per variant (the
baseline with threshold post-processing on top, reweighing, counterfactual
augmentation, the in-processing penalty), each into DIR/<variant>/, then audits
them all on the baseline's test rows and writes one comparison
(DIR/audit/audit.html): accuracy against disparity per mitigation, so the user
picks the trade-off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from tuneforge import kinds
from tuneforge.recipe import Recipe, load_recipe

# Each variant switches one mitigation on over the recipe's fairness section
# (with every other mitigation off). Post-processing rides on the baseline: its
# audit reports the raw model and the thresholded one side by side.
VARIANTS: dict[str, dict] = {
    "baseline": {"postprocess": "equalized_odds"},
    "reweighing": {"reweighing": True},
    "augmentation": {"counterfactual_augmentation": True},
    "eo_penalty": {"inprocessing": "eo_penalty"},
}
_OFF = {"reweighing": False, "counterfactual_augmentation": False, "postprocess": "none", "inprocessing": "none"}


def variant_recipe(recipe: Recipe, name: str, extra: Optional[dict] = None) -> Recipe:
    """A copy of `recipe` with only variant `name`'s mitigation on."""
    if name not in VARIANTS:
        raise ValueError(f"unknown mitigation variant {name!r}; choose from {', '.join(VARIANTS)}")
    fairness = {**recipe.fairness.model_dump(), **_OFF, **VARIANTS[name], **(extra or {})}
    data = recipe.model_dump()
    data.update(fairness=fairness, name=f"{recipe.name or 'run'}-{name}")
    if name == "augmentation":  # one augmentation path: the data studio's, not both
        data["data"]["augment"]["counterfactual"] = False
    return Recipe.model_validate(data, context={"check_files": False})


def mitigation_sweep(recipe, output: str, variants: Sequence[str] = tuple(VARIANTS),
                     overrides: Optional[dict[str, dict]] = None, device: Optional[str] = None,
                     quiet: bool = True) -> dict:
    """Train every variant into OUTPUT/<variant>/ and write OUTPUT/audit/; returns the audit."""
    from tuneforge import api
    from tuneforge.fairness.target import audit_target

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.model_kind.name != kinds.CLASSIFIER:
        raise ValueError("mitigation sweeps train classifiers; for causal LMs use `tuneforge audit --crows`")
    if "baseline" not in variants:
        raise ValueError("the sweep needs the 'baseline' variant to compare against")
    out = Path(output)
    runs = {}
    for name in variants:
        runs[name] = out / name
        if (runs[name] / "metrics.json").is_file():  # finished by an earlier, interrupted sweep
            continue
        api.train(variant_recipe(recipe, name, (overrides or {}).get(name)), output=str(runs[name]),
                  device=device, quiet=quiet)
    # The audit judges every variant by this recipe's fairness section (thresholds,
    # groups), also when the runs were trained by an earlier sweep.
    from tuneforge.fsio import atomic_write_text
    from tuneforge.recipe import dump_recipe

    atomic_write_text(out / "sweep-recipe.yaml", dump_recipe(recipe))
    others = [str(runs[n]) for n in variants if n != "baseline"]
    return audit_target(str(runs["baseline"]), compare=others, output=str(out / "audit"), device=device,
                        recipe_path=str(out / "sweep-recipe.yaml"))

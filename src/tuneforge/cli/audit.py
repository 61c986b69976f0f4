"""`tuneforge audit`: fairness audit and release gate (issue #7). Only typer at
the top: `tuneforge --help` must not import torch."""

from __future__ import annotations

from typing import List, Optional

import typer

from tuneforge.cli.common import EXIT_DATA, EXIT_GATE, EXIT_RECIPE, fail, load_recipe_or_exit


def audit(
    target: str = typer.Argument(..., help="A run folder, an exported model folder or a catalogue model."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. "
                                                    "fairness.thresholds.equalized_odds_difference=0.1."),
    data: Optional[str] = typer.Option(None, "--data", help="Labelled rows to audit (default: the run's split); "
                                       "for a causal LM with --sentiment, the prompts."),
    split: str = typer.Option("test", "--split", help="The run's split when no --data: test, validation or train."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Group column (repeat once for a second; "
                                              "their intersection is audited too). Default: the recipe's "
                                              "fairness.groups; none: groups detected from the text."),
    lexicon: Optional[List[str]] = typer.Option(None, "--lexicon", help="Term list by name (gender) or YAML file, "
                                                "for swaps and text groups (repeatable)."),
    positive: Optional[str] = typer.Option(None, "--positive", help="The positive label (default: the second)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Take the fairness section (thresholds, lexicons, "
                                         "groups) from this recipe instead of the run's."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="Another run or model to audit on the same "
                                                "rows, side by side (repeatable): accuracy vs disparity."),
    crows: Optional[str] = typer.Option(None, "--crows", help="Causal LM: CrowS-Pairs csv to score "
                                        "(evaluation only)."),
    crows_limit: Optional[int] = typer.Option(None, "--crows-limit", min=1, help="Score only the first N pairs."),
    bias_type: Optional[List[str]] = typer.Option(None, "--bias-type", help="CrowS-Pairs bias types to keep."),
    sentiment: Optional[str] = typer.Option(None, "--sentiment", help="Causal LM: a sentiment classifier (run, "
                                            "folder or catalogue name) to score generations for swapped prompts."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Generation length for --sentiment."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Folder for audit.json/.html/.md "
                                         "(default: RUN/audit/, or audits/NAME-TIME/)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps."),
) -> None:
    """Fairness audit: per-group metrics with 95% intervals, disparities (demographic parity, equalized odds,
    equal opportunity), counterfactual term swaps; for causal LMs CrowS-Pairs and generation sentiment.

    Exit codes: 0 passed; 4 a fairness.thresholds limit crossed or the audit is inconclusive
    ((near-)constant predictions) (release gate); 2 recipe/options; 3 data; 1 other.
    """

    if split not in ("test", "validation", "train"):
        fail(f"--split must be test, validation or train, got {split!r}", EXIT_RECIPE)
    from tuneforge.data.load import DataError
    from tuneforge.fairness.target import audit_target
    from tuneforge.recipe import RecipeError

    try:
        result = audit_target(target, data, split, group or [], lexicon or [], overrides or [], recipe, output,
                              device, positive, compare or [], crows, crows_limit, bias_type or [], sentiment,
                              max_new_tokens)
    except RecipeError as exc:
        fail(exc.render(), EXIT_RECIPE)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        fail(f"error: {exc}", 1)
    _print(result)
    if result["gate"].get("inconclusive"):  # exit 4 too: an audit that cannot judge must not pass
        fail("fairness gate INCONCLUSIVE: " + "; ".join(result["gate"]["reasons"]), EXIT_GATE)
    if not result["gate"]["passed"]:
        failed = [c for c in result["gate"]["checks"] if not c["passed"]]
        fail("fairness gate FAILED: " + "; ".join(f"{c['check']}: {c['reason']}" for c in failed), EXIT_GATE)


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for grouping, res in ((result.get("audit") or {}).get("groupings") or {}).items():
        table = Table(title=f"by {grouping} (positive: {result['audit']['positive_label']})")
        for col in ("group", "n", "accuracy", "selection rate", "TPR", "FPR", "F1"):
            table.add_column(col)
        for g, row in res["groups"].items():
            table.add_row(g, str(row["n"]), *[f"{row[m]:.3f}" for m in ("accuracy", "selection_rate",
                                                                         "true_positive_rate", "false_positive_rate",
                                                                         "f1")])
        console.print(table)
        for k, v in (res.get("disparities") or {}).items():
            if k != "ci":
                ci = (res["disparities"].get("ci") or {}).get(k)
                console.print(f"  {k}: {v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    for lex, res in (result.get("counterfactual") or {}).items():
        if res.get("swappable"):
            console.print(f"counterfactual ({lex}): {res['swappable']} swappable texts, flip rate "
                          f"{res['flip_rate']:.4f}, mean |Δp| {res['mean_abs_delta']:.4f}")
    gen = result.get("generation_sentiment")
    if gen and gen.get("pairs"):
        a, b = gen["groups"]
        console.print(f"generation sentiment ({gen['pairs']} prompt pairs): {a} {gen['mean_sentiment'][a]:.4f}, "
                      f"{b} {gen['mean_sentiment'][b]:.4f}, gap {gen['gap']:+.4f} "
                      f"[{gen['gap_ci'][0]:.4f}, {gen['gap_ci'][1]:.4f}]")
    from tuneforge.fairness.audit import audit_warnings, gate_summary

    for line in audit_warnings(result):
        console.print(f"[bold yellow]warning: {line}")
    console.print(gate_summary(result["gate"]))
    console.print(f"wrote {result['path']}/audit.json, audit.html, audit.md")


def mitigate(
    recipe: str = typer.Argument(..., help="A classification recipe with a fairness section (groups, thresholds)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for one run per variant and audit/."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help="Variants to train (repeatable): baseline, "
                                                "reweighing, augmentation, eo_penalty. Default: all."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps."),
) -> None:
    """Train the recipe once per fairness mitigation and compare them in one report:
    accuracy against disparity per mitigation (OUTPUT/audit/audit.html).
    Exit code 4 when the baseline crosses a fairness.thresholds limit."""
    from tuneforge.data.load import DataError
    from tuneforge.fairness.sweep import VARIANTS, mitigation_sweep

    parsed = load_recipe_or_exit(recipe, [])
    chosen = list(variant or VARIANTS)
    if "baseline" not in chosen:
        chosen.insert(0, "baseline")
    try:
        result = mitigation_sweep(parsed, output, chosen, device=device, quiet=False)
    except DataError as exc:
        fail(f"data error: {exc}", EXIT_DATA)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # a pickle-only model folder among them
        fail(f"error: {exc}", 1)
    typer.echo(f"audit: {result['path']}/audit.html")
    if not result.get("gate", {}).get("passed", True):
        raise typer.Exit(EXIT_GATE)

"""Terminal output: a progress bar with loss, lr, tokens/s and ETA, or plain lines with
--quiet; the base vs fine-tuned table, and the red panel of a run no better than its baseline."""

from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from tuneforge.evaluate import registry

console = Console(stderr=False, highlight=False)


class Progress:
    def __init__(self, total: int, quiet: bool, start_step: int = 0):
        self.total, self.quiet, self.step = total, quiet, start_step
        self._bar = None
        self._t0 = time.perf_counter()
        self._start = start_step
        if not quiet and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=console, transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start_step, info="")
            self._bar.start()

    def update(self, step: int, info: dict, log_line: bool) -> None:
        self.step = step
        text = "  ".join(_fmt(k, v) for k, v in info.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=text)
        elif log_line:
            elapsed = time.perf_counter() - self._t0
            done = max(step - self._start, 1)
            eta = elapsed / done * (self.total - step)
            console.print(f"step {step}/{self.total}  {text}  eta {eta:5.0f}s")

    def message(self, text: str) -> None:
        (self._bar.console if self._bar else console).print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"lr {value:.2e}"
        if key == "tokens_per_s":
            return f"{value:,.0f} tok/s"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


def comparison_table(title: str, baseline: Optional[dict], tuned: dict, baseline_name: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column(baseline_name, justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("delta", justify="right")
    for key, value in tuned.items():
        if not isinstance(value, float):
            continue  # counts and nested tables are in metrics.json
        entry = registry.METRICS.get(key)
        fmt = entry.fmt if entry else ".4f"
        base = (baseline or {}).get(key)
        if isinstance(base, (int, float)):
            delta = value - base
            table.add_row(key, format(base, fmt), format(value, fmt), format(delta, "+" + fmt))
        else:
            table.add_row(key, "-", format(value, fmt), "")
    return table


def verdict_panel(verdict: dict, baseline_name: str) -> Panel:
    """The red panel of a run that ended no better than its baseline: why, and what to try."""
    lines = [f"[bold]This fine-tune is no better than the {baseline_name}.[/]", ""]
    lines += [f"- {reason}" for reason in verdict.get("reasons", [])]
    if verdict.get("hints"):
        lines += ["", "[bold]Likely causes:[/]"] + [f"- {hint}" for hint in verdict["hints"]]
    return Panel("\n".join(lines), title="NO BETTER THAN BASELINE", border_style="red", style="red")

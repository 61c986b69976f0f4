"""`tuneforge data ...`: the data studio commands (issue #3). Owned by the data-studio work."""

from __future__ import annotations

import typer

data_app = typer.Typer(no_args_is_help=True, add_completion=False)

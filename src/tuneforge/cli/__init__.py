"""The `tuneforge` command: a thin layer over the library, one module per
command group, every command registered in the table below.

Command modules import only typer (and tuneforge.cli.common) at the top; heavy
modules (torch, transformers, FastAPI) load inside the commands, so
`tuneforge --help` answers at once. `python -m tuneforge.cli` runs it too.
"""

from __future__ import annotations

import typer

from tuneforge.cli import audit, data, evaluate, export, recipes, serve, train

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Fine-tune language models from one YAML recipe: data -> training -> evaluation -> run record.",
)

# name -> the function behind it, in the order `tuneforge --help` lists them.
COMMANDS = {
    "init": recipes.init,
    "models": recipes.models,
    "validate": recipes.validate,
    "train": train.train,
    "eval": evaluate.eval_,
    "report": evaluate.report,
    "compare": evaluate.compare,
    "export": export.export,
    "datagen": recipes.datagen,
    "serve": serve.serve,
    "audit": audit.audit,
    "mitigate": audit.mitigate,
}
GROUPS = {"data": (data.data_app, "Inspect, prepare, preview and review training data.")}

for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)
for _name, (_group, _help) in GROUPS.items():
    app.add_typer(_group, name=_name, help=_help)


def main() -> None:
    app(prog_name="tuneforge")

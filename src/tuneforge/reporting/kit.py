"""Tables, figures, the stylesheet and run-file readers (see the package docstring)."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Optional

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f4f6f8}.figs{display:flex;flex-wrap:wrap;gap:1em}.figs img{max-width:100%}
.muted{color:#666}code{background:#f4f6f8;padding:0 .2em}
.verdict-bad{border:2px solid #c62828;background:#fdecea;color:#8e0000;padding:.4em 1em;border-radius:4px}"""


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's content, or None when the file is absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_log(path: Path) -> list[dict]:
    """The lines of a JSONL log; a torn last line (a killed writer) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def pyplot():
    """matplotlib.pyplot on the Agg backend with the project's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 10})
    return plt


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; every cell is escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; pipes and newlines in cells are neutralised."""
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

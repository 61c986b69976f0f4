"""The reporting kit every report shares (run report, compare, fairness, data,
and the reports later stages write): HTML and Markdown tables, matplotlib
figures rendered to PNG, the one stylesheet, and tolerant readers of a run's
JSON files and metrics log. Free of torch; matplotlib is imported on first use.
"""

from tuneforge.reporting.kit import CSS, figure_png, html_table, md_table, pyplot, read_json, read_log

__all__ = ["CSS", "html_table", "md_table", "figure_png", "pyplot", "read_json", "read_log"]

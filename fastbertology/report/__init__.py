"""``report.html``: one self-contained page per run (no network: inline SVG, CSS and a few lines of script).

* :mod:`~fastbertology.report.run_files` — read a finished run's files back (summary.json, .npy tables, patterns);
* :mod:`~fastbertology.report.scales` — colour maps and number formats (shared with the PNG plots);
* :mod:`~fastbertology.report.svg` — heatmaps, attention maps and the masking curve as SVG;
* :mod:`~fastbertology.report.page` — the page.

Every command writes the report last; ``fastbertology report DIR`` rebuilds it from the files alone.
"""

from __future__ import annotations

from pathlib import Path

from ..outputs import write_bytes_atomic
from .page import build_html
from .run_files import read_run

REPORT_FILE = "report.html"


def write_report(directory) -> Path:
    """Build ``report.html`` from the run in ``directory`` and write it there atomically; return its path."""
    run = read_run(directory)
    return write_bytes_atomic(run.directory / REPORT_FILE, build_html(run).encode("utf-8"))


__all__ = ["REPORT_FILE", "build_html", "read_run", "write_report"]

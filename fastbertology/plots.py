"""PNG figures: head heatmaps and the masking curve (matplotlib, Agg backend).

Readable at a glance: cell numbers at 8 pt in black or white by the cell's luminance, enough decimals that
different values read differently (no colour-bar offset such as "1e-5+3.859"), a diverging map centred on zero for
changes (sweep deltas), and a title that names what is shown, the model, the task, the metric and the number of
examples. matplotlib is optional (the ``plots`` extra): without it :func:`available` is False and the commands skip
the PNGs (report.html has the same figures).
"""

from __future__ import annotations

import io

import numpy as np

from .outputs import write_bytes_atomic
from .report.scales import decimals_for, format_value, ink_for

try:  # optional dependency
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import CenteredNorm, Normalize
    from matplotlib.ticker import FuncFormatter
except ImportError:  # pragma: no cover - exercised where matplotlib is not installed
    plt = None

MISSING = "PNG plots need matplotlib (pip install 'fastbertology[plots]'); report.html has the same figures"


def available() -> bool:
    return plt is not None


def _save(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(figure)
    return write_bytes_atomic(path, buffer.getvalue())


def _title(axis, title: str, subtitle: str | None) -> None:
    axis.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11, loc="left")


def heatmap(path, table, *, title: str, colorbar_label: str, subtitle: str | None = None, cmap: str = "viridis",
            diverging: bool = False, row_label: str = "layer", column_label: str = "head"):
    """Save a ``[L, H]`` table as a heatmap (layers down, heads across) with the values written in the cells.
    ``diverging``: a blue-white-red map centred on zero (for changes such as sweep deltas)."""
    values = np.asarray(table.cpu().numpy() if hasattr(table, "cpu") else table, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    rows, columns = values.shape
    decimals = decimals_for(values)
    longest = max(len(format_value(v, decimals)) for v in values.ravel())
    column_width = max(0.62, 0.11 * longest + 0.1)  # inches: the longest number fits its cell at 8 pt
    figure, axis = plt.subplots(figsize=(max(5.0, column_width * columns + 2.4), max(3.2, 0.5 * rows + 1.9)))
    norm = CenteredNorm(vcenter=0.0, halfrange=max(float(np.nanmax(np.abs(values))), 1e-12)) if diverging \
        else Normalize(vmin=float(np.nanmin(values)), vmax=float(np.nanmax(values)))
    colormap = matplotlib.colormaps["RdBu_r" if diverging else cmap]
    image = axis.imshow(values, cmap=colormap, norm=norm, aspect="auto")
    axis.set_xlabel(column_label)
    axis.set_ylabel(row_label)
    axis.set_xticks(range(columns))
    axis.set_yticks(range(rows))
    _title(axis, title, subtitle)
    if rows * columns <= 400:
        size = 8 if rows * columns <= 200 else 7
        for row in range(rows):
            for column in range(columns):
                value = values[row, column]
                axis.text(column, row, format_value(value, decimals), ha="center", va="center", fontsize=size,
                          color=ink_for(colormap(norm(value))))
    bar = figure.colorbar(image, ax=axis, label=colorbar_label)
    bar.formatter = FuncFormatter(lambda v, _: format_value(v, decimals))
    bar.update_ticks()
    return _save(figure, path)


def masking_curve(path, curve, *, metric_name: str, threshold_score: float | None = None, subtitle: str | None = None):
    """Save the iterative-masking curve: the score against heads remaining, with the stopping threshold."""
    figure, axis = plt.subplots(figsize=(6, 3.8))
    heads = [p["heads_remaining"] for p in curve]
    scores = [p["score"] for p in curve]
    axis.plot(heads, scores, marker="o", label=metric_name)
    decimals = decimals_for(scores)
    for x, y in zip(heads, scores):
        axis.annotate(format_value(y, decimals), (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                      fontsize=8)
    if threshold_score is not None:
        axis.axhline(threshold_score, color="grey", linestyle="--", label="stopping threshold")
    axis.legend(fontsize=8, loc="lower left")
    axis.margins(x=0.06, y=0.18)
    axis.set_xticks(heads)
    axis.invert_xaxis()
    axis.set_xlabel("heads remaining")
    axis.set_ylabel(metric_name)
    _title(axis, "Iterative head masking", subtitle)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def gates_curve(path, curve, *, target: int | None = None, subtitle: str | None = None):
    """Save the gate-learning curve: the task loss (left axis) and the expected number of open gates L0 (right
    axis, with the warmed-up target when there is one) against the training step."""
    figure, axis = plt.subplots(figsize=(6, 3.8))
    steps = [p["step"] for p in curve]
    axis.plot(steps, [p["loss"] for p in curve], color="tab:blue", label="task loss")
    axis.set_xlabel("step")
    axis.set_ylabel("task loss", color="tab:blue")
    right = axis.twinx()
    right.plot(steps, [p["l0"] for p in curve], color="tab:orange", label="expected open gates (L0)")
    if target is not None:  # the warmed-up target of every step where the curve has it
        goals = [p.get("target", target) for p in curve]
        right.plot(steps, goals, color="grey", linestyle="--", label=f"target (warmed up to {target})")
    right.set_ylabel("expected open gates", color="tab:orange")
    right.legend(fontsize=8, loc="upper right")
    _title(axis, "Learning hard-concrete head gates", subtitle)
    axis.grid(alpha=0.3)
    return _save(figure, path)

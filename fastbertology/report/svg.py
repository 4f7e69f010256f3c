"""Inline SVG figures for ``report.html``: value heatmaps, attention maps, the masking curve and line charts.

Every cell is an ``<rect class="cell">`` carrying ``data-row``, ``data-column`` and ``data-value`` (the exact stored
value) with a ``<title>`` child, which browsers show on hover (``layer 3, head 7: 0.30924246``); the page's script
copies it to a read-out line as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

import numpy as np

from .scales import COLORMAPS, Scale, decimals_for, format_value, ink_for

FONT = "font-family=\"system-ui, -apple-system, 'Segoe UI', sans-serif\""
CHAR_WIDTH = 7.0  # px per character at 12px, for sizing margins and cells


def exact(value) -> str:
    """The shortest text that reads back as ``value`` in its own dtype (float32 stays float32-short)."""
    if not np.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if value != 0 and (abs(value) < 1e-4 or abs(value) >= 1e7):
        return np.format_float_scientific(value, unique=True, trim="-")
    return np.format_float_positional(value, unique=True, trim="-")


def _legend(x: float, y: float, height: float, scale: Scale, decimals: int, gradient_id: str) -> list[str]:
    """A vertical colour bar from ``scale.low`` (bottom) to ``scale.high`` (top), centre marked when diverging."""
    anchors = COLORMAPS[scale.colormap]
    stops = "".join(f'<stop offset="{i / (len(anchors) - 1):.3f}" stop-color="{color}"/>'
                    for i, color in enumerate(reversed(anchors)))
    parts = [f'<defs><linearGradient id="{gradient_id}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>',
             f'<rect x="{x}" y="{y}" width="14" height="{height}" fill="url(#{gradient_id})" stroke="#999"/>']
    ticks = [(scale.high, y), (scale.low, y + height)]
    if scale.centre is not None:
        ticks.append((scale.centre, y + height / 2))
    for value, ty in ticks:
        parts.append(f'<line x1="{x + 14}" y1="{ty}" x2="{x + 18}" y2="{ty}" stroke="#666"/>'
                     f'<text x="{x + 21}" y="{ty + 4}" font-size="11">{escape(format_value(value, decimals))}</text>')
    return parts


def grid_svg(values: np.ndarray, *, table: str, scale: Scale, describe: Callable[[int, int, float], str],
             row_names: Sequence[str], column_names: Sequence[str], row_title: str = "", column_title: str = "",
             cell_width: float = 44, cell_height: float = 26, decimals: int | None = None, legend: bool = True,
             rotate_columns: bool = False, label: str = "") -> str:
    """A ``[R, C]`` grid of coloured cells. ``decimals``: write each value in its cell with that many decimals
    (None: no numbers). ``describe(row, column, value)``: the hover text. ``table``: the name in ``data-table``
    (also the id prefix of the read-out and the legend's gradient)."""
    rows, columns = values.shape
    row_width = max((len(name) for name in row_names), default=1) * CHAR_WIDTH
    column_height = max((len(name) for name in column_names), default=1) * CHAR_WIDTH * 0.87 if rotate_columns else 14
    left = row_width + (24 if row_title else 8)
    top = column_height + (22 if column_title else 8)
    width, height = columns * cell_width, rows * cell_height
    legend_decimals = decimals if decimals is not None else decimals_for([scale.low, scale.high])
    total_width = left + width + (48 + CHAR_WIDTH * (legend_decimals + 3) if legend else 10)
    total_height = top + max(height, 120 if legend else 0) + 10
    parts = [f'<svg class="grid" data-table="{escape(table)}" data-rows="{rows}" data-columns="{columns}" '
             f'width="{total_width:.0f}" height="{total_height:.0f}" viewBox="0 0 {total_width:.0f} '
             f'{total_height:.0f}" role="img" aria-label="{escape(label or table)}" {FONT}>']
    if column_title:
        parts.append(f'<text x="{left + width / 2}" y="12" font-size="12" text-anchor="middle" fill="#444">'
                     f'{escape(column_title)}</text>')
    if row_title:
        parts.append(f'<text x="12" y="{top + height / 2}" font-size="12" text-anchor="middle" fill="#444" '
                     f'transform="rotate(-90 12 {top + height / 2})">{escape(row_title)}</text>')
    for c, name in enumerate(column_names):
        x = left + (c + 0.5) * cell_width
        if rotate_columns:
            parts.append(f'<text x="{x + 3}" y="{top - 4}" font-size="11" transform="rotate(-60 {x + 3} {top - 4})">'
                         f'{escape(name)}</text>')
        else:
            parts.append(f'<text x="{x}" y="{top - 5}" font-size="11" text-anchor="middle">{escape(name)}</text>')
    for r, name in enumerate(row_names):
        parts.append(f'<text x="{left - 5}" y="{top + (r + 0.5) * cell_height + 4}" font-size="11" '
                     f'text-anchor="end">{escape(name)}</text>')
    for r in range(rows):
        for c in range(columns):
            value = values[r, c]
            color = scale.color(float(value))
            x, y = left + c * cell_width, top + r * cell_height
            parts.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell_width}" height="{cell_height}" '
                         f'fill="{color}" data-row="{r}" data-column="{c}" data-value="{exact(value)}">'
                         f'<title>{escape(describe(r, c, value))}</title></rect>')
            if decimals is not None:
                parts.append(f'<text class="value" x="{x + cell_width / 2}" y="{y + cell_height / 2 + 4}" '
                             f'font-size="11.5" text-anchor="middle" fill="{ink_for(color)}" pointer-events="none">'
                             f'{escape(format_value(float(value), decimals))}</text>')
    if legend:
        parts += _legend(left + width + 16, top, max(height, 120), scale, legend_decimals, f"legend-{table}")
    parts.append("</svg>")
    return "".join(parts)


def head_heatmap(values: np.ndarray, *, table: str, colormap: str = "viridis", centre: float | None = None,
                 row_title: str = "layer", column_title: str = "head", what: str = "value") -> str:
    """An ``[L, H]`` table (or ``[L]``, shown as one column) with its numbers in the cells."""
    grid = values[:, None] if values.ndim == 1 else values
    decimals = decimals_for(grid)
    texts = [format_value(float(v), decimals) for v in grid.ravel()]
    cell_width = max(44.0, CHAR_WIDTH * max(len(t) for t in texts) + 12)
    rows, columns = grid.shape
    single = values.ndim == 1

    def describe(r, c, value):
        where = f"{row_title} {r}" if single else f"{row_title} {r}, {column_title} {c}"
        return f"{where}: {what} {exact(value)}"

    return grid_svg(grid, table=table, scale=Scale(grid, colormap=colormap, centre=centre), describe=describe,
                    row_names=[str(r) for r in range(rows)],
                    column_names=[""] if single else [str(c) for c in range(columns)], row_title=row_title,
                    column_title="" if single else column_title, cell_width=cell_width, decimals=decimals,
                    label=f"{what} per {row_title}" + ("" if single else f" and {column_title}"))


def _token(text: str, limit: int = 12) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def attention_map(probabilities: np.ndarray, tokens: Sequence[str], *, table: str, label: str) -> str:
    """A ``[k, k]`` map of attention probabilities (query rows, key columns) on a fixed 0..1 scale, tokens on
    both axes; hover names the query, the key and the probability."""
    k = probabilities.shape[0]
    cell = max(8.0, min(14.0, 340.0 / max(k, 1)))
    names = [_token(t) for t in tokens[:k]]

    def describe(r, c, value):
        return f"query {r} {tokens[r]!r} -> key {c} {tokens[c]!r}: {exact(value)}"

    return grid_svg(probabilities, table=table, scale=Scale(probabilities, colormap="Blues", low=0.0, high=1.0),
                    describe=describe, row_names=names, column_names=names, row_title="query",
                    column_title="", cell_width=cell, cell_height=cell, decimals=None, rotate_columns=True,
                    label=label)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    span = high - low or abs(high) or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def masking_curve(curve: Sequence[dict], *, metric: str, threshold: float | None) -> str:
    """The iterative-masking curve: ``metric`` against heads remaining (more heads on the left), the stopping
    threshold dashed; each point's exact score on hover and printed above it."""
    xs = [float(p["heads_remaining"]) for p in curve]
    ys = [float("nan") if p["score"] is None else float(p["score"]) for p in curve]  # null: NaN, not drawn
    y_values = [y for y in ys + ([threshold] if threshold is not None else []) if math.isfinite(y)] or [0.0, 1.0]
    unit = max(1.0, max(abs(y) for y in y_values) / 1e300)  # plot y / unit: differences of huge scores stay finite
    low, high = min(y_values) / unit, max(y_values) / unit
    pad = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
    low, high = low - pad, high + pad
    x_high, x_low = max(xs), min(xs)
    x_pad = (x_high - x_low) * 0.06 or 1.0
    width, height, left, top, right, bottom = 640, 320, 64, 16, 20, 46
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):  # reversed: more heads on the left
        return left + (x_high + x_pad - x) / (x_high - x_low + 2 * x_pad) * plot_w

    def py(y):
        return top + (high - y / unit) / (high - low) * plot_h

    decimals = decimals_for(ys)
    parts = [f'<svg class="curve" data-table="masking_curve" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="masking curve" {FONT}>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    for tick in (unit * t for t in _ticks(low, high)):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{escape(format_value(tick, max(decimals - 1, 0)))}</text>')
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">'
                     f'{int(x)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="12" text-anchor="middle" '
                 f'fill="#444">heads remaining</text>'
                 f'<text x="14" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" fill="#444" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(metric)}</text>')
    if threshold is not None:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(threshold):.1f}" y2="{py(threshold):.1f}" '
                     f'stroke="#888" stroke-dasharray="6 4"/><text x="{left + 6}" y="{py(threshold) + 15:.1f}" '
                     f'font-size="11" fill="#666">stopping threshold {escape(format_value(threshold, decimals))}'
                     '</text>')
    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if math.isfinite(y))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#2a788e" stroke-width="2"/>')
    for index, (x, y) in enumerate(zip(xs, ys)):
        if not math.isfinite(y):
            continue
        parts.append(f'<circle class="cell" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4.5" fill="#2a788e" '
                     f'data-row="{index}" data-column="0" data-value="{exact(np.float64(y))}"><title>{int(x)} heads: '
                     f'{escape(metric)} {exact(np.float64(y))}</title></circle>'
                     f'<text x="{px(x):.1f}" y="{py(y) - 9:.1f}" font-size="11" text-anchor="middle">'
                     f'{escape(format_value(y, decimals))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(xs: Sequence[float], ys: Sequence[float], *, table: str, x_label: str, y_label: str,
               reference: float | None = None, reference_label: str = "") -> str:
    """A line of ``ys`` against ``xs`` (e.g. a training curve), with an optional dashed horizontal ``reference``;
    every point's exact value on hover (points thinned to at most 200)."""
    step = max(1, len(xs) // 200)
    xs, ys = [float(x) for x in xs[::step]], [float(y) for y in ys[::step]]
    y_values = ys + ([reference] if reference is not None else [])
    low, high = min(y_values), max(y_values)
    pad = (high - low) * 0.1 or abs(high) * 0.05 or 1.0
    low, high = low - pad, high + pad
    x_low, x_high = min(xs), max(xs)
    width, height, left, top, right, bottom = 640, 280, 64, 16, 20, 46
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x_low) / ((x_high - x_low) or 1.0) * plot_w

    def py(y):
        return top + (high - y) / (high - low) * plot_h

    decimals = decimals_for(ys)
    parts = [f'<svg class="curve" data-table="{escape(table)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(y_label)}" {FONT}>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    for tick in _ticks(low, high):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{escape(format_value(tick, max(decimals - 1, 0)))}</text>')
    for tick in _ticks(x_low, x_high):
        parts.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">'
                     f'{escape(format_value(tick, 0))}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="12" text-anchor="middle" '
                 f'fill="#444">{escape(x_label)}</text>'
                 f'<text x="14" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" fill="#444" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    if reference is not None:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(reference):.1f}" y2="{py(reference):.1f}" '
                     f'stroke="#888" stroke-dasharray="6 4"/><text x="{left + 6}" y="{py(reference) - 5:.1f}" '
                     f'font-size="11" fill="#666">{escape(reference_label)} {escape(format_value(reference, decimals))}'
                     '</text>')
    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#2a788e" stroke-width="2"/>')
    for index, (x, y) in enumerate(zip(xs, ys)):
        parts.append(f'<circle class="cell" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="#2a788e" '
                     f'data-row="{index}" data-column="0" data-value="{exact(np.float64(y))}"><title>'
                     f'{escape(x_label)} {exact(np.float64(x))}: {escape(y_label)} {exact(np.float64(y))}</title>'
                     '</circle>')
    parts.append("</svg>")
    return "".join(parts)

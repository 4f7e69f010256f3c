"""Colour scales and number formats shared by the PNG plots and ``report.html``.

* colour maps as 11 anchors sampled from matplotlib's (viridis, magma: sequential; RdBu_r: diverging, white at the
  centre), linearly interpolated in sRGB — no matplotlib needed for the report;
* :func:`ink_for` — black or white text, whichever contrasts more with a cell's colour (WCAG relative luminance);
* :func:`decimals_for` — enough decimals that the largest value keeps 3 significant digits and values that differ
  across the table do not all print the same (an entropy table where every head reads 3.859 shows 3.85901...).
"""

from __future__ import annotations

import math

import numpy as np

COLORMAPS = {
    "viridis": ("#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70", "#7ad151",
                "#bddf26", "#fde725"),
    "magma": ("#000004", "#140e36", "#3b0f70", "#641a80", "#8c2981", "#b73779", "#de4968", "#f7705c", "#fe9f6d",
              "#fecf92", "#fcfdbf"),
    "RdBu_r": ("#053061", "#2065ab", "#4393c3", "#90c4dd", "#d1e5f0", "#f7f6f6", "#fddbc7", "#f3a481", "#d6604d",
               "#b1182b", "#67001f"),
    "Blues": ("#f7fbff", "#e3eef9", "#d0e1f2", "#b7d4ea", "#94c4df", "#6aaed6", "#4a98c9", "#2e7ebc", "#1764ab",
              "#084a91", "#08306b"),
}
MAX_DECIMALS = 6


def _rgb(hex_color: str) -> tuple[float, float, float]:
    return tuple(int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))


def color_at(colormap: str, t: float) -> str:
    """The colour at ``t`` in [0, 1] (clipped; NaN -> light grey) of ``colormap``, as ``#rrggbb``."""
    if t != t:
        return "#dddddd"
    anchors = COLORMAPS[colormap]
    position = min(max(float(t), 0.0), 1.0) * (len(anchors) - 1)
    low = min(int(position), len(anchors) - 2)
    frac = position - low
    a, b = _rgb(anchors[low]), _rgb(anchors[low + 1])
    return "#" + "".join(f"{round(255 * (x + (y - x) * frac)):02x}" for x, y in zip(a, b))


def relative_luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour (``#rrggbb`` or three floats in [0, 1])."""
    r, g, b = _rgb(rgb) if isinstance(rgb, str) else tuple(rgb)[:3]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def ink_for(rgb) -> str:
    """``"black"`` or ``"white"``: the text colour with the higher contrast ratio on ``rgb``."""
    luminance = relative_luminance(rgb)
    return "black" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "white"


def decimals_for(values, *, significant: int = 3) -> int:
    """Decimals to print every value of ``values`` with: none for whole numbers; else 3 significant digits for the
    largest magnitude, more when the spread is small against it (two significant digits of the spread), at most 6."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 2
    if np.all(finite == np.round(finite)) and np.abs(finite).max() < 1e6:
        return 0  # whole numbers (a 0/1 head mask, counts)
    largest = float(np.abs(finite).max())
    with np.errstate(over="ignore"):
        spread = float(finite.max() - finite.min())
    spread = spread if math.isfinite(spread) else largest
    by_size = significant - 1 - math.floor(math.log10(largest)) if largest > 0 else 0
    by_spread = 1 - math.floor(math.log10(spread)) if spread > 0 else 0
    return int(min(MAX_DECIMALS, max(0, by_size, by_spread)))


def format_value(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals; NaN as an en dash; ``-0.000`` as ``0.000``."""
    if value != value:
        return "–"
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


class Scale:
    """Maps values to colours: sequential from ``low`` to ``high``, or diverging (``centre=0``: symmetric around
    0, so that white means no change)."""

    def __init__(self, values, *, colormap: str = "viridis", centre: float | None = None, low=None, high=None):
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        self.colormap = colormap
        self.centre = centre
        if centre is not None:
            half = float(np.abs(finite - centre).max()) if finite.size else 1.0
            half = half or 1.0
            self.low, self.high = centre - half, centre + half
        else:
            self.low = float(finite.min()) if low is None and finite.size else (0.0 if low is None else low)
            self.high = float(finite.max()) if high is None and finite.size else (1.0 if high is None else high)
            if self.high <= self.low:
                self.high = self.low + (abs(self.low) or 1.0) * 1e-9

    def fraction(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low) if value == value else float("nan")

    def color(self, value: float) -> str:
        return color_at(self.colormap, self.fraction(value))

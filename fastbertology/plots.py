"""PNG figures: head heatmaps and the masking curve (matplotlib, imported lazily; Agg backend)."""

from __future__ import annotations

import io

from .outputs import write_bytes_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    return write_bytes_atomic(path, buffer.getvalue())


def heatmap(path, table, *, title: str, colorbar_label: str, cmap: str = "viridis"):
    """Save a ``[L, H]`` table as a heatmap (layers down, heads across) with the values written in the cells."""
    plt = _pyplot()
    values = table.cpu().numpy() if hasattr(table, "cpu") else table
    layers, heads = values.shape
    figure, axis = plt.subplots(figsize=(max(4, 0.55 * heads + 1.5), max(2.5, 0.45 * layers + 1)))
    image = axis.imshow(values, cmap=cmap, aspect="auto")
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_xticks(range(heads))
    axis.set_yticks(range(layers))
    axis.set_title(title)
    if layers * heads <= 400:
        for layer in range(layers):
            for head in range(heads):
                axis.text(head, layer, f"{values[layer, head]:.2f}", ha="center", va="center", fontsize=6,
                          color="white")
    figure.colorbar(image, ax=axis, label=colorbar_label)
    return _save(figure, path)


def masking_curve(path, curve, *, metric_name: str, threshold_score: float | None = None):
    """Save the iterative-masking curve: score against heads remaining."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([p["heads_remaining"] for p in curve], [p["score"] for p in curve], marker="o")
    if threshold_score is not None:
        axis.axhline(threshold_score, color="grey", linestyle="--", label="threshold")
        axis.legend()
    axis.invert_xaxis()
    axis.set_xlabel("heads remaining")
    axis.set_ylabel(metric_name)
    axis.set_title("iterative head masking")
    axis.grid(alpha=0.3)
    return _save(figure, path)

"""The eager way to run mean and resample ablation sweeps: hooks on the stock model's output projections.

What TransformerLens-style tools do: the stock model with ``attn_implementation="eager"``, a forward pre-hook on
every attention output projection that replaces the masked heads' slices of its input (the per-head context
vectors ``[B, N, H * D]``), and one pass over the data per mask. The definitions are those of
:mod:`fastbertology.ablation` (the means over the real tokens of the data from a first pass; resample sources from
:func:`~fastbertology.ablation.resample_sources`, zeros where the source is padding). Independent of the patch.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence

import torch

from ..ablation import resample_sources
from ..architectures import architecture, attention_sites, heads_per_layer
from ..sweeps import SweepResult
from .reference import _call_attention_mask

# replace(row, call, context [B, N, H, D], attention_mask [B, N]) -> the new context, or None (unchanged)
Replace = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor | None]


@contextlib.contextmanager
def _projection_hooks(model, replace: Replace):
    """Inside the block, every output projection's input goes through ``replace`` (``call``: the index of the
    base-model call since the block began)."""
    output = architecture(model).projections_of(model.config).output
    projections = [operator.attrgetter(output)(site.block) for site in attention_sites(model)]
    heads = heads_per_layer(model)
    state = {"call": -1, "mask": None}

    def before_call(module, args, kwargs):
        state["call"] += 1
        state["mask"] = _call_attention_mask(module, args, kwargs)

    def hook(row):
        def before_projection(module, args):
            x = args[0]
            context = x.view(*x.shape[:-1], heads[row], -1)  # [B, N, H * D] -> [B, N, H, D]
            result = replace(row, state["call"], context, state["mask"])
            return None if result is None else (result.reshape(x.shape), *args[1:])
        return before_projection

    handles = [model.base_model.register_forward_pre_hook(before_call, with_kwargs=True)]
    handles += [projection.register_forward_pre_hook(hook(row)) for row, projection in enumerate(projections)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _blend(context: torch.Tensor, mask: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    keep = mask.to(context.dtype)[None, None, :, None]
    return context * keep + (1 - keep) * replacement.to(context.dtype)


def _head_means(model, batches: Sequence[dict], task) -> list[torch.Tensor]:
    """Per row ``[H, D]`` float64: the mean context over the real tokens of every call of ``task.forward``."""
    sums: dict[int, torch.Tensor] = {}
    tokens: dict[int, float] = {}

    def record(row, call, context, attention_mask):
        weights = attention_mask.to(torch.float64)
        sums[row] = sums.get(row, 0) + torch.einsum("bnhd,bn->hd", context.double(), weights)
        tokens[row] = tokens.get(row, 0.0) + float(weights.sum())

    with _projection_hooks(model, record):
        for batch in batches:
            task.forward(model, batch)
    return [sums[row] / tokens[row] for row in sorted(sums)]


def reference_ablation_sweep(model, batches: Sequence[dict], task, masks: torch.Tensor, *, ablation: str,
                             seed: int = 0) -> SweepResult:
    """Scores and mean batch losses of the stock eager ``model`` under each mask of ``masks [M, L, H]`` with
    ``ablation`` ``"mean"`` or ``"resample"``: a mean pass first (mean), then per batch one clean pass (the baseline,
    and the resample sources' contexts) and one pass per mask."""
    if ablation not in ("mean", "resample"):
        raise ValueError(f"the hook reference runs mean and resample ablation, not {ablation!r}")
    model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    masks = masks.to(device)
    states = [task.metric_state() for _ in range(len(masks) + 1)]  # baseline first
    losses = [0.0] * (len(masks) + 1)
    clean: dict[tuple[int, int], torch.Tensor] = {}  # (call, row) -> the sources' contexts of this batch
    current = {"mask": masks[0]}

    def capture(row, call, context, attention_mask):
        if ablation == "resample":
            sources = resample_sources(context.shape[0], seed).to(context.device)
            real = attention_mask[sources].to(context.dtype)[:, :, None, None]
            clean[(call, row)] = context[sources] * real
        return None

    def replace(row, call, context, attention_mask):
        mask = current["mask"][row]
        if bool((mask == 1).all()):
            return None
        return _blend(context, mask, means[row][None, None] if means is not None else clean[(call, row)])

    with torch.no_grad():
        means = _head_means(model, batches, task) if ablation == "mean" else None
        for batch in batches:
            clean.clear()
            with _projection_hooks(model, capture):
                result = task.evaluate(model, batch)
            task.update_metric(states[0], result, batch)
            losses[0] += float(result.loss)
            for index, mask in enumerate(masks, start=1):
                current["mask"] = mask
                with _projection_hooks(model, replace):
                    result = task.evaluate(model, batch)
                task.update_metric(states[index], result, batch)
                losses[index] += float(result.loss)
    count = max(len(batches), 1)
    scores = [task.compute_metric(state) for state in states]
    return SweepResult(kind="masks", masks=masks.cpu(), scores=torch.tensor(scores[1:], dtype=torch.float64),
                       losses=torch.tensor(losses[1:], dtype=torch.float64) / count, baseline_score=scores[0],
                       baseline_loss=losses[0] / count, higher_is_better=bool(task.higher_is_better),
                       metric_name=str(task.metric_name), batches=len(batches), ablation=ablation)

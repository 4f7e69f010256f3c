"""Head importance, entropy, max probability and the metric over a stream of batches that never sits in memory
as a whole, with snapshots to resume from: :func:`analyze_stream`.

The same accumulation as :func:`fastbertology.importance.analyze_heads` (importance ``|dL/dmask|`` summed in
float64, entropy and max-probability sums, the task's metric state, the batch losses), batch by batch. Every
``every`` batches ``on_snapshot(totals, position)`` receives the accumulated state (lossless, see
:func:`encode_totals`) and the stream's position after that batch; a run started with ``resume=`` such a state
and the batches from that position continues exactly where the first one stopped: every sum is added in the same
order, so the results are the same bits as a run that was never interrupted (with the same ``every``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .architectures import heads_per_layer
from .head_mask import checked_head_masks
from .importance import (
    IMPORTANCE_MODES,
    HeadAnalysis,
    examples_in,
    frozen_parameters,
    full_head_mask,
    normalize_importance,
    require_patched,
)
from .recording import HeadStatistics, record
from .sweep_checkpoint import decode_value, encode_value
from .tasks import TaskProtocol

TOTAL_FIELDS = ("raw_importance", "entropy_sums", "max_prob_sums", "tokens", "metric_state", "loss_sum", "batches",
                "examples")


def encode_totals(totals: dict) -> dict:
    """JSON-safe, lossless form of :func:`analyze_stream`'s accumulated state."""
    return {key: encode_value(totals[key]) for key in TOTAL_FIELDS}


def decode_totals(payload: dict, *, model: nn.Module, task: TaskProtocol) -> dict:
    """The inverse of :func:`encode_totals`, checked against ``model``'s ``[L, H]`` heads; ValueError naming the
    field that is missing or has the wrong type or shape."""
    if not isinstance(payload, dict) or set(payload) != set(TOTAL_FIELDS):
        raise ValueError(f"the accumulated state needs exactly the fields {list(TOTAL_FIELDS)}")
    totals = {key: decode_value(payload[key]) for key in TOTAL_FIELDS}
    heads = heads_per_layer(model)
    raw = totals["raw_importance"]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.float64 or tuple(raw.shape) != (len(heads), heads[0]):
        raise ValueError(f"raw_importance must be a float64 [{len(heads)}, {heads[0]}] tensor")
    for key in ("entropy_sums", "max_prob_sums", "tokens"):
        if not isinstance(totals[key], list) or len(totals[key]) != len(heads):
            raise ValueError(f"{key} must hold one entry per layer ({len(heads)})")
    for key in ("entropy_sums", "max_prob_sums"):
        for layer, sums in enumerate(totals[key]):
            if sums is not None and (not isinstance(sums, torch.Tensor) or sums.dtype != torch.float64
                                     or tuple(sums.shape) != (heads[layer],)):
                raise ValueError(f"{key}[{layer}] must be a float64 [{heads[layer]}] tensor")
    for key in ("batches", "examples"):
        if not isinstance(totals[key], int) or isinstance(totals[key], bool) or totals[key] < 0:
            raise ValueError(f"{key} must be a count")
    if not isinstance(totals["loss_sum"], torch.Tensor) or totals["loss_sum"].dtype != torch.float64:
        raise ValueError("loss_sum must be a float64 tensor")
    template = task.metric_state()
    if not isinstance(totals["metric_state"], dict) or set(totals["metric_state"]) != set(template):
        raise ValueError(f"metric_state must have the entries {sorted(template)}")
    return totals


def _snapshot(raw: torch.Tensor, stats: HeadStatistics, metric_state: dict, loss_sum: torch.Tensor, batches: int,
              examples: int) -> dict:
    tokens = [None if t is None else (t.detach().cpu() if isinstance(t, torch.Tensor) else t) for t in stats.tokens]
    return {"raw_importance": raw.detach().cpu().clone(),
            "entropy_sums": [None if s is None else s.detach().cpu().clone() for s in stats.entropy_sum],
            "max_prob_sums": [None if s is None else s.detach().cpu().clone() for s in stats.max_prob_sum],
            "tokens": tokens, "metric_state": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                                               for k, v in metric_state.items()},
            "loss_sum": loss_sum.detach().cpu().clone(), "batches": batches, "examples": examples}


def _restore(stats: HeadStatistics, totals: dict, device: torch.device) -> None:
    for layer, (entropy, max_prob) in enumerate(zip(totals["entropy_sums"], totals["max_prob_sums"])):
        if entropy is not None:
            stats._set_sums(layer, entropy.to(device), max_prob.to(device))
        tokens = totals["tokens"][layer]
        stats.tokens[layer] = tokens.to(device) if isinstance(tokens, torch.Tensor) else tokens


def analyze_stream(model: nn.Module, batches: Iterable[tuple[dict, object]], task: TaskProtocol, *,
                   importance: str = "per_batch", normalize_by_layer: bool = True, normalize_global: bool = True,
                   resume: dict | None = None, every: int = 0,
                   on_snapshot: Callable[[dict, object], None] | None = None,
                   on_batch: Callable[[dict, object], None] | None = None) -> HeadAnalysis:
    """:func:`~fastbertology.importance.analyze_heads` over ``batches``, an iterable of ``(batch, position)``
    (batch: a dict of tensors on the model's device; position: where the stream stands after it).

    resume:      an accumulated state (:func:`decode_totals`) to continue from; ``batches`` must then start where
                 it was taken.
    every:       call ``on_snapshot(totals, position)`` every ``every`` batches (0: never) and after the last one;
                 ``totals`` holds ``raw_importance`` ``[L, H]``, per-layer ``entropy_sums`` / ``max_prob_sums``
                 ``[H]``, ``tokens``, ``metric_state``, ``loss_sum`` (0-d float64), ``batches``, ``examples`` (CPU).
    on_batch:    called after every batch with the batch and its position (progress).
    The loss sum stays on the device (no synchronisation per batch); NaN or infinite losses raise ValueError at the
    next snapshot and at the end.
    """
    require_patched(model)
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {importance!r}")
    base_mask = full_head_mask(model)
    device = base_mask.device
    raw = torch.zeros(base_mask.shape, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metric_state, batches_seen, examples = task.metric_state(), 0, 0
    if resume is not None:
        raw = resume["raw_importance"].to(device).clone()
        loss_sum = resume["loss_sum"].to(device).clone()
        metric_state = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                        for key, value in resume["metric_state"].items()}
        batches_seen, examples = resume["batches"], resume["examples"]
    position = None
    with frozen_parameters(model), record(model) as stats, checked_head_masks(base_mask):
        if resume is not None:
            _restore(stats, resume, device)
        since = 0
        for batch, position in batches:
            size = examples_in(task, batch)
            shape = (size, *base_mask.shape) if importance == "per_example" else base_mask.shape
            mask = base_mask.expand(shape).clone().requires_grad_(True)
            result = task.evaluate(model, batch, head_mask=mask)
            objective = result.example_losses.sum() if importance == "per_example" else result.loss
            (gradient,) = torch.autograd.grad(objective, mask)
            raw += gradient.abs().double().sum(0) if importance == "per_example" else gradient.abs().double()
            task.update_metric(metric_state, result, batch)
            loss_sum += result.loss.detach().double()
            batches_seen, examples, since = batches_seen + 1, examples + size, since + 1
            if on_batch is not None:
                on_batch(batch, position)
            if every and since >= every and on_snapshot is not None:
                _check_loss(loss_sum, batches_seen)
                on_snapshot(_snapshot(raw, stats, metric_state, loss_sum, batches_seen, examples), position)
                since = 0
        if since and every and on_snapshot is not None:
            _check_loss(loss_sum, batches_seen)
            on_snapshot(_snapshot(raw, stats, metric_state, loss_sum, batches_seen, examples), position)
    _check_loss(loss_sum, batches_seen)
    tokens = stats.token_count()
    if batches_seen == 0:
        raise ValueError("the corpus has no block of at least 2 tokens: there is nothing to analyse")
    raw = (raw / max(tokens, 1)).cpu()
    return HeadAnalysis(
        importance=normalize_importance(raw, by_layer=normalize_by_layer, global_minmax=normalize_global),
        raw_importance=raw, entropy=stats.entropy(), max_prob=stats.max_prob(),
        metric=task.compute_metric(metric_state), loss=float(loss_sum) / max(batches_seen, 1), tokens=tokens,
        examples=examples)


def _check_loss(loss_sum: torch.Tensor, batches: int) -> None:
    value = float(loss_sum)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"the sum of the batch losses after {batches} batches is {value}: the model computes "
                         "non-finite values on this data (weights with NaN or inf, or an overflow in a 16-bit dtype: "
                         "try --dtype float32)")

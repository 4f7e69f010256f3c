"""Iterative head masking (Michel et al. 2019; run_bertology's ``mask_heads``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .importance import HeadAnalysis, analyze_heads, full_head_mask
from .tasks import TaskProtocol


@dataclass
class MaskingResult:
    """head_mask: ``[L, H]`` (1 keep, 0 masked) — the last mask whose score stayed within the threshold.
    curve: one ``{"heads_remaining", "score", "masked"}`` entry per step, starting with the unmasked model."""

    head_mask: torch.Tensor
    original_score: float
    final_score: float
    higher_is_better: bool
    curve: list[dict] = field(default_factory=list)
    cuda_graphs: dict | None = None  # how the steps of the last pass ran (HeadAnalysis.cuda_graphs)


def relative_quality(score: float, original: float, *, higher_is_better: bool) -> float:
    """``score / original`` for accuracy-like metrics, ``original / score`` for perplexity-like ones."""
    if original <= 0 or score <= 0:  # a ratio means nothing here: only "not worse" counts as keeping quality
        better_or_equal = score >= original if higher_is_better else score <= original
        return 1.0 if better_or_equal else 0.0
    return score / original if higher_is_better else original / score


def heads_to_mask_next(importance: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` least important heads among those still unmasked in ``mask`` ``[L, H]``."""
    scores = importance.clone().double().flatten()
    scores[mask.flatten() == 0] = float("inf")
    order = torch.sort(scores, stable=True).indices  # ties: lower index first, deterministic
    return order[:count]


def iterative_masking(model: nn.Module, batches: Sequence[dict], task: TaskProtocol, *, masking_amount: float = 0.1,
                      masking_threshold: float = 0.9, importance: str = "per_batch",
                      normalize_by_layer: bool = True, normalize_global: bool = True,
                      initial: HeadAnalysis | None = None, reduce=None, progress: bool = False,
                      cuda_graphs: str = "auto", checkpoint_layers: bool = False) -> MaskingResult:
    """Mask the ``masking_amount`` fraction (of all heads) least important remaining heads, recompute importance
    and the metric under the new mask, and repeat until the metric falls below ``masking_threshold`` times the
    original (for lower-is-better metrics: until ``original / score`` falls below it).

    Returns the last mask that stayed within the threshold and the whole curve (heads remaining -> score).
    ``batches`` is iterated once per step, so it must be a sequence (a list of batches), not a generator.
    ``initial``: the unmasked model's :func:`analyze_heads` result with the same options, if already computed
    (saves one pass). ``reduce``, ``cuda_graphs`` and ``checkpoint_layers``: passed to every :func:`analyze_heads`
    call (data-parallel runs; CUDA-graph replay, whose graphs the passes share; the memory plan's checkpointing).
    """
    if not 0 < masking_amount < 1:
        raise ValueError(f"masking_amount must be in (0, 1), got {masking_amount}")
    if not 0 < masking_threshold <= 1:
        raise ValueError(f"masking_threshold must be in (0, 1], got {masking_threshold}")
    higher_is_better = bool(task.higher_is_better)
    options = dict(importance=importance, normalize_by_layer=normalize_by_layer, normalize_global=normalize_global,
                   reduce=reduce, cuda_graphs=cuda_graphs, checkpoint_layers=checkpoint_layers)
    mask = full_head_mask(model)
    analysis = initial if initial is not None else analyze_heads(model, batches, task, head_mask=mask, **options)
    original = analysis.metric
    curve = [{"heads_remaining": int(mask.sum()), "score": original, "masked": []}]
    kept_mask, kept_score = mask.clone(), original
    per_step = max(1, int(mask.numel() * masking_amount))
    steps = tqdm(desc="masking", disable=not progress, unit="step")
    while int(mask.sum()) > per_step:
        chosen = heads_to_mask_next(analysis.importance, mask.cpu(), per_step)
        mask = mask.clone()
        mask.view(-1)[chosen.to(mask.device)] = 0.0
        analysis = analyze_heads(model, batches, task, head_mask=mask, **options)
        layers, heads = mask.shape
        curve.append({
            "heads_remaining": int(mask.sum()),
            "score": analysis.metric,
            "masked": [[int(i) // heads, int(i) % heads] for i in chosen],
        })
        steps.update(1)
        steps.set_postfix(heads=int(mask.sum()), score=f"{analysis.metric:.4g}")
        if relative_quality(analysis.metric, original, higher_is_better=higher_is_better) < masking_threshold:
            break
        kept_mask, kept_score = mask.clone(), analysis.metric
    steps.close()
    return MaskingResult(head_mask=kept_mask.cpu(), original_score=original, final_score=kept_score,
                         higher_is_better=higher_is_better, curve=curve, cuda_graphs=analysis.cuda_graphs)

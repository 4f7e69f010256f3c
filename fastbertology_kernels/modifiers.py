"""Score modifiers: relative-position bias tables, ALiBi slopes, tanh soft-capping and attention sinks.

Every backend of :func:`fastbertology.kernels.attention` takes them as keyword arguments (all default None) and
computes them from the ``O(H * M)`` / ``O(H)`` data below, never from an ``N x N`` bias (the float64 reference alone
builds one: it is the oracle). For query ``i`` and key ``j`` of one sequence (positions counted from the sequence's
first token, packed or padded), the score is, in this order:

    s_ij = cap(scale * q_i . k_j) + relative_bias[h, (j - i) + M - 1] + alibi_slopes[h] * (j - i)
    cap(x) = softcap * tanh(x / softcap)          (x itself without ``softcap``)

then padding, causal and window masks hide keys, and the softmax runs over the visible keys **and**, with
``sinks``, one extra logit ``sinks[h]`` per row whose value is zero: ``p_ij = exp(s_ij - lse')`` with
``lse' = log(exp(sinks[h]) + sum_j exp(s_ij))``. The returned ``lse`` is ``lse'``; ``entropy`` and ``max_prob``
describe the distribution over the visible keys and the sink (so the sink's probability counts). A row without
any visible key (padding, or every key at ``-inf`` bias) has zero probabilities and zero statistics, sink or not.

* ``relative_bias``: floating ``[H, 2 * M - 1]`` with ``M`` >= the longest sequence; entries may be ``-inf`` (a
  bidirectional local window as a table) provided every query that is not padding sees at least one key.
* ``alibi_slopes``: floating ``[H]``.
* ``softcap``: a float > 0.
* ``sinks``: floating ``[H]``.

These are frozen model parameters in every analysis (the backends differentiate q, k, v and the head mask), but a
modifier tensor that requires grad gets its exact gradient: in the reference (plain autograd) and the torch
backend all of them; in the Triton backend ``sinks`` (``-sum_i p_sink,i * rowsum(dO * O)_i``), while a
``relative_bias`` or ``alibi_slopes`` that requires a gradient is refused (with a message) rather than dropped.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch


class ScoreModifiers(NamedTuple):
    """The modifiers of one attention call (any of them None). See the module docstring for the formula."""

    relative_bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        return any(value is not None for value in self)

    @property
    def has_bias(self) -> bool:
        """An additive position term (relative bias or ALiBi) is present."""
        return self.relative_bias is not None or self.alibi_slopes is not None

    @property
    def bias_span(self) -> int:
        """``M``: the relative bias table holds the distances ``-(M - 1) .. M - 1``."""
        return (self.relative_bias.shape[-1] + 1) // 2


def check_modifiers(relative_bias, alibi_slopes, softcap, sinks, q: torch.Tensor, heads: int,
                    longest: int) -> ScoreModifiers:
    """Validate the modifiers against query heads ``heads`` and the longest sequence ``longest`` (``N`` padded, the
    longest packed sequence); return them as :class:`ScoreModifiers` (``softcap`` as a Python float)."""
    for name, value in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if value is None:
            continue
        _check_tensor(name, value, q)
        if tuple(value.shape) != (heads,):
            raise ValueError(f"{name} must have shape [heads]=({heads},) (one value per query head); got "
                             f"{tuple(value.shape)}")
    if relative_bias is not None:
        _check_tensor("relative_bias", relative_bias, q)
        width = relative_bias.shape[-1] if relative_bias.dim() == 2 else 0
        if relative_bias.dim() != 2 or relative_bias.shape[0] != heads or width % 2 == 0 or (width + 1) // 2 < longest:
            raise ValueError(
                f"relative_bias must be [heads, 2 * M - 1] with heads = {heads} and M >= the longest sequence "
                f"({longest}), entry (j - i) + M - 1 holding the bias of key j for query i; got "
                f"{tuple(relative_bias.shape)} (build the table for M = {max(longest, 1)} or more)"
            )
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (
                math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be None or a finite number > 0 (scores become softcap * tanh(s / softcap));"
                             f" got {softcap!r}")
        softcap = float(softcap)
    return ScoreModifiers(relative_bias, alibi_slopes, softcap, sinks)


def _check_tensor(name, value, q):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {type(value).__name__}"
                         f"{'' if not isinstance(value, torch.Tensor) else ' ' + str(value.dtype)}")
    if value.device != q.device:
        raise ValueError(f"{name} is on {value.device} but q is on {q.device}; move it with .to(q.device)")


def refuse_modifier_gradients(modifiers: ScoreModifiers, backend: str) -> None:
    """Raise when a position-bias tensor (relative bias, ALiBi slopes) would need a gradient, which ``backend`` does
    not compute (the sinks' gradient every backend computes)."""
    if not torch.is_grad_enabled():
        return
    for name in ("relative_bias", "alibi_slopes"):
        value = getattr(modifiers, name)
        if value is not None and value.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the {backend} attention backend treats it as a frozen parameter and "
                f"computes no gradient for it; pass {name}.detach() (or use backend='reference', which "
                "differentiates it)"
            )


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (a new tensor), or ``scores`` itself without a cap."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def position_bias(modifiers: ScoreModifiers, q_start: int, q_len: int, n_keys: int, dtype: torch.dtype,
                  device) -> torch.Tensor | None:
    """The additive position term ``[H, q_len, n_keys]`` for queries ``q_start ..`` and keys ``0 ..`` of one
    sequence (relative bias plus ALiBi), or None without either. One piece of rows at a time: callers bound its
    size like that of their scores."""
    if not modifiers.has_bias:
        return None
    rows = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    distance = torch.arange(n_keys, device=device)[None, :] - rows  # j - i, [q_len, n_keys]
    bias = None
    if modifiers.relative_bias is not None:
        bias = modifiers.relative_bias.to(dtype)[:, distance + modifiers.bias_span - 1]
    if modifiers.alibi_slopes is not None:
        alibi = modifiers.alibi_slopes.to(dtype)[:, None, None] * distance.to(dtype)
        bias = alibi if bias is None else bias + alibi
    return bias

"""The result type and the input checks shared by every attention backend."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionStats(NamedTuple):
    """Per (example, head, query) statistics of the attention distribution, all float32.

    lse:      ``[B, H, N]`` log-sum-exp of the (scaled, masked) scores.
    entropy:  ``[B, H, N]`` ``-sum_j p_j log p_j`` over keys.
    max_prob: ``[B, H, N]`` largest probability of the row.
    probs:    ``[B, H, N, N]`` the softmax probabilities before the head mask, only when asked, else None.

    Rows whose keys are all masked have zero probabilities and zero statistics. The statistics describe the
    head's softmax distribution, before the head mask is applied, and carry no gradient.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    max_prob: torch.Tensor
    probs: torch.Tensor | None = None


def check_inputs(q, k, v, head_mask, key_padding_mask, causal):
    """Validate shapes, dtypes and devices; return ``(B, H, N, D)``. Raises ValueError naming the problem."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, seq, head_dim]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            "q, k, v must have the same shape [batch, heads, seq, head_dim] (self-attention over whole sequences; "
            f"incremental decoding with a cache is not supported); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    batch, heads, seq, head_dim = q.shape
    if head_mask is not None:
        if not isinstance(head_mask, torch.Tensor) or not head_mask.is_floating_point():
            raise ValueError("head_mask must be a floating-point tensor of shape [heads] or [batch, heads]")
        if tuple(head_mask.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"head_mask must have shape [heads]=({heads},) or [batch, heads]=({batch}, {heads}); "
                f"got {tuple(head_mask.shape)}"
            )
        if head_mask.device != q.device:
            raise ValueError(f"head_mask is on {head_mask.device} but q is on {q.device}; move it with .to(q.device)")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq):
            raise ValueError(
                f"key_padding_mask must be a bool tensor [batch, seq]=({batch}, {seq}) with True = keep; got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    return batch, heads, seq, head_dim

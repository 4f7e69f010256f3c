"""The explicit PyTorch attention that every backend is tested against.

:func:`attention_reference` materialises the ``[B, H, N, N]`` probabilities and is differentiable through plain
autograd; run it in float64 for a ground truth. Packed sequences are handled one sequence at a time through the
same padded code. Grouped-query attention (``k, v`` with ``H_kv`` heads) repeats each key/value head for the
``H // H_kv`` query heads of its group (the only backend that does), so autograd sums their gradients. Never imports
transformers.
"""

from __future__ import annotations

import torch

from .common import AttentionStats, Packing, check_inputs
from .modifiers import ScoreModifiers, capped, check_modifiers, position_bias


def expand_head_mask(head_mask, batch, heads):
    """``[H]`` or ``[B, H]`` head mask -> ``[B, H]`` (a view where possible)."""
    return head_mask.expand(batch, heads) if head_mask.dim() == 1 else head_mask


def score_mask(key_padding_mask, causal, q_start, q_len, n_keys, device, window=None):
    """Boolean "may attend" mask broadcastable to scores ``[B, H, q_len, n_keys]``, or None if all keys are kept.

    Query ``i`` (rows ``q_start ..``) sees key ``j`` if the key is kept, ``j <= i`` when ``causal``, and with a
    ``window``: ``i - window < j`` and (not causal) ``j < i + window``."""
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # [B, 1, 1, N]
    if causal or window is not None:
        rows = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        cols = torch.arange(n_keys, device=device)[None, :]
        position_keep = (cols <= rows) if causal else None
        if window is not None:
            band = (cols > rows - window) & (cols < rows + (1 if causal else window))
            position_keep = band if position_keep is None else position_keep & band
        position_keep = position_keep[None, None]  # [1, 1, q_len, N]
        keep = position_keep if keep is None else keep & position_keep
    return keep


def repeat_kv_heads(t, heads):
    """``[B, H_kv, N, D]`` -> ``[B, heads, N, D]``: key/value head ``g`` for query heads ``g * group ..`` (a copy;
    ``t`` itself when ``H_kv = heads``)."""
    kv_heads = t.shape[1]
    return t if kv_heads == heads else t.repeat_interleave(heads // kv_heads, dim=1)


def attention_reference(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None,
                        return_probs=False, packing: Packing | None = None, window: int | None = None,
                        relative_bias=None, alibi_slopes=None, softcap=None, sinks=None):
    """Explicit attention, the ground truth. Same contract as :func:`fastbertology.kernels.attention`.

    Computes in the dtype of ``q`` (use float64 inputs for a reference), materialises all probabilities (and the
    ``[H, N, N]`` position bias of the score modifiers, see :mod:`~fastbertology.kernels.modifiers`), and is
    differentiable through autograd in ``q``, ``k``, ``v``, ``head_mask`` and the modifier tensors.
    """
    _, heads, _, _ = check_inputs(q, k, v, head_mask, key_padding_mask, causal, packing, return_probs, window)
    longest = packing.max_seqlen if packing is not None else q.shape[2]
    modifiers = check_modifiers(relative_bias, alibi_slopes, softcap, sinks, q, heads, longest)
    window = None if window is None else int(window)
    if packing is not None:
        return _packed_reference(q, k, v, head_mask, causal, scale, packing, window, modifiers)
    batch, heads, n_queries, head_dim = q.shape
    k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
    scale = head_dim**-0.5 if scale is None else scale
    scores = capped(torch.matmul(q, k.transpose(-1, -2)) * scale, modifiers.softcap)
    bias = position_bias(modifiers, 0, n_queries, k.shape[2], q.dtype, q.device)
    if bias is not None:
        scores = scores + bias[None]
    keep = score_mask(key_padding_mask, causal, 0, n_queries, k.shape[2], q.device, window)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    has_keys = torch.isfinite(scores).any(-1)  # [B, H, N]: rows with a visible key
    scores = scores.masked_fill(~has_keys[..., None], 0.0)  # rows without: finite (zeroed below), no NaN gradient
    if modifiers.sinks is not None:  # one more logit per row, whose value is zero
        sink = modifiers.sinks.to(q.dtype)[None, :, None, None].expand(batch, heads, n_queries, 1)
        scores = torch.cat((scores, sink), dim=-1)
    full = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    full = full * has_keys[..., None].to(full.dtype)  # rows without keys: zero, sink or not
    plogp = torch.where(full > 0, full * torch.log(full), torch.zeros_like(full))
    entropy = -plogp.sum(-1)
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(has_keys, lse, torch.zeros_like(lse))
    max_prob = full.amax(-1)
    probs = full[..., :k.shape[2]]
    out = torch.matmul(probs, v)
    masked_probs = probs
    if head_mask is not None:
        mask = expand_head_mask(head_mask, batch, heads).to(q.dtype)[:, :, None, None]
        out = out * mask
        masked_probs = probs * mask
    stats = AttentionStats(
        lse=lse.detach(),
        entropy=entropy.detach(),
        max_prob=max_prob.detach(),
        probs=masked_probs.detach() if return_probs else None,
    )
    return out, stats


def _packed_reference(q, k, v, head_mask, causal, scale, packing, window, modifiers: ScoreModifiers):
    """Packed ``[1, H, T, D]`` inputs: every sequence through the padded reference on its own, concatenated."""
    outs, stats = [], []
    for index, (start, length) in enumerate(zip(packing.starts(), packing.lengths)):
        if length == 0:
            continue
        rows = slice(start, start + length)
        mask = head_mask if head_mask is None or head_mask.dim() == 1 else head_mask[index:index + 1]
        out, stat = attention_reference(q[:, :, rows], k[:, :, rows], v[:, :, rows], head_mask=mask,
                                        causal=causal, scale=scale, window=window, **modifiers._asdict())
        outs.append(out)
        stats.append(stat)
    if not outs:
        empty = q.new_zeros(q.shape[:3])
        return q.new_zeros(q.shape), AttentionStats(empty, empty.clone(), empty.clone())
    return torch.cat(outs, dim=2), AttentionStats(*(torch.cat(parts, dim=2) for parts in list(zip(*stats))[:3]))

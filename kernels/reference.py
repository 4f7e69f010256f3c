"""Pure-PyTorch masked multi-head attention with per-head row statistics.

Two implementations of the contract documented in :mod:`fastbertology.kernels`:

* :func:`attention_reference` — explicit, materialises the ``[B, H, N, N]`` probabilities, differentiable
  through plain autograd. It is the ground truth the tests compare everything against (run it in float64).
* :func:`attention_torch` — the CPU backend. Processes queries in chunks so that no ``N x N`` tensor for
  the whole batch is ever built, and has its own backward (recomputes the probabilities chunk by chunk from
  the saved log-sum-exp, like FlashAttention) so that autograd does not keep them either.

Both never import transformers.
"""

from __future__ import annotations

import torch

from .common import AttentionStats, check_inputs

# Upper bound for the elements of one chunk of scores [B, H, chunk, N] (float32): 16M elements = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _score_mask(key_padding_mask, causal, q_start, q_len, n_keys, device):
    """Boolean "may attend" mask broadcastable to scores ``[B, H, q_len, n_keys]``, or None if all keys are kept."""
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # [B, 1, 1, N]
    if causal:
        rows = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        cols = torch.arange(n_keys, device=device)[None, :]
        causal_keep = (cols <= rows)[None, None]  # [1, 1, q_len, N]
        keep = causal_keep if keep is None else keep & causal_keep
    return keep


def _row_statistics(scores):
    """Softmax and its statistics for float32 ``scores [..., K]`` that may hold ``-inf``.

    Returns ``(probs, lse, entropy, max_prob)``; rows with every key masked give zero probabilities and zero
    statistics (finite, never NaN).
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    has_keys = torch.isfinite(row_max)
    row_max = torch.where(has_keys, row_max, torch.zeros_like(row_max))
    shifted = scores - row_max  # <= 0, -inf where masked
    weights = torch.exp(shifted)
    total = weights.sum(dim=-1, keepdim=True)  # >= 1 where the row has keys, 0 otherwise
    safe_total = torch.where(has_keys, total, torch.ones_like(total))
    probs = weights / safe_total
    # u = sum_j e_j (s_j - m): no large terms cancel (see DESIGN.md); 0 * (-inf) -> 0 for masked keys.
    weighted_shift = torch.where(weights > 0, weights * shifted, torch.zeros_like(weights)).sum(dim=-1, keepdim=True)
    log_total = torch.log(safe_total)
    entropy = log_total - weighted_shift / safe_total
    lse = row_max + log_total
    max_prob = 1.0 / safe_total
    zero = torch.zeros_like(lse)
    lse, entropy, max_prob = (torch.where(has_keys, t, zero).squeeze(-1) for t in (lse, entropy, max_prob))
    return probs, lse, entropy, max_prob


def _accumulation_dtype(dtype):
    """float32 for half types and float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _masked_scores(q, k, scale, key_padding_mask, causal, q_start):
    """float32 scores ``[B, H, q_len, N]`` of a query chunk with ``-inf`` at keys it may not attend to."""
    acc = _accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    keep = _score_mask(key_padding_mask, causal, q_start, q.shape[2], k.shape[2], q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def attention_reference(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None, return_probs=False):
    """Explicit attention, the ground truth. Same contract as :func:`fastbertology.kernels.attention`.

    Computes in the dtype of ``q`` (use float64 inputs for a reference), materialises all probabilities, and is
    differentiable through autograd in ``q``, ``k``, ``v`` and ``head_mask``.
    """
    batch, heads, n_queries, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal)
    scale = head_dim**-0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = _score_mask(key_padding_mask, causal, 0, n_queries, k.shape[2], q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    plogp = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
    entropy = -plogp.sum(-1)
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.matmul(probs, v)
    if head_mask is not None:
        out = out * expand_head_mask(head_mask, batch, heads)[:, :, None, None]
    stats = AttentionStats(
        lse=lse.detach(),
        entropy=entropy.detach(),
        max_prob=probs.amax(-1).detach(),
        probs=probs.detach() if return_probs else None,
    )
    return out, stats


def expand_head_mask(head_mask, batch, heads):
    """``[H]`` or ``[B, H]`` head mask -> ``[B, H]`` (a view where possible)."""
    return head_mask.expand(batch, heads) if head_mask.dim() == 1 else head_mask


def _chunk_size(batch, heads, n_queries, n_keys):
    return max(1, min(n_queries, _CHUNK_ELEMENTS // max(1, batch * heads * n_keys)))


class _ChunkedAttention(torch.autograd.Function):
    """Unmasked attention ``P @ V`` in query chunks; saves ``q, k, v, out, lse`` (no probabilities) for backward."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, return_probs):
        batch, heads, n_queries, _ = q.shape
        n_keys = k.shape[2]
        out = torch.empty_like(q)
        acc = _accumulation_dtype(q.dtype)
        lse = q.new_empty((batch, heads, n_queries), dtype=acc)
        entropy, max_prob = torch.empty_like(lse), torch.empty_like(lse)
        probs_all = q.new_empty((batch, heads, n_queries, n_keys), dtype=acc) if return_probs else None
        chunk = _chunk_size(batch, heads, n_queries, n_keys)
        v_acc = v.to(acc)
        for start in range(0, n_queries, chunk):
            stop = min(start + chunk, n_queries)
            scores = _masked_scores(q[:, :, start:stop], k, scale, key_padding_mask, causal, start)
            probs, lse[:, :, start:stop], entropy[:, :, start:stop], max_prob[:, :, start:stop] = _row_statistics(
                scores
            )
            out[:, :, start:stop] = torch.matmul(probs, v_acc).to(q.dtype)
            if return_probs:
                probs_all[:, :, start:stop] = probs
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.scale, ctx.chunk = causal, scale, chunk
        # one call: a second mark_non_differentiable would replace the first
        ctx.mark_non_differentiable(*(t for t in (lse, entropy, max_prob, probs_all) if t is not None))
        return out, lse, entropy, max_prob, probs_all

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        acc = lse.dtype
        k_acc, v_acc = k.to(acc), v.to(acc)
        grad_q = torch.empty_like(q, dtype=acc)
        grad_k = torch.zeros_like(k, dtype=acc)
        grad_v = torch.zeros_like(v, dtype=acc)
        for start in range(0, q.shape[2], ctx.chunk):
            stop = min(start + ctx.chunk, q.shape[2])
            q_chunk = q[:, :, start:stop].to(acc)
            scores = _masked_scores(q_chunk, k, ctx.scale, key_padding_mask, ctx.causal, start)
            probs = torch.exp(scores - lse[:, :, start:stop, None])  # exp(-inf) = 0 at masked keys
            d_out = grad_out[:, :, start:stop].to(acc)
            grad_v += torch.matmul(probs.transpose(-1, -2), d_out)
            d_probs = torch.matmul(d_out, v_acc.transpose(-1, -2))
            delta = (d_out * out[:, :, start:stop].to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O)
            d_scores = probs * (d_probs - delta) * ctx.scale
            grad_q[:, :, start:stop] = torch.matmul(d_scores, k_acc)
            grad_k += torch.matmul(d_scores.transpose(-1, -2), q_chunk)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def attention_torch(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None, return_probs=False):
    """Chunked PyTorch attention (the CPU backend). Same contract as :func:`fastbertology.kernels.attention`.

    Scores and softmax are computed in float32 (float64 for float64 inputs); the output has the dtype of ``v``.
    The head mask multiplies the unmasked output through autograd, which gives its gradient
    ``dL/dmask[b, h] = sum_i sum_d dO[b,h,i,d] * (P V)[b,h,i,d]``.
    """
    batch, heads, _, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal)
    scale = head_dim**-0.5 if scale is None else float(scale)
    unmasked, lse, entropy, max_prob, probs = _ChunkedAttention.apply(
        q, k, v, key_padding_mask, causal, scale, return_probs
    )
    out = unmasked
    if head_mask is not None:
        out = unmasked * expand_head_mask(head_mask, batch, heads).to(unmasked.dtype)[:, :, None, None]
    return out, AttentionStats(lse=lse, entropy=entropy, max_prob=max_prob, probs=probs)


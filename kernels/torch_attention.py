"""The PyTorch backend (the CPU path) of :func:`fastbertology.kernels.attention`.

* Padded batches ``[B, H, N, D]`` are processed in query chunks, so that no ``N x N`` tensor for the whole batch
  exists unless it is small.
* Packed sequences ``[1, H, T, D]`` (:class:`~fastbertology.kernels.Packing`) are processed one sequence at a
  time on views of the packed tensors: no work and no memory for padding, in the forward or the backward.

Both run through one autograd Function with a hand-written backward. On the CPU recomputing the probabilities is
not free (the ``exp`` alone costs as much as a score product), so the probabilities are kept for the backward
whenever they fit in ``KEEP_PROBS_ELEMENTS``; larger inputs keep only the log-sum-exp and recompute them chunk by
chunk, like FlashAttention.

Statistics use the shift-invariant form ``u = sum_j e_j (s_j - m)`` with ``e_j = exp(s_j - m)``, ``l = sum_j e_j``:
``entropy = log l - u / l``, ``lse = m + log l``, ``max_prob = 1 / l`` (no large terms cancel). Masked scores are
a large finite negative number, not ``-inf``, so no element-wise ``where`` is needed (``0 * finite = 0``); rows
without any visible key are detected from their maximum and given zeros.

The head mask multiplies the (unmasked) output through autograd, which gives its gradient
``dL/dmask[b, h] = sum_i sum_d dO[b, h, i, d] * (P V)[b, h, i, d]``.
"""

from __future__ import annotations

import torch

from .common import AttentionStats, Packing, check_inputs
from .reference import expand_head_mask, score_mask

# Elements of one chunk of scores [B, H, chunk, N] in the padded path: 16M float32 = 64 MiB.
CHUNK_ELEMENTS = 1 << 24
# Probabilities kept for the backward, per call, when they have at most this many elements (64 MiB in float32).
KEEP_PROBS_ELEMENTS = 1 << 24
# Score of a key a query may not see: finite, so that exp gives exactly 0 and 0 * score stays 0.
MASKED_SCORE = -1.0e30


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _softmax_with_statistics(scores: torch.Tensor, may_have_empty_rows: bool):
    """Softmax of ``scores [..., K]`` (masked entries = ``MASKED_SCORE``), computed in place in ``scores``.

    Returns ``(probs, lse, entropy, max_prob)``: probs ``[..., K]`` (the storage of ``scores``), statistics
    ``[...]``. With ``may_have_empty_rows``, rows whose every key is masked give zero probabilities and zero
    statistics.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    has_keys = None
    if may_have_empty_rows:
        has_keys = row_max > MASKED_SCORE / 2
        row_max = row_max.masked_fill(~has_keys, 0.0)  # masked scores then stay hugely negative: exp -> 0
    shifted = scores.sub_(row_max)
    weights = torch.exp(shifted)
    total = weights.sum(dim=-1, keepdim=True)  # >= 1 where the row has keys
    weighted_shift = torch.linalg.vecdot(weights, shifted).unsqueeze(-1)  # u
    if may_have_empty_rows:
        total = total.masked_fill(~has_keys, 1.0)
    probs = weights.div_(total)
    log_total = torch.log(total)
    entropy = log_total - weighted_shift / total
    lse = row_max + log_total
    max_prob = total.reciprocal()
    if may_have_empty_rows:
        entropy, lse, max_prob = (t.masked_fill(~has_keys, 0.0) for t in (entropy, lse, max_prob))
    return probs, lse.squeeze(-1), entropy.squeeze(-1), max_prob.squeeze(-1)


class _Problem:
    """One attention problem: a list of independent pieces that together cover every query row.

    A piece is ``(batch rows, query rows, key rows, query offset)``: padded chunks take all batch rows, a query
    chunk and all keys; packed sequences take batch row 0 and the same token range for queries and keys.
    """

    def __init__(self, q, k, causal, key_padding_mask, packing: Packing | None):
        self.causal = causal
        self.key_padding_mask = key_padding_mask
        self.packing = packing
        self.pieces = []
        if packing is not None:
            for start, length in zip(packing.starts(), packing.lengths):
                if length:
                    rows = slice(start, start + length)
                    self.pieces.append((rows, rows, 0))
        else:
            batch, heads, n_queries = q.shape[:3]
            n_keys = k.shape[2]
            chunk = max(1, min(n_queries, CHUNK_ELEMENTS // max(1, batch * heads * n_keys)))
            for start in range(0, n_queries, chunk):
                self.pieces.append((slice(start, min(start + chunk, n_queries)), slice(0, n_keys), start))
        self._causal_masks: dict[tuple[int, int, int], torch.Tensor] = {}

    @property
    def may_have_empty_rows(self) -> bool:
        return self.key_padding_mask is not None

    def score_elements(self, q) -> int:
        """Elements of all the pieces' probabilities together."""
        batch, heads = q.shape[:2]
        return sum(batch * heads * (rows.stop - rows.start) * (keys.stop - keys.start)
                   for rows, keys, _ in self.pieces)

    def scores(self, q_piece, k_piece, scale, piece) -> torch.Tensor:
        """Scaled scores ``[b, H, n_q, n_k]`` (accumulation dtype) of one piece, masked keys = ``MASKED_SCORE``."""
        acc = accumulation_dtype(q_piece.dtype)
        scores = torch.matmul(q_piece.to(acc), k_piece.to(acc).transpose(-1, -2)).mul_(scale)
        rows, keys, offset = piece
        if self.packing is not None:
            if self.causal:
                scores.masked_fill_(self._causal_mask(rows.stop - rows.start, 0, scores.device), MASKED_SCORE)
            return scores
        keep = score_mask(self.key_padding_mask, self.causal, offset, rows.stop - rows.start,
                          keys.stop - keys.start, scores.device)
        if keep is not None:
            scores.masked_fill_(~keep, MASKED_SCORE)
        return scores

    def _causal_mask(self, length, offset, device) -> torch.Tensor:
        """bool ``[length, length]``, True above the diagonal (keys a query may not see); cached per length."""
        key = (length, offset, device.index or 0)
        if key not in self._causal_masks:
            self._causal_masks[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)
        return self._causal_masks[key]


class _TorchAttention(torch.autograd.Function):
    """Unmasked attention ``P @ V`` over the pieces of a :class:`_Problem`; keeps the probabilities for the
    backward when they are small, else the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, problem: _Problem, scale, return_probs):
        batch, heads, n_queries = q.shape[:3]
        acc = accumulation_dtype(q.dtype)
        out = torch.empty_like(q)  # keeps q's memory layout (e.g. [B, N, H, D] underneath)
        lse = q.new_empty((batch, heads, n_queries), dtype=acc)
        entropy, max_prob = torch.empty_like(lse), torch.empty_like(lse)
        probs_all = q.new_zeros((batch, heads, n_queries, k.shape[2]), dtype=acc) if return_probs else None
        keep_probs = any(ctx.needs_input_grad[:3]) and problem.score_elements(q) <= KEEP_PROBS_ELEMENTS
        kept = []
        v_acc = v.to(acc)
        for piece in problem.pieces:
            q_rows, k_rows, _ = piece
            batch_rows = slice(0, 1) if problem.packing is not None else slice(0, batch)
            scores = problem.scores(q[batch_rows, :, q_rows], k[batch_rows, :, k_rows], scale, piece)
            probs, lse_p, entropy_p, max_prob_p = _softmax_with_statistics(scores, problem.may_have_empty_rows)
            lse[batch_rows, :, q_rows], entropy[batch_rows, :, q_rows], max_prob[batch_rows, :, q_rows] = (
                lse_p, entropy_p, max_prob_p)
            out[batch_rows, :, q_rows] = torch.matmul(probs, v_acc[batch_rows, :, k_rows])
            if return_probs:
                probs_all[batch_rows, :, q_rows, k_rows] = probs
            if keep_probs:
                kept.append(probs)
        ctx.problem, ctx.scale, ctx.kept = problem, scale, kept if keep_probs else None
        ctx.save_for_backward(q, k, v, out, lse)
        # one call: a second mark_non_differentiable would replace the first
        ctx.mark_non_differentiable(*(t for t in (lse, entropy, max_prob, probs_all) if t is not None))
        return out, lse, entropy, max_prob, probs_all

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        q, k, v, out, lse = ctx.saved_tensors
        problem, scale = ctx.problem, ctx.scale
        acc = lse.dtype
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        packed = problem.packing is not None  # packed pieces own disjoint rows: write, do not accumulate
        new = torch.empty_like if packed else torch.zeros_like
        grad_q = new(q, dtype=acc) if need_q else None
        grad_k = new(k, dtype=acc) if need_k else None
        grad_v = new(v, dtype=acc) if need_v else None
        batch_rows = slice(0, 1) if problem.packing is not None else slice(0, q.shape[0])
        for index, piece in enumerate(problem.pieces):
            q_rows, k_rows, _ = piece
            q_piece, k_piece = q[batch_rows, :, q_rows].to(acc), k[batch_rows, :, k_rows].to(acc)
            if ctx.kept is not None:
                probs = ctx.kept[index]
            else:
                probs = problem.scores(q_piece, k_piece, scale, piece).sub_(lse[batch_rows, :, q_rows, None]).exp_()
            d_out = grad_out[batch_rows, :, q_rows].to(acc)
            if need_v:
                _store(grad_v[batch_rows, :, k_rows], torch.matmul(probs.transpose(-1, -2), d_out), packed)
            if need_q or need_k:
                d_scores = torch.matmul(d_out, v[batch_rows, :, k_rows].to(acc).transpose(-1, -2))
                delta = torch.linalg.vecdot(d_out, out[batch_rows, :, q_rows].to(acc)).unsqueeze(-1)  # rowsum(dO*O)
                d_scores.sub_(delta).mul_(probs).mul_(scale)
                if need_q:
                    _store(grad_q[batch_rows, :, q_rows], torch.matmul(d_scores, k_piece), packed)
                if need_k:
                    _store(grad_k[batch_rows, :, k_rows], torch.matmul(d_scores.transpose(-1, -2), q_piece), packed)
        ctx.kept = None
        grads = [g.to(t.dtype) if g is not None else None for g, t in ((grad_q, q), (grad_k, k), (grad_v, v))]
        return (*grads, None, None, None)


def _store(target: torch.Tensor, value: torch.Tensor, overwrite: bool) -> None:
    """``target = value`` (``overwrite``) or ``target += value``, in place."""
    if overwrite:
        target.copy_(value)
    else:
        target.add_(value)


def _token_head_mask(head_mask, packing: Packing | None, batch: int, heads: int):
    """The head mask broadcastable to the output ``[B, H, N, D]``: ``[B, H, 1, 1]``, or for packed sequences
    with per-sequence masks ``[1, H, T, 1]`` (each token takes its sequence's row)."""
    if packing is not None and head_mask.dim() == 1:
        return head_mask[None, :, None, None]
    if packing is not None:
        lengths = torch.tensor(packing.lengths, device=head_mask.device)
        per_token = head_mask.repeat_interleave(lengths, dim=0, output_size=packing.total)  # [T, H]
        return per_token.t()[None, :, :, None]
    return expand_head_mask(head_mask, batch, heads)[:, :, None, None]


def attention_torch(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None, return_probs=False,
                    packing: Packing | None = None):
    """PyTorch attention (the CPU backend). Same contract as :func:`fastbertology.kernels.attention`.

    Scores and softmax are computed in float32 (float64 for float64 inputs); the output has the dtype of ``v``.
    """
    batch, heads, _, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal, packing, return_probs)
    scale = head_dim**-0.5 if scale is None else float(scale)
    problem = _Problem(q, k, causal, key_padding_mask, packing)
    out, lse, entropy, max_prob, probs = _TorchAttention.apply(q, k, v, problem, scale, return_probs)
    if head_mask is not None:
        mask = _token_head_mask(head_mask, packing, batch, heads)
        out = out * mask.to(out.dtype)
        if probs is not None:
            probs = probs * mask.detach().to(probs.dtype)
    if probs is not None:
        probs = probs.to(q.dtype)
    return out, AttentionStats(lse=lse, entropy=entropy, max_prob=max_prob, probs=probs)

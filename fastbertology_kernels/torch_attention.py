"""The PyTorch backend (the CPU path) of :func:`fastbertology.kernels.attention`.

The work is cut into *pieces* that one batched matrix product each can do:

* padded batches ``[B, H, N, D]``: query chunks of all examples, so that no ``N x N`` tensor for the whole batch
  exists unless it is small (:class:`PaddedPieces`);
* packed sequences ``[1, H, T, D]`` (:class:`~fastbertology.kernels.Packing`): one sequence at a time, on views of
  the packed tensors: no work and no memory for padding (:class:`PackedPieces`); a long sequence in query blocks
  (causal: each block against the keys up to its last query), so that memory stays linear in its length.
  (Gathering sequences of similar length into padded groups makes fewer, larger products, but the gathers and
  scatters cost more than they save on a CPU: measured 2x slower for MiniLM-sized heads.)

Grouped-query attention (``k, v`` ``[B, H_kv, N, D]``, ``G = H / H_kv`` query heads per key/value head) never
repeats K or V: the queries of a group are stacked along the rows, ``[B, H_kv, G * n, D]``, so that one product
with the group's keys gives the scores of all its heads, ``[B, H_kv, G * n, N]``, which is the very memory of
``[B, H, n, N]`` (query head ``h = g_kv * G + g``); ``P^T dO`` and ``dS^T Q`` over the stacked rows are already the
sums over the group that ``dV`` and ``dK`` need. With ``G = 1`` every regrouping is a free view.

A sliding ``window`` masks keys outside ``i - window < j`` (and ``j <= i`` causal, ``j < i + window`` otherwise)
like the causal mask: in the scores, per piece.

One autograd Function with a hand-written backward runs either. On the CPU recomputing the probabilities is not
free (the ``exp`` alone costs about as much as a score product), so they are kept for the backward whenever they
fit in ``KEEP_PROBS_ELEMENTS``; larger inputs keep only the log-sum-exp and recompute them piece by piece, like
FlashAttention.

Statistics use the shift-invariant form ``u = sum_j e_j (s_j - m)`` with ``e_j = exp(s_j - m)``, ``l = sum_j e_j``:
``entropy = log l - u / l``, ``lse = m + log l``, ``max_prob = 1 / l`` (no large terms cancel). Masked scores are
a large finite negative number, not ``-inf``, so no element-wise ``where`` is needed (``0 * finite = 0``); rows
without any visible key are detected from their maximum and given zeros.

The head mask multiplies the (unmasked) output through autograd, which gives its gradient
``dL/dmask[b, h] = sum_i sum_d dO[b, h, i, d] * (P V)[b, h, i, d]``; for half-precision inputs and a float32 mask
this sum is taken in float32 of the unrounded ``P V`` (:class:`_MaskedHalfOutput`; as the Triton backward's float32
``Delta``), the output itself being what half-precision attention gives.

Score modifiers (:mod:`~fastbertology.kernels.modifiers`) act per piece: the cap on the scaled scores, then the
position term ``[H, n, N]`` built for the piece's rows from the ``[H, 2M - 1]`` table / ``[H]`` slopes (``-inf``
entries become ``MASKED_SCORE``), then the masks. A sink adds ``exp(sink - m)`` to ``l`` and
``exp(sink - m) (sink - m)`` to ``u``; the backward needs nothing more (the sink's value is zero, so
``rowsum(dO * O)`` is still the ``sum_j p_j dP_j`` of the softmax backward). The cap's derivative
``1 - tanh^2`` multiplies ``dS``, from scores recomputed in the backward. The modifier tensors get their exact
gradients when they require one: the sinks ``-sum_i p_sink,i rowsum(dO * O)_i``, the bias table the sum of
``dL/ds`` over the entries of each distance, the slopes ``sum dL/ds * (j - i)``.
"""

from __future__ import annotations

import torch

from .common import AttentionStats, Packing, check_inputs
from .modifiers import ScoreModifiers, capped, check_modifiers, position_bias
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


def _softmax_parts(scores: torch.Tensor, may_have_empty_rows: bool, sink: torch.Tensor | None = None):
    """Softmax of ``scores [..., K]`` (masked entries = ``MASKED_SCORE``), computed in place in ``scores``, with one
    more logit ``sink`` (broadcastable to ``[..., 1]``, value zero) in the denominator when given.

    Returns ``(probs [..., K], row_max [...], total [...], weighted_shift [...])``: the row's max ``m`` (0 for a
    row without keys and no sink), ``l = sum_j e_j`` (1 for a row without keys) and ``u = sum_j e_j (s_j - m)``,
    the sink counted as one more ``j``; see :func:`_statistics`. With ``may_have_empty_rows``, rows whose every
    key is masked get zero probabilities.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    elif may_have_empty_rows:  # masked scores stay hugely negative after shifting by 0: exp -> 0
        row_max.masked_fill_(row_max < MASKED_SCORE / 2, 0.0)
    shifted = scores.sub_(row_max)
    weights = torch.exp(shifted)
    total = weights.sum(dim=-1, keepdim=True)  # >= 1 where the row has keys, 0 otherwise
    weighted_shift = torch.linalg.vecdot(weights, shifted)
    if sink is not None:
        sink_shift = sink - row_max
        sink_weight = torch.exp(sink_shift)
        total = total + sink_weight
        weighted_shift = weighted_shift + (sink_weight * sink_shift).squeeze(-1)
    if may_have_empty_rows:
        total.clamp_(min=1.0)  # rows without keys: probabilities 0 / 1
    probs = weights.div_(total)
    return probs, row_max.squeeze(-1), total.squeeze(-1), weighted_shift


def _statistics(row_max: torch.Tensor, total: torch.Tensor, weighted_shift: torch.Tensor, has_keys):
    """``(lse, entropy, max_prob)`` from :func:`_softmax_parts`' row quantities (any shape, all alike):
    ``lse = m + log l``, ``entropy = log l - u / l``, ``max_prob = 1 / l``; zeros where ``has_keys`` is False."""
    log_total = torch.log(total)
    lse, entropy, max_prob = row_max + log_total, log_total - weighted_shift / total, total.reciprocal()
    if has_keys is not None:
        lse, entropy, max_prob = (t.masked_fill(~has_keys, 0.0) for t in (lse, entropy, max_prob))
    return lse, entropy, max_prob


def _grouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H, n, X]`` -> ``[B, H_kv, G * n, X]``: the rows of the ``G = H / H_kv`` query heads of a group one after
    another (a view where the layout allows, else a copy of this query-sized tensor)."""
    batch, heads, n, x = t.shape
    return t.reshape(batch, kv_heads, (heads // kv_heads) * n, x)


def _ungrouped(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, H_kv, G * n, X]`` (contiguous, as products make them) -> ``[B, H, n, X]``, a view."""
    batch, kv_heads, rows, x = t.shape
    return t.view(batch, heads, rows // (heads // kv_heads), x)


def _visible_keys(key_padding_mask, causal: bool, window: int | None) -> torch.Tensor:
    """bool ``[B, N]``: query ``i`` sees at least one kept key (within the causal / sliding-window bounds)."""
    n = key_padding_mask.shape[-1]
    if not causal and window is None:
        return key_padding_mask.any(-1, keepdim=True).expand(-1, n)
    before = torch.nn.functional.pad(key_padding_mask.to(torch.int32).cumsum(-1), (1, 0))  # [B, N + 1]: kept < j
    rows = torch.arange(n, device=key_padding_mask.device)
    stop = rows + 1 if causal else (rows + window).clamp(max=n)
    start = (rows - window + 1).clamp(min=0) if window is not None else torch.zeros_like(rows)
    return before[:, stop] > before[:, start]


class PaddedPieces:
    """Query chunks of a padded batch ``[B, H, N, D]``; a piece is ``(start, stop)`` of query rows (all keys).
    Piece tensors are ``[B, H, n, ...]``; row quantities ``[B, H, n]``."""

    may_have_empty_rows: bool

    def __init__(self, q, causal: bool, key_padding_mask, window: int | None = None):
        batch, heads, n = q.shape[:3]
        self.causal, self.key_padding_mask, self.window = causal, key_padding_mask, window
        self.may_have_empty_rows = key_padding_mask is not None
        chunk = max(1, min(n, CHUNK_ELEMENTS // max(1, batch * heads * n)))
        self.pieces = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
        self.score_elements = batch * heads * n * n

    def queries(self, piece, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, piece[0]:piece[1]]

    def keys(self, piece, t: torch.Tensor) -> torch.Tensor:
        return t

    def query_gradient_rows(self, piece, grad_out: torch.Tensor) -> torch.Tensor:
        return self.queries(piece, grad_out)

    def query_offset(self, piece) -> int:
        """Position of the piece's first query row in its sequence (its keys start at position 0)."""
        return piece[0]

    def mask_scores(self, piece, scores: torch.Tensor) -> None:
        keep = score_mask(self.key_padding_mask, self.causal, piece[0], piece[1] - piece[0], scores.shape[-1],
                          scores.device, self.window)
        if keep is not None:
            scores.masked_fill_(~keep, MASKED_SCORE)

    def lse_rows(self, piece, lse: torch.Tensor) -> torch.Tensor:
        return lse[:, :, piece[0]:piece[1]]

    def assemble(self, like: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-piece query rows ``[B, H, n, ...]`` -> ``[B, H, N, ...]`` (the chunks tile the rows in order)."""
        return torch.cat(parts, dim=2)

    def add_keys(self, total: torch.Tensor | None, like: torch.Tensor, piece, part: torch.Tensor) -> torch.Tensor:
        """Add one chunk's key-side gradient (every chunk covers every key) into the running ``[B, H, N, D]`` sum."""
        return part if total is None else total.add_(part)

    def has_keys(self, q) -> torch.Tensor | None:
        """bool ``[B, 1, N]``: the query row sees at least one key (None: every row does)."""
        if self.key_padding_mask is None:
            return None
        return _visible_keys(self.key_padding_mask, self.causal, self.window)[:, None, :]


class PackedPieces:
    """The sequences of a packed batch ``[1, H, T, D]``, taken as views (no copies, no padding). A piece is
    ``(q_start, q_stop, k_start, k_stop)``: a block of one sequence's queries and the keys they may see (the whole
    sequence; causal: up to the block's last query). A sequence is cut into query blocks of at most
    ``CHUNK_ELEMENTS / (H * n)`` rows, so that a piece's scores ``[1, H, rows, keys]`` stay bounded and the memory of
    a long sequence is linear in its length. Piece tensors are ``[1, H, rows, ...]``; row quantities
    ``[1, H, rows]``."""

    may_have_empty_rows = False  # every query of a sequence sees at least itself

    def __init__(self, q, causal: bool, packing: Packing, window: int | None = None):
        self.causal, self.window = causal, window
        heads = q.shape[1]
        self.pieces = []
        for start, n in zip(packing.starts(), packing.lengths):
            rows = max(1, min(n, CHUNK_ELEMENTS // max(1, heads * n)))
            for block in range(start, start + n, rows):
                stop = min(block + rows, start + n)
                self.pieces.append((block, stop, start, stop if causal else start + n))
        self.score_elements = heads * sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in self.pieces)
        self._hidden: dict[tuple[int, int, int], torch.Tensor] = {}

    def queries(self, piece, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, piece[0]:piece[1]]

    def keys(self, piece, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, piece[2]:piece[3]]

    query_gradient_rows = queries
    lse_rows = queries

    def query_offset(self, piece) -> int:
        """Position of the block's first query in its sequence (its keys start at the sequence's start)."""
        return piece[0] - piece[2]

    def mask_scores(self, piece, scores: torch.Tensor) -> None:
        if self.causal or self.window is not None:
            q_start, q_stop, k_start, k_stop = piece
            shape = (q_start - k_start, q_stop - q_start, k_stop - k_start)
            hidden = self._hidden.get(shape)
            if hidden is None:  # the keys a query may not see, [rows, keys]
                hidden = ~score_mask(None, self.causal, *shape, scores.device, self.window)[0, 0]
                if shape[0] == 0 and shape[1] == shape[2]:  # a whole sequence: kept for the other layers' calls
                    self._hidden[shape] = hidden
            scores.masked_fill_(hidden, MASKED_SCORE)

    def assemble(self, like: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-block rows ``[1, H, rows, ...]`` -> ``[1, H, T, ...]`` (the blocks tile the stream in order)."""
        return torch.cat(parts, dim=2)

    def add_keys(self, total: torch.Tensor | None, like: torch.Tensor, piece, part: torch.Tensor) -> torch.Tensor:
        """Add one piece's key-side gradient ``[1, H_kv, keys, D]`` into the running ``[1, H_kv, T, D]`` total (the
        pieces of one sequence share its keys); ``like``: the key / value tensor."""
        if total is None:
            total = part.new_zeros((like.shape[0], part.shape[1], like.shape[2], part.shape[3]))
        total[:, :, piece[2]:piece[3]] += part
        return total

    def has_keys(self, q) -> None:
        return None


def _modify_scores(pieces, piece, scores: torch.Tensor, modifiers: ScoreModifiers) -> torch.Tensor:
    """Cap and bias the scaled scores ``[B, H, n, N]`` of a piece (in place where possible), then mask them; returns
    the scores. Positions are those of the sequence: rows ``pieces.query_offset(piece) ..`` against keys ``0 ..``."""
    if modifiers.softcap is not None:
        scores = capped(scores, modifiers.softcap)
    q_start = pieces.query_offset(piece)
    bias = position_bias(modifiers, q_start, scores.shape[2], scores.shape[3], scores.dtype, scores.device)
    if bias is not None:
        scores.add_(bias.clamp_(min=MASKED_SCORE))  # -inf entries: hidden like masked keys
    pieces.mask_scores(piece, scores)
    return scores


def _add_bias_gradients(pieces, piece, d_scores: torch.Tensor, modifiers: ScoreModifiers, grad_table, grad_slopes):
    """Add a piece's ``dL/ds`` ``[B, H, n, N]`` to the gradients of the bias table ``[H, 2M - 1]`` (summed over the
    entries of each distance ``j - i``) and of the ALiBi slopes ``[H]`` (``sum dL/ds * (j - i)``), in place."""
    per_head = d_scores.sum(dim=0)  # [H, n, N]
    q_start = pieces.query_offset(piece)
    rows = torch.arange(q_start, q_start + per_head.shape[1], device=per_head.device)[:, None]
    distance = torch.arange(per_head.shape[2], device=per_head.device)[None, :] - rows  # j - i, [n, N]
    if grad_table is not None:
        grad_table.index_add_(1, (distance + modifiers.bias_span - 1).flatten(), per_head.flatten(1))
    if grad_slopes is not None:
        grad_slopes.add_(torch.linalg.vecdot(per_head.flatten(1), distance.flatten().to(per_head.dtype)))


def _cap_derivative(piece_q, piece_k, heads, scale, softcap) -> torch.Tensor:
    """``1 - tanh^2(x / softcap)`` ``[B, H, n, N]`` for the raw scaled scores ``x`` of a piece (recomputed)."""
    raw = _ungrouped(torch.matmul(piece_q, piece_k.transpose(-1, -2)), heads).mul_(scale / softcap)
    return 1.0 - torch.tanh(raw).square_()


def _pieces(q, causal, key_padding_mask, packing, window):
    if packing is not None:
        return PackedPieces(q, causal, packing, window)
    return PaddedPieces(q, causal, key_padding_mask, window)


class _TorchAttention(torch.autograd.Function):
    """Unmasked attention ``P @ V`` over the pieces of :class:`PaddedPieces` / :class:`PackedPieces`; keeps the
    probabilities for the backward when they are small, else the log-sum-exp. Per piece only the score products,
    the softmax and ``P V`` run; the row statistics and the output are assembled once for all pieces. ``k, v`` may
    have fewer heads than ``q`` (grouped-query attention: the products run on the stacked rows of each group, see
    :func:`_grouped`); probabilities and scores are ``[B, H, n, N]`` either way."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, relative_bias, alibi_slopes, pieces, scale, return_probs, modifiers,
                wide_out=False):
        acc = accumulation_dtype(q.dtype)
        sink = None if modifiers.sinks is None else modifiers.sinks.detach().to(acc)[None, :, None, None]
        # a bias table may hide every key of a row: such rows are found from their scores
        rows_from_scores = modifiers.relative_bias is not None
        may_have_empty_rows = pieces.may_have_empty_rows or rows_from_scores
        seen = []
        probs_all = q.new_zeros((*q.shape[:3], k.shape[2]), dtype=acc) if return_probs else None
        keep_probs = any(ctx.needs_input_grad[:3]) and pieces.score_elements <= KEEP_PROBS_ELEMENTS
        heads, kv_heads = q.shape[1], k.shape[1]
        kept, outs, maxes, totals, shifts = [], [], [], [], []
        for piece in pieces.pieces:
            keys = pieces.keys(piece, k).to(acc)
            queries = _grouped(pieces.queries(piece, q).to(acc), kv_heads)
            scores = _ungrouped(torch.matmul(queries, keys.transpose(-1, -2)), heads).mul_(scale)
            scores = _modify_scores(pieces, piece, scores, modifiers)
            if rows_from_scores:
                seen.append(scores.amax(dim=-1) > MASKED_SCORE / 2)
            probs, row_max, total, weighted_shift = _softmax_parts(scores, may_have_empty_rows, sink)
            outs.append(_ungrouped(torch.matmul(_grouped(probs, kv_heads), pieces.keys(piece, v).to(acc)), heads))
            maxes.append(row_max)
            totals.append(total)
            shifts.append(weighted_shift)
            if return_probs:  # padded batches only
                probs_all[:, :, piece[0]:piece[1]] = probs
            if keep_probs:
                kept.append(probs)
        out = pieces.assemble(q, outs)
        out = out if wide_out else out.to(q.dtype)  # wide_out: float32 (the accumulation dtype)
        row_max, total, weighted_shift = (pieces.assemble(q, parts) for parts in (maxes, totals, shifts))
        has_keys = pieces.assemble(q, seen) if rows_from_scores else pieces.has_keys(q)
        lse, entropy, max_prob = _statistics(row_max, total.clamp(min=1.0), weighted_shift, has_keys)
        ctx.pieces, ctx.scale, ctx.kept = pieces, scale, kept if keep_probs else None
        ctx.modifiers = modifiers
        ctx.save_for_backward(q, k, v, out, lse)
        # one call: a second mark_non_differentiable would replace the first
        ctx.mark_non_differentiable(*(t for t in (lse, entropy, max_prob, probs_all) if t is not None))
        return out, lse, entropy, max_prob, probs_all

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        q, k, v, out, lse = ctx.saved_tensors
        pieces, scale, modifiers = ctx.pieces, ctx.scale, ctx.modifiers
        acc = lse.dtype
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        need_table, need_slopes = ctx.needs_input_grad[4:6]
        heads, kv_heads = q.shape[1], k.shape[1]
        grads_q, grad_k, grad_v = [], None, None  # key-side gradients are summed as the pieces go
        grad_table = torch.zeros(modifiers.relative_bias.shape, dtype=acc, device=q.device) if need_table else None
        grad_slopes = q.new_zeros(heads, dtype=acc) if need_slopes else None
        for index, piece in enumerate(pieces.pieces):
            # [B, H_kv, G * n, D] (grouped) query-side rows against [B, H_kv, N, D] keys: products over the stacked
            # rows sum dK and dV over the group
            q_piece = _grouped(pieces.queries(piece, q).to(acc), kv_heads)
            k_piece = pieces.keys(piece, k).to(acc)
            if ctx.kept is not None:
                probs = ctx.kept[index]
            else:
                scores = _ungrouped(torch.matmul(q_piece, k_piece.transpose(-1, -2)), heads).mul_(scale)
                scores = _modify_scores(pieces, piece, scores, modifiers)
                probs = scores.sub_(pieces.lse_rows(piece, lse).unsqueeze(-1)).exp_()
            d_out = pieces.query_gradient_rows(piece, grad_out).to(acc)
            d_out_rows = _grouped(d_out, kv_heads)
            if need_v:
                grad_v = pieces.add_keys(grad_v, v, piece,
                                         torch.matmul(_grouped(probs, kv_heads).transpose(-1, -2), d_out_rows))
            if need_q or need_k or need_table or need_slopes:
                d_scores = _ungrouped(torch.matmul(d_out_rows, pieces.keys(piece, v).to(acc).transpose(-1, -2)), heads)
                delta = torch.linalg.vecdot(d_out, pieces.queries(piece, out).to(acc)).unsqueeze(-1)  # rowsum(dO*O)
                d_scores = d_scores.sub_(delta).mul_(probs)  # dL/ds of the modified scores
                if need_table or need_slopes:
                    _add_bias_gradients(pieces, piece, d_scores, modifiers, grad_table, grad_slopes)
                d_scores.mul_(scale)
                if modifiers.softcap is not None:
                    d_scores.mul_(_cap_derivative(q_piece, k_piece, heads, scale, modifiers.softcap))
                d_scores = _grouped(d_scores, kv_heads)
                if need_q:
                    grads_q.append(_ungrouped(torch.matmul(d_scores, k_piece), heads))
                if need_k:
                    grad_k = pieces.add_keys(grad_k, k, piece, torch.matmul(d_scores.transpose(-1, -2), q_piece))
        ctx.kept = None
        grad_q = pieces.assemble(q, grads_q).to(q.dtype) if need_q else None
        grad_k = grad_k.to(k.dtype) if need_k else None
        grad_v = grad_v.to(v.dtype) if need_v else None
        grad_sinks = None
        if ctx.needs_input_grad[3]:  # dL/dsink_h = -sum_i p_sink,i * rowsum(dO * O)_i (the sink's value is zero)
            delta = torch.linalg.vecdot(grad_out.to(acc), out.to(acc))  # [B, H, N]; 0 on rows without keys
            sink_probs = torch.exp(modifiers.sinks.detach().to(acc)[None, :, None] - lse)
            grad_sinks = -(sink_probs * delta).sum(dim=(0, 2)).to(modifiers.sinks.dtype)
        if grad_table is not None:
            grad_table = grad_table.to(modifiers.relative_bias.dtype)
        if grad_slopes is not None:
            grad_slopes = grad_slopes.to(modifiers.alibi_slopes.dtype)
        return grad_q, grad_k, grad_v, grad_sinks, grad_table, grad_slopes, None, None, None, None, None


class _MaskedHalfOutput(torch.autograd.Function):
    """``out.to(dtype) * mask.to(dtype)`` for a float32 ``out`` ``[B, H, N, D]`` (``P V`` before rounding) and a
    float32 (or wider) mask broadcastable to it: the forward is that of half-precision attention, and the mask's
    gradient ``sum(dO * P V)`` is accumulated in float32 from the unrounded ``P V``."""

    @staticmethod
    def forward(ctx, out, mask, dtype):
        ctx.save_for_backward(out, mask)
        return out.to(dtype) * mask.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        out, mask = ctx.saved_tensors
        grad_out = (grad * mask.to(grad.dtype)).to(out.dtype) if ctx.needs_input_grad[0] else None
        grad_mask = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(mask.dtype, torch.float32)
            grad_mask = (grad.to(acc) * out.to(acc)).sum_to_size(mask.shape).to(mask.dtype)
        return grad_out, grad_mask, None


def _token_head_mask(head_mask, packing: Packing | None, batch: int, heads: int):
    """The head mask broadcastable to the output ``[B, H, N, D]``: ``[B, H, 1, 1]``, or for packed sequences
    ``[1, H, 1, 1]`` (``[H]`` masks) or ``[1, H, T, 1]`` (``[S, H]``: each token takes its sequence's row)."""
    if packing is not None and head_mask.dim() == 1:
        return head_mask[None, :, None, None]
    if packing is not None:
        lengths = torch.tensor(packing.lengths, device=head_mask.device)
        per_token = head_mask.repeat_interleave(lengths, dim=0, output_size=packing.total)  # [T, H]
        return per_token.t()[None, :, :, None]
    return expand_head_mask(head_mask, batch, heads)[:, :, None, None]


def attention_torch(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None, return_probs=False,
                    packing: Packing | None = None, window: int | None = None, relative_bias=None,
                    alibi_slopes=None, softcap=None, sinks=None):
    """PyTorch attention (the CPU backend). Same contract as :func:`fastbertology.kernels.attention`.

    Scores and softmax are computed in float32 (float64 for float64 inputs); the output has the dtype of ``v``.
    """
    batch, heads, _, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal, packing, return_probs,
                                             window)
    longest = packing.max_seqlen if packing is not None else q.shape[2]
    modifiers = check_modifiers(relative_bias, alibi_slopes, softcap, sinks, q, heads, longest)
    window = None if window is None else int(window)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if q.numel() == 0:
        empty = q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype))
        probs = q.new_zeros((*q.shape[:3], k.shape[2])) if return_probs else None
        return q.new_zeros(q.shape), AttentionStats(empty, empty.clone(), empty.clone(), probs)
    pieces = _pieces(q, causal, key_padding_mask, packing, window)
    # half-precision inputs with a wider head mask: the output comes in float32, so that the mask's gradient
    # sum(dO * P V) is accumulated in float32 from the unrounded P V (:class:`_MaskedHalfOutput`)
    wide = head_mask is not None and q.dtype in (torch.float16, torch.bfloat16) and head_mask.dtype != q.dtype
    out, lse, entropy, max_prob, probs = _TorchAttention.apply(q, k, v, sinks, relative_bias, alibi_slopes, pieces,
                                                               scale, return_probs, modifiers, wide)
    if head_mask is not None:
        mask = _token_head_mask(head_mask, packing, batch, heads)
        out = _MaskedHalfOutput.apply(out, mask, q.dtype) if wide else out * mask.to(out.dtype)
        if probs is not None:
            probs = probs * mask.detach().to(probs.dtype)
    if probs is not None:
        probs = probs.to(q.dtype)
    return out, AttentionStats(lse=lse, entropy=entropy, max_prob=max_prob, probs=probs)

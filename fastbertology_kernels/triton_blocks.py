"""The pieces every Triton attention kernel shares: which rows a program owns (a padded batch row or a packed
sequence), row loads and stores, the key and query block ranges (interior blocks without masks, edge blocks with
them; sliding windows) and the key masks. See :mod:`fastbertology.kernels.triton_attention` for the design."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sequence(CuSeqlens, KvEnd, seq, N, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr):
    """``(batch row, first row, query rows, key rows)`` of sequence ``seq``: a packed sequence (VARLEN, batch row
    0, rows ``cu[seq] ..``), or batch row ``seq`` of a padded batch (all N query rows; keys up to ``kv_end``)."""
    if VARLEN:
        row0 = tl.load(CuSeqlens + seq)
        q_len = tl.load(CuSeqlens + seq + 1) - row0
        k_len = q_len
        batch_row = seq * 0
    else:
        row0 = seq * 0
        q_len = N
        k_len = N
        if HAS_KEY_PAD:
            k_len = tl.load(KvEnd + seq)
        batch_row = seq
    return batch_row, row0, q_len, k_len


@triton.jit
def _base(T, batch_row, head, row0, stride_b, stride_h, stride_n):
    """Pointer to the first row of a (sequence, head) in a ``[B, H, N, D]`` tensor (64-bit offsets)."""
    return T + batch_row.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + row0.to(tl.int64) * stride_n


@triton.jit
def _load_rows(base, offs, stride_n, offs_d, stride_d, bound,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """``[len(offs), BLOCK_D]`` rows ``offs`` of a ``[rows, HEAD_DIM]`` matrix; rows >= ``bound`` (only checked with
    CHECK_ROWS) and columns >= HEAD_DIM read as 0."""
    ptrs = base + offs[:, None] * stride_n + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            block = tl.load(ptrs, mask=(offs < bound)[:, None], other=0.0)
        else:
            block = tl.load(ptrs, mask=(offs < bound)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            block = tl.load(ptrs)
        else:
            block = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return block


@triton.jit
def _store_rows(base, offs, stride_n, offs_d, stride_d, bound, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store ``value [len(offs), BLOCK_D]`` into rows ``offs < bound``, columns < HEAD_DIM."""
    ptrs = base + offs[:, None] * stride_n + offs_d[None, :] * stride_d
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value, mask=(offs < bound)[:, None])
    else:
        tl.store(ptrs, value, mask=(offs < bound)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _key_keep(kp_base, stride_pn, offs_m, offs_n, k_len, window, CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
              WINDOW: tl.constexpr):
    """bool ``[BLOCK_M, BLOCK_N]``: key ``offs_n`` exists, is not padding, (causal) is not after query ``offs_m``,
    and (WINDOW) lies in the query's window: ``i - window < j``, and ``j < i + window`` when not causal."""
    keep = (offs_n < k_len)[None, :]
    if HAS_KEY_PAD:
        kp = tl.load(kp_base + offs_n * stride_pn, mask=offs_n < k_len, other=0)
        keep = keep & (kp != 0)[None, :]
    if WINDOW:
        keep = keep & _in_window(offs_m[:, None] - offs_n[None, :], window, CAUSAL)
    elif CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return keep


@triton.jit
def _in_window(distance, window, CAUSAL: tl.constexpr):
    """``distance = i - j`` (query minus key position) lies in the window: ``0 <= distance < window`` (CAUSAL) or
    ``|distance| < window``; one unsigned compare each (negative values wrap to large ones)."""
    if CAUSAL:
        inside = distance.to(tl.uint32, bitcast=True) < window
    else:
        inside = (distance + (window - 1)).to(tl.uint32, bitcast=True) < 2 * window - 1
    return inside


@triton.jit
def _query_keep(offs_n, offs_m, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """bool ``[BLOCK_N, BLOCK_M]`` (transposed): query ``offs_m`` may see key ``offs_n`` by position (causal, window);
    bounds and key padding are the caller's."""
    if WINDOW:
        keep = _in_window(offs_m[None, :] - offs_n[:, None], window, CAUSAL)
    else:
        keep = offs_m[None, :] >= offs_n[:, None]
    return keep


@triton.jit
def _key_blocks(start_m, k_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KEY_PAD: tl.constexpr, WINDOW: tl.constexpr):
    """The key blocks of the query block ``[start_m, start_m + BLOCK_M)``: ``(lo, interior_lo, interior_hi, hi)``.

    ``[interior_lo, interior_hi)`` are the interior blocks, whose every key every query of the block sees (no
    bounds, no causal compare, no window, no padding); ``[lo, interior_lo)`` (only WINDOW: the blocks crossed by the
    window's lower edge) and ``[interior_hi, hi)`` (the causal diagonal or the window's upper edge, the last partial
    block) are edge blocks (one loop over both: :func:`_edge_blocks`). ``hi`` is one past the last key any query of
    the block may see; blocks before ``lo`` are entirely outside every query's window and are not visited. A key
    padding mask with holes makes every block an edge block. Without WINDOW, ``lo = interior_lo = 0``.
    """
    hi = k_len
    interior_hi = (k_len // BLOCK_N) * BLOCK_N
    if CAUSAL:  # block [n, n + BLOCK_N) is interior iff n + BLOCK_N - 1 <= start_m
        hi = tl.minimum(hi, start_m + BLOCK_M)
        interior_hi = tl.minimum(interior_hi, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    lo = 0
    interior_lo = 0
    if WINDOW:  # query i sees keys i - window < j (< i + window without CAUSAL)
        if not CAUSAL:  # ... and n + BLOCK_N <= start_m + window for an interior block
            hi = tl.minimum(hi, start_m + BLOCK_M + window - 1)
            interior_hi = tl.minimum(interior_hi, ((start_m + window) // BLOCK_N) * BLOCK_N)
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        # block n is interior iff n > (start_m + BLOCK_M - 1) - window; keep lo <= interior_lo <= max(hi, lo)
        interior_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
        interior_lo = tl.minimum(tl.maximum(interior_lo, lo), tl.maximum(hi, lo))
    if HAS_KEY_PAD:  # holes anywhere: every block is an edge block
        interior_hi = interior_hi * 0
    if WINDOW:
        interior_hi = tl.maximum(interior_hi, interior_lo)
        # whole blocks: tell the compiler (alignment of the loops' offsets, as with a start at 0)
        lo = tl.multiple_of(lo, BLOCK_N)
        interior_lo = tl.multiple_of(interior_lo, BLOCK_N)
    return lo, interior_lo, interior_hi, hi


@triton.jit
def _edge_blocks(lo, interior_lo, interior_hi, hi, WINDOW: tl.constexpr):
    """``(lo, hi, skip_from, skip)`` of the one loop over the edge blocks of :func:`_key_blocks`: without WINDOW
    ``[interior_hi, hi)``; with it ``[lo, interior_lo)`` and ``[interior_hi, hi)`` as one range, from ``lo`` to
    ``hi - (interior_hi - interior_lo)``, whose blocks from ``skip_from = interior_lo`` on move ``skip =
    interior_hi - interior_lo`` keys up. (One edge loop after the interior loop, as without a window: a second edge
    loop before it costs the compiled forward 60-70 registers per thread, and spills, at head dim 128.)"""
    edge_lo = interior_hi
    edge_hi = hi
    skip_from = 0
    skip = 0
    if WINDOW:
        skip = interior_hi - interior_lo
        edge_lo = lo
        edge_hi = hi - skip
        skip_from = interior_lo
    return edge_lo, edge_hi, skip_from, skip


@triton.jit
def _block_start(start, skip_from, skip, SKIP: tl.constexpr):
    """The first key of an edge block: ``start``, or with SKIP ``start + skip`` from ``skip_from`` on."""
    if SKIP:
        start = start + tl.where(start >= skip_from, skip, 0)
    return start


@triton.jit
def _query_blocks(start_n, q_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr):
    """The query blocks that see keys of the key block ``[start_n, start_n + BLOCK_N)``:
    ``(lo, interior_lo, interior_hi, hi)``, as :func:`_key_blocks` with queries and keys swapped.

    ``[interior_lo, interior_hi)``: every query of the block sees every key of the key block and is a real row;
    ``[lo, interior_lo)``: the causal diagonal (or the window's lower edge without CAUSAL); ``[interior_hi, hi)``:
    the window's upper edge and the last partial block. Query blocks before ``lo`` or from ``hi`` on see none of
    the keys. (``start_n < q_len``.)
    """
    lo = 0
    interior_lo = 0
    hi = q_len
    if CAUSAL:  # query i sees key j iff j <= i
        lo = (start_n // BLOCK_M) * BLOCK_M
        interior_lo = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, q_len)
    interior_hi = tl.maximum((q_len // BLOCK_M) * BLOCK_M, interior_lo)
    if WINDOW:  # ... and i < j + window (and j - window < i without CAUSAL)
        hi = tl.minimum(q_len, start_n + BLOCK_N + window - 1)
        if not CAUSAL:
            lo = (tl.maximum(start_n - window + 1, 0) // BLOCK_M) * BLOCK_M
            interior_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - window, 0), BLOCK_M) * BLOCK_M
        interior_lo = tl.minimum(tl.maximum(interior_lo, lo), hi)
        interior_hi = tl.minimum((q_len // BLOCK_M) * BLOCK_M, ((start_n + window) // BLOCK_M) * BLOCK_M)
        interior_hi = tl.maximum(interior_hi, interior_lo)
    return lo, interior_lo, interior_hi, hi


@triton.jit
def _kv_head(off_h, group):
    """The key/value head read by query head ``off_h`` (``group`` query heads per key/value head; the JIT folds
    ``group = 1``)."""
    return off_h // group


@triton.jit
def _tanh(x):
    """``tanh(x)`` from one ``exp2`` (saturates to +-1 without NaN: ``exp2`` overflows to inf or underflows to 0)."""
    TWO_LOG2E: tl.constexpr = 2.8853900817779268
    return 1.0 - 2.0 / (tl.exp2(x * TWO_LOG2E) + 1.0)


@triton.jit
def _modified_scores(qk, q_pos, k_pos, qk_scale, bias_base, bias_span, slope2, cap_in, cap_out,
                     SOFTCAP: tl.constexpr, BIAS: tl.constexpr, ALIBI: tl.constexpr):
    """Base-2 scores after the score modifiers, ``(s2, t)``: ``qk`` the raw ``q . k`` products (any 2-D block),
    ``q_pos`` / ``k_pos`` the query / key positions within the sequence, broadcastable to it.

    ``s2 = cap(qk * scale) * log2(e) + table2[k - q + M - 1] + slope2 * (k - q)`` where SOFTCAP: ``cap(x) * log2(e) =
    cap_out * tanh(qk * cap_in)`` (``cap_in = scale / softcap``, ``cap_out = softcap * log2(e)``; ``t`` is that tanh,
    for the backward's ``1 - t^2``), BIAS: ``bias_base`` points at this head's row of the base-2 table (``-inf``
    already clamped to the masked score), ALIBI: ``slope2`` the head's slope times ``log2(e)``. Distances outside the
    table (rows or keys past the sequence) read its nearest entry."""
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        s2 = t * cap_out
    else:
        t = qk
        s2 = qk * qk_scale
    if BIAS or ALIBI:
        distance = k_pos - q_pos
        if BIAS:
            # clamped, not masked (no predicates): only rows or keys past the sequence fall outside the table, and
            # their scores are masked or unused
            index = tl.minimum(tl.maximum(distance + (bias_span - 1), 0), 2 * bias_span - 2)
            s2 += tl.load(bias_base + index)
        if ALIBI:
            s2 += slope2 * distance.to(tl.float32)
    return s2, t

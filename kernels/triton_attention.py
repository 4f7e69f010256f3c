"""Fused masked multi-head attention with per-head statistics, in Triton.

:func:`attention_triton` implements the contract of :func:`fastbertology.kernels.attention` (see
``kernels/__init__.py``), for padded batches ``[B, H, N, D]`` and for packed sequences ``[1, H, T, D]``
(:class:`~fastbertology.kernels.Packing`, one program per query block of a sequence, as FlashAttention's variable
length kernels). Every program works on one *sequence* (a batch row, or a packed sequence) and one query head.
Grouped-query attention (``k, v`` with ``H_kv`` heads, ``group = H / H_kv``): query head ``h`` reads key/value
head ``h // group`` in place (only the K/V base pointers change; ``group`` is a runtime argument that the JIT
specialises away when it is 1).

* forward (``_attn_fwd``): online softmax over the key blocks that keeps the running max ``m``,
  ``l = sum_j exp(s_j - m)`` and ``u = sum_j exp(s_j - m) (s_j - m)``, so that ``lse = m + log l``,
  ``entropy = log l - u / l`` and ``max_prob = 1 / l`` come out of the same pass as ``out = mask * P V``;
  ``u`` costs one multiply-add per score, on the ``exp2`` argument itself. No ``N x N`` tensor is stored. The
  probabilities, times the head mask and in the output dtype, are written by ``_attn_probs`` only on request.
* backward: ``_attn_bwd_preprocess`` computes ``Delta = rowsum(dO * O) / mask`` and ``lse * log2(e)`` per query
  row; ``_attn_bwd_dkdv`` (one program per key block and query head, looping over query blocks) and
  ``_attn_bwd_dq`` (one program per query block, looping over key blocks) recompute ``P`` from them. With
  grouped-query attention dK/dV programs write float32 per-query-head terms that torch sums over each group (in
  a fixed order: deterministic, no atomics). One program summing its whole group would read K, V once and need no
  partial buffer, but the kernel report shows its nested loops cost 50-70 more registers per thread (240-255 at
  head dim 64/128 on sm_90, spills at bf16/fp16 D128 on sm_90 and fp32 on sm_80), where per-head programs keep
  the multi-head kernel's registers (+13 at most) and interior loop.
* head-mask gradient ``dL/dmask = sum_i sum_d dO (P V)``, reduced inside the kernels into per-program partial sums
  (then summed by torch; deterministic, no atomics). Where the mask is not 0, ``P V = O / mask`` and the gradient
  is ``sum_i Delta_i / mask`` (the preprocess kernel sums it); where it is 0 (or tiny), ``_attn_bwd_dq`` computes
  ``sum_j P_ij (dO_i . V_j)`` in its key loop. No extra output tensor is stored for it.

Masks only where they matter: the key loops are split into *interior* blocks, where every query of the block sees
every key (no bounds checks, no causal compare, no window, no ``where``), and *edge* blocks: the causal diagonal,
the last, partial block of a sequence, and with a sliding window the blocks crossed by the window's edges. A
sliding window (query i sees keys ``i - window < j``, and ``j < i + window`` when not causal) moves the loop bounds:
key blocks entirely outside every query's window are never visited (the key loop starts at the block of the first
query's first key), and the query loops of dK/dV likewise. A key padding mask with holes (padded batches only;
packing removes padding) puts every block on the edge path. A masked score is a large finite negative number, so that
no second ``where`` is needed for ``u``; rows that saw no key at all are recognised by their running max and get zeros.
It is set after the scaling (``where(keep, qk * scale, MASKED)``): a row's exp2 argument is then exactly 0 while it
has seen no key, where a fused multiply-add of the scaled sentinel would leave its rounding error (up to 1e22).

Scores are handled in base 2 inside the kernels (``s2 = s * scale * log2(e)``, ``exp2``); statistics are returned
in natural units. float32 inputs use ``tl.dot(..., input_precision=FP32_DOT_PRECISION)``: ``"tf32x3"`` (three TF32
products on tensor cores, close to float32 accuracy) by default, ``"ieee"`` with the environment variable
``FASTBERTOLOGY_FP32_DOT_PRECISION=ieee``. 16-bit inputs: scores, softmax and accumulators are float32, ``P`` is
rounded to the input dtype for the ``P V`` product (as FlashAttention does). float64 inputs, head dims above 128,
a non-positive scale and empty inputs are delegated to :func:`attention_torch`.

A head whose mask is 0 still has its statistics computed (they describe the softmax before the mask), but no ``V``
loads or ``P V`` products in the forward and no ``dQ, dK, dV`` work in the backward (they are exactly zero).

Triton is imported at module import; :mod:`fastbertology.kernels` imports this module only when the Triton
backend is selected. On CPU tensors it runs under the Triton interpreter (``TRITON_INTERPRET=1`` must be set
before triton is imported).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Triton attention backend needs triton (pip install triton, or a CUDA build of torch that ships it); "
        "use backend='torch' otherwise"
    ) from error

from .common import AttentionStats, Packing, check_inputs
from .reference import expand_head_mask
from .torch_attention import attention_torch
from .triton_configs import AttentionConfigs, KernelConfig, configs_for, gpu_configs

# Input precision of tl.dot for float32 inputs: "tf32x3" (three TF32 tensor-core products, close to float32
# accuracy) or "ieee" (true float32 FMA, slower). The environment variable overrides it (read at import).
FP32_DOT_PRECISION = os.environ.get("FASTBERTOLOGY_FP32_DOT_PRECISION", "tf32x3")
_LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128  # larger head dims go to attention_torch (shared memory and registers)
_MAX_GRID_Y = 65535  # CUDA limit on the second grid dimension, which holds sequences * heads
# Heads whose |mask| is below this get their mask gradient from the exact P (dO . V) sum instead of Delta / mask.
_SMALL_MASK = 1.0 / 64

# ----------------------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
              offs_m, offs_d, lo, hi, skip_from, skip, k_len, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, WINDOW: tl.constexpr, WITH_PV: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks ``[lo, hi)`` for the query block ``q [BLOCK_M, BLOCK_D]``; with WINDOW (edge
    blocks) the blocks from ``skip_from`` on are taken ``skip`` keys further (see :func:`_edge_blocks`).

    Carries ``acc [BLOCK_M, BLOCK_D]`` (unnormalised ``P V``, only WITH_PV) and ``l_i, m_i, u_i [BLOCK_M]`` (base 2:
    ``m`` is the running max of ``s2``, ``u = sum p (s2 - m)``). EDGE blocks check bounds, key padding, causality
    and the window.
    """
    MASKED_SCORE: tl.constexpr = -1.0e30
    for start in range(lo, hi, BLOCK_N):
        offs_n = _block_start(start, skip_from, skip, EDGE and WINDOW) + tl.arange(0, BLOCK_N)
        # -- stage 1: raw scores
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, k_len, HEAD_DIM, BLOCK_D, EDGE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        # -- stage 2: online softmax; x = s2 - m_new is the exp2 argument and the entropy term
        if EDGE:
            # masked keys get MASKED_SCORE after the scaling: for a row that has seen no key yet, m_new and the
            # masked scores are then the same constant and x is exactly 0 (a fused multiply-add of the scaled
            # sentinel, qk * qk_scale - m_new, leaves its rounding error, up to 1e22, in x: 2^x overflows)
            keep = _key_keep(kp_base, stride_pn, offs_m, offs_n, k_len, window, CAUSAL, HAS_KEY_PAD, WINDOW)
            s2 = tl.where(keep, qk * qk_scale, MASKED_SCORE)
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            x = s2 - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            x = qk * qk_scale - m_new[:, None]
        p = tl.exp2(x)
        alpha = tl.exp2(m_i - m_new)
        u_i = alpha * (u_i + (m_i - m_new) * l_i) + tl.sum(p * x, 1)
        l_i = alpha * l_i + tl.sum(p, 1)
        m_i = m_new
        # -- stage 3: P V
        if WITH_PV:
            v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, k_len, HEAD_DIM, BLOCK_D, EDGE)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i, u_i


@triton.jit
def _attn_fwd(Q, K, V, HeadMask, KeyPad, KvEnd, CuSeqlens, Out, Lse, Ent, MaxP,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              stride_pb, stride_pn,
              H, N, group, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
              WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Forward for one query block of one (sequence, query head); grid ``(cdiv(longest sequence, BLOCK_M), S * H)``.

    Q, Out ``[B, H, N, HEAD_DIM]``, K, V ``[B, H / group, N, HEAD_DIM]`` (any strides; packed: B = 1, N = T): query
    head h reads key/value head ``h // group``; HeadMask ``[S * H]`` float32; KeyPad ``[B, N]`` uint8 (1 = keep) and
    KvEnd ``[B]`` int32 (one past the last kept key), padded batches only; CuSeqlens ``[S + 1]`` int32 (VARLEN only);
    Lse, Ent, MaxP ``[B * H * N]`` float32. ``qk_scale`` = softmax scale * log2(e) > 0. WINDOW: query i sees keys
    ``i - window < j`` (and ``j < i + window`` without CAUSAL).
    """
    LN2: tl.constexpr = 0.6931471805599453
    MASKED_SCORE: tl.constexpr = -1.0e30
    # -- stage 0: the (sequence, head, query block) of this program
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    seq = off_bh // H
    off_h = off_bh % H
    off_kvh = _kv_head(off_h, group)
    batch_row, row0, q_len, k_len = _sequence(CuSeqlens, KvEnd, seq, N, VARLEN, HAS_KEY_PAD)
    if start_m >= q_len:  # past the end of a shorter packed sequence
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_base(Q, batch_row, off_h, row0, stride_qb, stride_qh, stride_qn), offs_m, stride_qn, offs_d,
                   stride_qd, q_len, HEAD_DIM, BLOCK_D, True)
    k_base = _base(K, batch_row, off_kvh, row0, stride_kb, stride_kh, stride_kn)
    v_base = _base(V, batch_row, off_kvh, row0, stride_vb, stride_vh, stride_vn)
    kp_base = KeyPad + batch_row.to(tl.int64) * stride_pb

    # -- stage 1: the key loops: interior blocks (no masks), then edge blocks (WINDOW: those of both of the window's
    #    edges, in one loop); key blocks outside every query's window are not visited. P V is skipped for a head
    #    whose mask is 0. (The loops are called from the kernel itself, so that the compiled code's line information
    #    names these lines and benchmarks/kernel_report.py can tell the loops apart by their "# loop:" marks.)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + MASKED_SCORE
    hm = 1.0
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
    lo, interior_lo, interior_hi, hi = _key_blocks(start_m, k_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_KEY_PAD,
                                                   WINDOW)
    edge_lo, edge_hi, skip_from, skip = _edge_blocks(lo, interior_lo, interior_hi, hi, WINDOW)
    if hm != 0.0:
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: interior
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                       BLOCK_N, False, CAUSAL, HAS_KEY_PAD, WINDOW, True, DOT_PRECISION)
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: edge
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                       BLOCK_N, True, CAUSAL, HAS_KEY_PAD, WINDOW, True, DOT_PRECISION)
    else:
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: interior
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                       BLOCK_N, False, CAUSAL, HAS_KEY_PAD, WINDOW, False, DOT_PRECISION)
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: edge
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                       BLOCK_N, True, CAUSAL, HAS_KEY_PAD, WINDOW, False, DOT_PRECISION)

    # -- stage 2: normalise; rows that saw no key (the max never left MASKED_SCORE) get zeros
    has_keys = m_i > 0.5 * MASKED_SCORE
    l_safe = tl.where(has_keys, l_i, 1.0)
    inv_l = 1.0 / l_safe
    log_l = tl.log2(l_safe)
    lse = tl.where(has_keys, (m_i + log_l) * LN2, 0.0)
    entropy = tl.where(has_keys, (log_l - u_i * inv_l) * LN2, 0.0)
    max_prob = tl.where(has_keys, inv_l, 0.0)
    out = acc * tl.where(has_keys, inv_l * hm, 0.0)[:, None]

    # -- stage 3: store the output and the statistics
    _store_rows(_base(Out, batch_row, off_h, row0, stride_ob, stride_oh, stride_on), offs_m, stride_on, offs_d,
                stride_od, q_len, out.to(Out.dtype.element_ty), HEAD_DIM, BLOCK_D)
    row = (batch_row.to(tl.int64) * H + off_h) * N + row0 + offs_m
    m_ok = offs_m < q_len
    tl.store(Lse + row, lse, mask=m_ok)
    tl.store(Ent + row, entropy, mask=m_ok)
    tl.store(MaxP + row, max_prob, mask=m_ok)


@triton.jit
def _attn_probs(Q, K, HeadMask, KeyPad, KvEnd, Lse, P,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_pb, stride_pn,
                stride_probs_bh, stride_probs_m,
                H, N, group, window, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, WINDOW: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """``P * mask`` ``[B, H, N, N]`` (contiguous, in P's dtype) from the saved log-sum-exp; padded batches only.

    Grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B * H)``; K ``[B, H / group, N, HEAD_DIM]``. Keys a query may not
    see and rows without keys get 0.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    start_m = tl.program_id(0) * BLOCK_M
    start_n = tl.program_id(1) * BLOCK_N
    off_bh = tl.program_id(2)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_len = N
    if HAS_KEY_PAD:
        k_len = tl.load(KvEnd + off_b)
    zero = off_b * 0
    q = _load_rows(_base(Q, off_b, off_h, zero, stride_qb, stride_qh, stride_qn), offs_m, stride_qn, offs_d,
                   stride_qd, N, HEAD_DIM, BLOCK_D, True)
    k = _load_rows(_base(K, off_b, _kv_head(off_h, group), zero, stride_kb, stride_kh, stride_kn), offs_n, stride_kn,
                   offs_d, stride_kd, k_len, HEAD_DIM, BLOCK_D, True)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    keep = _key_keep(KeyPad + off_b.to(tl.int64) * stride_pb, stride_pn, offs_m, offs_n, k_len, window, CAUSAL,
                     HAS_KEY_PAD, WINDOW)
    lse2 = tl.load(Lse + off_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0) * LOG2E
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    if HAS_HEAD_MASK:
        p = p * tl.load(HeadMask + off_bh)
    p_offs = off_bh.to(tl.int64) * stride_probs_bh + offs_m[:, None].to(tl.int64) * stride_probs_m + offs_n[None, :]
    tl.store(P + p_offs, p.to(P.dtype.element_ty), mask=(offs_m < N)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(O, DO, HeadMask, KvEnd, CuSeqlens, Lse, Delta, Lse2, MaskGrad,
                         stride_ob, stride_oh, stride_on, stride_od,
                         stride_dob, stride_doh, stride_don, stride_dod,
                         H, N, blocks_per_row, small_mask,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         VARLEN: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
                         WRITE_LSE2: tl.constexpr):
    """Per query row (all ``[B * H * N]`` float32), grid ``(cdiv(longest, BLOCK_M), S * H)``:
    ``Delta = rowsum(dO * O) / mask`` (0 where the mask is 0; ``O = mask * P V``, so this is ``rowsum(dO * P V)``),
    and with WRITE_LSE2 ``Lse2 = lse * log2(e)``: what the dK/dV loop reads, as it is, per query block.

    With MASK_GRAD, also the head-mask gradient of the block's rows, ``sum_i Delta_i``, into
    ``MaskGrad[(seq * H + head) * blocks_per_row + block]`` for heads with ``|mask| >= small_mask``.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    seq = off_bh // H
    off_h = off_bh % H
    batch_row, row0, q_len, _ = _sequence(CuSeqlens, KvEnd, seq, N, VARLEN, False)
    slot = MaskGrad + off_bh.to(tl.int64) * blocks_per_row + tl.program_id(0)
    if start_m >= q_len:
        if MASK_GRAD:
            tl.store(slot, 0.0)  # every program writes its slot: the partial buffer needs no zero fill
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(_base(O, batch_row, off_h, row0, stride_ob, stride_oh, stride_on), offs_m, stride_on, offs_d,
                   stride_od, q_len, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(_base(DO, batch_row, off_h, row0, stride_dob, stride_doh, stride_don), offs_m, stride_don,
                    offs_d, stride_dod, q_len, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = (batch_row.to(tl.int64) * H + off_h) * N + row0 + offs_m
    m_ok = offs_m < q_len
    hm = 1.0
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
        delta = delta / tl.where(hm != 0.0, hm, 1.0)  # O = 0 where the mask is 0
    tl.store(Delta + row, delta, mask=m_ok)
    if WRITE_LSE2:
        tl.store(Lse2 + row, tl.load(Lse + row, mask=m_ok, other=0.0) * LOG2E, mask=m_ok)
    if MASK_GRAD:  # heads with a small mask: 0 here, their gradient comes from _attn_bwd_dq
        tl.store(slot, tl.where(tl.abs(hm) >= small_mask, tl.sum(delta, 0), 0.0))


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
               stride_qn, stride_qd, stride_don, stride_dod,
               offs_n, offs_d, lo, hi, q_len, window, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate ``dV += P^T dO`` and ``dK += dS^T Q`` (unscaled) over the query blocks ``[lo, hi)`` of one key
    block ``k, v [BLOCK_N, BLOCK_D]``. EDGE blocks check query bounds, (causal) the diagonal and the window.

    ``P^T = exp2(K Q^T * qk_scale - Lse2)`` and ``dS^T = P^T (V dO^T - Delta)``, with ``Lse2 = lse * log2(e)`` and
    ``Delta = rowsum(dO * O) / mask`` per query row from ``_attn_bwd_preprocess``. Query rows past the sequence
    read as zeros (dO = Delta = 0), so they add nothing.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_qn, offs_d, stride_qd, q_len, HEAD_DIM, BLOCK_D, EDGE)
        do = _load_rows(do_base, offs_m, stride_don, offs_d, stride_dod, q_len, HEAD_DIM, BLOCK_D, EDGE)
        if EDGE:
            lse2 = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # recompute P^T [BLOCK_N, BLOCK_M]
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if EDGE:
            if CAUSAL or WINDOW:
                p_t = tl.where(_query_keep(offs_n, offs_m, window, CAUSAL, WINDOW), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, HeadMask, KeyPad, KvEnd, CuSeqlens, Lse2, Delta, DK, DV,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_pb, stride_pn,
                   H, N, group, window, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                   HAS_HEAD_MASK: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of one key block for one (sequence, query head), looping over query blocks; grid
    ``(cdiv(longest, BLOCK_N), S * H)``. ``dV = mask * P^T dO``, ``dK = scale * mask * dS^T Q`` with K, V from
    key/value head ``head // group``; keys that are padding (or past a padded row's last key) get zeros. DK and DV
    ``[B, H, N, HEAD_DIM]`` share the strides ``stride_g*``: dK and dV themselves (``group = 1``), or the float32
    per-query-head terms that the launcher sums over each group (grouped-query attention).

    Lse2 and Delta ``[B * H * N]`` come from ``_attn_bwd_preprocess`` (``lse * log2(e)`` and ``rowsum(dO * O) /
    mask``), so that the loops spend nothing on the head mask.
    """
    # -- stage 0: the (sequence, query head, key block) of this program; load the K, V block of its kv head
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    seq = off_bh // H
    off_h = off_bh % H
    off_kvh = _kv_head(off_h, group)
    batch_row, row0, q_len, k_len = _sequence(CuSeqlens, KvEnd, seq, N, VARLEN, HAS_KEY_PAD)
    n_rows = N  # rows to store: a padded row stores zeros for its padding keys, a packed sequence only its own
    if VARLEN:
        n_rows = k_len
    if start_n >= n_rows:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(_base(K, batch_row, off_kvh, row0, stride_kb, stride_kh, stride_kn), offs_n, stride_kn, offs_d,
                   stride_kd, k_len, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(_base(V, batch_row, off_kvh, row0, stride_vb, stride_vh, stride_vn), offs_n, stride_vn, offs_d,
                   stride_vd, k_len, HEAD_DIM, BLOCK_D, True)
    hm = 1.0
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
    q_base = _base(Q, batch_row, off_h, row0, stride_qb, stride_qh, stride_qn)
    do_base = _base(DO, batch_row, off_h, row0, stride_dob, stride_doh, stride_don)
    stats = (batch_row.to(tl.int64) * H + off_h) * N + row0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # -- stage 1: query blocks: (causal or WINDOW) the diagonal / the window's lower edge (edge), the blocks that see
    #    the whole key block (interior), the rest (edge: the window's upper edge, the last partial block). Query
    #    blocks that see none of the keys are not visited.
    if (start_n < k_len) & (hm != 0.0):
        lo, interior_lo, interior_hi, hi = _query_blocks(start_n, q_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        if CAUSAL or WINDOW:
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, Lse2 + stats, Delta + stats,  # loop: edge
                                stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                                lo, interior_lo, q_len, window, qk_scale,
                                HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, WINDOW, DOT_PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, Lse2 + stats, Delta + stats,  # loop: interior
                            stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                            interior_lo, interior_hi, q_len, window, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, WINDOW, DOT_PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, Lse2 + stats, Delta + stats,  # loop: edge
                            stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                            interior_hi, hi, q_len, window, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_M, True, False, WINDOW, DOT_PRECISION)

    # -- stage 2: scale, zero the keys nobody sees, store
    keep_n = offs_n < k_len
    if HAS_KEY_PAD:
        kp = tl.load(KeyPad + batch_row.to(tl.int64) * stride_pb + offs_n * stride_pn, mask=keep_n, other=0)
        keep_n = keep_n & (kp != 0)
    dk = tl.where(keep_n[:, None], dk * (sm_scale * hm), 0.0)
    dv = tl.where(keep_n[:, None], dv * hm, 0.0)
    g_base = _base(DK, batch_row, off_h, row0, stride_gb, stride_gh, stride_gn)
    _store_rows(g_base, offs_n, stride_gn, offs_d, stride_gd, n_rows, dk.to(DK.dtype.element_ty), HEAD_DIM, BLOCK_D)
    g_base = _base(DV, batch_row, off_h, row0, stride_gb, stride_gh, stride_gn)
    _store_rows(g_base, offs_n, stride_gn, offs_d, stride_gd, n_rows, dv.to(DV.dtype.element_ty), HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_loop(dq, row_dot, q, do, lse2, delta, k_base, v_base, kp_base,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
             offs_m, offs_d, lo, hi, skip_from, skip, k_len, window,
             qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, WINDOW: tl.constexpr, ROW_DOT_ONLY: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Over the key blocks ``[lo, hi)`` (WINDOW edge blocks: from ``skip_from`` on ``skip`` keys further, see
    :func:`_edge_blocks`) of one query block: ``dQ += dS K`` (unscaled), with
    ``dS = P (dO V^T - Delta / mask)``; or, ROW_DOT_ONLY (a head whose mask is 0), only the head-mask gradient rows
    ``row_dot += sum_j P (dO V^T)``. Keys past the sequence read as zeros (K = V = 0) and add nothing; EDGE blocks
    zero ``P`` above the causal diagonal, outside the window and at padding keys."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = _block_start(start, skip_from, skip, EDGE and WINDOW) + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, k_len, HEAD_DIM, BLOCK_D, EDGE)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, k_len, HEAD_DIM, BLOCK_D, EDGE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if EDGE:
            keep = _key_keep(kp_base, stride_pn, offs_m, offs_n, k_len, window, CAUSAL, HAS_KEY_PAD, WINDOW)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if ROW_DOT_ONLY:
            row_dot += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq, row_dot


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, HeadMask, KeyPad, KvEnd, CuSeqlens, Lse, Delta, DQ, MaskGrad,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_gb, stride_gh, stride_gn, stride_gd,
                 stride_pb, stride_pn,
                 H, N, group, window, qk_scale, sm_scale, blocks_per_row, small_mask,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                 HAS_HEAD_MASK: tl.constexpr, WINDOW: tl.constexpr, COMPUTE_DQ: tl.constexpr,
                 MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of one query block of one (sequence, query head), looping over key blocks (of key/value head
    ``head // group``); grid ``(cdiv(longest, BLOCK_M), S * H)``. ``dQ = scale * mask * dS K`` (COMPUTE_DQ; 0 for a
    head whose mask is 0). With MASK_GRAD, heads with ``|mask| < small_mask`` get the head-mask gradient of the
    block's rows, ``sum_i sum_j P_ij (dO_i . V_j)``, in ``MaskGrad[(seq * H + head) * blocks_per_row + block]``.
    Without COMPUTE_DQ (launched for that gradient alone) the other heads' programs return at once.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    # -- stage 0: the (sequence, head, query block) of this program; load Q, dO, lse of the block
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    seq = off_bh // H
    off_h = off_bh % H
    off_kvh = _kv_head(off_h, group)
    batch_row, row0, q_len, k_len = _sequence(CuSeqlens, KvEnd, seq, N, VARLEN, HAS_KEY_PAD)
    slot = MaskGrad + off_bh.to(tl.int64) * blocks_per_row + tl.program_id(0)
    if start_m >= q_len:
        if MASK_GRAD:
            tl.store(slot, 0.0)  # every program writes its slot: the partial buffer needs no zero fill
        return
    hm = 1.0
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
    if not COMPUTE_DQ:
        if tl.abs(hm) >= small_mask:
            tl.store(slot, 0.0)  # (MASK_GRAD: launched for the gradient alone) this head's is in the preprocess slot
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_base(Q, batch_row, off_h, row0, stride_qb, stride_qh, stride_qn), offs_m, stride_qn, offs_d,
                   stride_qd, q_len, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(_base(DO, batch_row, off_h, row0, stride_dob, stride_doh, stride_don), offs_m, stride_don,
                    offs_d, stride_dod, q_len, HEAD_DIM, BLOCK_D, True)
    row = (batch_row.to(tl.int64) * H + off_h) * N + row0 + offs_m
    m_ok = offs_m < q_len
    lse2 = tl.load(Lse + row, mask=m_ok, other=0.0) * LOG2E
    k_base = _base(K, batch_row, off_kvh, row0, stride_kb, stride_kh, stride_kn)
    v_base = _base(V, batch_row, off_kvh, row0, stride_vb, stride_vh, stride_vn)
    kp_base = KeyPad + batch_row.to(tl.int64) * stride_pb
    lo, interior_lo, interior_hi, hi = _key_blocks(start_m, k_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_KEY_PAD,
                                                   WINDOW)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_dot = tl.zeros([BLOCK_M], dtype=tl.float32)

    # -- stage 1: key blocks, interior then edge (WINDOW: both edges of the window); dS = P (dO V^T - Delta / mask)
    edge_lo, edge_hi, skip_from, skip = _edge_blocks(lo, interior_lo, interior_hi, hi, WINDOW)
    if COMPUTE_DQ:
        if hm != 0.0:
            delta = tl.load(Delta + row, mask=m_ok, other=0.0)  # rowsum(dO * O) / mask
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, delta, k_base, v_base, kp_base,  # loop: interior
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, False, CAUSAL, HAS_KEY_PAD, WINDOW, False, DOT_PRECISION)
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, delta, k_base, v_base, kp_base,  # loop: edge
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, True, CAUSAL, HAS_KEY_PAD, WINDOW, False, DOT_PRECISION)
    # -- stage 2: the head-mask gradient rows sum_j P (dO V^T) of a head whose mask is (near) 0
    if MASK_GRAD:
        if tl.abs(hm) < small_mask:
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, lse2, k_base, v_base, kp_base,  # loop: interior
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, False, CAUSAL, HAS_KEY_PAD, WINDOW, True, DOT_PRECISION)
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, lse2, k_base, v_base, kp_base,  # loop: edge
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, True, CAUSAL, HAS_KEY_PAD, WINDOW, True, DOT_PRECISION)
    if MASK_GRAD:  # 0 for the heads whose gradient the preprocess slot holds (row_dot never left 0 for them)
        tl.store(slot, tl.sum(row_dot, 0))
    # -- stage 3: store
    if COMPUTE_DQ:
        _store_rows(_base(DQ, batch_row, off_h, row0, stride_gb, stride_gh, stride_gn), offs_m, stride_gn, offs_d,
                    stride_gd, q_len, (dq * (sm_scale * hm)).to(DQ.dtype.element_ty), HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    """Host-side ceiling division (``triton.cdiv`` is a JIT function: slow to call from Python)."""
    return -(-a // b)


_DUMMIES: dict = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """One int32 element per device: the pointer argument of a tensor a kernel variant never reads."""
    tensor = _DUMMIES.get(device)
    if tensor is None:
        tensor = _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return tensor


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"the Triton attention backend needs CUDA tensors (got {q.device}); on CPU use backend='torch', or set "
        "TRITON_INTERPRET=1 before triton is imported to run the kernels under the (slow) interpreter"
    )


class _Layout:
    """What the kernels need to know about the sequences of one call (computed once, kept for the backward).

    ``sequences`` S and ``longest`` (grid sizes); ``cu_seqlens`` int32 ``[S + 1]`` (packed); ``keep`` uint8 ``[B, N]``
    and ``kv_end`` int32 ``[B]`` (padded with a key padding mask); ``dummy`` for the pointers a variant never reads;
    ``window``: the sliding window, None where there is none or where it spans every sequence (``>= longest``:
    then it hides no key and the kernels need no window bounds).
    """

    def __init__(self, q, key_padding_mask, packing: Packing | None, window: int | None = None):
        self.packing = packing
        self.dummy = _dummy(q.device)
        self.keep = self.kv_end = None
        self.pad_strides = (0, 0)
        if packing is not None:
            self.sequences, self.longest = packing.num_sequences, packing.max_seqlen
            self.cu_seqlens = packing.cu_seqlens
        else:
            self.sequences, self.longest = q.shape[0], q.shape[2]
            self.cu_seqlens = self.dummy
            if key_padding_mask is not None:
                self.keep = key_padding_mask.view(torch.uint8)  # bool -> uint8 view, no copy
                positions = torch.arange(1, q.shape[2] + 1, dtype=torch.int32, device=q.device)
                self.kv_end = (self.keep.to(torch.int32) * positions).amax(dim=-1).to(torch.int32)  # 0: no keys
                self.pad_strides = (self.keep.stride(0), self.keep.stride(1))
        self.window = window if window is not None and window < self.longest else None

    @property
    def varlen(self) -> bool:
        return self.packing is not None

    @property
    def has_key_pad(self) -> bool:
        return self.keep is not None

    @property
    def has_window(self) -> bool:
        return self.window is not None

    @property
    def window_arg(self) -> int:
        """The kernels' ``window`` argument (unused without WINDOW)."""
        return self.window if self.window is not None else 0

    def pointers(self):
        """``(KeyPad, KvEnd, CuSeqlens)`` kernel arguments."""
        return (self.keep if self.keep is not None else self.dummy,
                self.kv_end if self.kv_end is not None else self.dummy, self.cu_seqlens)


def _configs(q: torch.Tensor, layout: _Layout, causal: bool) -> AttentionConfigs:
    return configs_for(q.device, _block_d(q.shape[3]), q.dtype, max_seqlen=layout.longest, causal=causal)


def _forward(q, k, v, mask_sh, layout: _Layout, causal, scale, return_probs):
    """Launch ``_attn_fwd`` (and ``_attn_probs``). Returns ``(out, lse, entropy, max_prob, probs or None)``;
    ``mask_sh`` is None or float32 contiguous ``[S, H]``; ``k, v`` have ``H / group`` heads."""
    batch, heads, seq, head_dim = q.shape
    group = heads // k.shape[1]
    block_d = _block_d(head_dim)
    cfg = _configs(q, layout, causal)
    precision = _dot_precision(q.dtype)
    qk_scale = scale * _LOG2E
    has_mask = mask_sh is not None
    out = torch.empty_like(q)  # q's layout where dense (e.g. [B, N, H, D] underneath): free transpose later
    # lse is saved for the backward: a tensor of its own (an in-place change of a view of the same storage would
    # fail the backward's version check); entropy and max_prob are the halves of one [2, B, H, N] buffer, which the
    # statistics recorder reduces in one operation (kernels.common.row_statistics)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    entropy, max_prob = torch.empty((2, batch, heads, seq), dtype=torch.float32, device=q.device).unbind(0)
    key_pad, kv_end, cu_seqlens = layout.pointers()
    grid = (_cdiv(layout.longest, cfg.fwd.block_m), layout.sequences * heads)
    _attn_fwd[grid](
        q, k, v, mask_sh if has_mask else lse, key_pad, kv_end, cu_seqlens, out, lse, entropy, max_prob,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *layout.pad_strides,
        heads, seq, group, layout.window_arg, qk_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.fwd.block_m, BLOCK_N=cfg.fwd.block_n,
        CAUSAL=causal, VARLEN=layout.varlen, HAS_KEY_PAD=layout.has_key_pad, HAS_HEAD_MASK=has_mask,
        WINDOW=layout.has_window, DOT_PRECISION=precision, **cfg.fwd.launch_options(),
    )
    probs = None
    if return_probs:  # padded batches only (checked by check_inputs)
        probs = torch.empty((batch, heads, seq, seq), dtype=q.dtype, device=q.device)
        grid = (_cdiv(seq, cfg.probs.block_m), _cdiv(seq, cfg.probs.block_n), batch * heads)
        _attn_probs[grid](
            q, k, mask_sh if has_mask else lse, key_pad, kv_end, lse, probs,
            *q.stride(), *k.stride(), *layout.pad_strides, probs.stride(1), probs.stride(2),
            heads, seq, group, layout.window_arg, qk_scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.probs.block_m, BLOCK_N=cfg.probs.block_n,
            CAUSAL=causal, HAS_KEY_PAD=layout.has_key_pad, HAS_HEAD_MASK=has_mask, WINDOW=layout.has_window,
            DOT_PRECISION=precision, **cfg.probs.launch_options(),
        )
    return out, lse, entropy, max_prob, probs


def _backward(grad_out, q, k, v, out, lse, mask_sh, layout: _Layout, causal, scale, need_dq, need_dkdv, need_mask):
    """Launch the backward kernels. Returns ``(dq, dk, dv, mask_partials)``: ``mask_partials [S, H, blocks]``
    float32 (the head-mask gradient is their sum over the last dim) or None; ``dk, dv`` have the shape of ``k, v``
    (``H / group`` heads)."""
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    block_d = _block_d(head_dim)
    cfg = _configs(q, layout, causal)
    precision = _dot_precision(q.dtype)
    has_mask = mask_sh is not None
    need_mask = need_mask and has_mask
    key_pad, kv_end, cu_seqlens = layout.pointers()
    rows = layout.sequences * heads
    mask_arg = mask_sh if has_mask else lse
    # -- stage 1: Delta / mask, lse * log2(e) (for dK, dV), and the head-mask gradient of heads whose mask is not
    #    small
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta) if need_dkdv else delta
    pre_blocks = _cdiv(layout.longest, cfg.preprocess.block_m)
    dq_blocks = _cdiv(layout.longest, cfg.dq.block_m)
    # the head-mask gradient's per-program partial sums: [rows, pre_blocks | dq_blocks], every slot written by its
    # program (no zero fill), one reduction at the end
    partials = torch.empty((rows, pre_blocks + dq_blocks), dtype=torch.float32, device=q.device) if need_mask \
        else delta
    slots = pre_blocks + dq_blocks
    _attn_bwd_preprocess[(pre_blocks, rows)](
        out, grad_out, mask_arg, kv_end, cu_seqlens, lse, delta, lse2, partials,
        *out.stride(), *grad_out.stride(),
        heads, seq, slots, _SMALL_MASK,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.preprocess.block_m, VARLEN=layout.varlen,
        HAS_HEAD_MASK=has_mask, MASK_GRAD=need_mask, WRITE_LSE2=need_dkdv,
    )
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=layout.varlen,
                  HAS_KEY_PAD=layout.has_key_pad, HAS_HEAD_MASK=has_mask, WINDOW=layout.has_window,
                  DOT_PRECISION=precision)
    dq = dk = dv = None
    # -- stage 2: dK, dV; grouped-query attention: per query head, summed over each group by torch (fixed order)
    if need_dkdv:
        if group == 1:
            dk = torch.empty_like(k)
            dv = torch.empty_like(dk)  # dK and dV share strides in the kernel
        else:  # float32 [B, H, N, D] terms of every query head
            dk, dv = (torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        grid = (_cdiv(layout.longest, cfg.dkdv.block_n), rows)
        _attn_bwd_dkdv[grid](
            q, k, v, grad_out, mask_arg, key_pad, kv_end, cu_seqlens, lse2, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *layout.pad_strides,
            heads, seq, group, layout.window_arg, scale * _LOG2E, scale,
            BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **common,
            **cfg.dkdv.launch_options(),
        )
        if group > 1:
            dk, dv = (t.view(batch, kv_heads, group, seq, head_dim).sum(2).to(k.dtype) for t in (dk, dv))
    # -- stage 3: dQ, and the head-mask gradient of heads whose mask is (near) 0
    if need_dq or need_mask:
        dq = torch.empty_like(q) if need_dq else None
        grid = (dq_blocks, rows)
        _attn_bwd_dq[grid](
            q, k, v, grad_out, mask_arg, key_pad, kv_end, cu_seqlens, lse, delta,
            dq if dq is not None else q, partials[:, pre_blocks:] if need_mask else lse,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *(dq if dq is not None else q).stride(),
            *layout.pad_strides,
            heads, seq, group, layout.window_arg, scale * _LOG2E, scale, slots, _SMALL_MASK,
            BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, COMPUTE_DQ=need_dq, MASK_GRAD=need_mask, **common,
            **cfg.dq.launch_options(),
        )
    mask_grad = partials.view(layout.sequences, heads, slots) if need_mask else None
    return dq, dk, dv, mask_grad


# ----------------------------------------------------------------------------------------------------------
# Public function and autograd
# ----------------------------------------------------------------------------------------------------------


def attention_triton(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None,
                     return_probs=False, packing: Packing | None = None, window: int | None = None):
    """Fused Triton attention; same contract as :func:`fastbertology.kernels.attention`.

    Args:
        q, k, v: ``[B, H, N, D]`` (packed: ``[1, H, T, D]``), float32/float16/bfloat16, ``D <= 128`` (otherwise
            :func:`attention_torch`), CUDA (or CPU under ``TRITON_INTERPRET=1``), any strides (read in place);
            ``k, v`` may have ``H_kv`` heads, ``H_kv`` dividing ``H`` (grouped-query attention, read in place).
        head_mask: ``[H]`` or ``[B, H]`` (packed: ``[S, H]``) floats, or None; multiplies each head's output.
            Differentiable.
        key_padding_mask: bool ``[B, N]`` (True = keep the key), any pattern, or None (padded batches only).
        causal: query i sees keys j <= i (of its own sequence).
        scale: softmax scale, default ``D ** -0.5``.
        return_probs: also return ``stats.probs`` ``[B, H, N, N]`` (probabilities times the head mask, input dtype).
        packing: :class:`~fastbertology.kernels.Packing` of packed sequences, or None.
        window: sliding window, or None: query i sees keys ``i - window < j`` (and ``j < i + window`` when not
            causal).

    Returns:
        ``out`` (input dtype, with the memory layout of ``q`` where ``q`` is dense) and :class:`AttentionStats`
        with ``lse, entropy, max_prob`` float32 (before the head mask, no gradient) and ``probs`` (or None).

    Tensors are saved for backward only when one of q, k, v, head_mask requires grad (and grad mode is on).
    """
    batch, heads, seq, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal, packing, return_probs,
                                               window)
    window = None if window is None else int(window)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or head_dim > MAX_HEAD_DIM or q.numel() == 0 \
            or not scale > 0:
        if head_dim > MAX_HEAD_DIM:
            warnings.warn(f"head dim {head_dim} > {MAX_HEAD_DIM}: the Triton kernels are not built for it; "
                          "using the PyTorch backend", stacklevel=2)
        return attention_torch(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=causal,
                               scale=scale, return_probs=return_probs, packing=packing, window=window)
    _check_device(q)
    if batch * heads > _MAX_GRID_Y:
        raise ValueError(f"sequences * heads = {batch * heads} exceeds {_MAX_GRID_Y}; split the batch")
    layout = _Layout(q, key_padding_mask, packing, window)
    grad_on = torch.is_grad_enabled()
    needs_grad = grad_on and (q.requires_grad or k.requires_grad or v.requires_grad
                              or (head_mask is not None and head_mask.requires_grad))
    if not needs_grad:
        out, lse, entropy, max_prob, probs = _forward(q, k, v, _mask_sh(head_mask, batch, heads), layout, causal,
                                                      scale, return_probs)
    else:
        out, lse, entropy, max_prob, probs = _TritonAttention.apply(q, k, v, head_mask, layout, causal, scale,
                                                                    return_probs)
    return out, AttentionStats(lse=lse, entropy=entropy, max_prob=max_prob, probs=probs)


def _mask_sh(head_mask, sequences, heads):
    """None, or the head mask as float32 contiguous ``[S, H]`` (detached)."""
    if head_mask is None:
        return None
    return expand_head_mask(head_mask.detach(), sequences, heads).to(torch.float32).contiguous()


class _TritonAttention(torch.autograd.Function):
    """Autograd wrapper: inputs ``q, k, v``, ``head_mask [H] | [S, H] | None``; outputs ``out`` and the
    non-differentiable ``lse, entropy, max_prob`` (and ``probs`` or None)."""

    @staticmethod
    def forward(ctx, q, k, v, head_mask, layout, causal, scale, return_probs):
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors made for them
        mask_sh = _mask_sh(head_mask, layout.sequences, q.shape[1])
        out, lse, entropy, max_prob, probs = _forward(q, k, v, mask_sh, layout, causal, scale, return_probs)
        ctx.save_for_backward(q, k, v, out, lse, mask_sh)
        ctx.layout, ctx.causal, ctx.scale = layout, causal, scale
        ctx.head_mask_shape = None if head_mask is None else (head_mask.dim(), head_mask.dtype)
        # one call: a second mark_non_differentiable would replace the first
        ctx.mark_non_differentiable(*(t for t in (lse, entropy, max_prob, probs) if t is not None))
        return out, lse, entropy, max_prob, probs

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        q, k, v, out, lse, mask_sh = ctx.saved_tensors
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        if grad_out is None:
            return (None,) * 8
        dq, dk, dv, mask_grad = _backward(grad_out, q, k, v, out, lse, mask_sh, ctx.layout, ctx.causal, ctx.scale,
                                          need_dq=need_q, need_dkdv=need_k or need_v, need_mask=need_mask)
        grad_mask = None
        if need_mask and mask_grad is not None:  # one reduction: over the blocks (and the sequences for [H])
            dim, dtype = ctx.head_mask_shape
            grad_mask = mask_grad.sum(dim=(0, 2) if dim == 1 else 2)
            if grad_mask.dtype != dtype:
                grad_mask = grad_mask.to(dtype)
        return (dq if need_q else None, dk if need_k else None, dv if need_v else None, grad_mask,
                None, None, None, None)


__all__ = ["attention_triton", "gpu_configs", "AttentionConfigs", "KernelConfig", "FP32_DOT_PRECISION", "MAX_HEAD_DIM"]

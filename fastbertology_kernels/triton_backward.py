"""The backward Triton kernels: ``_attn_bwd_preprocess`` (``Delta``, ``lse * log2(e)`` and the head-mask gradient of
heads whose mask is not small), ``_attn_bwd_dkdv`` and ``_attn_bwd_dq`` (with the head-mask gradient of heads whose
mask is (near) 0). The head-mask gradient goes into one partial-sum slot per program, which every program writes.
Launched by :mod:`fastbertology.kernels.triton_attention`, whose docstring states the design."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_blocks import (
    _base,
    _block_start,
    _edge_blocks,
    _key_blocks,
    _key_keep,
    _kv_head,
    _load_rows,
    _modified_scores,
    _query_blocks,
    _query_keep,
    _sequence,
    _store_rows,
)


@triton.jit
def _attn_bwd_preprocess(O, DO, HeadMask, KvEnd, CuSeqlens, Lse, Delta, MaskGrad,
                         stride_ob, stride_oh, stride_on, stride_od,
                         stride_dob, stride_doh, stride_don, stride_dod,
                         H, N, lse2_at, blocks_per_row, small_mask,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         VARLEN: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
                         WRITE_LSE2: tl.constexpr):
    """Per query row (all ``[B * H * N]`` float32), grid ``(cdiv(longest, BLOCK_M), S * H)``:
    ``Delta = rowsum(dO * O) / mask`` (0 where the mask is 0; ``O = mask * P V``, so this is ``rowsum(dO * P V)``),
    and with WRITE_LSE2 ``lse * log2(e)`` at ``Delta + lse2_at`` (the second half of the launcher's one buffer): what
    the dK/dV loop reads, as it is, per query block.

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
        tl.store(Delta + lse2_at + row, tl.load(Lse + row, mask=m_ok, other=0.0) * LOG2E, mask=m_ok)
    if MASK_GRAD:  # heads with a small mask: 0 here, their gradient comes from _attn_bwd_dq
        tl.store(slot, tl.where(tl.abs(hm) >= small_mask, tl.sum(delta, 0), 0.0))


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
               stride_qn, stride_qd, stride_don, stride_dod,
               offs_n, offs_d, lo, hi, q_len, window, qk_scale, bias_base, bias_span, slope2, cap_in, cap_out,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BIAS: tl.constexpr,
               ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate ``dV += P^T dO`` and ``dK += dS^T Q`` (unscaled) over the query blocks ``[lo, hi)`` of one key
    block ``k, v [BLOCK_N, BLOCK_D]``. EDGE blocks check query bounds, (causal) the diagonal and the window.

    ``P^T = exp2(K Q^T * qk_scale - Lse2)`` and ``dS^T = P^T (V dO^T - Delta)``, with ``Lse2 = lse * log2(e)`` and
    ``Delta = rowsum(dO * O) / mask`` per query row from ``_attn_bwd_preprocess``. Query rows past the sequence
    read as zeros (dO = Delta = 0), so they add nothing. With score modifiers (:func:`_modified_scores`) the scores
    are modified alike and SOFTCAP multiplies ``dS`` by the cap's derivative ``1 - t^2``.
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
        if SOFTCAP or BIAS or ALIBI:
            s2_t, t_t = _modified_scores(s_t, offs_m[None, :], offs_n[:, None], qk_scale, bias_base, bias_span, slope2,
                                         cap_in, cap_out, SOFTCAP, BIAS, ALIBI)
            p_t = tl.exp2(s2_t - lse2[None, :])
        else:
            p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if EDGE:
            if CAUSAL or WINDOW:
                p_t = tl.where(_query_keep(offs_n, offs_m, window, CAUSAL, WINDOW), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, HeadMask, KeyPad, KvEnd, CuSeqlens, Delta, DK, DV,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_pb, stride_pn,
                   H, N, group, window, qk_scale, sm_scale, lse2_at,
                   Bias, Slopes, bias_span, cap_in, cap_out,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                   HAS_HEAD_MASK: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   SOFTCAP: tl.constexpr = False, BIAS: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """dK, dV of one key block for one (sequence, query head), looping over query blocks; grid
    ``(cdiv(longest, BLOCK_N), S * H)``. ``dV = mask * P^T dO``, ``dK = scale * mask * dS^T Q`` with K, V from
    key/value head ``head // group``; keys that are padding (or past a padded row's last key) get zeros. DK and DV
    ``[B, H, N, HEAD_DIM]`` share the strides ``stride_g*``: dK and dV themselves (``group = 1``), or the float32
    per-query-head terms that the launcher sums over each group (grouped-query attention).

    Delta ``[B * H * N]`` and, at ``Delta + lse2_at``, Lse2 come from ``_attn_bwd_preprocess`` (``rowsum(dO * O) /
    mask`` and ``lse * log2(e)``), so that the loops spend nothing on the head mask.
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
    lse2_base = Delta + lse2_at + stats
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bias_base = Bias + off_h.to(tl.int64) * (2 * bias_span - 1)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + off_h)

    # -- stage 1: query blocks: (causal or WINDOW) the diagonal / the window's lower edge (edge), the blocks that see
    #    the whole key block (interior), the rest (edge: the window's upper edge, the last partial block). Query
    #    blocks that see none of the keys are not visited.
    if (start_n < k_len) & (hm != 0.0):
        lo, interior_lo, interior_hi, hi = _query_blocks(start_n, q_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        if CAUSAL or WINDOW:
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, Delta + stats,  # loop: edge
                                stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                                lo, interior_lo, q_len, window, qk_scale, bias_base, bias_span, slope2,
                                cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, WINDOW, SOFTCAP, BIAS,
                                ALIBI, DOT_PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, Delta + stats,  # loop: interior
                            stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                            interior_lo, interior_hi, q_len, window, qk_scale, bias_base, bias_span, slope2,
                            cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, WINDOW, SOFTCAP, BIAS, ALIBI,
                            DOT_PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, Delta + stats,  # loop: edge
                            stride_qn, stride_qd, stride_don, stride_dod, offs_n, offs_d,
                            interior_hi, hi, q_len, window, qk_scale, bias_base, bias_span, slope2,
                            cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_M, True, False, WINDOW, SOFTCAP, BIAS, ALIBI,
                            DOT_PRECISION)

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
             qk_scale, bias_base, bias_span, slope2, cap_in, cap_out,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, WINDOW: tl.constexpr, ROW_DOT_ONLY: tl.constexpr,
             SOFTCAP: tl.constexpr, BIAS: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Over the key blocks ``[lo, hi)`` (WINDOW edge blocks: from ``skip_from`` on ``skip`` keys further, see
    :func:`_edge_blocks`) of one query block: ``dQ += dS K`` (unscaled), with
    ``dS = P (dO V^T - Delta / mask)``; or, ROW_DOT_ONLY (a head whose mask is 0), only the head-mask gradient rows
    ``row_dot += sum_j P (dO V^T)``. Keys past the sequence read as zeros (K = V = 0) and add nothing; EDGE blocks
    zero ``P`` above the causal diagonal, outside the window and at padding keys. Score modifiers as in
    :func:`_dkdv_loop`."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = _block_start(start, skip_from, skip, EDGE and WINDOW) + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, k_len, HEAD_DIM, BLOCK_D, EDGE)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, k_len, HEAD_DIM, BLOCK_D, EDGE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if SOFTCAP or BIAS or ALIBI:
            s2, t = _modified_scores(s, offs_m[:, None], offs_n[None, :], qk_scale, bias_base, bias_span, slope2,
                                     cap_in, cap_out, SOFTCAP, BIAS, ALIBI)
            p = tl.exp2(s2 - lse2[:, None])
        else:
            p = tl.exp2(s * qk_scale - lse2[:, None])
        if EDGE:
            keep = _key_keep(kp_base, stride_pn, offs_m, offs_n, k_len, window, CAUSAL, HAS_KEY_PAD, WINDOW)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if ROW_DOT_ONLY:
            row_dot += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
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
                 H, N, group, window, qk_scale, sm_scale, blocks_per_row, first_slot, small_mask,
                 Bias, Slopes, bias_span, cap_in, cap_out,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                 HAS_HEAD_MASK: tl.constexpr, WINDOW: tl.constexpr, COMPUTE_DQ: tl.constexpr,
                 MASK_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = False,
                 BIAS: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """dQ of one query block of one (sequence, query head), looping over key blocks (of key/value head
    ``head // group``); grid ``(cdiv(longest, BLOCK_M), S * H)``. ``dQ = scale * mask * dS K`` (COMPUTE_DQ; 0 for a
    head whose mask is 0). With MASK_GRAD, heads with ``|mask| < small_mask`` get the head-mask gradient of the
    block's rows, ``sum_i sum_j P_ij (dO_i . V_j)``, in ``MaskGrad[(seq * H + head) * blocks_per_row + first_slot +
    block]`` (the preprocess kernel's slots come first).
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
    slot = MaskGrad + off_bh.to(tl.int64) * blocks_per_row + first_slot + tl.program_id(0)
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
    bias_base = Bias + off_h.to(tl.int64) * (2 * bias_span - 1)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + off_h)

    # -- stage 1: key blocks, interior then edge (WINDOW: both edges of the window); dS = P (dO V^T - Delta / mask)
    edge_lo, edge_hi, skip_from, skip = _edge_blocks(lo, interior_lo, interior_hi, hi, WINDOW)
    if COMPUTE_DQ:
        if hm != 0.0:
            delta = tl.load(Delta + row, mask=m_ok, other=0.0)  # rowsum(dO * O) / mask
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, delta, k_base, v_base, kp_base,  # loop: interior
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, bias_base, bias_span,
                                   slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_KEY_PAD,
                                   WINDOW, False, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, delta, k_base, v_base, kp_base,  # loop: edge
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, bias_base, bias_span,
                                   slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KEY_PAD,
                                   WINDOW, False, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
    # -- stage 2: the head-mask gradient rows sum_j P (dO V^T) of a head whose mask is (near) 0
    if MASK_GRAD:
        if tl.abs(hm) < small_mask:
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, lse2, k_base, v_base, kp_base,  # loop: interior
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, bias_base, bias_span,
                                   slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_KEY_PAD,
                                   WINDOW, True, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
            dq, row_dot = _dq_loop(dq, row_dot, q, do, lse2, lse2, k_base, v_base, kp_base,  # loop: edge
                                   stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                   edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, bias_base, bias_span,
                                   slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KEY_PAD,
                                   WINDOW, True, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
    if MASK_GRAD:  # 0 for the heads whose gradient the preprocess slot holds (row_dot never left 0 for them)
        tl.store(slot, tl.sum(row_dot, 0))
    # -- stage 3: store
    if COMPUTE_DQ:
        _store_rows(_base(DQ, batch_row, off_h, row0, stride_gb, stride_gh, stride_gn), offs_m, stride_gn, offs_d,
                    stride_gd, q_len, (dq * (sm_scale * hm)).to(DQ.dtype.element_ty), HEAD_DIM, BLOCK_D)

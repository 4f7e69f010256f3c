"""The forward Triton kernels: ``_attn_fwd`` (online softmax with the entropy and max-probability statistics, the
head mask, ``out = mask * P V``) and ``_attn_probs`` (the probabilities times the head mask, on request). The key
loops are called from the kernels on lines whose comments mark them as interior or edge loops (read by
``benchmarks/kernel_report.py``). Launched by :mod:`fastbertology.kernels.triton_attention`, whose docstring
states the design."""

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
    _sequence,
    _store_rows,
)


@triton.jit
def _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
              offs_m, offs_d, lo, hi, skip_from, skip, k_len, window, qk_scale,
              bias_base, bias_span, slope2, cap_in, cap_out,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, WINDOW: tl.constexpr, WITH_PV: tl.constexpr,
              SOFTCAP: tl.constexpr, BIAS: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks ``[lo, hi)`` for the query block ``q [BLOCK_M, BLOCK_D]``; with WINDOW (edge
    blocks) the blocks from ``skip_from`` on are taken ``skip`` keys further (see :func:`_edge_blocks`).

    Carries ``acc [BLOCK_M, BLOCK_D]`` (unnormalised ``P V``, only WITH_PV) and ``l_i, m_i, u_i [BLOCK_M]`` (base 2:
    ``m`` is the running max of ``s2``, ``u = sum p (s2 - m)``). EDGE blocks check bounds, key padding, causality
    and the window. SOFTCAP, BIAS, ALIBI: the score modifiers (:func:`_modified_scores`); without them the loop is
    the plain one.
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
            if SOFTCAP or BIAS or ALIBI:
                s2, _ = _modified_scores(qk, offs_m[:, None], offs_n[None, :], qk_scale, bias_base, bias_span,
                                         slope2, cap_in, cap_out, SOFTCAP, BIAS, ALIBI)
                s2 = tl.where(keep, s2, MASKED_SCORE)
            else:
                s2 = tl.where(keep, qk * qk_scale, MASKED_SCORE)
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            x = s2 - m_new[:, None]
        elif SOFTCAP or BIAS or ALIBI:
            s2, _ = _modified_scores(qk, offs_m[:, None], offs_n[None, :], qk_scale, bias_base, bias_span, slope2,
                                     cap_in, cap_out, SOFTCAP, BIAS, ALIBI)
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
              Bias, Slopes, Sinks, bias_span, cap_in, cap_out,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
              WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = False,
              BIAS: tl.constexpr = False, ALIBI: tl.constexpr = False, SINKS: tl.constexpr = False):
    """Forward for one query block of one (sequence, query head); grid ``(cdiv(longest sequence, BLOCK_M), S * H)``.

    Q, Out ``[B, H, N, HEAD_DIM]``, K, V ``[B, H / group, N, HEAD_DIM]`` (any strides; packed: B = 1, N = T): query
    head h reads key/value head ``h // group``; HeadMask ``[S * H]`` float32; KeyPad ``[B, N]`` uint8 (1 = keep) and
    KvEnd ``[B]`` int32 (one past the last kept key), padded batches only; CuSeqlens ``[S + 1]`` int32 (VARLEN only);
    Lse, Ent, MaxP ``[B * H * N]`` float32. ``qk_scale`` = softmax scale * log2(e) > 0. WINDOW: query i sees keys
    ``i - window < j`` (and ``j < i + window`` without CAUSAL). Score modifiers (:mod:`~fastbertology.kernels.
    modifiers`), each a constexpr switch: SOFTCAP (``cap_in = scale / softcap``, ``cap_out = softcap * log2(e)``),
    BIAS (``Bias [H, 2 * bias_span - 1]`` float32, base 2, ``-inf`` clamped), ALIBI (``Slopes [H]`` float32, base 2),
    SINKS (``Sinks [H]`` float32, base 2: one more logit per row, merged into ``m, l, u`` after the key loops).
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
    bias_base = Bias + off_h.to(tl.int64) * (2 * bias_span - 1)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + off_h)
    if hm != 0.0:
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: interior
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, bias_base, bias_span,
                                       slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL,
                                       HAS_KEY_PAD, WINDOW, True, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: edge
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, bias_base, bias_span,
                                       slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL,
                                       HAS_KEY_PAD, WINDOW, True, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
    else:
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: interior
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       interior_lo, interior_hi, 0, 0, k_len, window, qk_scale, bias_base, bias_span,
                                       slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL,
                                       HAS_KEY_PAD, WINDOW, False, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)
        acc, l_i, m_i, u_i = _fwd_loop(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,  # loop: edge
                                       stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
                                       edge_lo, edge_hi, skip_from, skip, k_len, window, qk_scale, bias_base, bias_span,
                                       slope2, cap_in, cap_out, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL,
                                       HAS_KEY_PAD, WINDOW, False, SOFTCAP, BIAS, ALIBI, DOT_PRECISION)

    # -- stage 2: normalise; rows that saw no key (the max never left MASKED_SCORE) get zeros
    has_keys = m_i > 0.5 * MASKED_SCORE
    if SINKS:  # the sink logit as one more key whose value is zero
        sink2 = tl.load(Sinks + off_h)
        m_sink = tl.maximum(m_i, sink2)
        alpha = tl.exp2(m_i - m_sink)
        e_sink = tl.exp2(sink2 - m_sink)
        u_i = alpha * (u_i + (m_i - m_sink) * l_i) + e_sink * (sink2 - m_sink)
        l_i = alpha * l_i + e_sink
        acc = acc * alpha[:, None]
        m_i = m_sink
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
                Bias, Slopes, bias_span, cap_in, cap_out,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, WINDOW: tl.constexpr,
                DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = False, BIAS: tl.constexpr = False,
                ALIBI: tl.constexpr = False):
    """``P * mask`` ``[B, H, N, N]`` (contiguous, in P's dtype) from the saved log-sum-exp; padded batches only.

    Grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B * H)``; K ``[B, H / group, N, HEAD_DIM]``. Keys a query may not
    see and rows without keys get 0. Score modifiers as in :func:`_attn_fwd` (the sinks are in the saved lse).
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
    if SOFTCAP or BIAS or ALIBI:
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Slopes + off_h)
        s, _ = _modified_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), offs_m[:, None],
                                offs_n[None, :], qk_scale, Bias + off_h.to(tl.int64) * (2 * bias_span - 1), bias_span,
                                slope2, cap_in, cap_out, SOFTCAP, BIAS, ALIBI)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    keep = _key_keep(KeyPad + off_b.to(tl.int64) * stride_pb, stride_pn, offs_m, offs_n, k_len, window, CAUSAL,
                     HAS_KEY_PAD, WINDOW)
    lse2 = tl.load(Lse + off_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0) * LOG2E
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    if HAS_HEAD_MASK:
        p = p * tl.load(HeadMask + off_bh)
    p_offs = off_bh.to(tl.int64) * stride_probs_bh + offs_m[:, None].to(tl.int64) * stride_probs_m + offs_n[None, :]
    tl.store(P + p_offs, p.to(P.dtype.element_ty), mask=(offs_m < N)[:, None] & (offs_n < N)[None, :])

"""Fused masked multi-head attention with per-head statistics, in Triton.

:func:`attention_triton` implements the contract of :func:`fastbertology.kernels.attention` (see
``kernels/__init__.py``) with the same outputs as :func:`~fastbertology.kernels.reference.attention_torch`:

* forward (``_attn_fwd``): one pass over the keys per block of queries with an online softmax that keeps the
  running max ``m``, ``l = sum_j exp(s_j - m)`` and ``u = sum_j exp(s_j - m) (s_j - m)`` (DESIGN.md), so that
  ``lse = m + log l``, ``entropy = log l - u / l`` and ``max_prob = 1 / l`` come out of the same pass as
  ``out = head_mask * P V``; no ``N x N`` tensor is ever stored. The probabilities themselves are written by a
  second kernel (``_attn_probs``) only when ``return_probs=True``.
* backward: ``_attn_bwd_preprocess`` computes per query row ``r = rowsum(dO * (P V))`` (the head-mask gradient
  before the reduction over rows) and ``Delta = mask * r``; ``_attn_bwd_dkdv`` (one program per key block, looping
  over query blocks) and ``_attn_bwd_dq`` (one program per query block, looping over key blocks) recompute ``P``
  from the saved log-sum-exp. ``dL/dmask[b, h] = sum_i r[b, h, i]`` is reduced with ``torch.sum``. No atomics:
  the backward is deterministic.

Scores are handled in base 2 inside the kernels (``s2 = s * log2(e)``, ``exp2``); statistics are returned in
natural units.

Decisions worth knowing:

* Statistics are those of the head's softmax *before* the head mask (the contract), so a head whose mask is 0
  still has its scores and statistics computed; what is skipped for it is the ``P V`` product and the loads of
  ``V`` (forward, unless the head-mask gradient is needed, which requires ``P V``) and the whole ``dQ, dK, dV``
  computation (backward: its gradients are exactly zero).
* Key padding: the bool ``[B, N]`` mask is read inside the kernels (any pattern of kept keys is supported) and,
  on top of it, the per-example end of the last kept key, ``kv_end[b]``, bounds the key loops, so right padding
  (the common prefix case) skips the padded key blocks entirely without a host synchronisation.
* Causal: key blocks above the diagonal are not visited.
* Rows without any visible key give zero output, zero statistics, zero probabilities and zero gradients.
* float32 inputs use ``tl.dot(..., input_precision=FP32_DOT_PRECISION)``: ``"tf32x3"`` (three TF32 products on
  tensor cores, close to float32 accuracy) by default, ``"ieee"`` (float32 FMA, slower) with the environment
  variable ``FASTBERTOLOGY_FP32_DOT_PRECISION=ieee``. 16-bit inputs: scores, softmax and accumulators are float32,
  ``P`` is rounded to the input dtype for the ``P V`` product (as FlashAttention does). float64 inputs are
  delegated to :func:`attention_torch` (the kernels are built for float32, float16 and bfloat16), and so are
  head dims above 128 (with a warning) and empty inputs.
* The head-mask gradient is returned in the dtype and shape of ``head_mask`` (``[H]``: summed over the batch).

Triton is imported at module import; :mod:`fastbertology.kernels` imports this module only when the Triton
backend is selected. On CPU tensors it runs under the Triton interpreter (``TRITON_INTERPRET=1`` must be set
before triton is imported).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Triton attention backend needs triton (pip install triton, or a CUDA build of torch that ships it); "
        "use backend='torch' otherwise"
    ) from error

from .common import AttentionStats, check_inputs
from .reference import attention_torch, expand_head_mask

# Input precision of tl.dot for float32 inputs: "tf32x3" (three TF32 tensor-core products, close to float32
# accuracy) or "ieee" (true float32 FMA, slower). The environment variable overrides it (read at import).
FP32_DOT_PRECISION = os.environ.get("FASTBERTOLOGY_FP32_DOT_PRECISION", "tf32x3")
_LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128  # larger head dims go to attention_torch (shared memory and registers)
_MAX_GRID_Y = 65535  # CUDA limit on the second grid dimension, which holds batch * heads

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                    offs_m, offs_d, d_ok, hi, kv_end, qk_scale,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                    WITH_PV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax loop over the key blocks ``[0, hi)`` for one block of queries ``q [BLOCK_M, BLOCK_D]``.

    Carries ``acc [BLOCK_M, BLOCK_D]`` (unnormalised ``P V``, only when WITH_PV), ``l_i, m_i, u_i [BLOCK_M]``
    (base-2 units: ``m`` is the running max of ``s2``, ``u = sum p (s2 - m)``).
    """
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        # -- stage 1: scores of this key block, in base 2; keys the query may not see get -inf
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        keep = n_ok[None, :]
        if HAS_KEY_PAD:
            kp = tl.load(kp_base + offs_n * stride_pn, mask=n_ok, other=0)
            keep = keep & (kp != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        # -- stage 2: online softmax update of m, l, u (rows with no key so far keep m = -inf, l = u = 0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite: exp2 of masked scores is exactly 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        shift = tl.where(keep, s - m_use[:, None], 0.0)  # no 0 * inf at masked keys
        m_old = tl.where(l_i > 0, m_i, m_use)  # l = 0: nothing to move (and no -inf * 0)
        moved = (m_old - m_use) * l_i  # u <- alpha (u + (m_old - m_new) l_old)
        u_i = alpha * (u_i + moved) + tl.sum(p * shift, 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        # -- stage 3: accumulate P V
        if WITH_PV:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_i, u_i


@triton.jit
def _attn_fwd(Q, K, V, HeadMask, KeyPad, KvEnd, Out, OutU, Lse, Ent, MaxP,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              stride_pb, stride_pn,
              H, N, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
              STORE_UNMASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Forward for one block of queries of one (example, head); grid ``(cdiv(N, BLOCK_M), B * H)``.

    Q, K, V ``[B, H, N, HEAD_DIM]`` (any strides); HeadMask ``[B, H]`` float32 contiguous; KeyPad ``[B, N]`` uint8
    (1 = keep); KvEnd ``[B]`` int32 (one past the last kept key); Out, OutU ``[B, H, N, HEAD_DIM]`` (same strides):
    Out = mask * P V, OutU = P V (only with STORE_UNMASKED); Lse, Ent, MaxP ``[B, H, N]`` float32 contiguous.
    ``qk_scale`` = softmax scale * log2(e).
    """
    LN2: tl.constexpr = 0.6931471805599453
    # -- stage 0: the (example, head, query block) of this program
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    kp_base = KeyPad + off_b.to(tl.int64) * stride_pb
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if HAS_KEY_PAD:
        kv_end = tl.load(KvEnd + off_b)
    else:
        kv_end = N
    hi = kv_end
    if CAUSAL:  # key blocks entirely above the diagonal are never visited
        hi = tl.minimum(hi, start_m + BLOCK_M)

    # -- stage 1: the key loop (online softmax); P V is skipped for a head whose mask is 0 when not needed
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
        if STORE_UNMASKED:
            acc, l_i, m_i, u_i = _attn_fwd_inner(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
                                                 stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                                                 offs_m, offs_d, d_ok, hi, kv_end, qk_scale,
                                                 BLOCK_N, CAUSAL, HAS_KEY_PAD, True, DOT_PRECISION)
        elif hm != 0.0:
            acc, l_i, m_i, u_i = _attn_fwd_inner(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
                                                 stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                                                 offs_m, offs_d, d_ok, hi, kv_end, qk_scale,
                                                 BLOCK_N, CAUSAL, HAS_KEY_PAD, True, DOT_PRECISION)
        else:
            acc, l_i, m_i, u_i = _attn_fwd_inner(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
                                                 stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                                                 offs_m, offs_d, d_ok, hi, kv_end, qk_scale,
                                                 BLOCK_N, CAUSAL, HAS_KEY_PAD, False, DOT_PRECISION)
    else:
        acc, l_i, m_i, u_i = _attn_fwd_inner(acc, l_i, m_i, u_i, q, k_base, v_base, kp_base,
                                             stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                                             offs_m, offs_d, d_ok, hi, kv_end, qk_scale,
                                             BLOCK_N, CAUSAL, HAS_KEY_PAD, True, DOT_PRECISION)

    # -- stage 2: normalise; rows without any visible key (l = 0) get zeros
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    pv = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, 0.0)
    entropy = tl.where(has_keys, (tl.log2(l_safe) - u_i / l_safe) * LN2, 0.0)
    max_prob = tl.where(has_keys, 1.0 / l_safe, 0.0)

    # -- stage 3: store outputs and statistics
    o_offs = off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh \
        + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    o_mask = m_ok[:, None] & d_ok[None, :]
    if HAS_HEAD_MASK:
        tl.store(Out + o_offs, (pv * hm).to(Out.dtype.element_ty), mask=o_mask)
        if STORE_UNMASKED:
            tl.store(OutU + o_offs, pv.to(OutU.dtype.element_ty), mask=o_mask)
    else:
        tl.store(Out + o_offs, pv.to(Out.dtype.element_ty), mask=o_mask)
    row = off_bh.to(tl.int64) * N + offs_m
    tl.store(Lse + row, lse, mask=m_ok)
    tl.store(Ent + row, entropy, mask=m_ok)
    tl.store(MaxP + row, max_prob, mask=m_ok)


@triton.jit
def _attn_probs(Q, K, KeyPad, KvEnd, Lse, P,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_pb, stride_pn,
                stride_probs_bh, stride_probs_m,
                H, N, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Probabilities ``P [B, H, N, N]`` float32 (contiguous) from the saved log-sum-exp; only for return_probs.

    Grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B * H)``. Masked keys and rows without keys get 0.
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
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    if HAS_KEY_PAD:
        kv_end = tl.load(KvEnd + off_b)
    else:
        kv_end = N
    n_ok = offs_n < kv_end
    # -- stage 1: scores
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_t = tl.load(K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
                  + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    # -- stage 2: p = exp(s - lse) where visible, else 0
    keep = m_ok[:, None] & n_ok[None, :]
    if HAS_KEY_PAD:
        kp = tl.load(KeyPad + off_b.to(tl.int64) * stride_pb + offs_n * stride_pn, mask=n_ok, other=0)
        keep = keep & (kp != 0)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    lse2 = tl.load(Lse + off_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0) * LOG2E
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    p_offs = off_bh.to(tl.int64) * stride_probs_bh + offs_m[:, None].to(tl.int64) * stride_probs_m + offs_n[None, :]
    tl.store(P + p_offs, p, mask=m_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _attn_bwd_preprocess(O, DO, HeadMask, Delta, RowDot,
                         stride_ob, stride_oh, stride_on, stride_od,
                         stride_dob, stride_doh, stride_don, stride_dod,
                         H, N,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         SCALE_BY_HEAD_MASK: tl.constexpr):
    """Per query row ``r = rowsum(dO * O)`` and ``Delta`` ``[B, H, N]`` float32; grid ``(cdiv(N, BLOCK_M), B * H)``.

    With SCALE_BY_HEAD_MASK, ``O`` is the unmasked ``P V``: ``Delta = mask * r`` (the gradient with respect to
    ``P V`` is ``mask * dO``) and ``r`` is stored in RowDot (its sum over rows is ``dL/dmask``). Otherwise ``O`` is
    the output itself and ``Delta = r``.
    """
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    r = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = off_bh.to(tl.int64) * N + offs_m
    if SCALE_BY_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
        tl.store(RowDot + row, r, mask=m_ok)
        tl.store(Delta + row, r * hm, mask=m_ok)
    else:
        tl.store(Delta + row, r, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, HeadMask, KeyPad, KvEnd, Lse, Delta, DK, DV,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_pb, stride_pn,
                   H, N, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """dK, dV for one key block of one (example, head), looping over query blocks; grid ``(cdiv(N, BLOCK_N), B*H)``.

    ``P^T = exp(K Q^T * scale - lse)``; ``dV = mask * P^T dO``; ``dP^T = mask * V dO^T``;
    ``dS^T = P^T (dP^T - Delta)``; ``dK = scale * dS^T Q``. DK and DV share the strides ``stride_g*``.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    # -- stage 0: the (example, head, key block) of this program; load K, V of the block
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if HAS_KEY_PAD:
        kv_end = tl.load(KvEnd + off_b)
    else:
        kv_end = N
    n_ok = offs_n < kv_end
    keep_n = n_ok
    if HAS_KEY_PAD:
        kp = tl.load(KeyPad + off_b.to(tl.int64) * stride_pb + offs_n * stride_pn, mask=n_ok, other=0)
        keep_n = keep_n & (kp != 0)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    hm = 1.0
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
    # queries before the block's first key never see it (causal); a block past the last key or a head whose
    # mask is 0 has zero gradients
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n < kv_end, N, lo)
    if HAS_HEAD_MASK:
        hi = tl.where(hm != 0.0, hi, lo)

    # -- stage 1: loop over query blocks
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
        row = off_bh.to(tl.int64) * N + offs_m
        lse2 = tl.load(Lse + row, mask=m_ok, other=0.0) * LOG2E
        delta = tl.load(Delta + row, mask=m_ok, other=0.0)
        # recompute P^T [BLOCK_N, BLOCK_M]
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        keep = keep_n[:, None] & m_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(keep, tl.exp2(s_t - lse2[None, :]), 0.0)
        # dV += P^T dO (the head mask is applied once at the end)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        # dS^T = P^T (mask * V dO^T - Delta); dK += dS^T Q
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * hm
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    # -- stage 2: store
    g_offs = off_b.to(tl.int64) * stride_gb + off_h.to(tl.int64) * stride_gh \
        + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    g_mask = (offs_n < N)[:, None] & d_ok[None, :]
    tl.store(DK + g_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=g_mask)
    tl.store(DV + g_offs, (dv * hm).to(DV.dtype.element_ty), mask=g_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, HeadMask, KeyPad, KvEnd, Lse, Delta, DQ,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_gb, stride_gh, stride_gn, stride_gd,
                 stride_pb, stride_pn,
                 H, N, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """dQ for one query block of one (example, head), looping over key blocks; grid ``(cdiv(N, BLOCK_M), B * H)``.

    ``P = exp(Q K^T * scale - lse)``; ``dS = P (mask * dO V^T - Delta)``; ``dQ = scale * dS K``.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    # -- stage 0: the (example, head, query block) of this program; load Q, dO, lse, Delta of the block
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    kp_base = KeyPad + off_b.to(tl.int64) * stride_pb
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
    row = off_bh.to(tl.int64) * N + offs_m
    lse2 = tl.load(Lse + row, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    if HAS_KEY_PAD:
        kv_end = tl.load(KvEnd + off_b)
    else:
        kv_end = N
    hi = kv_end
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    hm = 1.0
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + off_bh)
        hi = tl.where(hm != 0.0, hi, 0)  # a head whose mask is 0 has dQ = 0

    # -- stage 1: loop over key blocks
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        kv_mask = d_ok[:, None] & n_ok[None, :]
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kv_mask, other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        keep = m_ok[:, None] & n_ok[None, :]
        if HAS_KEY_PAD:
            kp = tl.load(kp_base + offs_n * stride_pn, mask=n_ok, other=0)
            keep = keep & (kp != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION) * hm
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)

    # -- stage 2: store
    tl.store(DQ + off_b.to(tl.int64) * stride_gb + off_h.to(tl.int64) * stride_gh
             + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------


class KernelConfig(NamedTuple):
    """Block sizes and launch options of one kernel."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


class AttentionConfigs(NamedTuple):
    """The launch configurations of every kernel for one (device, head dim, dtype)."""

    fwd: KernelConfig
    probs: KernelConfig
    preprocess: KernelConfig  # only block_m is used
    dkdv: KernelConfig
    dq: KernelConfig


# Small blocks on the interpreter: short sequences in tests still cross several blocks.
_INTERPRETER_CONFIGS = AttentionConfigs(
    fwd=KernelConfig(32, 16), probs=KernelConfig(32, 16), preprocess=KernelConfig(32, 16),
    dkdv=KernelConfig(16, 32), dq=KernelConfig(32, 16),
)


def gpu_configs(block_d: int, dtype: torch.dtype) -> AttentionConfigs:
    """A small fixed set of configurations for H100/H200 (no autotuning), keyed on the padded head dim and dtype.

    Chosen so that no kernel spills registers (compiled ahead of time with ptxas for sm_90 with Triton 3.6 and 3.9)
    except the float32 forward with head dim 128 (a few spilled words); not yet tuned by timing on a GPU.
    """
    if dtype == torch.float32:  # twice the bytes per element, and tf32x3 dots need three times the operands
        if block_d <= 32:
            return AttentionConfigs(
                fwd=KernelConfig(64, 32, 4, 2), probs=KernelConfig(64, 32, 4, 2), preprocess=KernelConfig(64, 64),
                dkdv=KernelConfig(16, 32, 4, 2), dq=KernelConfig(32, 16, 4, 2),
            )
        if block_d <= 64:
            return AttentionConfigs(
                fwd=KernelConfig(64, 32, 4, 2), probs=KernelConfig(64, 32, 4, 2), preprocess=KernelConfig(64, 64),
                dkdv=KernelConfig(16, 32, 4, 2), dq=KernelConfig(32, 32, 8, 2),
            )
        return AttentionConfigs(
            fwd=KernelConfig(64, 16, 4, 2), probs=KernelConfig(64, 32, 4, 2), preprocess=KernelConfig(64, 64),
            dkdv=KernelConfig(16, 16, 4, 1), dq=KernelConfig(16, 32, 4, 2),
        )
    if block_d <= 64:
        return AttentionConfigs(
            fwd=KernelConfig(128, 64, 8, 3), probs=KernelConfig(64, 64, 4, 2), preprocess=KernelConfig(128, 64),
            dkdv=KernelConfig(32, 128, 8, 2), dq=KernelConfig(128, 64, 8, 2),
        )
    return AttentionConfigs(
        fwd=KernelConfig(128, 64, 8, 2), probs=KernelConfig(64, 64, 4, 2), preprocess=KernelConfig(64, 64),
        dkdv=KernelConfig(32, 64, 8, 2), dq=KernelConfig(128, 64, 8, 2),
    )


def _configs(device: torch.device, block_d: int, dtype: torch.dtype) -> AttentionConfigs:
    if device.type == "cuda":
        return gpu_configs(block_d, dtype)
    return _INTERPRETER_CONFIGS


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


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _key_padding(key_padding_mask, batch, seq, device):
    """``(mask as uint8 [B, N] or a dummy, kv_end int32 [B] or a dummy, strides)``; kv_end = 1 + last kept key."""
    if key_padding_mask is None:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return dummy, dummy, (0, 0)
    keep = key_padding_mask.view(torch.uint8)  # bool -> uint8 view, no copy
    positions = torch.arange(1, seq + 1, dtype=torch.int32, device=device)
    kv_end = (keep.to(torch.int32) * positions).amax(dim=-1).to(torch.int32)  # [B], 0 if no key is kept
    return keep, kv_end, (keep.stride(0), keep.stride(1))


def _forward(q, k, v, mask_bh, key_padding_mask, causal, scale, return_probs, store_unmasked):
    """Launch ``_attn_fwd`` (and ``_attn_probs``). Returns ``(out, out_unmasked or None, lse, entropy, max_prob,
    probs or None)``; ``mask_bh`` is None or float32 contiguous ``[B, H]``."""
    batch, heads, seq, head_dim = q.shape
    block_d = _block_d(head_dim)
    cfg = _configs(q.device, block_d, q.dtype)
    precision = _dot_precision(q.dtype)
    qk_scale = scale * _LOG2E
    keep, kv_end, (stride_pb, stride_pn) = _key_padding(key_padding_mask, batch, seq, q.device)
    has_mask = mask_bh is not None
    out = torch.empty_like(q)  # q's layout where dense (e.g. [B, N, H, D] underneath): free transpose later
    out_u = torch.empty_like(out) if (has_mask and store_unmasked) else None
    # three separate tensors (not views of one): callers may modify the statistics in place
    lse, entropy, max_prob = (torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device) for _ in range(3))
    dummy = out
    grid = (triton.cdiv(seq, cfg.fwd.block_m), batch * heads)
    _attn_fwd[grid](
        q, k, v, mask_bh if has_mask else dummy, keep, kv_end, out, out_u if out_u is not None else dummy,
        lse, entropy, max_prob,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_pb, stride_pn,
        heads, seq, qk_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.fwd.block_m, BLOCK_N=cfg.fwd.block_n,
        CAUSAL=causal, HAS_KEY_PAD=key_padding_mask is not None, HAS_HEAD_MASK=has_mask,
        STORE_UNMASKED=out_u is not None, DOT_PRECISION=precision,
        num_warps=cfg.fwd.num_warps, num_stages=cfg.fwd.num_stages,
    )
    probs = None
    if return_probs:
        probs = torch.empty((batch, heads, seq, seq), dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(seq, cfg.probs.block_m), triton.cdiv(seq, cfg.probs.block_n), batch * heads)
        _attn_probs[grid](
            q, k, keep, kv_end, lse, probs,
            *q.stride(), *k.stride(), stride_pb, stride_pn, probs.stride(1), probs.stride(2),
            heads, seq, qk_scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.probs.block_m, BLOCK_N=cfg.probs.block_n,
            CAUSAL=causal, HAS_KEY_PAD=key_padding_mask is not None, DOT_PRECISION=precision,
            num_warps=cfg.probs.num_warps, num_stages=cfg.probs.num_stages,
        )
    return out, out_u, lse, entropy, max_prob, probs


def _backward(grad_out, q, k, v, o_saved, lse, mask_bh, key_padding_mask, causal, scale, o_is_unmasked,
              need_dq, need_dkdv):
    """Launch the backward kernels. Returns ``(dq, dk, dv, row_dot)``; ``row_dot [B, H, N]`` float32 holds
    ``rowsum(dO * P V)`` when ``o_is_unmasked`` (for the head-mask gradient), else None."""
    batch, heads, seq, head_dim = q.shape
    block_d = _block_d(head_dim)
    cfg = _configs(q.device, block_d, q.dtype)
    precision = _dot_precision(q.dtype)
    has_mask = mask_bh is not None
    keep, kv_end, (stride_pb, stride_pn) = _key_padding(key_padding_mask, batch, seq, q.device)
    # -- stage 1: Delta (and the per-row head-mask gradient)
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    row_dot = torch.empty_like(delta) if o_is_unmasked else None
    grid = (triton.cdiv(seq, cfg.preprocess.block_m), batch * heads)
    _attn_bwd_preprocess[grid](
        o_saved, grad_out, mask_bh if has_mask else delta, delta, row_dot if row_dot is not None else delta,
        *o_saved.stride(), *grad_out.stride(),
        heads, seq,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.preprocess.block_m,
        SCALE_BY_HEAD_MASK=o_is_unmasked,
    )
    dq = dk = dv = None
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_KEY_PAD=key_padding_mask is not None,
                  HAS_HEAD_MASK=has_mask, DOT_PRECISION=precision)
    mask_arg = mask_bh if has_mask else delta
    # -- stage 2: dK, dV
    if need_dkdv:
        dk = torch.empty_like(k)
        dv = torch.empty_like(dk)  # dK and dV share strides in the kernel
        grid = (triton.cdiv(seq, cfg.dkdv.block_n), batch * heads)
        _attn_bwd_dkdv[grid](
            q, k, v, grad_out, mask_arg, keep, kv_end, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
            stride_pb, stride_pn,
            heads, seq, scale * _LOG2E, scale,
            BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **common,
            num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages,
        )
    # -- stage 3: dQ
    if need_dq:
        dq = torch.empty_like(q)
        grid = (triton.cdiv(seq, cfg.dq.block_m), batch * heads)
        _attn_bwd_dq[grid](
            q, k, v, grad_out, mask_arg, keep, kv_end, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            stride_pb, stride_pn,
            heads, seq, scale * _LOG2E, scale,
            BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, **common,
            num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
        )
    return dq, dk, dv, row_dot


# ----------------------------------------------------------------------------------------------------------
# Public function and autograd
# ----------------------------------------------------------------------------------------------------------


def attention_triton(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None,
                     return_probs=False):
    """Fused Triton attention; same contract as :func:`fastbertology.kernels.attention`.

    Args:
        q, k, v: ``[B, H, N, D]``, float32/float16/bfloat16, ``D <= 128`` (otherwise :func:`attention_torch`), CUDA (or
            CPU under ``TRITON_INTERPRET=1``), any strides (read in place, never copied).
        head_mask: ``[H]`` or ``[B, H]`` floats, or None; multiplies each head's output. Differentiable.
        key_padding_mask: bool ``[B, N]`` (True = keep the key), any pattern, or None.
        causal: query i sees keys j <= i.
        scale: softmax scale, default ``D ** -0.5``.
        return_probs: also return ``stats.probs`` ``[B, H, N, N]`` float32 (before the head mask).

    Returns:
        ``out [B, H, N, D]`` (input dtype, with the memory layout of ``q`` where ``q`` is dense) and
        :class:`AttentionStats` with ``lse, entropy, max_prob`` ``[B, H, N]`` float32 (before the head mask, no
        gradient) and ``probs`` (or None).

    Tensors are saved for backward only when one of q, k, v, head_mask requires grad (and grad mode is on); the
    unmasked ``P V`` (one extra ``[B, H, N, D]`` tensor) is kept only when the head-mask gradient is needed.
    """
    batch, heads, seq, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or head_dim > MAX_HEAD_DIM or q.numel() == 0:
        if head_dim > MAX_HEAD_DIM:
            warnings.warn(f"head dim {head_dim} > {MAX_HEAD_DIM}: the Triton kernels are not built for it; "
                          "using the PyTorch backend", stacklevel=2)
        return attention_torch(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=causal,
                               scale=scale, return_probs=return_probs)
    _check_device(q)
    if batch * heads > _MAX_GRID_Y:
        raise ValueError(f"batch * heads = {batch * heads} exceeds {_MAX_GRID_Y}; split the batch")
    scale = head_dim**-0.5 if scale is None else float(scale)
    grad_on = torch.is_grad_enabled()
    qkv_grad = grad_on and (q.requires_grad or k.requires_grad or v.requires_grad)
    mask_grad = grad_on and head_mask is not None and head_mask.requires_grad
    if not (qkv_grad or mask_grad):
        mask_bh = _mask_bh(head_mask, batch, heads)
        out, _, lse, entropy, max_prob, probs = _forward(q, k, v, mask_bh, key_padding_mask, causal, scale,
                                                         return_probs, store_unmasked=False)
    else:
        out, lse, entropy, max_prob, probs = _TritonAttention.apply(q, k, v, head_mask, key_padding_mask, causal,
                                                                    scale, return_probs, mask_grad)
    return out, AttentionStats(lse=lse, entropy=entropy, max_prob=max_prob, probs=probs)


def _mask_bh(head_mask, batch, heads):
    """None, or the head mask as float32 contiguous ``[B, H]`` (detached)."""
    if head_mask is None:
        return None
    return expand_head_mask(head_mask.detach(), batch, heads).to(torch.float32).contiguous()


class _TritonAttention(torch.autograd.Function):
    """Autograd wrapper: inputs ``q, k, v [B, H, N, D]``, ``head_mask [H] | [B, H] | None``; outputs ``out``
    and the non-differentiable ``lse, entropy, max_prob`` (and ``probs`` or None)."""

    @staticmethod
    def forward(ctx, q, k, v, head_mask, key_padding_mask, causal, scale, return_probs, mask_grad):
        batch, heads = q.shape[:2]
        mask_bh = _mask_bh(head_mask, batch, heads)
        out, out_u, lse, entropy, max_prob, probs = _forward(q, k, v, mask_bh, key_padding_mask, causal, scale,
                                                             return_probs, store_unmasked=mask_grad)
        o_saved = out_u if out_u is not None else out  # P V when the head-mask gradient is needed, else out
        ctx.save_for_backward(q, k, v, o_saved, lse, mask_bh, key_padding_mask)
        ctx.causal, ctx.scale, ctx.o_is_unmasked = causal, scale, out_u is not None
        ctx.head_mask_shape = None if head_mask is None else (head_mask.dim(), head_mask.dtype)
        # one call: a second mark_non_differentiable would replace the first
        ctx.mark_non_differentiable(*(t for t in (lse, entropy, max_prob, probs) if t is not None))
        return out, lse, entropy, max_prob, probs

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        q, k, v, o_saved, lse, mask_bh, key_padding_mask = ctx.saved_tensors
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        if grad_out is None:
            return (None,) * 9
        dq, dk, dv, row_dot = _backward(grad_out, q, k, v, o_saved, lse, mask_bh, key_padding_mask, ctx.causal,
                                        ctx.scale, ctx.o_is_unmasked, need_dq=need_q, need_dkdv=need_k or need_v)
        grad_mask = None
        if need_mask and row_dot is not None:
            grad_mask = row_dot.sum(dim=-1)  # [B, H], deterministic reduction over query rows
            dim, dtype = ctx.head_mask_shape
            if dim == 1:
                grad_mask = grad_mask.sum(dim=0)  # [H]
            grad_mask = grad_mask.to(dtype)
        return (dq if need_q else None, dk if need_k else None, dv if need_v else None, grad_mask,
                None, None, None, None, None)


__all__ = ["attention_triton", "gpu_configs", "AttentionConfigs", "KernelConfig", "FP32_DOT_PRECISION", "MAX_HEAD_DIM"]

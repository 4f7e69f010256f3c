"""Yardstick for the kernel report: a minimal attention forward with the entropy accumulator, no masks at all.

It computes, for one head, ``out = softmax(scale * Q K^T) V`` and per query row the log-sum-exp and the entropy
of the softmax, in one pass over the keys with an online softmax, the way a tutorial-style FlashAttention forward
does it; only what the statistics need is added:

* the ``Q`` block ``[BLOCK_M, HEAD_DIM]`` stays in registers; each iteration loads one ``K`` and one ``V`` block;
* scores are kept in base 2: ``t = s * qk_scale`` with ``qk_scale = scale * log2(e)`` folded in, so that
  ``exp(scale * s - m) = exp2(t - m2)`` (one FFMA for the scale and the max subtraction, then ``exp2``);
* per row it keeps the running max ``m``, ``l = sum_j exp2(t_j - m)`` and ``u = sum_j exp2(t_j - m) (t_j - m)``.
  When the max moves from ``m_old`` to ``m_new`` (``alpha = exp2(m_old - m_new)``), every old term changes by
  the factor ``alpha`` and its shift ``t_j - m`` grows by ``m_old - m_new``, hence
  ``u <- alpha * (u + (m_old - m_new) * l_old) + sum_j p_j (t_j - m_new)`` and ``l <- alpha * l_old + sum_j p_j``.
  The shift ``t_j - m_new`` is the ``exp2`` argument itself: the entropy costs one multiply-add per score;
* at the end ``lse = ln2 * (m + log2 l)`` and ``entropy = ln2 * (log2 l - u / l)`` (natural units: the
  entropy ``-sum_j p_j ln p_j = ln l - sum_j e_j (s_j - m) / l`` with ``e_j = exp(s_j - m)``).

``m`` starts at a finite sentinel (``-1e30``) instead of ``-inf``: the first update then gives ``alpha = 0`` and
``(m_old - m_new) * l_old = 0`` with no ``inf * 0``. There is no mask of any kind: the sequence length must be a
multiple of ``BLOCK_M`` and ``BLOCK_N``, the head dim a power of two >= 16.

This kernel is a measuring stick for ``benchmarks/kernel_report.py`` (instructions per key-block iteration), not
part of the library; :func:`yardstick_attention` launches it (on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1``) so that its results can be checked against a reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _yardstick_attn_fwd(Q, K, V, Out, Lse, Ent,
                        stride_bh, stride_n, N, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of ``BLOCK_M`` queries of one (example, head); grid ``(N // BLOCK_M, B * H)``.

    Q, K, V, Out ``[B * H, N, HEAD_DIM]`` with strides ``(stride_bh, stride_n, 1)``; Lse, Ent ``[B * H, N]``
    float32 contiguous. ``qk_scale`` = softmax scale * log2(e).
    """
    LN2: tl.constexpr = 0.6931471805599453
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + head * stride_bh + rows[:, None] * stride_n + dims[None, :])
    k_ptrs = K + head * stride_bh + cols[None, :] * stride_n + dims[:, None]  # K^T block [HEAD_DIM, BLOCK_N]
    v_ptrs = V + head * stride_bh + cols[:, None] * stride_n + dims[None, :]  # V block [BLOCK_N, HEAD_DIM]

    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite sentinel: no inf * 0 at the first update
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for _ in range(0, N, BLOCK_N):
        scores = tl.dot(q, tl.load(k_ptrs))  # [BLOCK_M, BLOCK_N], float32
        m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
        shifted = scores * qk_scale - m_new[:, None]  # base-2 score minus the new max: the exp2 argument
        p = tl.exp2(shifted)
        alpha = tl.exp2(m - m_new)
        u = alpha * (u + (m - m_new) * l) + tl.sum(p * shifted, 1)
        l = alpha * l + tl.sum(p, 1)
        acc = tl.dot(p.to(Q.dtype.element_ty), tl.load(v_ptrs), acc * alpha[:, None])
        m = m_new
        k_ptrs += BLOCK_N * stride_n
        v_ptrs += BLOCK_N * stride_n

    log2_l = tl.log2(l)
    out = acc / l[:, None]
    tl.store(Out + head * stride_bh + rows[:, None] * stride_n + dims[None, :], out.to(Out.dtype.element_ty))
    tl.store(Lse + head * N + rows, (m + log2_l) * LN2)
    tl.store(Ent + head * N + rows, (log2_l - u / l) * LN2)


def yardstick_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 16,
                        block_n: int = 16, num_warps: int = 4, num_stages: int = 2):
    """Run the yardstick on contiguous ``[B, H, N, D]`` tensors (scale ``D ** -0.5``, no mask).

    Returns ``(out [B, H, N, D]`` in the input dtype, ``lse [B, H, N]``, ``entropy [B, H, N]`` float32); ``N``
    must be a multiple of both block sizes and ``D`` a power of two >= 16.
    """
    batch, heads, seq, head_dim = q.shape
    if seq % block_m or seq % block_n:
        raise ValueError(f"N = {seq} must be a multiple of the blocks ({block_m}, {block_n}): no masks here")
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    lse, entropy = (torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device) for _ in range(2))
    qk_scale = head_dim**-0.5 * math.log2(math.e)
    grid = (seq // block_m, batch * heads)
    _yardstick_attn_fwd[grid](q, k, v, out, lse, entropy, q.stride(1), q.stride(2), seq, qk_scale,
                              HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                              num_warps=num_warps, num_stages=num_stages)
    return out, lse, entropy

"""Fused masked multi-head attention with per-head statistics, in Triton.

:func:`attention_triton` implements the contract of :func:`fastbertology.kernels.attention` (see
``fastbertology_kernels/__init__.py``), for padded batches ``[B, H, N, D]`` and for packed sequences ``[1, H, T, D]``
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
    import triton  # noqa: F401 - a clear error here when triton is missing (the kernels import it too)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Triton attention backend needs triton (pip install triton, or a CUDA build of torch that ships it); "
        "use backend='torch' otherwise"
    ) from error

from .common import AttentionStats, Packing, check_inputs, check_output_layout
from .modifiers import ScoreModifiers, check_modifiers, refuse_modifier_gradients
from .reference import expand_head_mask
from .torch_attention import attention_torch
from .triton_backward import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .triton_configs import AttentionConfigs, KernelConfig, configs_for, gpu_configs
from .triton_forward import _attn_fwd, _attn_probs

# Input precision of tl.dot for float32 inputs: "tf32x3" (three TF32 tensor-core products, close to float32
# accuracy) or "ieee" (true float32 FMA, slower). The environment variable overrides it (read at import).
FP32_DOT_PRECISION = os.environ.get("FASTBERTOLOGY_FP32_DOT_PRECISION", "tf32x3")
_LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128  # larger head dims go to attention_torch (shared memory and registers)
_MAX_GRID_Y = 65535  # CUDA limit on the second grid dimension, which holds sequences * heads
# Heads whose |mask| is below this get their mask gradient from the exact P (dO . V) sum instead of Delta / mask.
_SMALL_MASK = 1.0 / 64
_MASKED_SCORE = -1.0e30  # the kernels' score of a key a query may not see (base 2)

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
    """The power of two >= ``head_dim``, at least 16 (tl.dot needs K >= 16), in plain Python: on the host,
    ``triton.next_power_of_2`` is a constexpr function that costs microseconds per call."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _bhnd_strides(t: torch.Tensor, heads_last: bool) -> tuple[int, int, int, int]:
    """The strides of ``t`` read as ``[B, H, N, D]``: ``t`` itself, or (``heads_last``) ``t`` ``[B, N, H, D]``."""
    stride = t.stride()
    return (stride[0], stride[2], stride[1], stride[3]) if heads_last else stride


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


class _KernelModifiers:
    """The score modifiers as the kernels take them (see :func:`~fastbertology.kernels.triton_blocks.
    _modified_scores`): float32 base-2 copies of the table (``-inf`` clamped to the masked score), slopes and sinks,
    ``bias_span`` M, ``cap_in = scale / softcap``, ``cap_out = softcap * log2(e)``, and the constexpr switches.
    Unused pointers are a dummy and unused numbers 1 (so that the kernels without a modifier compile as before)."""

    def __init__(self, modifiers: ScoreModifiers, scale: float, dummy: torch.Tensor):
        def base2(t):
            return None if t is None else (t.detach().to(torch.float32) * _LOG2E).clamp(min=_MASKED_SCORE).contiguous()

        self.modifiers = modifiers
        self.table, self.slopes, self.sinks = (base2(t) for t in (modifiers.relative_bias, modifiers.alibi_slopes,
                                                                  modifiers.sinks))
        self.bias_span = modifiers.bias_span if self.table is not None else 1
        softcap = modifiers.softcap
        self.cap_in, self.cap_out = (scale / softcap, softcap * _LOG2E) if softcap is not None else (1.0, 1.0)
        self.dummy = dummy

    def args(self, sinks: bool = False) -> tuple:
        """``(Bias, Slopes[, Sinks], bias_span, cap_in, cap_out)`` kernel arguments."""
        pointers = [self.table, self.slopes] + ([self.sinks] if sinks else [])
        pointers = [self.dummy if t is None else t for t in pointers]
        return (*pointers, self.bias_span, self.cap_in, self.cap_out)

    def flags(self, sinks: bool = False) -> dict:
        flags = dict(SOFTCAP=self.modifiers.softcap is not None, BIAS=self.table is not None,
                     ALIBI=self.slopes is not None)
        if sinks:
            flags["SINKS"] = self.sinks is not None
        return flags


def _configs(q: torch.Tensor, layout: _Layout, causal: bool, mods: _KernelModifiers) -> AttentionConfigs:
    return configs_for(q.device, _block_d(q.shape[3]), q.dtype, max_seqlen=layout.longest, causal=causal,
                       bias_table=mods.table is not None)


def _forward(q, k, v, mask_sh, layout: _Layout, causal, scale, return_probs, mods: _KernelModifiers | None = None,
             heads_last: bool = False):
    """Launch ``_attn_fwd`` (and ``_attn_probs``). Returns ``(out, lse, entropy, max_prob, probs or None)``;
    ``mask_sh`` is None or float32 contiguous ``[S, H]``; ``k, v`` have ``H / group`` heads; ``mods``: the score
    modifiers (None: none); ``out`` is ``[B, H, N, D]``, or with ``heads_last`` a new contiguous ``[B, N, H, D]``
    (what a transformers attention function returns: no transpose, no copy after the call)."""
    mods = mods or _KernelModifiers(ScoreModifiers(), scale, layout.dummy)
    batch, heads, seq, head_dim = q.shape
    group = heads // k.shape[1]
    block_d = _block_d(head_dim)
    cfg = _configs(q, layout, causal, mods)
    precision = _dot_precision(q.dtype)
    qk_scale = scale * _LOG2E
    has_mask = mask_sh is not None
    if heads_last:
        out = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    else:
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
        *q.stride(), *k.stride(), *v.stride(), *_bhnd_strides(out, heads_last), *layout.pad_strides,
        heads, seq, group, layout.window_arg, qk_scale, *mods.args(sinks=True),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.fwd.block_m, BLOCK_N=cfg.fwd.block_n,
        CAUSAL=causal, VARLEN=layout.varlen, HAS_KEY_PAD=layout.has_key_pad, HAS_HEAD_MASK=has_mask,
        WINDOW=layout.has_window, DOT_PRECISION=precision, **mods.flags(sinks=True), **cfg.fwd.launch_options(),
    )
    probs = None
    if return_probs:  # padded batches only (checked by check_inputs)
        probs = torch.empty((batch, heads, seq, seq), dtype=q.dtype, device=q.device)
        grid = (_cdiv(seq, cfg.probs.block_m), _cdiv(seq, cfg.probs.block_n), batch * heads)
        _attn_probs[grid](
            q, k, mask_sh if has_mask else lse, key_pad, kv_end, lse, probs,
            *q.stride(), *k.stride(), *layout.pad_strides, probs.stride(1), probs.stride(2),
            heads, seq, group, layout.window_arg, qk_scale, *mods.args(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.probs.block_m, BLOCK_N=cfg.probs.block_n,
            CAUSAL=causal, HAS_KEY_PAD=layout.has_key_pad, HAS_HEAD_MASK=has_mask, WINDOW=layout.has_window,
            DOT_PRECISION=precision, **mods.flags(), **cfg.probs.launch_options(),
        )
    return out, lse, entropy, max_prob, probs


def _backward(grad_out, q, k, v, out, lse, mask_sh, layout: _Layout, causal, scale, need_dq, need_dkdv, need_mask,
              mods: _KernelModifiers | None = None, heads_last: bool = False):
    """Launch the backward kernels. Returns ``(dq, dk, dv, mask_partials)``: ``mask_partials [S, H, blocks]``
    float32 (the head-mask gradient is their sum over the last dim) or None; ``dk, dv`` have the shape of ``k, v``
    (``H / group`` heads). ``out`` and ``grad_out`` are ``[B, N, H, D]`` with ``heads_last``."""
    mods = mods or _KernelModifiers(ScoreModifiers(), scale, layout.dummy)
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    block_d = _block_d(head_dim)
    cfg = _configs(q, layout, causal, mods)
    precision = _dot_precision(q.dtype)
    has_mask = mask_sh is not None
    need_mask = need_mask and has_mask
    key_pad, kv_end, cu_seqlens = layout.pointers()
    rows = layout.sequences * heads
    mask_arg = mask_sh if has_mask else lse
    out_strides, grad_strides = _bhnd_strides(out, heads_last), _bhnd_strides(grad_out, heads_last)
    # -- stage 1: Delta / mask, lse * log2(e) (for dK, dV; the second half of delta's buffer, lse2_at further on),
    #    and the head-mask gradient of heads whose mask is not small
    delta = torch.empty((1 + need_dkdv) * batch * heads * seq, dtype=torch.float32, device=q.device)
    lse2_at = batch * heads * seq
    pre_blocks = _cdiv(layout.longest, cfg.preprocess.block_m)
    dq_blocks = _cdiv(layout.longest, cfg.dq.block_m)
    # the head-mask gradient's per-program partial sums: [rows, pre_blocks | dq_blocks], every slot written by its
    # program (no zero fill), one reduction at the end
    partials = torch.empty((layout.sequences, heads, pre_blocks + dq_blocks), dtype=torch.float32,
                           device=q.device) if need_mask else delta  # row s * H + h of [rows, slots] is [s, h]
    slots = pre_blocks + dq_blocks
    _attn_bwd_preprocess[(pre_blocks, rows)](
        out, grad_out, mask_arg, kv_end, cu_seqlens, lse, delta, partials, *out_strides, *grad_strides,
        heads, seq, lse2_at, slots, _SMALL_MASK,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.preprocess.block_m, VARLEN=layout.varlen,
        HAS_HEAD_MASK=has_mask, MASK_GRAD=need_mask, WRITE_LSE2=need_dkdv,
    )
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=layout.varlen,
                  HAS_KEY_PAD=layout.has_key_pad, HAS_HEAD_MASK=has_mask, WINDOW=layout.has_window,
                  DOT_PRECISION=precision, **mods.flags())
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
            q, k, v, grad_out, mask_arg, key_pad, kv_end, cu_seqlens, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_strides, *dk.stride(), *layout.pad_strides,
            heads, seq, group, layout.window_arg, scale * _LOG2E, scale, lse2_at, *mods.args(),
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
            dq if dq is not None else q, partials if need_mask else lse,
            *q.stride(), *k.stride(), *v.stride(), *grad_strides, *(dq if dq is not None else q).stride(),
            *layout.pad_strides,
            heads, seq, group, layout.window_arg, scale * _LOG2E, scale, slots, pre_blocks, _SMALL_MASK,
            *mods.args(),
            BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, COMPUTE_DQ=need_dq, MASK_GRAD=need_mask, **common,
            **cfg.dq.launch_options(),
        )
    mask_grad = partials if need_mask else None
    return dq, dk, dv, mask_grad


# ----------------------------------------------------------------------------------------------------------
# Public function and autograd
# ----------------------------------------------------------------------------------------------------------


def attention_triton(q, k, v, *, head_mask=None, key_padding_mask=None, causal=False, scale=None,
                     return_probs=False, packing: Packing | None = None, window: int | None = None,
                     relative_bias=None, alibi_slopes=None, softcap=None, sinks=None, output_layout="bhnd"):
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
        output_layout: ``"bhnd"`` (``out [B, H, N, D]``) or ``"bnhd"`` (a contiguous ``[B, N, H, D]``, written so
            by the kernel: no transpose op, no copy).

    Returns:
        ``out`` (input dtype; ``"bhnd"``: with the memory layout of ``q`` where ``q`` is dense) and
        :class:`AttentionStats`
        with ``lse, entropy, max_prob`` float32 (before the head mask, no gradient) and ``probs`` (or None).

    Tensors are saved for backward only when one of q, k, v, head_mask requires grad (and grad mode is on).
    """
    batch, heads, seq, head_dim = check_inputs(q, k, v, head_mask, key_padding_mask, causal, packing, return_probs,
                                               window)
    heads_last = check_output_layout(output_layout)
    longest = packing.max_seqlen if packing is not None else seq
    modifiers = check_modifiers(relative_bias, alibi_slopes, softcap, sinks, q, heads, longest)
    refuse_modifier_gradients(modifiers, "triton")
    window = None if window is None else int(window)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or head_dim > MAX_HEAD_DIM or q.numel() == 0 \
            or not scale > 0:
        if head_dim > MAX_HEAD_DIM:
            warnings.warn(f"head dim {head_dim} > {MAX_HEAD_DIM}: the Triton kernels are not built for it; "
                          "using the PyTorch backend", stacklevel=2)
        out, stats = attention_torch(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=causal,
                                     scale=scale, return_probs=return_probs, packing=packing, window=window,
                                     **modifiers._asdict())
        return (out.transpose(1, 2) if heads_last else out), stats
    _check_device(q)
    if batch * heads > _MAX_GRID_Y:
        raise ValueError(f"sequences * heads = {batch * heads} exceeds {_MAX_GRID_Y}; split the batch")
    layout = _Layout(q, key_padding_mask, packing, window)
    mods = _KernelModifiers(modifiers, scale, layout.dummy)
    sinks = modifiers.sinks
    grad_on = torch.is_grad_enabled()
    needs_grad = grad_on and (q.requires_grad or k.requires_grad or v.requires_grad
                              or (head_mask is not None and head_mask.requires_grad)
                              or (sinks is not None and sinks.requires_grad))
    if not needs_grad:
        out, lse, entropy, max_prob, probs = _forward(q, k, v, _mask_sh(head_mask, batch, heads), layout, causal,
                                                      scale, return_probs, mods, heads_last)
    else:
        out, lse, entropy, max_prob, probs = _TritonAttention.apply(q, k, v, head_mask, sinks, layout, causal, scale,
                                                                    return_probs, mods, heads_last)
    return out, AttentionStats(lse=lse, entropy=entropy, max_prob=max_prob, probs=probs)


def _mask_sh(head_mask, sequences, heads):
    """None, or the head mask as float32 contiguous ``[S, H]`` (the kernels only read it: no ``detach`` needed, in
    the autograd function's forward or without gradients)."""
    if head_mask is None:
        return None
    return expand_head_mask(head_mask, sequences, heads).to(torch.float32).contiguous()


class _TritonAttention(torch.autograd.Function):
    """Autograd wrapper: inputs ``q, k, v``, ``head_mask [H] | [S, H] | None``; outputs ``out`` and the
    non-differentiable ``lse, entropy, max_prob`` (and ``probs`` or None)."""

    @staticmethod
    def forward(ctx, q, k, v, head_mask, sinks, layout, causal, scale, return_probs, mods, heads_last):
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors made for them
        mask_sh = _mask_sh(head_mask, layout.sequences, q.shape[1])
        out, lse, entropy, max_prob, probs = _forward(q, k, v, mask_sh, layout, causal, scale, return_probs, mods,
                                                      heads_last)
        ctx.save_for_backward(q, k, v, out, lse, mask_sh)
        ctx.layout, ctx.causal, ctx.scale, ctx.mods, ctx.heads_last = layout, causal, scale, mods, heads_last
        ctx.head_mask_shape = None if head_mask is None else (head_mask.dim(), head_mask.dtype)
        # one call: a second mark_non_differentiable would replace the first
        ctx.mark_non_differentiable(*(t for t in (lse, entropy, max_prob, probs) if t is not None))
        return out, lse, entropy, max_prob, probs

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        q, k, v, out, lse, mask_sh = ctx.saved_tensors
        need_q, need_k, need_v, need_mask, need_sinks = ctx.needs_input_grad[:5]
        if grad_out is None:
            return (None,) * 11
        dq, dk, dv, mask_grad = (None,) * 4
        if need_q or need_k or need_v or need_mask:
            dq, dk, dv, mask_grad = _backward(grad_out, q, k, v, out, lse, mask_sh, ctx.layout, ctx.causal,
                                              ctx.scale, need_dq=need_q, need_dkdv=need_k or need_v,
                                              need_mask=need_mask, mods=ctx.mods, heads_last=ctx.heads_last)
        grad_sinks = None
        if need_sinks:  # -sum_i p_sink,i rowsum(dO * O)_i (the sink's value is zero; O already has the head mask)
            sinks = ctx.mods.modifiers.sinks
            delta = torch.linalg.vecdot(grad_out.to(torch.float32), out.to(torch.float32))  # [B, H, N] / [B, N, H]
            if ctx.heads_last:
                delta = delta.transpose(1, 2)
            sink_probs = torch.exp(sinks.detach().to(torch.float32)[None, :, None] - lse)
            grad_sinks = -(sink_probs * delta).sum(dim=(0, 2)).to(sinks.dtype)
        grad_mask = None
        if need_mask and mask_grad is not None:  # one reduction: over the blocks (and the sequences for [H])
            dim, dtype = ctx.head_mask_shape
            grad_mask = mask_grad.sum(dim=(0, 2) if dim == 1 else 2)
            if grad_mask.dtype != dtype:
                grad_mask = grad_mask.to(dtype)
        return (dq if need_q else None, dk if need_k else None, dv if need_v else None, grad_mask, grad_sinks,
                None, None, None, None, None, None)


__all__ = ["attention_triton", "gpu_configs", "AttentionConfigs", "KernelConfig", "FP32_DOT_PRECISION", "MAX_HEAD_DIM"]

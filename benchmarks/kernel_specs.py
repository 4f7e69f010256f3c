"""KERNEL SPECS: every launch of the project's Triton kernels that the launchers can pick, for the kernel report.

This is the only file that knows the kernels' arguments. Each ``*_launch(case, shape)`` function mirrors one
launch in ``kernels/triton_attention.py`` (``_forward`` / ``_backward``): the same positional arguments in the
same order (tensors as :class:`~kernel_report.Ptr` with the launcher's dtype, strides of the tensors the launcher
passes), the same constexpr keywords and the block configuration of ``gpu_configs``. When the kernels or the
launchers change, change these functions (and :data:`LAUNCHES`); ``kernel_report.py`` stays as it is.

What the launch values decide (Triton's JIT specialisation): ints equal to 1 become constants, ints divisible by 16
get a divisibility hint, so the strides matter. The tensors are laid out as transformers hands them over:
``q, k, v`` (and ``out``, ``dq``, ``dk``, ``dv``, ``dO``) ``[B, H, N, D]`` views of ``[B, N, H, D]``; the padding
mask ``[B, N]`` bool viewed as uint8; statistics ``[B, H, N]`` float32 contiguous. :class:`Shape` gives the sizes
(only their divisibility by 16 and equality to 1 matter).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(REPO), str(BENCHMARKS)):  # `kernels` as a plain package (torch + triton only), the yardstick
    if _path not in sys.path:
        sys.path.insert(0, _path)

from kernel_report import KernelSpec, Ptr  # noqa: E402
from kernels import triton_attention as ta  # noqa: E402

KERNEL_MODULE = "kernels.triton_attention"
YARDSTICK = "yardstick_attention:_yardstick_attn_fwd"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (32, 64, 128)
HEAD_MASKS = ("none", "mask", "grad")  # no head mask, a head mask without gradient, with gradient


class Case(NamedTuple):
    """One choice of the launcher: input dtype, head dim, causal, key padding mask, head mask (``HEAD_MASKS``)."""

    dtype: str
    head_dim: int
    causal: bool
    key_pad: bool
    head_mask: str


class Shape(NamedTuple):
    """Sizes behind the launch values (strides, ``H``, ``N``)."""

    batch: int = 4
    heads: int = 12
    seq: int = 512


BERT = Case("bf16", 64, causal=False, key_pad=True, head_mask="grad")  # head importance with padded batches
GPT2 = Case("bf16", 64, causal=True, key_pad=False, head_mask="grad")  # causal, head importance
QUICK_CASES = (BERT, GPT2)


def _bnhd_strides(shape: Shape, head_dim: int) -> tuple[int, int, int, int]:
    """Strides of a ``[B, N, H, D]`` tensor viewed as ``[B, H, N, D]`` (q, k, v from a projection, and
    ``empty_like`` of them)."""
    return (shape.seq * shape.heads * head_dim, head_dim, shape.heads * head_dim, 1)


def _common(case: Case, shape: Shape):
    """What every launch derives from the case: ``(torch dtype, BLOCK_D, configs, dot precision, scale, strides,
    key padding (keep pointer, kv_end pointer, stride_pb, stride_pn))``, as ``_forward`` / ``_backward`` do."""
    dtype = DTYPES[case.dtype]
    block_d = ta._block_d(case.head_dim)
    configs = ta.gpu_configs(block_d, dtype)
    precision = ta._dot_precision(dtype)
    scale = case.head_dim**-0.5
    strides = _bnhd_strides(shape, case.head_dim)
    if case.key_pad:  # the bool [B, N] mask viewed as uint8, kv_end int32 [B]
        padding = (Ptr("u8"), Ptr("i32"), shape.seq, 1)
    else:  # one int32 dummy for both, strides (0, 0)
        padding = (Ptr("i32"), Ptr("i32"), 0, 0)
    return dtype, block_d, configs, precision, scale, strides, padding


def _options(config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def fwd_launch(case: Case, shape: Shape) -> tuple:
    """``_attn_fwd`` as ``_forward`` launches it: ``(args, constexprs, options)``."""
    _, block_d, configs, precision, scale, strides, padding = _common(case, shape)
    has_mask, store_unmasked = case.head_mask != "none", case.head_mask == "grad"
    out = Ptr(case.dtype)
    stat = Ptr("fp32")
    args = (Ptr(case.dtype), Ptr(case.dtype), Ptr(case.dtype), stat if has_mask else out, padding[0], padding[1],
            out, out, stat, stat, stat, *strides, *strides, *strides, *strides, padding[2], padding[3],
            shape.heads, shape.seq, scale * ta._LOG2E)
    constexprs = dict(HEAD_DIM=case.head_dim, BLOCK_D=block_d, BLOCK_M=configs.fwd.block_m,
                      BLOCK_N=configs.fwd.block_n, CAUSAL=case.causal, HAS_KEY_PAD=case.key_pad,
                      HAS_HEAD_MASK=has_mask, STORE_UNMASKED=store_unmasked, DOT_PRECISION=precision)
    return args, constexprs, _options(configs.fwd)


def probs_launch(case: Case, shape: Shape) -> tuple:
    """``_attn_probs`` (``return_probs=True``) as ``_forward`` launches it; probabilities ``[B, H, N, N]``."""
    _, block_d, configs, precision, scale, strides, padding = _common(case, shape)
    args = (Ptr(case.dtype), Ptr(case.dtype), padding[0], padding[1], Ptr("fp32"), Ptr("fp32"),
            *strides, *strides, padding[2], padding[3], shape.seq * shape.seq, shape.seq,
            shape.heads, shape.seq, scale * ta._LOG2E)
    constexprs = dict(HEAD_DIM=case.head_dim, BLOCK_D=block_d, BLOCK_M=configs.probs.block_m,
                      BLOCK_N=configs.probs.block_n, CAUSAL=case.causal, HAS_KEY_PAD=case.key_pad,
                      DOT_PRECISION=precision)
    return args, constexprs, _options(configs.probs)


def preprocess_launch(case: Case, shape: Shape) -> tuple:
    """``_attn_bwd_preprocess`` as ``_backward`` launches it (no num_warps / num_stages: Triton's defaults)."""
    _, block_d, configs, _, _, strides, _ = _common(case, shape)
    stat = Ptr("fp32")
    args = (Ptr(case.dtype), Ptr(case.dtype), stat, stat, stat, *strides, *strides, shape.heads, shape.seq)
    constexprs = dict(HEAD_DIM=case.head_dim, BLOCK_D=block_d, BLOCK_M=configs.preprocess.block_m,
                      SCALE_BY_HEAD_MASK=case.head_mask == "grad")
    return args, constexprs, {}


def _grad_launch(case: Case, shape: Shape, config, outputs: int) -> tuple:
    """``_attn_bwd_dkdv`` (``outputs=2``: dK, dV) or ``_attn_bwd_dq`` (``outputs=1``) as ``_backward``
    launches them."""
    _, block_d, _, precision, scale, strides, padding = _common(case, shape)
    stat = Ptr("fp32")
    tensors = (Ptr(case.dtype),) * 4 + (stat, padding[0], padding[1], stat, stat) + (Ptr(case.dtype),) * outputs
    args = (*tensors, *strides * 5, padding[2], padding[3], shape.heads, shape.seq, scale * ta._LOG2E, scale)
    constexprs = dict(HEAD_DIM=case.head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      CAUSAL=case.causal, HAS_KEY_PAD=case.key_pad, HAS_HEAD_MASK=case.head_mask != "none",
                      DOT_PRECISION=precision)
    return args, constexprs, _options(config)


def dkdv_launch(case: Case, shape: Shape) -> tuple:
    """``_attn_bwd_dkdv`` as ``_backward`` launches it."""
    return _grad_launch(case, shape, _common(case, shape)[2].dkdv, outputs=2)


def dq_launch(case: Case, shape: Shape) -> tuple:
    """``_attn_bwd_dq`` as ``_backward`` launches it."""
    return _grad_launch(case, shape, _common(case, shape)[2].dq, outputs=1)


# kernel name -> launch mirror; "forward" marks the kernel compared with the yardstick
LAUNCHES = {
    "_attn_fwd": (fwd_launch, "forward"),
    "_attn_probs": (probs_launch, ""),
    "_attn_bwd_preprocess": (preprocess_launch, ""),
    "_attn_bwd_dkdv": (dkdv_launch, ""),
    "_attn_bwd_dq": (dq_launch, ""),
}


def yardstick_launch(dtype: str, head_dim: int, shape: Shape) -> tuple:
    """The yardstick with the block configuration of the project's forward for this dtype and head dim, on
    contiguous ``[B * H, N, D]`` tensors."""
    config = ta.gpu_configs(ta._block_d(head_dim), DTYPES[dtype]).fwd
    stat = Ptr("fp32")
    args = (Ptr(dtype), Ptr(dtype), Ptr(dtype), Ptr(dtype), stat, stat, shape.seq * head_dim, head_dim, shape.seq,
            head_dim**-0.5 * math.log2(math.e))
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    return args, constexprs, _options(config)


# ----------------------------------------------------------------------------------------------------------
# Spec lists
# ----------------------------------------------------------------------------------------------------------


def config_label(dtype: str, head_dim: int, constexprs: dict, options: dict) -> str:
    """``"bf16 D64 | causal key_pad | 128x64 w8 s3"``: dtype, head dim (``D48/64`` when padded to BLOCK_D), the
    boolean constexprs that are on (``HAS_`` dropped), the block sizes and warps / stages."""
    block_d = constexprs.get("BLOCK_D", head_dim)
    dims = f"D{head_dim}" if block_d == head_dim else f"D{head_dim}/{block_d}"
    flags = [name.lower().removeprefix("has_") for name, value in constexprs.items() if value is True]
    blocks = "x".join(str(constexprs[name]) for name in ("BLOCK_M", "BLOCK_N") if name in constexprs)
    launch = f"w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"
    return f"{dtype} {dims} | {' '.join(flags) or 'plain'} | {blocks} {launch}"


def all_cases(dtypes, head_dims):
    """Every :class:`Case` for these dtypes and head dims."""
    for dtype, head_dim, causal, key_pad, head_mask in itertools.product(dtypes, head_dims, (False, True),
                                                                        (False, True), HEAD_MASKS):
        yield Case(dtype, head_dim, causal, key_pad, head_mask)


def project_kernel_specs(cases, kernels=None, shape: Shape = Shape()) -> list[KernelSpec]:
    """A :class:`KernelSpec` per project kernel and case, identical launches once (e.g. ``_attn_bwd_dq`` does not
    depend on whether the head mask needs its gradient); ``kernels`` keeps the names that contain one of them."""
    specs, seen = [], set()
    for name, (launch, role) in LAUNCHES.items():
        if kernels and not any(part in name for part in kernels):
            continue
        for case in cases:
            args, constexprs, options = launch(case, shape)
            key = (name, repr(args), repr(constexprs), repr(options))
            if key in seen:
                continue
            seen.add(key)
            specs.append(KernelSpec(f"{KERNEL_MODULE}:{name}", args, constexprs, options, case.dtype, case.head_dim,
                                    config_label(case.dtype, case.head_dim, constexprs, options), role))
    return specs


def yardstick_specs(dtypes, head_dims, shape: Shape = Shape()) -> list[KernelSpec]:
    """The yardstick for the 16-bit dtypes among ``dtypes`` and the power-of-two head dims >= 16."""
    specs = []
    for dtype, head_dim in itertools.product(dtypes, head_dims):
        if dtype == "fp32" or head_dim < 16 or head_dim & (head_dim - 1):
            continue
        args, constexprs, options = yardstick_launch(dtype, head_dim, shape)
        specs.append(KernelSpec(YARDSTICK, args, constexprs, options, dtype, head_dim,
                                config_label(dtype, head_dim, constexprs, options), "yardstick"))
    return specs


def report_specs(dtypes=None, head_dims=None, kernels=None, quick=False, shape: Shape = Shape()) -> list[KernelSpec]:
    """The specs of a report: every case of ``dtypes`` x ``head_dims`` (default all: bf16/fp16/fp32, 32/64/128),
    or with ``quick`` only :data:`QUICK_CASES` among them; plus the yardstick. ``kernels`` filters by name part
    (``"yardstick"`` selects the yardstick)."""
    dtypes = list(dtypes or DTYPES)
    head_dims = list(head_dims or HEAD_DIMS)
    if quick:
        cases = [case for case in QUICK_CASES if case.dtype in dtypes and case.head_dim in head_dims]
        stick_keys = sorted({(case.dtype, case.head_dim) for case in cases})
    else:
        cases = list(all_cases(dtypes, head_dims))
        stick_keys = list(itertools.product(dtypes, head_dims))
    specs = project_kernel_specs(cases, kernels, shape)
    if not kernels or any(part in YARDSTICK for part in kernels):
        for dtype, head_dim in stick_keys:
            specs += yardstick_specs([dtype], [head_dim], shape)
    return specs

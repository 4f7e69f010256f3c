"""KERNEL SPECS: every launch of the project's Triton kernels that the launchers can pick, for the kernel report.

The launches are not written out by hand: for each :class:`Case` the real launchers (``_forward`` and ``_backward``
of ``fastbertology_kernels/triton_attention.py``) run on CPU tensors with the GPU block configurations, with every
kernel replaced by a recorder, and each recorded launch (its positional arguments, constexpr keywords and options)
becomes a :class:`~kernel_report.KernelSpec`. So the report always compiles exactly what the launchers launch;
when the kernels change, nothing here changes unless the launchers grow a new choice (a new :class:`Case` field).

What the launch values decide (Triton's JIT specialisation): ints equal to 1 become constants, ints divisible by 16
get a divisibility hint, so the strides matter. The tensors are laid out as transformers hands them over: ``q, k,
v`` and ``dO`` ``[B, H, N, D]`` views of ``[B, N, H, D]`` (packed: ``[1, H, T, D]`` views of ``[1, T, H, D]``).
:class:`Shape` gives the sizes.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
# fastbertology_kernels as a plain package (torch + triton only), and the yardstick
for _path in (str(REPO), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from kernel_compile import KernelSpec, Ptr  # noqa: E402

from fastbertology_kernels import triton_attention as ta  # noqa: E402
from fastbertology_kernels.common import Packing  # noqa: E402
from fastbertology_kernels.modifiers import ScoreModifiers  # noqa: E402

KERNEL_MODULE = "fastbertology_kernels.triton_attention"
KERNELS = ("_attn_fwd", "_attn_probs", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")
YARDSTICK = "yardstick_attention:_yardstick_attn_fwd"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (32, 64, 128)
LAYOUTS = ("packed", "padded", "dense")  # packed sequences; padded with a key padding mask; padded without one
HEAD_MASKS = ("none", "mask", "grad")  # no head mask, a head mask without gradient, with gradient
MODIFIERS = ("softcap", "bias", "alibi", "sinks")  # score modifiers (fastbertology_kernels/modifiers.py)
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
                torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class Case(NamedTuple):
    """One choice of the launchers: input dtype, head dim, causal, layout (:data:`LAYOUTS`), head mask
    (:data:`HEAD_MASKS`), grouped-query attention (``group`` query heads per key/value head; 1: multi-head), a
    sliding ``window`` (None: none; a window as long as the sequence or longer is dropped by the launchers) and
    the score ``modifiers`` (names among :data:`MODIFIERS`)."""

    dtype: str
    head_dim: int
    causal: bool
    layout: str
    head_mask: str
    group: int = 1
    window: int | None = None
    modifiers: tuple[str, ...] = ()


class Shape(NamedTuple):
    """Sizes behind the launch values: sequences, heads, and the (longest) sequence length, which also picks the
    block configuration (see ``fastbertology_kernels/triton_configs.py``)."""

    batch: int = 4
    heads: int = 12
    seq: int = 512


DEFAULT_SHAPE = Shape()

BERT = Case("bf16", 64, causal=False, layout="packed", head_mask="grad")  # head importance, padding-free
GPT2 = Case("bf16", 64, causal=True, layout="packed", head_mask="grad")  # causal, head importance
PLAIN = Case("bf16", 64, causal=False, layout="dense", head_mask="none")  # no mask of any kind: the baseline
# Mistral-like: grouped-query (4 query heads per key/value head), causal, a sliding window shorter than the sequence
MISTRAL = Case("bf16", 64, causal=True, layout="packed", head_mask="grad", group=4, window=160)
# score modifiers: Gemma 2 (soft-capping, GQA, causal window), GPT-OSS (sinks: the Mistral case with the sink in
# the forward), T5 (a bidirectional relative-position bias table)
GEMMA2 = Case("bf16", 64, causal=True, layout="packed", head_mask="grad", group=2, window=160, modifiers=("softcap",))
GPT_OSS = Case("bf16", 64, causal=True, layout="packed", head_mask="grad", group=4, window=160, modifiers=("sinks",))
T5 = Case("bf16", 64, causal=False, layout="packed", head_mask="grad", modifiers=("bias",))
QUICK_CASES = (BERT, GPT2, PLAIN, MISTRAL, GEMMA2, GPT_OSS, T5)


def feature_cases(dtype: str, head_dim: int) -> tuple[Case, ...]:
    """The grouped-query and sliding-window launches of one dtype and head dim: a GQA decoder (Llama), GQA with a
    causal window (Mistral, Qwen2, Gemma2), and a bidirectional window over a padded batch with the probabilities
    (ModernBERT-like encoders); and the score modifiers: soft-capping and sinks with GQA and a causal window
    (Gemma 2, GPT-OSS), a relative-position bias table (T5 encoders, padded with the probabilities) and ALiBi
    (BLOOM, causal)."""
    return (Case(dtype, head_dim, True, "packed", "grad", group=4),
            Case(dtype, head_dim, True, "packed", "grad", group=4, window=160),
            Case(dtype, head_dim, False, "padded", "grad", window=129),
            Case(dtype, head_dim, True, "packed", "grad", group=2, window=160, modifiers=("softcap",)),
            Case(dtype, head_dim, True, "packed", "grad", group=4, window=160, modifiers=("sinks",)),
            Case(dtype, head_dim, False, "padded", "grad", modifiers=("bias",)),
            Case(dtype, head_dim, True, "packed", "grad", modifiers=("alibi",)))


class _Recorder:
    """Stands in for a jit kernel: ``kernel[grid](*args, **kwargs)`` appends ``(name, args, kwargs)``."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


@contextlib.contextmanager
def _recording(calls: list, arch: int):
    """Inside the block the launchers record their kernel launches into ``calls`` and use the GPU configs of
    ``arch``."""
    saved = {name: getattr(ta, name) for name in (*KERNELS, "configs_for")}
    try:
        for name in KERNELS:
            setattr(ta, name, _Recorder(name, calls))
        ta.configs_for = lambda device, block_d, dtype, **options: ta.gpu_configs(block_d, dtype, arch=arch,
                                                                                  **options)
        yield
    finally:
        for name, value in saved.items():
            setattr(ta, name, value)


def _inputs(case: Case, shape: Shape):
    """``(q, k, v, dO, layout, head mask [S, H] or None)`` on the CPU, laid out as the patch hands them over (``k, v``
    with ``heads / group`` heads)."""
    dtype = DTYPES[case.dtype]
    kv_heads = shape.heads // case.group
    if case.layout == "packed":
        packing = Packing.from_lengths([shape.seq] * shape.batch)
        q, k, v, grad_out = (torch.zeros(1, packing.total, heads, case.head_dim, dtype=dtype).transpose(1, 2)
                             for heads in (shape.heads, kv_heads, kv_heads, shape.heads))
        layout = ta._Layout(q, None, packing, case.window)
    else:
        q, k, v, grad_out = (torch.zeros(shape.batch, shape.seq, heads, case.head_dim, dtype=dtype).transpose(1, 2)
                             for heads in (shape.heads, kv_heads, kv_heads, shape.heads))
        keep = None
        if case.layout == "padded":
            keep = torch.arange(shape.seq)[None, :] < torch.tensor([shape.seq, shape.seq // 2] * (shape.batch // 2)
                                                                  + [shape.seq] * (shape.batch % 2))[:, None]
        layout = ta._Layout(q, keep, None, case.window)
    mask = torch.ones(layout.sequences, shape.heads) if case.head_mask != "none" else None
    return q, k, v, grad_out, layout, mask


def _modifiers(case: Case, shape: Shape) -> ScoreModifiers:
    """The score modifiers of ``case`` (values do not matter to the compiled code, only which are present)."""
    unknown = set(case.modifiers) - set(MODIFIERS)
    if unknown:
        raise ValueError(f"unknown score modifiers {sorted(unknown)}; choose among {MODIFIERS}")
    heads = torch.zeros(shape.heads)
    return ScoreModifiers(relative_bias=torch.zeros(shape.heads, 2 * shape.seq - 1) if "bias" in case.modifiers
                          else None, alibi_slopes=heads if "alibi" in case.modifiers else None,
                          softcap=50.0 if "softcap" in case.modifiers else None,
                          sinks=heads if "sinks" in case.modifiers else None)


def recorded_launches(case: Case, shape: Shape, arch: int = 90) -> list[tuple[str, tuple, dict]]:
    """Every kernel launch of one forward (with the probabilities where the layout allows them) and backward of
    ``case`` on ``arch``, and of the backward that only needs the head-mask gradient: ``(kernel name, args,
    kwargs)``."""
    q, k, v, grad_out, layout, mask = _inputs(case, shape)
    scale = case.head_dim**-0.5
    mods = ta._KernelModifiers(_modifiers(case, shape), scale, layout.dummy)
    calls: list = []
    with _recording(calls, arch):
        out, lse, *_ = ta._forward(q, k, v, mask, layout, case.causal, scale, case.layout != "packed", mods)
        need_mask = case.head_mask == "grad"
        ta._backward(grad_out, q, k, v, out, lse, mask, layout, case.causal, scale, True, True, need_mask, mods)
        if need_mask:
            ta._backward(grad_out, q, k, v, out, lse, mask, layout, case.causal, scale, False, False, True, mods)
    return calls


_ARG_NAMES = {}


def launch_flags(name: str, args: tuple) -> list[str]:
    """Flags of a launch that its constexprs do not show: ``gqa`` (key/value heads shared by ``group > 1`` query
    heads: a runtime argument, specialised by the JIT only when it is 1)."""
    if name not in _ARG_NAMES:
        _ARG_NAMES[name] = list(inspect.signature(getattr(ta, name).fn).parameters)
    return ["gqa"] * (dict(zip(_ARG_NAMES[name], args)).get("group", 1) > 1)


def _spec_argument(value):
    if isinstance(value, torch.Tensor):
        return Ptr(TRITON_TYPES[value.dtype])
    return value


def config_label(dtype: str, head_dim: int, constexprs: dict, options: dict, extra_flags=()) -> str:
    """``"bf16 D64 | causal varlen head_mask | 128x64 w8 s3"``: dtype, head dim (``D48/64`` when padded to BLOCK_D),
    the boolean constexprs that are on (``HAS_`` dropped) and ``extra_flags`` (:func:`launch_flags`), the block
    sizes and warps / stages."""
    block_d = constexprs.get("BLOCK_D", head_dim)
    dims = f"D{head_dim}" if block_d == head_dim else f"D{head_dim}/{block_d}"
    flags = [name.lower().removeprefix("has_") for name, value in constexprs.items() if value is True]
    flags += list(extra_flags)
    blocks = "x".join(str(constexprs[name]) for name in ("BLOCK_M", "BLOCK_N") if name in constexprs)
    launch = f"w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"
    return f"{dtype} {dims} | {' '.join(flags) or 'plain'} | {blocks} {launch}"


def all_cases(dtypes, head_dims):
    """Every multi-head :class:`Case` for these dtypes and head dims, then their :func:`feature_cases`."""
    for dtype, head_dim, causal, layout, head_mask in itertools.product(dtypes, head_dims, (False, True), LAYOUTS,
                                                                       HEAD_MASKS):
        yield Case(dtype, head_dim, causal, layout, head_mask)
    for dtype, head_dim in itertools.product(dtypes, head_dims):
        yield from feature_cases(dtype, head_dim)


def project_kernel_specs(cases, kernels=None, shapes=(DEFAULT_SHAPE,), archs=(90, 80)) -> list[KernelSpec]:
    """A :class:`KernelSpec` per distinct recorded launch of the cases, per architecture (the launchers pick block
    sizes by architecture and by the longest sequence: give a shape per length bucket); ``kernels`` keeps the
    names that contain one of them."""
    specs, seen = [], set()
    for arch, shape, case in itertools.product(archs, shapes, cases):
        for name, args, kwargs in recorded_launches(case, shape, arch):
            if kernels and not any(part in name for part in kernels):
                continue
            options = {key: kwargs[key] for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
            constexprs = {key: value for key, value in kwargs.items() if key not in options}
            flags = launch_flags(name, args)
            args = tuple(_spec_argument(value) for value in args)
            key = (arch, name, repr(args), repr(constexprs), repr(options))
            if key in seen:
                continue
            seen.add(key)
            specs.append(KernelSpec(f"{KERNEL_MODULE}:{name}", args, constexprs, options, case.dtype, case.head_dim,
                                    config_label(case.dtype, case.head_dim, constexprs, options, flags),
                                    "forward" if name == "_attn_fwd" else "", arch))
    return specs


def yardstick_launch(dtype: str, head_dim: int, shape: Shape, arch: int = 90) -> tuple:
    """The yardstick with the block configuration of the project's forward for this dtype, head dim, sequence
    length and architecture, on contiguous ``[B * H, N, D]`` tensors."""
    config = ta.gpu_configs(ta._block_d(head_dim), DTYPES[dtype], max_seqlen=shape.seq, arch=arch).fwd
    stat = Ptr("fp32")
    args = (Ptr(dtype), Ptr(dtype), Ptr(dtype), Ptr(dtype), stat, stat, shape.seq * head_dim, head_dim, shape.seq,
            head_dim**-0.5 * math.log2(math.e))
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    return args, constexprs, {"num_warps": config.num_warps, "num_stages": config.num_stages}


def yardstick_specs(dtypes, head_dims, shape: Shape = DEFAULT_SHAPE, archs=(90, 80)) -> list[KernelSpec]:
    """The yardstick for the 16-bit dtypes among ``dtypes`` and the power-of-two head dims >= 16, with the long
    sequences' forward configuration of each architecture."""
    specs = []
    for arch, dtype, head_dim in itertools.product(archs, dtypes, head_dims):
        if dtype == "fp32" or head_dim < 16 or head_dim & (head_dim - 1):
            continue
        args, constexprs, options = yardstick_launch(dtype, head_dim, shape, arch)
        specs.append(KernelSpec(YARDSTICK, args, constexprs, options, dtype, head_dim,
                                config_label(dtype, head_dim, constexprs, options), "yardstick", arch))
    return specs


SHORT = Shape(seq=64)  # the short-sequence bucket of the block configurations


def report_specs(dtypes=None, head_dims=None, kernels=None, quick=False, shape: Shape = DEFAULT_SHAPE,
                 archs=(90, 80)) -> list[KernelSpec]:
    """The specs of a report for ``archs``: every case of ``dtypes`` x ``head_dims`` (default all: bf16/fp16/fp32,
    32/64/128) for ``shape`` and, unless ``quick``, for the short-sequence bucket too; or with ``quick`` only
    :data:`QUICK_CASES` among them for ``shape``; plus the yardstick. ``kernels`` filters by name part
    (``"yardstick"`` selects the yardstick)."""
    dtypes = list(dtypes or DTYPES)
    head_dims = list(head_dims or HEAD_DIMS)
    if quick:
        cases = [case for case in QUICK_CASES if case.dtype in dtypes and case.head_dim in head_dims]
        stick_keys = sorted({(case.dtype, case.head_dim) for case in cases})
    else:
        cases = list(all_cases(dtypes, head_dims))
        stick_keys = list(itertools.product(dtypes, head_dims))
    shapes = (shape,) if quick or shape.seq <= SHORT.seq else (shape, SHORT)
    specs = project_kernel_specs(cases, kernels, shapes, archs)
    if not kernels or any(part in YARDSTICK for part in kernels):
        for dtype, head_dim in stick_keys:
            specs += yardstick_specs([dtype], [head_dim], shape, archs)
    return specs

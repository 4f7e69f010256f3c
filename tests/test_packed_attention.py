"""Packed (padding-free) attention: every backend against the float64 reference, and packed == padded; with
multi-head, grouped-query and multi-query attention and sliding windows (positions within each sequence).

Packed sequences ``[1, H, T, D]`` with :class:`Packing` must give, at every real token, exactly what padded
attention over ``[S, H, max_len, D]`` with a key padding mask gives (outputs, statistics, every gradient including
the head mask's). The Triton kernels run under the interpreter on the CPU (small blocks: interior and edge key
blocks are both crossed), also with the GPU block sizes. Pass rule as in test_triton_kernels.py: the backend's
error against float64 is at most 2x (outputs) / 3x (gradients) the error of the same-dtype PyTorch computation
plus a floor of a few units in the last place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from fastbertology.kernels import Packing, attention

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# gradients: one unit roundoff (the backward reads the stored, rounded output; see tests/test_triton_kernels.py)
GRAD_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
OUTPUT_FACTOR, GRAD_FACTOR = 2.0, 3.0


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    lengths: tuple[int, ...]
    heads: int = 2
    head_dim: int = 32
    causal: bool = False
    mask: str | None = None  # None, "H", "SH" (per sequence, with a 0 and a tiny value)
    grads: str = "all"  # "all", "qkv", "mask", "none"
    kv_heads: int | None = None  # key/value heads (None: heads)
    window: int | None = None  # sliding window

    def __str__(self):
        name = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        parts = [name, "L" + ",".join(map(str, self.lengths)), f"H{self.heads}D{self.head_dim}",
                 "causal" if self.causal else "full", f"mask-{self.mask}", f"grad-{self.grads}"]
        parts += [f"kv{self.kv_heads}"] * (self.kv_heads is not None)
        parts += [f"win{self.window}"] * (self.window is not None)
        return "-".join(parts)


def _packed_inputs(case: Case, seed: int = 0, device: torch.device | str = "cpu"):
    """q, k, v, dO ``[1, H, T, D]`` (strided like transformers' views), head mask, packing; on ``device`` (float64:
    each backend casts)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(case.lengths)
    kv_heads = case.heads if case.kv_heads is None else case.kv_heads
    q, k, v, grad_out = (torch.randn(1, total, heads, case.head_dim, generator=gen, dtype=torch.float64)
                         .transpose(1, 2) for heads in (case.heads, kv_heads, kv_heads, case.heads))
    head_mask = None
    if case.mask == "H":
        head_mask = 0.5 + torch.rand(case.heads, generator=gen, dtype=torch.float64)
        head_mask[-1] = 0.0
    elif case.mask == "SH":
        head_mask = 0.5 + torch.rand(len(case.lengths), case.heads, generator=gen, dtype=torch.float64)
        head_mask[0, -1] = 0.0
        head_mask[-1, 0] = 1e-3  # below the kernels' "small mask" threshold: exact gradient path
    q, k, v, grad_out = (t.to(device) for t in (q, k, v, grad_out))
    head_mask = head_mask.to(device) if head_mask is not None else None
    return q, k, v, grad_out, head_mask, Packing.from_lengths(case.lengths, device)


def _evaluate(backend, case, q, k, v, grad_out, head_mask, packing, dtype):
    """Run one backend on copies cast to ``dtype``; return name -> tensor (float64)."""
    q, k, v, grad_out = (t.detach().to(dtype) for t in (q, k, v, grad_out))
    if head_mask is not None:
        head_mask = head_mask.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = {"q": q, "k": k, "v": v, "head_mask": head_mask}
    wanted = {"all": ["q", "k", "v", "head_mask"], "qkv": ["q", "k", "v"], "mask": ["head_mask"], "none": []}
    wanted = [name for name in wanted[case.grads] if inputs[name] is not None]
    for name in wanted:
        inputs[name].requires_grad_(True)
    with torch.set_grad_enabled(bool(wanted)):
        out, stats = attention(q, k, v, head_mask=head_mask, causal=case.causal, packing=packing, backend=backend,
                               window=case.window)
    results = {"out": out.detach(), "lse": stats.lse, "entropy": stats.entropy, "max_prob": stats.max_prob}
    if wanted:
        out.backward(grad_out.to(out.dtype))
        results.update({f"grad_{name}": inputs[name].grad for name in wanted})
    return {name: value.double() for name, value in results.items()}


def _check(backend, case, seed=0, device="cpu"):
    inputs = _packed_inputs(case, seed, device)
    exact = _evaluate("reference", case, *inputs, torch.float64)
    same_dtype = _evaluate("reference", case, *inputs, case.dtype)
    ours = _evaluate(backend, case, *inputs, case.dtype)
    assert ours.keys() == exact.keys()
    failures = []
    for name, reference in exact.items():
        mine = ours[name]
        assert mine.shape == reference.shape, name
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        error = (mine - reference).abs().max().item() if mine.numel() else 0.0
        torch_error = (same_dtype[name] - reference).abs().max().item() if mine.numel() else 0.0
        factor = GRAD_FACTOR if name.startswith("grad_") else OUTPUT_FACTOR
        scale = max(1.0, reference.abs().max().item() if mine.numel() else 1.0)
        floor = (GRAD_FLOOR if name.startswith("grad_") else FLOOR)[case.dtype]
        allowed = factor * torch_error + floor * scale
        if not error <= allowed:
            failures.append(f"{name}: error {error:.3g} > allowed {allowed:.3g} (torch {torch_error:.3g})")
    assert not failures, f"{backend} {case}: " + "; ".join(failures)


F64, F32, F16 = torch.float64, torch.float32, torch.float16
# Odd lengths, a 1-token and an empty sequence, sequences shorter and longer than the interpreter's blocks.
TORCH_CASES = [
    Case(F64, (5, 1, 0, 9, 4), mask="SH"),
    Case(F64, (5, 1, 0, 9, 4), causal=True, mask="H"),
    Case(F32, (97, 33, 1), causal=True, mask="SH", grads="qkv"),
    Case(F32, (1, 1, 1), mask="SH", grads="mask"),
    Case(F32, (40, 7), grads="none"),
    Case(F64, (5, 1, 0, 9, 4), heads=4, kv_heads=2, causal=True, mask="SH", window=3),
    Case(F32, (97, 33, 1), heads=6, kv_heads=3, mask="SH", window=17),
    Case(F32, (30, 12), heads=3, kv_heads=1, causal=True, mask="H", grads="qkv", window=40),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_torch_backend_packed(case):
    _check("torch", case)


def test_torch_backend_recomputing_probabilities(monkeypatch):
    from fastbertology.kernels import torch_attention

    monkeypatch.setattr(torch_attention, "KEEP_PROBS_ELEMENTS", 0)
    _check("torch", Case(F64, (13, 1, 7), causal=True, mask="SH"))


triton_needed = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)",
)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
interpreter_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test on CPU tensors; on CUDA test_triton_gpu.py's packed cases "
    "and test_triton_backend_packed cover the same")
TRITON_CASES = [
    Case(F32, (97, 1, 0, 33), mask="SH"),
    Case(F32, (97, 1, 0, 33), causal=True, mask="SH"),
    Case(F16, (50, 17, 3), heads=3, head_dim=64, causal=True, mask="H", grads="mask"),
    Case(F16, (31, 64, 2), head_dim=16, mask="SH", grads="qkv"),
    Case(F32, (20, 21), head_dim=48, causal=True, grads="none"),
    Case(F32, (1, 1, 1, 1), mask="SH"),
    # grouped-query (2 heads per kv head) with a causal window crossing the interpreter's 16- and 32-row blocks
    Case(F32, (97, 1, 0, 33), heads=4, kv_heads=2, causal=True, mask="SH", window=20),
    # multi-query, bidirectional window smaller than every block, fp16
    Case(F16, (50, 17, 3), heads=3, kv_heads=1, mask="SH", window=6),
]


@triton_needed
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_backend_packed(case):
    pytest.importorskip("triton")
    _check("triton", case, device=TRITON_DEVICE)


@triton_needed
def test_triton_backend_packed_gpu_blocks(monkeypatch):
    """The GPU block sizes (128-row query blocks for long sequences) on the interpreter."""
    pytest.importorskip("triton")
    from fastbertology.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "configs_for",
                        lambda device, block_d, dtype, **options: triton_attention.gpu_configs(block_d, dtype,
                                                                                               **options))
    _check("triton", Case(F32, (130, 5, 70), causal=True, mask="SH"), device=TRITON_DEVICE)
    _check("triton", Case(F32, (150, 5, 70), heads=4, kv_heads=1, causal=True, mask="SH", window=80),
           device=TRITON_DEVICE)


@triton_needed
def test_triton_mask_gradient_needs_no_zeroed_buffers(monkeypatch):
    """The head-mask gradient's per-program partial sums live in one ``torch.empty`` buffer that every program of
    the preprocess and dQ kernels writes (0 where it owns no gradient or returns early past a shorter sequence):
    with every fresh float32 buffer of the backward filled with NaN, the gradient is still exact. Sequences much
    shorter than the longest (many programs return early), a head with mask 0 and one below the small-mask
    threshold, with and without the q/k/v gradients."""
    pytest.importorskip("triton")
    from fastbertology.kernels import triton_attention

    real_empty = torch.empty

    def poisoned_empty(*size, **options):
        tensor = real_empty(*size, **options)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(triton_attention.torch, "empty", poisoned_empty)
    _check("triton", Case(F32, (70, 1, 0, 9), heads=3, causal=True, mask="SH"), device=TRITON_DEVICE)
    _check("triton", Case(F32, (70, 1, 0, 9), heads=3, mask="SH", grads="mask"), device=TRITON_DEVICE)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[triton_needed, interpreter_only])])
@pytest.mark.parametrize("kv_heads, window", [(2, None), (1, 5)])
def test_packed_equals_padded(backend, kv_heads, window):
    """The same sequences padded (key padding mask) and packed give the same values at every real token."""
    if backend == "triton":
        pytest.importorskip("triton")
    lengths = [9, 1, 17, 4]
    batch, seq, heads, dim = len(lengths), max(lengths), 2, 32
    gen = torch.Generator().manual_seed(3)
    padded = [torch.randn(batch, seq, h, dim, generator=gen).transpose(1, 2) for h in (heads, kv_heads, kv_heads)]
    keep = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    index = keep.flatten().nonzero().squeeze(1)

    def pack(t):  # [B, H, N, D] -> [1, H, T, D]
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)[index].transpose(0, 1)[None]

    head_mask = torch.rand(batch, heads, generator=gen) + 0.5
    for causal in (False, True):
        out_p, stats_p = attention(*padded, head_mask=head_mask, key_padding_mask=keep, causal=causal, backend=backend,
                                   window=window)
        out_k, stats_k = attention(*(pack(t) for t in padded), head_mask=head_mask, causal=causal,
                                   packing=Packing.from_lengths(lengths), backend=backend, window=window)
        torch.testing.assert_close(out_k, pack(out_p), atol=2e-6, rtol=0)
        for a, b in zip(stats_k[:3], stats_p[:3]):
            torch.testing.assert_close(a[0].t(), b.transpose(1, 2).reshape(batch * seq, heads)[index],
                                       atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key_padding_mask=torch.ones(1, 6, dtype=torch.bool)), "no padding"),
        (dict(return_probs=True), "not available for packed"),
        (dict(packing=Packing.from_lengths([2, 3])), "total tokens"),
        (dict(head_mask=torch.ones(3, 2)), "head_mask must have shape"),
        (dict(packing=Packing(torch.tensor([0, 2, 6]), (2, 4))), "int32"),
    ],
)
def test_packed_bad_inputs_raise(kwargs, message):
    q = torch.randn(1, 2, 6, 4)
    options = dict(packing=Packing.from_lengths([2, 4]))
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, backend="torch", **options)


def test_packing_from_lengths():
    packing = Packing.from_lengths([3, 0, 2])
    assert packing.cu_seqlens.tolist() == [0, 3, 3, 5] and packing.cu_seqlens.dtype == torch.int32
    assert (packing.total, packing.max_seqlen, packing.num_sequences, packing.starts()) == (5, 3, 3, [0, 3, 3])
    with pytest.raises(ValueError, match=">= 0"):
        Packing.from_lengths([2, -1])

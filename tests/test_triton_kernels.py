"""Triton attention kernels against the float64 reference (CPU: under TRITON_INTERPRET=1, set in conftest.py).

Pass rule (docs/design.md): for every output, statistic and gradient, the kernel's max abs error against
``attention_reference`` in float64 must be at most ``factor`` x the error of the same-dtype PyTorch computation
(``attention_reference`` run in that dtype) plus a small floor, with factor 2 for outputs/statistics/probabilities
and 3 for gradients. The floor, ``FLOOR[dtype] * max(1, max |reference|)`` (a few units in the last place), only
matters where the same-dtype PyTorch error is (near) zero, e.g. exactly representable results. Gradients get one
unit roundoff of the dtype instead (``GRAD_FLOOR``): the kernels' backward reads ``Delta = rowsum(dO * O)`` from the
output as stored (rounded to the dtype, as FlashAttention does), which the PyTorch backward does not; with a single
key, where ``dQ`` and ``dK`` are exactly 0 for PyTorch, that rounding is all the error there is (seen on an H200:
bf16, N = 1, dQ off by 1.8e-3).

The interpreter is slow, so the cases below are chosen to cover the options (dtype, head dim 32/64 and a padded
48, N in 1/7/97/130, custom scale, causal, prefix/general/empty key padding, [H]/[B, H] head masks with zeros and
fractions, which inputs need gradients, non-contiguous inputs, the GPU block sizes; grouped-query attention with
groups of 1, 2, 3 and all heads (multi-query); sliding windows smaller than, between and larger than the
interpreter's 16- and 32-row blocks, causal and bidirectional; head-mask values below 1/64) without taking their
cartesian product.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)",
)

from fastbertology.kernels import attention, attention_reference, attention_torch  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
GRAD_FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
OUTPUT_FACTOR, GRAD_FACTOR = 2.0, 3.0


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool = False
    padding: str | None = None  # None, "prefix", "prefix_empty" (one example without keys), "general"
    mask: str | None = None  # None, "H", "BH"
    grads: str = "all"  # "all", "qkv" (head mask without grad), "mask" (only head mask), "none" (no_grad)
    strided: bool = False  # q, k, v (and dO) as transposes of [B, N, H, D]
    gpu_blocks: bool = False  # use the GPU block sizes (on the interpreter)
    probs: bool = True
    scale: float | None = None  # softmax scale, default D ** -0.5
    kv_heads: int | None = None  # key/value heads, dividing heads (None: heads)
    window: int | None = None  # sliding window
    tiny: bool = False  # one head-mask value below the kernels' 1/64 threshold (exact mask-gradient path)

    def __str__(self):
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        parts = [name, f"B{self.batch}H{self.heads}N{self.seq}D{self.head_dim}", "causal" if self.causal else "full",
                 f"pad-{self.padding}", f"mask-{self.mask}", f"grad-{self.grads}"]
        parts += ["strided"] * self.strided + ["gpublocks"] * self.gpu_blocks
        parts += [f"scale{self.scale}"] * (self.scale is not None)
        parts += [f"kv{self.kv_heads}"] * (self.kv_heads is not None)
        parts += [f"win{self.window}"] * (self.window is not None)
        parts += ["tiny"] * self.tiny
        return "-".join(parts)


F32, F16 = torch.float32, torch.float16
CASES = [
    Case(F32, 1, 2, 1, 32),
    Case(F32, 2, 3, 7, 32, causal=True, padding="prefix", mask="H"),
    Case(F32, 2, 3, 97, 64, padding="prefix_empty", mask="BH", strided=True),
    Case(F32, 2, 2, 97, 32, causal=True, padding="general", mask="H", grads="qkv", strided=True),
    Case(F16, 2, 3, 7, 64, padding="general", mask="BH"),
    Case(F16, 2, 3, 97, 32, causal=True, padding="prefix_empty", mask="BH", grads="mask", strided=True),
    Case(F16, 1, 3, 97, 64, mask="H", grads="none"),
    Case(F16, 2, 2, 97, 64, causal=True, strided=True, probs=False),
    Case(F32, 2, 2, 130, 64, causal=True, padding="prefix", mask="BH", gpu_blocks=True),
    Case(F16, 1, 2, 130, 32, padding="general", mask="H", strided=True, gpu_blocks=True),
    Case(F32, 1, 2, 33, 48, causal=True, padding="general", mask="BH", scale=0.3),  # head dim padded to 64
    Case(F16, 2, 1, 1, 64, padding="prefix_empty", mask="BH"),
    # grouped-query attention and sliding windows (interpreter blocks: forward and dQ 32 x 16, dK/dV 16 x 32)
    Case(F32, 2, 4, 37, 32, causal=True, padding="general", mask="BH", kv_heads=2, window=5, tiny=True),
    Case(F16, 2, 4, 45, 32, padding="prefix_empty", mask="H", kv_heads=1, window=20, strided=True),
    Case(F32, 1, 3, 97, 32, causal=True, mask="BH", kv_heads=3, window=45, strided=True, probs=False),
    Case(F16, 2, 4, 97, 64, causal=True, padding="prefix", mask="BH", kv_heads=2, tiny=True, strided=True),
    Case(F32, 2, 6, 33, 32, mask="BH", kv_heads=2, window=9, grads="mask", tiny=True),
    Case(F16, 1, 4, 40, 32, padding="general", kv_heads=4, window=17, grads="qkv"),
    Case(F32, 1, 4, 150, 64, causal=True, mask="H", kv_heads=1, window=70, gpu_blocks=True, probs=False),
    Case(F16, 1, 2, 130, 32, padding="general", mask="BH", kv_heads=1, window=40, gpu_blocks=True, tiny=True),
]


def _inputs(case: Case, seed: int = 0, device: torch.device = DEVICE):
    """Fresh random q, k, v, dO (``[B, H, N, D]``), head mask and key padding mask for a case, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = case.batch, case.heads, case.seq, case.head_dim
    kv_heads = h if case.kv_heads is None else case.kv_heads

    def tensor(h):
        if case.strided:  # [B, N, H, D] -> [B, H, N, D] view, as transformers hands them over
            return torch.randn(b, n, h, d, generator=gen).to(device, case.dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=gen).to(device, case.dtype)

    q, k, v, grad_out = tensor(h), tensor(kv_heads), tensor(kv_heads), tensor(h)
    head_mask = None
    if case.mask == "H":
        head_mask = 0.2 + 0.8 * torch.rand(h, generator=gen, dtype=torch.float64)
        head_mask[h // 2] = 0.0
    elif case.mask == "BH":
        head_mask = 0.2 + 0.8 * torch.rand(b, h, generator=gen)
        head_mask[0, min(1, h - 1)] = 0.0
        head_mask[-1, 0] = 1.0
    if head_mask is not None and case.tiny:
        head_mask.view(-1)[-1] = 1e-3
    if head_mask is not None:
        head_mask = head_mask.to(device)
    key_padding_mask = None
    if case.padding in ("prefix", "prefix_empty"):
        lengths = torch.randint(1, n + 1, (b,), generator=gen)
        lengths[0] = n
        if case.padding == "prefix_empty":
            lengths[-1] = 0
        key_padding_mask = torch.arange(n)[None, :] < lengths[:, None]
    elif case.padding == "general":
        key_padding_mask = torch.rand(b, n, generator=gen) < 0.7
        key_padding_mask[-1, 0] = False  # causal: query 0 of that example sees no key
        key_padding_mask[-1, -1] = True
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device)
    return q, k, v, grad_out, head_mask, key_padding_mask


def _evaluate(function, case, q, k, v, grad_out, head_mask, key_padding_mask, dtype=None):
    """Run ``function`` on copies of the inputs cast to ``dtype`` (None: as they are); return name -> tensor."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    q, k, v, grad_out = (cast(t) for t in (q, k, v, grad_out))
    if head_mask is not None:
        head_mask = head_mask.detach().to(dtype if dtype is not None else head_mask.dtype)
    leaves = {"all": ["q", "k", "v", "head_mask"], "qkv": ["q", "k", "v"], "mask": ["head_mask"], "none": []}
    inputs = {"q": q, "k": k, "v": v, "head_mask": head_mask}
    wanted = [name for name in leaves[case.grads] if inputs[name] is not None]
    for name in wanted:
        inputs[name].requires_grad_(True)
    with torch.set_grad_enabled(case.grads != "none"):
        out, stats = function(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=case.causal,
                              scale=case.scale, return_probs=case.probs, window=case.window)
    results = {"out": out.detach(), "lse": stats.lse, "entropy": stats.entropy, "max_prob": stats.max_prob}
    if case.probs:
        results["probs"] = stats.probs
    else:
        assert stats.probs is None
    if wanted:
        out.backward(grad_out.to(out.dtype))
        results.update({f"grad_{name}": inputs[name].grad for name in wanted})
    return results


def _check_against_reference(case, q, k, v, grad_out, head_mask, key_padding_mask, function):
    """Assert the pass rule for every result; return ``{name: (kernel error, torch error, allowed)}``."""
    exact = _evaluate(attention_reference, case, q, k, v, grad_out, head_mask, key_padding_mask, torch.float64)
    same_dtype = _evaluate(attention_reference, case, q, k, v, grad_out, head_mask, key_padding_mask, case.dtype)
    ours = _evaluate(function, case, q, k, v, grad_out, head_mask, key_padding_mask)
    assert ours.keys() == exact.keys()
    report, failures = {}, []
    for name, reference in exact.items():
        mine = ours[name]
        assert mine.shape == reference.shape, name
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        if name in ("lse", "entropy", "max_prob"):
            assert mine.dtype == torch.float32, name
        elif name == "grad_head_mask":
            assert mine.dtype == head_mask.dtype, name
        else:
            assert mine.dtype == case.dtype, name
        error = (mine.double() - reference).abs().max().item()
        torch_error = (same_dtype[name].double() - reference).abs().max().item()
        factor = GRAD_FACTOR if name.startswith("grad_") else OUTPUT_FACTOR
        floor = (GRAD_FLOOR if name.startswith("grad_") else FLOOR)[case.dtype]
        allowed = factor * torch_error + floor * max(1.0, reference.abs().max().item())
        report[name] = (error, torch_error, allowed)
        if not error <= allowed:
            failures.append(f"{name}: kernel error {error:.3g} > allowed {allowed:.3g} (torch {torch_error:.3g})")
    assert not failures, f"{case}: " + "; ".join(failures)
    return report


@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_reference(case, monkeypatch):
    from fastbertology.kernels import triton_attention

    if case.gpu_blocks:
        monkeypatch.setattr(triton_attention, "configs_for",
                            lambda device, block_d, dtype, **options: triton_attention.gpu_configs(block_d, dtype,
                                                                                                   **options))
    inputs = _inputs(case)
    _check_against_reference(case, *inputs, triton_attention.attention_triton)


def test_dispatch_zero_mask_rows_and_mask_grad_shape():
    """backend="triton" dispatch; fully masked rows are exact zeros; [H] mask gradient keeps shape and dtype."""
    case = Case(F32, 2, 2, 9, 32, causal=True, padding="prefix_empty", mask="H", probs=True)
    q, k, v, grad_out, head_mask, key_padding_mask = _inputs(case, seed=1)
    head_mask = head_mask.requires_grad_(True)
    q.requires_grad_(True)
    out, stats = attention(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=True,
                           return_probs=True, backend="triton")
    out.backward(grad_out)
    empty = ~key_padding_mask.any(-1)  # examples without keys
    for tensor in (out, stats.lse, stats.entropy, stats.max_prob, stats.probs):
        assert torch.count_nonzero(tensor[empty]) == 0
    assert torch.count_nonzero(q.grad[empty]) == 0
    assert head_mask.grad.shape == head_mask.shape and head_mask.grad.dtype == torch.float64
    assert torch.count_nonzero(out[:, case.heads // 2]) == 0  # the head whose mask is 0


@pytest.mark.parametrize("kv_heads, window", [(None, None), (1, 7)])
def test_backward_is_deterministic(kv_heads, window):
    """Bitwise equal gradients on a second run (grouped-query: the per-head dK, dV terms are summed in a fixed
    order, no atomics)."""
    case = Case(F32, 2, 2, 40, 32, causal=True, padding="general", mask="BH", kv_heads=kv_heads, window=window)
    from fastbertology.kernels.triton_attention import attention_triton

    grads = []
    for _ in range(2):
        q, k, v, grad_out, head_mask, key_padding_mask = _inputs(case, seed=3)
        for t in (q, k, v, head_mask):
            t.requires_grad_(True)
        out, _ = attention_triton(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=True,
                                  window=window)
        out.backward(grad_out)
        grads.append([t.grad.clone() for t in (q, k, v, head_mask)])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_heads_last_output_is_the_transposed_output(packed):
    """``output_layout="bnhd"``: the kernels write ``out`` as ``[B, N, H, D]`` (contiguous) and read its gradient
    so: the output, the statistics and every gradient (q, k, v with grouped-query heads, the head mask, the sinks)
    are bitwise those of the default layout."""
    from fastbertology.kernels import Packing
    from fastbertology.kernels.triton_attention import attention_triton

    case = Case(F32, 2, 4, 24, 32, causal=True, padding=None if packed else "general", mask="BH", kv_heads=2)
    q, k, v, grad_out, head_mask, key_padding_mask = _inputs(case, seed=7)
    options = dict(causal=True, key_padding_mask=key_padding_mask)
    if packed:  # two sequences of 24 and 13 tokens, one after another
        lengths = (24, 13)
        q, k, v, grad_out = (torch.cat([t[:1], t[1:, :, :13]], dim=2).contiguous() for t in (q, k, v, grad_out))
        options = dict(causal=True, packing=Packing.from_lengths(lengths, q.device))
    sinks = torch.linspace(-1.0, 1.0, case.heads, device=q.device)
    results = []
    for layout in ("bhnd", "bnhd"):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, head_mask, sinks)]
        out, stats = attention_triton(*inputs[:3], head_mask=inputs[3], sinks=inputs[4], output_layout=layout,
                                      **options)
        if layout == "bnhd":
            assert out.is_contiguous() and out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
            out = out.transpose(1, 2)
        out.backward(grad_out)
        results.append([out.detach(), *stats[:3], *(t.grad for t in inputs)])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_output_layout_is_checked_and_transposed_by_every_backend():
    from fastbertology.kernels import attention

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    for backend in ("torch", "reference", "triton"):
        reference, _ = attention(q, k, v, backend=backend)
        out, _ = attention(q, k, v, output_layout="bnhd", backend=backend)
        assert torch.equal(out, reference.transpose(1, 2))
    with pytest.raises(ValueError, match="output_layout must be one of 'bhnd', 'bnhd'; got 'nhd'"):
        attention(q, k, v, output_layout="nhd")


def test_grad_mode_paths_agree():
    """no_grad (P V skipped for zero-mask heads), head mask without grad (masked output saved) and with grad
    (unmasked output saved) give the same forward results."""
    from fastbertology.kernels.triton_attention import attention_triton

    case = Case(F32, 2, 3, 20, 32, padding="general", mask="BH")
    q, k, v, _, head_mask, key_padding_mask = _inputs(case, seed=5)
    results = []
    for q_grad, mask_grad in ((False, False), (True, False), (False, True)):
        qq, mm = q.detach().clone().requires_grad_(q_grad), head_mask.detach().clone().requires_grad_(mask_grad)
        out, stats = attention_triton(qq, k, v, head_mask=mm, key_padding_mask=key_padding_mask)
        results.append((out.detach(), *stats[:3]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_float64_is_delegated_to_torch():
    from fastbertology.kernels.triton_attention import attention_triton

    q, k, v, _, head_mask, _ = _inputs(Case(F32, 1, 2, 5, 32, mask="H"))
    q, k, v = (t.double() for t in (q, k, v))
    out, stats = attention_triton(q, k, v, head_mask=head_mask)
    expected, expected_stats = attention_torch(q, k, v, head_mask=head_mask)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(stats.entropy, expected_stats.entropy)


# Compile every kernel for an H100 (sm_90) without a GPU: the launchers run on CPU tensors with the kernels replaced
# by recorders, and each recorded launch (argument types, the JIT's specialisation of ints equal to 1 and of
# 16-divisible ints and pointers, constexprs, num_warps/num_stages with the GPU block sizes) is compiled to a cubin
# with ptxas. Runs in a subprocess because this process has TRITON_INTERPRET=1.
_AOT_SCRIPT = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, sys.argv[1])  # repo root: fastbertology_kernels/ as a plain package (torch + triton only)
from fastbertology_kernels import triton_attention as ta

calls = []


class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))


for name in ("_attn_fwd", "_attn_probs", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
    setattr(ta, name, Recorder(getattr(ta, name)))
ta.configs_for = lambda device, block_d, dtype, **options: ta.gpu_configs(block_d, dtype, **options)
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
           torch.int32: "*i32"}

# (dtype, head dim, causal, layout): packed sequences (the default path of patched models), padded with a key
# padding mask (and probabilities), padded without one
CONFIGS = [(torch.bfloat16, 64, False, "packed"), (torch.bfloat16, 64, True, "packed"),
           (torch.float16, 128, True, "padded"), (torch.float32, 128, False, "padded"),
           (torch.bfloat16, 32, False, "dense")]
for dtype, head_dim, causal, kind in CONFIGS:
    b, h, n = 2, 3, 200
    lengths = [120, 80]
    if kind == "packed":
        packing = ta.Packing.from_lengths(lengths)
        q, k, v, do = (torch.randn(1, sum(lengths), h, head_dim, dtype=dtype).transpose(1, 2) for _ in range(4))
        layout = ta._Layout(q, None, packing)
    else:
        q, k, v, do = (torch.randn(b, n, h, head_dim, dtype=dtype).transpose(1, 2) for _ in range(4))
        keep = torch.rand(b, n) < 0.8 if kind == "padded" else None
        layout = ta._Layout(q, keep, None)
    mask = torch.rand(layout.sequences, h)
    calls.clear()
    out, lse, *_ = ta._forward(q, k, v, mask, layout, causal, 0.125, kind == "padded")
    ta._backward(do, q, k, v, out, lse, mask, layout, causal, 0.125, True, True, True)
    ta._backward(do, q, k, v, out, lse, mask, layout, causal, 0.125, False, False, True)  # mask gradient only
    for fn, args, kwargs in calls:
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 1)}
        params = dict(zip(fn.arg_names, args))
        signature, constexprs, attrs = {}, dict(kwargs), {}
        for index, name in enumerate(fn.arg_names):
            value = params.get(name, kwargs.get(name))
            if name in kwargs or (isinstance(value, int) and value == 1):
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = POINTER[value.dtype]
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, int):
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        assert compiled.metadata.shared <= 227 * 1024, (fn.__name__, compiled.metadata.shared)
        assert compiled.asm["cubin"], fn.__name__
        print(fn.__name__, kind, dtype, head_dim, "causal" if causal else "", "shared", compiled.metadata.shared)
print("compiled", flush=True)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run on the GPU here")
def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel for packed bf16 head dim 64 (bidirectional and causal), padded fp16/fp32 head dim 128 with key
    padding and probabilities, and dense bf16 head dim 32; head mask with gradient, and the mask gradient alone."""
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this triton has no NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    repo = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, repo], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    print(result.stdout)

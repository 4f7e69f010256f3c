"""Score modifiers (relative-position bias, ALiBi, soft-capping, sinks): the float64 reference against their
definitions, and the PyTorch backend against the reference (padded and packed, causal or not, windows, head masks
[H] and [B, H], statistics, probabilities, q/k/v and head-mask gradients)."""

import math
import os

import pytest
import torch
from fastbertology.kernels import Packing

from fastbertology import kernels

HEADS, DIM = 3, 8
# the Triton kernels (CPU: under the interpreter, TRITON_INTERPRET=1 set in conftest.py; slow: few, small cases)
triton_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)")


def _modifier(name, heads, span, generator, dtype=torch.float64):
    if name == "relative_bias":
        return {name: torch.randn(heads, 2 * span - 1, generator=generator, dtype=dtype)}
    if name == "local_window":  # ModernBERT-style: 0 within |j - i| <= 2, -inf outside
        distance = torch.arange(-(span - 1), span).abs()
        table = torch.where(distance <= 2, 0.0, float("-inf")).to(dtype).expand(heads, -1).clone()
        return {"relative_bias": table}
    if name == "alibi_slopes":
        return {name: torch.rand(heads, generator=generator, dtype=dtype)}
    if name == "softcap":
        return {name: 1.5}
    if name == "sinks":
        return {name: torch.randn(heads, generator=generator, dtype=dtype) + 1.0}
    if name == "all":
        result = {}
        for part in ("relative_bias", "alibi_slopes", "softcap", "sinks"):
            result.update(_modifier(part, heads, span, generator, dtype))
        return result
    raise AssertionError(name)


def _inputs(batch, seq, *, seed=0, kv_heads=HEADS):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq, DIM, generator=generator, dtype=torch.float64) * 2
    k, v = (torch.randn(batch, kv_heads, seq, DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(batch, HEADS, seq, DIM, generator=generator, dtype=torch.float64)
    return (q, k, v), grad_out, generator


def _run(backend, tensors, grad_out, dtype, head_mask, modifiers, **kwargs):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    mask = None
    if head_mask is not None:
        mask = head_mask.detach().to(dtype if dtype == torch.float64 else torch.float32).requires_grad_(True)
    modifiers = {name: value.to(dtype) if isinstance(value, torch.Tensor) else value
                 for name, value in modifiers.items()}
    out, stats = kernels.attention(*leaves, head_mask=mask, backend=backend, **modifiers, **kwargs)
    out.backward(grad_out.to(dtype))
    grads = [t.grad for t in leaves] + ([mask.grad] if mask is not None else [])
    values = [out, *(s for s in stats if s is not None), *grads]
    return [t.double() for t in values]


def _assert_matches(backend, dtype, tensors, grad_out, head_mask, modifiers, **kwargs):
    exact = _run("reference", tensors, grad_out, torch.float64, head_mask, modifiers, **kwargs)
    ours = _run(backend, tensors, grad_out, dtype, head_mask, modifiers, **kwargs)
    same = _run("reference", tensors, grad_out, dtype, head_mask, modifiers, **kwargs)
    assert len(ours) == len(exact)
    for index, (a, b, c) in enumerate(zip(ours, exact, same)):
        assert torch.isfinite(a).all(), index
        floor = 1e-12 if dtype == torch.float64 else 2e-6
        allowed = 3 * (c - b).abs().max() + floor * max(1.0, b.abs().max().item())
        assert (a - b).abs().max() <= allowed, f"value {index}: {(a - b).abs().max()} > {allowed}"


MODIFIERS = ["relative_bias", "local_window", "alibi_slopes", "softcap", "sinks", "all"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MODIFIERS)
@pytest.mark.parametrize("causal, window, mask_kind", [(False, None, "BH"), (True, None, "H"), (True, 3, "BH"),
                                                        (False, 2, None)])
def test_torch_backend_padded_matches_reference(dtype, name, causal, window, mask_kind):
    batch, seq = 3, 11
    tensors, grad_out, generator = _inputs(batch, seq, kv_heads=1 if window == 2 else HEADS)
    key_padding_mask = torch.arange(seq)[None, :] < torch.tensor([seq, 6, 1])[:, None]
    head_mask = {"BH": torch.rand(batch, HEADS, generator=generator, dtype=torch.float64) + 0.5,
                 "H": torch.rand(HEADS, generator=generator, dtype=torch.float64) + 0.5, None: None}[mask_kind]
    modifiers = _modifier(name, HEADS, seq + 2, generator)
    _assert_matches("torch", dtype, tensors, grad_out, head_mask, modifiers, key_padding_mask=key_padding_mask,
                    causal=causal, window=window, return_probs=True)


@pytest.mark.parametrize("name", MODIFIERS)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_packed_matches_reference_and_padded(name, causal):
    lengths = (5, 1, 9)
    packing = Packing.from_lengths(lengths)
    tensors, grad_out, generator = _inputs(1, sum(lengths))
    head_mask = torch.rand(len(lengths), HEADS, generator=generator, dtype=torch.float64) + 0.5
    modifiers = _modifier(name, HEADS, max(lengths), generator)
    _assert_matches("torch", torch.float64, tensors, grad_out, head_mask, modifiers, packing=packing, causal=causal)
    packed = _run("torch", tensors, grad_out, torch.float64, head_mask, modifiers, packing=packing, causal=causal)
    # the same sequences padded: outputs and statistics at the real tokens, and the gradients, agree
    seq = max(lengths)
    padded_tensors = [torch.zeros(len(lengths), t.shape[1], seq, DIM, dtype=torch.float64) for t in tensors]
    padded_grad = torch.zeros(len(lengths), HEADS, seq, DIM, dtype=torch.float64)
    for index, (start, length) in enumerate(zip(packing.starts(), lengths)):
        for padded, t in zip((*padded_tensors, padded_grad), (*tensors, grad_out)):
            padded[index, :, :length] = t[0, :, start:start + length]
    key_padding_mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    padded = _run("torch", padded_tensors, padded_grad, torch.float64, head_mask, modifiers,
                  key_padding_mask=key_padding_mask, causal=causal)
    for index, (start, length) in enumerate(zip(packing.starts(), lengths)):
        for a, b in zip(packed[:7], padded[:7]):  # out, lse, entropy, max_prob, dq, dk, dv
            torch.testing.assert_close(a[0, ..., start:start + length, :] if a.dim() == 4 else
                                       a[0, :, start:start + length],
                                       b[index, ..., :length, :] if b.dim() == 4 else b[index, :, :length])
    torch.testing.assert_close(packed[7], padded[7])  # the [S, H] head-mask gradient


def test_torch_backend_recomputing_path(monkeypatch):
    """The backward that recomputes probabilities from the log-sum-exp (large inputs) agrees too."""
    from fastbertology.kernels import torch_attention

    monkeypatch.setattr(torch_attention, "KEEP_PROBS_ELEMENTS", 0)
    monkeypatch.setattr(torch_attention, "CHUNK_ELEMENTS", 2 * HEADS * 9 * 4)
    tensors, grad_out, generator = _inputs(2, 9)
    key_padding_mask = torch.arange(9)[None, :] < torch.tensor([9, 4])[:, None]
    _assert_matches("torch", torch.float64, tensors, grad_out, torch.rand(2, HEADS, generator=generator) + 0.5,
                    _modifier("all", HEADS, 9, generator), key_padding_mask=key_padding_mask, causal=True)



@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_packed_query_blocks(causal, monkeypatch):
    """Long packed sequences cut into query blocks (memory linear in the length): each block's position terms
    start at its first query's position in the sequence, and the table / slope gradients are summed over blocks."""
    from fastbertology.kernels import torch_attention

    monkeypatch.setattr(torch_attention, "CHUNK_ELEMENTS", HEADS * 9 * 3)  # blocks of 3 rows in a 9-token sequence
    for keep in (1 << 24, 0):
        monkeypatch.setattr(torch_attention, "KEEP_PROBS_ELEMENTS", keep)
        lengths = (9, 2, 7)
        packing = Packing.from_lengths(lengths)
        assert len(torch_attention.PackedPieces(torch.zeros(1, HEADS, 18, DIM), causal, packing).pieces) > 3
        tensors, grad_out, generator = _inputs(1, sum(lengths))
        head_mask = torch.rand(len(lengths), HEADS, generator=generator, dtype=torch.float64) + 0.5
        modifiers = _modifier("all", HEADS, max(lengths), generator)
        _assert_matches("torch", torch.float64, tensors, grad_out, head_mask, modifiers, packing=packing,
                        causal=causal)
        grads = []
        for backend in ("reference", "torch"):
            leaves = {name: modifiers[name].clone().requires_grad_(True) for name in ("relative_bias", "alibi_slopes")}
            out, _ = kernels.attention(*tensors, head_mask=head_mask, causal=causal, softcap=1.5, backend=backend,
                                       packing=packing, **leaves)
            out.backward(grad_out)
            grads.append([leaf.grad for leaf in leaves.values()])
        for ours, exact in zip(grads[1], grads[0]):
            torch.testing.assert_close(ours, exact)

def _manual(q, k, v, scores_fn, sinks=None):
    """Explicit softmax attention of one unpadded example with scores ``scores_fn(raw scaled scores)``."""
    scores = scores_fn(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    if sinks is not None:
        scores = torch.cat((scores, sinks[None, :, None, None].expand(*scores.shape[:3], 1)), -1)
    probs = torch.softmax(scores, -1)
    return probs[..., :k.shape[2]] @ v, probs


def test_reference_follows_the_definitions():
    (q, k, v), _, generator = _inputs(1, 6)
    n = 6
    distance = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    table = torch.randn(HEADS, 2 * n + 1, generator=generator, dtype=torch.float64)  # M = n + 1 > n
    slopes, sinks = torch.rand(HEADS, dtype=torch.float64), torch.randn(HEADS, dtype=torch.float64)

    out, _ = kernels.attention(q, k, v, relative_bias=table, backend="reference")
    torch.testing.assert_close(out, _manual(q, k, v, lambda s: s + table[:, distance + n])[0])
    out, _ = kernels.attention(q, k, v, alibi_slopes=slopes, causal=True, backend="reference")
    causal = torch.where(distance <= 0, 0.0, float("-inf"))
    torch.testing.assert_close(out, _manual(q, k, v, lambda s: s + slopes[:, None, None] * distance + causal)[0])
    out, _ = kernels.attention(q, k, v, softcap=0.7, backend="reference")
    torch.testing.assert_close(out, _manual(q, k, v, lambda s: 0.7 * torch.tanh(s / 0.7))[0])
    out, stats = kernels.attention(q, k, v, sinks=sinks, backend="reference")
    expected, probs = _manual(q, k, v, lambda s: s, sinks)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(stats.entropy, -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(stats.max_prob, probs.amax(-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(DIM)
    torch.testing.assert_close(stats.lse, torch.logaddexp(scores.logsumexp(-1), sinks[None, :, None]))


def test_local_window_table_equals_the_window_argument():
    """A 0 / -inf table over |j - i| < w is the bidirectional window ``window=w``."""
    tensors, grad_out, generator = _inputs(2, 9)
    key_padding_mask = torch.arange(9)[None, :] < torch.tensor([9, 5])[:, None]
    distance = torch.arange(-8, 9).abs()
    table = torch.where(distance < 3, 0.0, float("-inf")).to(torch.float64).expand(HEADS, -1)
    with_table = _run("torch", tensors, grad_out, torch.float64, None, {"relative_bias": table},
                      key_padding_mask=key_padding_mask)
    with_window = _run("torch", tensors, grad_out, torch.float64, None, {}, key_padding_mask=key_padding_mask,
                       window=3)
    for a, b in zip(with_table, with_window):
        torch.testing.assert_close(a, b)


def test_alibi_equals_its_relative_bias_table():
    tensors, grad_out, generator = _inputs(2, 7)
    slopes = torch.rand(HEADS, generator=generator, dtype=torch.float64)
    table = slopes[:, None] * torch.arange(-6, 7, dtype=torch.float64)
    a = _run("torch", tensors, grad_out, torch.float64, None, {"alibi_slopes": slopes}, causal=True)
    b = _run("torch", tensors, grad_out, torch.float64, None, {"relative_bias": table}, causal=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_sink_statistics_of_fully_padded_rows_are_zero():
    tensors, _, generator = _inputs(2, 5)
    key_padding_mask = torch.tensor([[True] * 5, [False] * 5])
    sinks = torch.randn(HEADS, generator=generator, dtype=torch.float64)
    for backend in ("reference", "torch"):
        out, stats = kernels.attention(*tensors, key_padding_mask=key_padding_mask, sinks=sinks, backend=backend,
                                       return_probs=True)
        assert (out[1] == 0).all() and all((s[1] == 0).all() for s in stats)
        assert (stats.probs[0].sum(-1) < 1).all()  # the sink takes some probability


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", ["sinks", "relative_bias", "alibi_slopes", "local_window"])
def test_modifier_gradients_match_reference(packed, name, monkeypatch):
    """A modifier tensor that requires grad gets its exact gradient from the torch backend (kept and recomputed
    probabilities), with soft-capping on: the sum of dL/ds over each distance for the table, over dL/ds (j - i) for
    the slopes, -sum p_sink rowsum(dO O) for the sinks."""
    from fastbertology.kernels import torch_attention

    lengths = (6, 2, 4)
    tensors, grad_out, generator = _inputs(1 if packed else 3, sum(lengths) if packed else 6)
    options = {"packing": Packing.from_lengths(lengths)} if packed else {
        "key_padding_mask": torch.arange(6)[None, :] < torch.tensor([6, 2, 0])[:, None]}
    head_mask = torch.rand(3, HEADS, generator=generator, dtype=torch.float64) + 0.5
    (key, value), = _modifier(name, HEADS, 7, generator).items()
    grads = []
    for backend, keep in (("reference", 1 << 24), ("torch", 1 << 24), ("torch", 0)):
        monkeypatch.setattr(torch_attention, "KEEP_PROBS_ELEMENTS", keep)
        leaf = value.clone().requires_grad_(True)
        out, _ = kernels.attention(*tensors, head_mask=head_mask, causal=True, softcap=1.5, backend=backend,
                                   **{key: leaf}, **options)
        out.backward(grad_out)
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0])


@triton_kernels
def test_triton_refuses_a_bias_that_requires_grad():
    pytest.importorskip("triton")
    tensors, _, _ = _inputs(1, 5)
    tensors = [t.float() for t in tensors]
    for name, shape in (("alibi_slopes", (HEADS,)), ("relative_bias", (HEADS, 9))):
        value = torch.randn(*shape, requires_grad=True)
        with pytest.raises(ValueError, match=f"{name} requires grad.*detach"):
            kernels.attention(*tensors, backend="triton", **{name: value})
        with torch.no_grad():  # no gradient asked: fine
            kernels.attention(*tensors, backend="triton", **{name: value})


@pytest.mark.parametrize("kwargs, message", [
    ({"relative_bias": torch.zeros(HEADS, 8)}, "relative_bias must be \\[heads, 2 \\* M - 1\\]"),
    ({"relative_bias": torch.zeros(HEADS, 7)}, "M >= the longest sequence \\(5\\)"),
    ({"relative_bias": torch.zeros(2, 9)}, "heads = 3"),
    ({"alibi_slopes": torch.zeros(2)}, "alibi_slopes must have shape \\[heads\\]"),
    ({"sinks": torch.zeros(HEADS, dtype=torch.int64)}, "sinks must be a floating-point tensor"),
    ({"softcap": 0.0}, "softcap must be None or a finite number > 0"),
    ({"softcap": True}, "softcap must be None or a finite number > 0"),
])
def test_bad_modifiers_raise(kwargs, message):
    tensors, _, _ = _inputs(1, 5)
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=message):
            kernels.attention(*tensors, backend=backend, **kwargs)




@triton_kernels
@pytest.mark.parametrize("name, causal, window, mask_kind, seq", [
    ("softcap", True, None, "BH", 21), ("softcap", False, 5, "H", 21), ("relative_bias", False, None, "BH", 21),
    ("local_window", False, None, "H", 21), ("alibi_slopes", True, 6, "BH", 21), ("sinks", False, None, "BH", 21),
    ("sinks", True, None, None, 7), ("all", True, None, "BH", 21), ("all", False, 4, "H", 21)])
def test_triton_padded_matches_reference(name, causal, window, mask_kind, seq):
    pytest.importorskip("triton")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tensors, grad_out, generator = _inputs(3, seq, kv_heads=1 if window == 4 else HEADS)
    key_padding_mask = torch.arange(seq)[None, :] < torch.tensor([seq, 6, 0])[:, None]
    key_padding_mask[0, 3] = False  # a hole: every block on the edge path for this batch
    if name == "softcap":  # prefix padding only: interior blocks
        key_padding_mask = None
    head_mask = {"BH": torch.rand(3, HEADS, generator=generator, dtype=torch.float64) + 0.5,
                 "H": torch.rand(HEADS, generator=generator, dtype=torch.float64) + 0.5, None: None}[mask_kind]
    if head_mask is not None:
        head_mask[..., 1] = 0.0  # a head switched off: its mask gradient from the dQ kernel
    modifiers = _modifier(name, HEADS, seq, generator)
    moved = [t.to(device) for t in tensors]
    modifiers = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in modifiers.items()}
    _assert_matches("triton", torch.float32, moved, grad_out.to(device),
                    None if head_mask is None else head_mask.to(device), modifiers,
                    key_padding_mask=None if key_padding_mask is None else key_padding_mask.to(device),
                    causal=causal, window=window, return_probs=True)


@triton_kernels
@pytest.mark.parametrize("name, causal", [("all", True), ("local_window", False), ("sinks", False)])
def test_triton_packed_matches_reference(name, causal):
    pytest.importorskip("triton")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lengths = (19, 1, 6)
    tensors, grad_out, generator = _inputs(1, sum(lengths))
    head_mask = torch.rand(len(lengths), HEADS, generator=generator, dtype=torch.float64) + 0.5
    modifiers = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in _modifier(name, HEADS, max(lengths), generator).items()}
    _assert_matches("triton", torch.float32, [t.to(device) for t in tensors], grad_out.to(device),
                    head_mask.to(device), modifiers, packing=Packing.from_lengths(lengths, device), causal=causal)



@triton_kernels
def test_triton_packed_with_a_planned_longest_matches_reference():
    """A CUDA-graph bucket's packing (``Packing.longest`` past every length, a filler sequence of length 0): the
    launch grid follows ``longest``, the modifiers' table is built for it, and the results are those of the
    lengths."""
    pytest.importorskip("triton")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lengths, longest = (7, 1, 0, 5), 16
    planned = Packing.from_lengths(lengths, device)._replace(longest=longest)
    assert planned.max_seqlen == longest
    tensors, grad_out, generator = _inputs(1, sum(lengths))
    head_mask = torch.rand(len(lengths), HEADS, generator=generator, dtype=torch.float64) + 0.5
    modifiers = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in _modifier("all", HEADS, longest, generator).items()}
    _assert_matches("triton", torch.float32, [t.to(device) for t in tensors], grad_out.to(device),
                    head_mask.to(device), modifiers, packing=planned, causal=True)

@triton_kernels
@pytest.mark.parametrize("packed", [False, True])
def test_triton_sink_gradient_matches_reference(packed):
    pytest.importorskip("triton")
    lengths = (6, 2, 4)
    tensors, grad_out, generator = _inputs(1 if packed else 3, sum(lengths) if packed else 6)
    options = {"packing": Packing.from_lengths(lengths)} if packed else {
        "key_padding_mask": torch.arange(6)[None, :] < torch.tensor([6, 2, 0])[:, None]}
    head_mask = torch.rand(3, HEADS, generator=generator, dtype=torch.float64) + 0.5
    sinks = torch.randn(HEADS, generator=generator, dtype=torch.float64)
    grads = []
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaf = sinks.detach().to(dtype).clone().requires_grad_(True)
        out, _ = kernels.attention(*(t.to(dtype) for t in tensors), head_mask=head_mask.to(dtype), sinks=leaf,
                                   causal=True, backend=backend, **options)
        out.backward(grad_out.to(dtype))
        grads.append(leaf.grad.double())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)

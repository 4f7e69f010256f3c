"""The PyTorch backend (CPU path) of fastbertology.kernels.attention against the float64 reference, with multi-head,
grouped-query and multi-query attention and sliding windows; the window's semantics against transformers' masks."""

import pytest
import torch
from fastbertology.kernels import reference, torch_attention

from fastbertology import kernels


def _inputs(batch, heads, seq, head_dim, dtype, *, seed=0, padding=True, mask_kind="BH", kv_heads=None):
    generator = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q, k, v = (torch.randn(batch, h, seq, head_dim, generator=generator, dtype=torch.float64)
               for h in (heads, kv_heads, kv_heads))
    if mask_kind == "H":
        head_mask = torch.rand(heads, generator=generator, dtype=torch.float64) + 0.5
        head_mask[0] = 0.0
    elif mask_kind == "BH":
        head_mask = torch.rand(batch, heads, generator=generator, dtype=torch.float64) + 0.5
        head_mask[0, -1] = 0.0
    else:
        head_mask = None
    key_padding_mask = None
    if padding:
        lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
        lengths[0] = seq
        key_padding_mask = torch.arange(seq)[None, :] < lengths[:, None]
        if batch > 2:
            key_padding_mask[2] = False  # a fully padded example
    grad_out = torch.randn(batch, heads, seq, head_dim, generator=generator, dtype=torch.float64)
    return (q, k, v), head_mask, key_padding_mask, grad_out


def _run(function, tensors, head_mask, key_padding_mask, grad_out, dtype, causal, window=None):
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]
    mask_dtype = dtype if dtype == torch.float64 else torch.float32
    mask = None if head_mask is None else head_mask.detach().to(mask_dtype).clone()
    if mask is not None:
        mask.requires_grad_(True)
    out, stats = function(*leaves, head_mask=mask, key_padding_mask=key_padding_mask, causal=causal,
                          return_probs=True, window=window)
    out.backward(grad_out.to(dtype))
    grads = [t.grad for t in leaves] + ([mask.grad] if mask is not None else [])
    return out, stats, grads


def _check_against_reference(dtype, tensors, head_mask, key_padding_mask, grad_out, causal, window=None):
    exact = _run(reference.attention_reference, tensors, head_mask, key_padding_mask, grad_out, torch.float64, causal,
                 window)
    ours = _run(kernels.attention_torch, tensors, head_mask, key_padding_mask, grad_out, dtype, causal, window)
    same_dtype = _run(reference.attention_reference, tensors, head_mask, key_padding_mask, grad_out, dtype, causal,
                      window)
    for tensor, expected in zip(ours[2], exact[2]):  # dk, dv with k's shape (summed over each group)
        assert tensor.shape == expected.shape

    def error(result_a, result_b):
        out_a, stats_a, grads_a = result_a
        out_b, stats_b, grads_b = result_b
        values = [(out_a.double() - out_b).abs().max()]
        values += [(a.double() - b).abs().max() for a, b in zip(stats_a, stats_b)]
        values += [(a.double() - b).abs().max() for a, b in zip(grads_a, grads_b)]
        return values

    # a floor of a few units in the last place of float32, relative to the largest value (of any gradient, for the
    # gradients): it matters only where the same-dtype error is 0, e.g. with a window of one key (P = 1, so dS = 0
    # exactly in the reference, and rounding-size elsewhere)
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    grad_scale = max(t.abs().max().item() for t in exact[2])
    scales = [t.abs().max().item() for t in (exact[0], *exact[1])] + [grad_scale] * len(exact[2])
    names = ["out", "lse", "entropy", "max_prob", "probs", "dq", "dk", "dv", "dmask"][: len(error(ours, exact))]
    # the error no computation from the rounded inputs can avoid: float64 math on the inputs rounded to ``dtype``
    # (a same-dtype computation may land closer by chance, e.g. a half-precision head-mask gradient summed in float32
    # against one rounded to half precision)
    mask_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rounded = _run(reference.attention_reference, [t.to(dtype).double() for t in tensors],
                   None if head_mask is None else head_mask.to(mask_dtype).double(), key_padding_mask,
                   grad_out.to(dtype).double(), torch.float64, causal, window)
    for name, ours_error, torch_error, input_error, scale in zip(names, error(ours, exact), error(same_dtype, exact),
                                                                 error(rounded, exact), scales):
        factor = 3.0 if name.startswith("d") else 2.0
        allowed = factor * max(torch_error, input_error) + floor * max(1.0, scale)
        assert ours_error <= allowed, f"{name}: {ours_error} vs same-dtype torch {torch_error}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, causal, mask_kind",
                         [(1, False, "BH"), (7, True, "H"), (97, False, "BH"), (33, True, None)])
def test_torch_backend_matches_reference(dtype, seq, causal, mask_kind):
    tensors, head_mask, key_padding_mask, grad_out = _inputs(3, 2, seq, 16, dtype, mask_kind=mask_kind)
    _check_against_reference(dtype, tensors, head_mask, key_padding_mask, grad_out, causal)


# (heads, kv heads): grouped-query with groups of 2 and 3, multi-query; windows of 1 key, shorter and longer than the
# sequence; a tiny head-mask value (below the Triton kernels' 1/64 threshold) next to the zero
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, seq, causal, window", [
    (4, 2, 29, True, 5), (6, 2, 29, False, 5), (4, 1, 29, True, None), (4, 1, 17, False, 1), (3, 3, 41, True, 9),
    (4, 2, 13, False, 40),
])
def test_grouped_query_and_window_match_reference(dtype, heads, kv_heads, seq, causal, window):
    tensors, head_mask, key_padding_mask, grad_out = _inputs(3, heads, seq, 16, dtype, kv_heads=kv_heads, seed=seq)
    head_mask[1, 0] = 1e-3
    _check_against_reference(dtype, tensors, head_mask, key_padding_mask, grad_out, causal, window)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_window_is_transformers_sliding_window(causal, window):
    """``window=W`` hides the keys transformers 5 hides: causal models' ``sliding_window_causal_mask_function(W)``
    (Mistral, Qwen2, Gemma2 pass ``sliding_window=W``); bidirectional models hand the attention function
    ``sliding_window = config.sliding_window + 1`` and mask ``|i - j| <= config.sliding_window``
    (``sliding_window_bidirectional_mask_function``, ModernBERT)."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    n = 13
    if causal:
        function = masking_utils.sliding_window_causal_mask_function(window)
    else:
        function = masking_utils.sliding_window_bidirectional_mask_function(window - 1)
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    expected = function(torch.tensor(0), torch.tensor(0), rows, cols).expand(n, n)
    assert torch.equal(reference.score_mask(None, causal, 0, n, n, "cpu", window)[0, 0], expected)
    # and every backend attends exactly there: the probabilities are 0 exactly where the mask hides a key
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    for backend in ("torch", "reference"):
        probs = kernels.attention(q, k, v, causal=causal, window=window, return_probs=True, backend=backend)[1].probs
        assert torch.equal(probs[0, 0] > 0, expected), backend


def test_grouped_query_attention_equals_repeated_heads():
    """k, v with H_kv heads give what k, v repeated to H heads give (and their gradients are the repeated ones'
    sums over each group), without the repeat."""
    q, grad_out = torch.randn(2, 6, 11, 8, dtype=torch.float64), torch.randn(2, 6, 11, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, stats = kernels.attention(q, k, v, causal=True, window=4, backend="torch")
    out.backward(grad_out)
    k_rep, v_rep = (t.detach().repeat_interleave(3, dim=1).requires_grad_(True) for t in (k, v))
    expected, expected_stats = kernels.attention(q, k_rep, v_rep, causal=True, window=4, backend="torch")
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(stats.entropy, expected_stats.entropy)
    torch.testing.assert_close(k.grad, k_rep.grad.view(2, 2, 3, 11, 8).sum(2))
    torch.testing.assert_close(v.grad, v_rep.grad.view(2, 2, 3, 11, 8).sum(2))


@pytest.mark.parametrize("chunk_elements, keep_probs_elements", [(2 * 3 * 41 * 5, 1 << 24), (1 << 24, 0),
                                                                    (2 * 3 * 41 * 5, 0)])
def test_chunked_and_recomputing_paths_equal_the_whole(monkeypatch, chunk_elements, keep_probs_elements):
    """Query chunks of 5 rows, and probabilities recomputed in the backward instead of kept: same results."""
    tensors, head_mask, key_padding_mask, grad_out = _inputs(2, 3, 41, 8, torch.float64)
    whole = _run(kernels.attention_torch, tensors, head_mask, key_padding_mask, grad_out, torch.float64, True)
    monkeypatch.setattr(torch_attention, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(torch_attention, "KEEP_PROBS_ELEMENTS", keep_probs_elements)
    chunked = _run(kernels.attention_torch, tensors, head_mask, key_padding_mask, grad_out, torch.float64, True)
    for a, b in zip([whole[0], *whole[1], *whole[2]], [chunked[0], *chunked[1], *chunked[2]]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_fully_padded_rows_are_zero_and_finite():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    out, stats = kernels.attention(q, k, v, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool), backend="torch")
    assert out.abs().max() == 0
    for value in stats[:3]:
        assert torch.isfinite(value).all() and value.abs().max() == 0


def test_no_probabilities_unless_asked():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    _, stats = kernels.attention(q, k, v, backend="torch")
    assert stats.probs is None
    _, stats = kernels.attention(q, k, v, backend="torch", return_probs=True)
    assert stats.probs.shape == (1, 2, 5, 5)


@pytest.mark.parametrize("return_probs", [False, True])
def test_statistics_carry_no_gradient(return_probs):
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    out, stats = kernels.attention(q, k, v, backend="torch", return_probs=return_probs)
    assert out.requires_grad
    assert not any(t.requires_grad for t in stats if t is not None)
    with torch.no_grad():
        out, stats = kernels.attention(q, k, v, backend="torch")
    assert not out.requires_grad and not stats.entropy.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=torch.randn(2, 3, 4)), "must be \\[batch, heads, seq, head_dim\\]"),
        (dict(k=torch.randn(1, 2, 6, 4)), "same shape"),
        (dict(k=torch.randn(1, 3, 5, 4), v=torch.randn(1, 3, 5, 4)), "multiple of the key/value heads"),
        (dict(k=torch.randn(1, 1, 5, 4)), "k and v must have the same shape"),
        (dict(window=0), "window must be None .* or an int >= 1"),
        (dict(window=2.5), "window must be None"),
        (dict(window=True), "window must be None"),
        (dict(head_mask=torch.ones(3)), "head_mask must have shape"),
        (dict(head_mask=torch.ones(2, dtype=torch.long)), "floating-point"),
        (dict(key_padding_mask=torch.ones(1, 5)), "bool tensor"),
        (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), "bool tensor"),
        (dict(v=torch.randn(1, 2, 5, 4, dtype=torch.float64)), "one floating dtype"),
        (dict(backend="cuda"), "unknown attention backend"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    args = dict(q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 4))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, k, v, **args)


def test_non_contiguous_inputs():
    base = torch.randn(2, 9, 3, 8, dtype=torch.float64)  # [B, N, H, D] as transformers produces
    q = base.transpose(1, 2)
    out, _ = kernels.attention(q, q, q, backend="torch")
    expected, _ = kernels.attention_reference(q.contiguous(), q.contiguous(), q.contiguous())
    torch.testing.assert_close(out, expected)

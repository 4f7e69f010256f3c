"""The PyTorch backend (CPU path) of fastbertology.kernels.attention against the float64 reference."""

import pytest
import torch

from fastbertology import kernels
from fastbertology.kernels import reference, torch_attention


def _inputs(batch, heads, seq, head_dim, dtype, *, seed=0, padding=True, mask_kind="BH"):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
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


def _run(function, tensors, head_mask, key_padding_mask, grad_out, dtype, causal):
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]
    mask = None if head_mask is None else head_mask.detach().to(dtype if dtype == torch.float64 else torch.float32).clone()
    if mask is not None:
        mask.requires_grad_(True)
    out, stats = function(*leaves, head_mask=mask, key_padding_mask=key_padding_mask, causal=causal,
                          return_probs=True)
    out.backward(grad_out.to(dtype))
    grads = [t.grad for t in leaves] + ([mask.grad] if mask is not None else [])
    return out, stats, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, causal, mask_kind", [(1, False, "BH"), (7, True, "H"), (97, False, "BH"), (33, True, None)])
def test_torch_backend_matches_reference(dtype, seq, causal, mask_kind):
    tensors, head_mask, key_padding_mask, grad_out = _inputs(3, 2, seq, 16, dtype, mask_kind=mask_kind)
    exact = _run(reference.attention_reference, tensors, head_mask, key_padding_mask, grad_out, torch.float64, causal)
    ours = _run(kernels.attention_torch, tensors, head_mask, key_padding_mask, grad_out, dtype, causal)
    same_dtype = _run(reference.attention_reference, tensors, head_mask, key_padding_mask, grad_out, dtype, causal)

    def error(result_a, result_b):
        out_a, stats_a, grads_a = result_a
        out_b, stats_b, grads_b = result_b
        values = [(out_a.double() - out_b).abs().max()]
        values += [(a.double() - b).abs().max() for a, b in zip(stats_a, stats_b)]
        values += [(a.double() - b).abs().max() for a, b in zip(grads_a, grads_b)]
        return values

    floor = 1e-12 if dtype == torch.float64 else 1e-6
    names = ["out", "lse", "entropy", "max_prob", "probs", "dq", "dk", "dv", "dmask"][: len(error(ours, exact))]
    for name, ours_error, torch_error in zip(names, error(ours, exact), error(same_dtype, exact)):
        factor = 3.0 if name.startswith("d") else 2.0
        assert ours_error <= factor * torch_error + floor, f"{name}: {ours_error} vs same-dtype torch {torch_error}"


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

"""BLOOM specifics (the family suite of tests/test_families.py covers the rest): the ALiBi slopes, left padding
(where BLOOM's positions count from the first real token) and the refusal of cached keys."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from families import FAMILIES, PAD, oracle_head_mask

import fastbertology
from fastbertology.families_alibi import alibi_slopes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("heads", [4, 6])
def test_slopes_are_blooms_of_the_remaining_heads(heads):
    """4 heads: ``2^(-2 h)``, h = 1..4; 6 heads (not a power of two) as BLOOM's builder interleaves them; a pruned
    row keeps the slopes of its remaining original heads."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    config = tf.BloomConfig(n_head=heads, hidden_size=8 * heads)
    stock = build_alibi_tensor(torch.ones(1, 5), heads, torch.float32).view(heads, 5)  # slope * position
    slopes = alibi_slopes(config, 0)
    torch.testing.assert_close(slopes[:, None] * torch.arange(5.0), stock, atol=0, rtol=0)
    if heads == 4:
        torch.testing.assert_close(slopes, torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]))
    config.pruned_heads = {1: [0, 2]}
    torch.testing.assert_close(alibi_slopes(config, 1), slopes[[h for h in range(heads) if h not in (0, 2)]],
                               atol=0, rtol=0)
    torch.testing.assert_close(alibi_slopes(config, 0), slopes, atol=0, rtol=0)


def test_left_padding_equals_the_oracle():
    """Left padding shifts BLOOM's key positions by a constant per row, which the softmax ignores."""
    spec = FAMILIES["bloom"]
    model = spec.model()
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([9, 5, 7])
    attention_mask = (torch.arange(9)[None, :] >= 9 - lengths[:, None]).long()
    input_ids = torch.randint(3, 101, (3, 9), generator=generator).masked_fill(attention_mask == 0, PAD)
    head_mask = torch.rand(3, 4, dtype=torch.float64, generator=generator)
    with torch.no_grad(), oracle_head_mask(spec, model, head_mask):
        expected = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask, use_cache=False).logits
    keep = attention_mask.bool()
    torch.testing.assert_close(ours[keep], expected[keep], atol=1e-10, rtol=0)


def test_cached_keys_are_refused_by_name():
    model = FAMILIES["bloom"].model()
    input_ids = torch.tensor([[5, 6, 7]])
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).cache
        with pytest.raises(ValueError, match="BLOOM attention takes no cached keys"):
            model(input_ids=torch.tensor([[8]]), cache=cache, use_cache=True)

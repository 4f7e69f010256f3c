"""BLOOM and MPT specifics (the family suite of tests/test_families.py covers the rest): the ALiBi slopes, left
padding (BLOOM counts positions from the first real token, MPT from the first position) and the refusal of cached
keys."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from families import FAMILIES, PAD, oracle_head_mask

import fastbertology
from fastbertology.families_alibi import alibi_slopes, bloom_slopes, mpt_slopes

pytestmark = pytest.mark.usefixtures("one_thread")


def _stock_bloom(heads):  # slope * position for positions 0..4, [H, 5]
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 5), heads, torch.float32).view(heads, 5)


def _stock_mpt(heads):  # slope * (position - 4) for positions 0..4, [H, 5]
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    return build_mpt_alibi_tensor(heads, 5).view(heads, 5) + 0.0


@pytest.mark.parametrize("heads", [4, 6])
@pytest.mark.parametrize("builder, stock, offset", [(bloom_slopes, _stock_bloom, 0), (mpt_slopes, _stock_mpt, 4)])
def test_slopes_are_the_models_own_for_the_remaining_heads(builder, stock, offset, heads):
    """The slopes times the positions give the model's ALiBi tensor (6 heads, not a power of two: each family
    interleaves them its own way); a pruned row keeps the slopes of its remaining original heads."""
    config = tf.PretrainedConfig()
    slopes = alibi_slopes(config, 0, builder, heads)
    torch.testing.assert_close(slopes[:, None] * (torch.arange(5.0) - offset), stock(heads), atol=0, rtol=0)
    if heads == 4:
        torch.testing.assert_close(slopes, torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]))
    config.pruned_heads = {1: [0, 2]}
    torch.testing.assert_close(alibi_slopes(config, 1, builder, heads),
                               slopes[[h for h in range(heads) if h not in (0, 2)]], atol=0, rtol=0)
    torch.testing.assert_close(alibi_slopes(config, 0, builder, heads), slopes, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_left_padding_equals_the_oracle(family):
    """Left padding shifts the key positions of a row by a constant (BLOOM) or not at all (MPT): either way the
    probabilities are the model's."""
    spec = FAMILIES[family]
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


@pytest.mark.parametrize("family, name", [("bloom", "BLOOM"), ("mpt", "MPT")])
def test_cached_keys_are_refused_by_name(family, name):
    model = FAMILIES[family].model()
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        cache = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).cache
        with pytest.raises(ValueError, match=f"{name} attention takes no cached keys"):
            model(input_ids=torch.tensor([[8]]), cache=cache, use_cache=True)

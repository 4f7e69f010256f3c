"""Falcon specifics (the family suite of tests/test_families.py runs its four variants): the ALiBi it means (once,
as SDPA computes it, not twice as stock eager does), the slopes, pruning refused by name for the layouts it does
not cut, and cached keys refused."""

from __future__ import annotations

import math

import pytest
import torch
from families import FAMILIES, inputs

import fastbertology
from fastbertology.families_falcon import falcon_slopes
from fastbertology.pruning import prune_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_alibi_is_added_once_as_sdpa_does_not_twice_as_stock_eager_does():
    spec = FAMILIES["falcon-alibi"]
    model = spec.model()
    batch = inputs(spec, [9, 5, 7])
    keep = batch["attention_mask"].bool()
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation  # (Falcon refuses set_attn_implementation)
        with torch.no_grad():
            outputs[implementation] = model(**batch, use_cache=False).logits[keep]
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        ours = model(**batch, use_cache=False).logits[keep]
    torch.testing.assert_close(ours, outputs["sdpa"], atol=1e-10, rtol=0)
    assert (outputs["eager"] - outputs["sdpa"]).abs().max() > 1e-4  # the stock eager defect is real


def test_slopes_are_falcons_over_the_square_root_of_the_head_size():
    config = FAMILIES["falcon-alibi"].model().config  # 4 heads of size 8
    expected = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8], dtype=torch.float64) / math.sqrt(8)
    torch.testing.assert_close(falcon_slopes(config, 0), expected, atol=0, rtol=0)
    config.pruned_heads = {2: [1]}
    torch.testing.assert_close(falcon_slopes(config, 2), expected[[0, 2, 3]], atol=0, rtol=0)


@pytest.mark.parametrize("family, feature", [("falcon-mq", "multi_query=True"),
                                             ("falcon-new", "new_decoder_architecture=True")])
def test_layouts_pruning_does_not_cut_are_refused_by_name(family, feature):
    model = FAMILIES[family].model()
    with pytest.raises(ValueError, match=f"cannot prune this Falcon model: Falcon with {feature}.*head masks"):
        prune_heads(model, {0: [1]})
    assert not getattr(model.config, "pruned_heads", None)


def test_cached_keys_are_refused_by_name():
    model = FAMILIES["falcon"].model()
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        cache = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).cache
        with pytest.raises(ValueError, match="Falcon attention takes no cached keys"):
            model(input_ids=torch.tensor([[8]]), cache=cache, use_cache=True)

"""Falcon specifics (the family suite of tests/test_families.py runs its four variants): the ALiBi it means (once,
as SDPA computes it, not twice as stock eager does), the slopes, pruning of the multi-query and new-decoder-
architecture layouts (8 heads: unequal remaining groups, a layer with no heads, pruning in steps), and cached keys
refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from families import BOS, EOS, FAMILIES, PAD, VOCAB, inputs

import fastbertology
from fastbertology import architectures
from fastbertology.families_falcon import falcon_slopes
from fastbertology.pruning import count_parameters, load_pruned, prune_heads, requires_patch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_alibi_is_added_once_as_sdpa_does_not_twice_as_stock_eager_does():
    """Ours equals stock SDPA (the bias added once). Stock eager added it twice up to transformers 5.24; 5.25 folds
    it into the mask for every attention function, so there eager equals SDPA too."""
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
    eager_defect = (outputs["eager"] - outputs["sdpa"]).abs().max() > 1e-4
    assert eager_defect == (not hasattr(model.transformer.h[0].self_attention, "num_key_value_groups"))


def test_slopes_are_falcons_over_the_square_root_of_the_head_size():
    config = FAMILIES["falcon-alibi"].model().config  # 4 heads of size 8
    expected = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8], dtype=torch.float64) / math.sqrt(8)
    torch.testing.assert_close(falcon_slopes(config, 0), expected, atol=0, rtol=0)
    config.pruned_heads = {2: [1]}
    torch.testing.assert_close(falcon_slopes(config, 2), expected[[0, 2, 3]], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ pruning
# 8 heads of size 4, 3 layers; the new decoder architecture with 2 key/value groups of 4 query heads
VARIANTS = {"multi-query": dict(multi_query=True), "new": dict(new_decoder_architecture=True, num_kv_heads=2),
            "new-alibi": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=True)}
# row 0: groups keep 3 | 4 query heads (chunks of 1); row 1: none; row 2: 2 | 4 (chunks of 2)
PRUNE = {0: [1], 1: list(range(8)), 2: [0, 1]}
SHAPES = {"multi-query": [(7, 1), (0, 0), (6, 1)], "new": [(7, 7), (0, 0), (6, 3)]}  # (num_heads, num_kv_heads)


def _falcon8(variant: str):
    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=8,
                             pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **VARIANTS[variant])
    config._attn_implementation = "sdpa"  # (stock eager Falcon adds ALiBi twice)
    return tf.FalconForCausalLM(config).double().eval()


def _logits(model, batch, *, head_mask=None):
    """Real positions' logits of the stock ``model``; ``head_mask [L, 8]`` scales each head's slice of the output
    projections' inputs (what a head mask of 0 means, independent of fastbertology)."""
    handles = []
    if head_mask is not None:
        for row, layer in enumerate(model.transformer.h):
            def scale(module, args, row=row):
                context = args[0]
                heads = context.view(*context.shape[:-1], 8, -1) * head_mask[row, :, None]
                return (heads.view(context.shape),)
            handles.append(layer.self_attention.dense.register_forward_pre_hook(scale))
    try:
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[batch["attention_mask"].bool()]


def _counts(model):
    return [(layer.self_attention.num_heads, layer.self_attention.num_kv_heads) for layer in model.transformer.h]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pruned_multi_query_and_new_decoder_falcon_equal_masked_stock_patched_and_reloaded(variant, tmp_path):
    """Unequal remaining groups (the new decoder architecture cuts them into equal chunks with copied key/value
    rows), a layer with no heads, ALiBi: the pruned model, stock and patched, and its reloaded copy give what a head
    mask of 0 gives."""
    model = _falcon8(variant)
    batch = inputs(FAMILIES["falcon"], [9, 5, 7])
    mask = torch.ones(3, 8, dtype=torch.float64)
    for row, heads in PRUNE.items():
        mask[row, heads] = 0.0
    expected = _logits(model, batch, head_mask=mask)
    pruned = prune_heads(copy.deepcopy(model), PRUNE)
    assert _counts(pruned) == SHAPES[variant.removesuffix("-alibi")]
    assert architectures.heads_per_layer(pruned) == [7, 0, 6] and not requires_patch(pruned.config)
    torch.testing.assert_close(_logits(pruned, batch), expected, atol=1e-12, rtol=0)  # stock, unpatched
    with fastbertology.patch(pruned, backend="torch"):
        torch.testing.assert_close(_logits(pruned, batch), expected, atol=1e-12, rtol=0)
    pruned.save_pretrained(tmp_path)
    loaded = load_pruned(tf.FalconForCausalLM, tmp_path, dtype=torch.float64)
    assert _counts(loaded) == _counts(pruned) and count_parameters(loaded) == count_parameters(pruned)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-12, rtol=0)
    with fastbertology.patch(loaded, backend="torch"):
        torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-12, rtol=0)


def test_new_decoder_chunks_copy_their_groups_key_and_value_rows():
    """Row 2 keeps original heads 2, 3 (group 0) and 4..7 (group 1): chunks [2 3] [4 5] [6 7], each ``[q q k v]``."""
    model = _falcon8("new")
    weight = model.transformer.h[2].self_attention.query_key_value.weight.detach().view(2, 6, 4, 32)  # [H_kv, G+2]
    pruned = prune_heads(copy.deepcopy(model), {2: [0, 1]})
    chunks = pruned.transformer.h[2].self_attention.query_key_value.weight.detach().view(3, 4, 4, 32)  # [C, g+2]
    torch.testing.assert_close(chunks[0], weight[0, [2, 3, 4, 5]], atol=0, rtol=0)
    torch.testing.assert_close(chunks[1], weight[1, [0, 1, 4, 5]], atol=0, rtol=0)
    torch.testing.assert_close(chunks[2], weight[1, [2, 3, 4, 5]], atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["multi-query", "new"])
def test_pruning_falcon_in_steps_equals_pruning_once(variant):
    model = _falcon8(variant)
    once = prune_heads(copy.deepcopy(model), {0: [1, 4, 6], 2: [0, 1, 2]})
    steps = prune_heads(copy.deepcopy(model), {0: [4], 2: [0, 1]})  # row 0: chunks of 1; row 2: chunks of 2
    prune_heads(steps, {0: [1, 5], 2: [0]})  # (current indices: originals 1 and 6; original 2)
    assert steps.config.pruned_heads == once.config.pruned_heads and _counts(steps) == _counts(once)
    expected, ours = once.state_dict(), steps.state_dict()
    assert list(ours) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, atol=0, rtol=0, msg=name)
    batch = inputs(FAMILIES["falcon"], [6, 4])
    torch.testing.assert_close(_logits(steps, batch), _logits(once, batch), atol=0, rtol=0)


def test_new_decoder_groups_that_pruned_heads_do_not_describe_are_refused():
    model = prune_heads(_falcon8("new"), {0: [0, 1]})  # chunks [2 3] [4 5] [6 7]
    model.config.pruned_heads = {0: [0, 4]}  # would be chunks [1 2 3] [5 6 7]
    with pytest.raises(ValueError, match=r"row 0's attention module holds 6 heads in 3 key/value groups, not in the 2 "
                                         r"groups its remaining original heads \[1, 2, 3, 5, 6, 7\] make"):
        prune_heads(model, {2: [1], 0: [0]})
    assert model.transformer.h[2].self_attention.num_heads == 8  # (nothing changed)


def test_cached_keys_are_refused_by_name():
    model = FAMILIES["falcon"].model()
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        cache = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).cache
        with pytest.raises(ValueError, match="Falcon attention takes no cached keys"):
            model(input_ids=torch.tensor([[8]]), cache=cache, use_cache=True)

"""T5 / mT5 specifics (the family suite of tests/test_families.py covers the rest): the relative position bias
table against T5's own dense bias, its gradient, the Triton refusal of a trainable table, and no ``N x N`` bias
while patched."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, inputs, loss_of, oracle_head_mask

import fastbertology
from fastbertology.families_t5 import relative_bias_table

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [9, 5, 7]  # odd lengths, right padding


@pytest.mark.parametrize("stack", [0, 1])
def test_the_table_holds_t5s_bias_of_every_distance(stack):
    """``table[h, (j - i) + M - 1]`` equals stock ``compute_bias`` ``[1, H, N, N]`` at ``(h, i, j)`` (encoder:
    bidirectional buckets, decoder: causal ones), for a span longer than the sequence."""
    model = FAMILIES["t5"].model()
    stacks = (model.transformer.encoder, model.transformer.decoder)
    module = stacks[stack].block[0].layer[0].SelfAttention
    n, span = 15, 20  # distances up to 14 > max_distance 12: every kind of bucket
    dense = module.compute_bias(n, n)[0]  # [H, N, N]
    table = relative_bias_table(model, stack, 0 if stack == 0 else 2, span)
    assert table.shape == (4, 2 * span - 1)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    torch.testing.assert_close(table[:, j - i + span - 1], dense, atol=0, rtol=0)
    assert dense.std() > 0 and len({round(v, 12) for v in dense[0].flatten().tolist()}) > 4


def test_the_bias_table_gets_its_exact_gradient_with_the_torch_backend():
    """With a trainable ``relative_attention_bias`` the patched model (torch backend, padded and padding-free)
    gives it the stock model's gradient."""
    spec = FAMILIES["t5"]
    model = spec.model()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    batch = inputs(spec, LENGTHS)
    tables = [model.transformer.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
              model.transformer.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight]

    def gradients():
        grads = torch.autograd.grad(loss_of(model(**batch, use_cache=False), batch), tables)
        return [g.clone() for g in grads]

    model.set_attn_implementation("sdpa")
    expected = gradients()
    for padding_free in (False, True):
        with fastbertology.patch(model, backend="torch", padding_free=padding_free):
            for ours, theirs in zip(gradients(), expected):
                assert theirs.abs().sum() > 0
                torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_a_trainable_bias_table_is_refused_on_triton_with_the_fix():
    spec = FAMILIES["t5"]
    model = spec.model(torch.float32)
    model.transformer.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.requires_grad_(True)
    batch = inputs(spec, [5, 3])
    with fastbertology.patch(model, backend="triton"):
        with pytest.raises(ValueError, match=r"T5 relative position bias requires grad.*requires_grad_\(False\).*"
                                             r"backend='torch'"):
            model(**batch, use_cache=False)


def test_no_dense_position_bias_while_patched():
    """While patched, T5's ``compute_bias`` returns a ``[1, H, 1, 1]`` placeholder (packed calls would otherwise
    build ``[1, H, T, T]``); the stock one is back after ``remove``."""
    model = FAMILIES["mt5"].model()
    module = model.transformer.encoder.block[0].layer[0].SelfAttention
    shapes = []
    handle = module.register_forward_hook(lambda m, args, output: shapes.append(tuple(output[1].shape)))
    batch = inputs(FAMILIES["mt5"], LENGTHS)
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        model(**batch, use_cache=False)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    assert shapes == [(1, 4, 1, 1), (1, 4, 9, 9)]


@pytest.mark.parametrize("model_class, parts", [
    ("T5EncoderModel", ["encoder"] * 2),
    ("T5ForConditionalGeneration", ["encoder"] * 2 + ["decoder"] * 2 + ["cross"] * 2)])
def test_the_encoder_alone_and_the_language_model_equal_the_oracle(model_class, parts):
    """T5EncoderModel (rows: the encoder's only) and T5ForConditionalGeneration (its logits and loss) with a head
    mask over their rows, padded and padding-free, against the stock model with output-projection hooks."""
    import transformers as tf
    from families import Family, _t5

    model = Family("t5", lambda: _t5(tf.T5Config, getattr(tf, model_class)), "seq2seq", lambda m: []).model()
    spec = FAMILIES["t5"]
    batch = inputs(spec, LENGTHS)
    real = batch["attention_mask"].bool()
    if model_class == "T5EncoderModel":
        outputs = [block.layer[0].SelfAttention.o for block in model.encoder.block]
        extra, field = {"use_cache": False}, "last_hidden_state"
    else:
        outputs = ([block.layer[0].SelfAttention.o for block in model.encoder.block]
                   + [block.layer[0].SelfAttention.o for block in model.decoder.block]
                   + [block.layer[1].EncDecAttention.o for block in model.decoder.block])
        extra, field = {"labels": batch["input_ids"][:, :4].contiguous(), "use_cache": False}, "logits"
    oracle = Family("t5", spec.build, "seq2seq", lambda m: outputs)
    head_mask = torch.rand(len(parts), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), oracle_head_mask(oracle, model, head_mask):
        expected = model(**batch, **extra)
    for padding_free in (False, True):
        with fastbertology.patch(model, backend="torch", padding_free=padding_free), torch.no_grad():
            assert fastbertology.architectures.row_parts(model) == parts
            ours = model(**batch, **extra, head_mask=head_mask)
        a, b = getattr(ours, field), getattr(expected, field)
        if field == "last_hidden_state":
            a, b = a[real], b[real]
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        if model_class != "T5EncoderModel":
            torch.testing.assert_close(ours.loss, expected.loss, atol=1e-10, rtol=0)

"""Patched models against stock transformers with an independent eager implementation of 4.x head masking."""

import pytest
import torch
from models import MODEL_TYPES, model_loss, random_batch, reference_head_mask, tiny_model

import fastbertology

LENGTHS = [9, 5, 7]  # odd lengths, right padding


def _outputs(model, input_ids, attention_mask, head_mask=None, **kwargs):
    kwargs = dict(kwargs)
    if head_mask is not None:
        kwargs["head_mask"] = head_mask
    return model(input_ids, attention_mask=attention_mask, output_attentions=True, output_hidden_states=True,
                 **kwargs)


def _assert_same(patched, reference, attention_mask, atol=1e-10):
    keep = attention_mask.bool()
    sequence_logits = patched.logits.dim() == 3
    if sequence_logits:  # padded positions of token-level outputs are not compared
        torch.testing.assert_close(patched.logits[keep], reference.logits[keep], atol=atol, rtol=0)
    else:
        torch.testing.assert_close(patched.logits, reference.logits, atol=atol, rtol=0)
    assert len(patched.attentions) == len(reference.attentions)
    for ours, theirs in zip(patched.attentions, reference.attentions):
        assert ours.shape == theirs.shape
        # rows of padded queries and columns of padded keys may differ in how "nothing" is represented
        rows = keep[:, None, :, None] & keep[:, None, None, :]
        torch.testing.assert_close(ours * rows, theirs * rows, atol=atol, rtol=0)
    assert len(patched.hidden_states) == len(reference.hidden_states)
    for ours, theirs in zip(patched.hidden_states, reference.hidden_states):
        torch.testing.assert_close(ours[keep], theirs[keep], atol=atol, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_no_mask_equals_stock_eager(model_type):
    model, _, _ = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 9, LENGTHS)
    if model_type != "openai-gpt":
        model.set_attn_implementation("eager")
    with torch.no_grad():
        stock = _outputs(model, input_ids, attention_mask)
        with fastbertology.patch(model, backend="torch"):
            patched = _outputs(model, input_ids, attention_mask)
    _assert_same(patched, stock, attention_mask)


def _mask_of_shape(shape_kind, layers, heads, batch):
    generator = torch.Generator().manual_seed(7)
    if shape_kind == "H":
        mask = torch.rand(heads, generator=generator, dtype=torch.float64)
        mask[1] = 0.0
    elif shape_kind == "LH":
        mask = torch.rand(layers, heads, generator=generator, dtype=torch.float64)
        mask[0, 2] = 0.0
        mask[2] = 0.0  # a fully masked layer
    else:
        mask = torch.rand(batch, layers, heads, generator=generator, dtype=torch.float64)
        mask[1, 0, 3] = 0.0
    return mask


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("shape_kind", ["H", "LH", "BLH"])
def test_head_mask_equals_4x_semantics(model_type, shape_kind):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 9, LENGTHS)
    mask = _mask_of_shape(shape_kind, layers, heads, batch=3)

    reference_mask = mask.clone().requires_grad_(True)
    with reference_head_mask(model, reference_mask):
        reference = _outputs(model, input_ids, attention_mask)
    model_loss(model, reference, input_ids, attention_mask).backward()

    patched_mask = mask.clone().requires_grad_(True)
    with fastbertology.patch(model, backend="torch"):
        patched = _outputs(model, input_ids, attention_mask, head_mask=patched_mask)
    model_loss(model, patched, input_ids, attention_mask).backward()

    _assert_same(patched, reference, attention_mask)
    torch.testing.assert_close(patched_mask.grad, reference_mask.grad, atol=1e-9, rtol=1e-9)
    assert patched_mask.grad.abs().sum() > 0


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_loss_and_hidden_states_with_labels(model_type):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 9, LENGTHS)
    mask = _mask_of_shape("LH", layers, heads, batch=3)
    labels = torch.tensor([0, 2, 1]) if model_type == "bert" else input_ids.masked_fill(attention_mask == 0, -100)
    with reference_head_mask(model, mask):
        reference = model(input_ids, attention_mask=attention_mask, labels=labels)
    with fastbertology.patch(model, backend="torch"):
        patched = model(input_ids, attention_mask=attention_mask, labels=labels, head_mask=mask)
    torch.testing.assert_close(patched.loss, reference.loss, atol=1e-10, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_per_example_mask_equals_each_example_alone(model_type):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 9, LENGTHS)
    mask = _mask_of_shape("BLH", layers, heads, batch=3)
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        together = model(input_ids, attention_mask=attention_mask, head_mask=mask).logits
        for row, length in enumerate(LENGTHS):
            alone = model(input_ids[row:row + 1, :length], head_mask=mask[row]).logits
            torch.testing.assert_close(together[row:row + 1, :length] if together.dim() == 3 else together[row:row + 1],
                                       alone, atol=1e-10, rtol=0)


def test_fully_masked_head_has_no_effect_of_its_values():
    model, layers, heads = tiny_model("bert")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    mask = torch.ones(layers, heads, dtype=torch.float64)
    mask[1, 2] = 0.0
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        masked = model(input_ids, attention_mask=attention_mask, head_mask=mask, output_attentions=True)
        # perturbing the masked head's value weights must not change anything
        value = model.bert.encoder.layer[1].attention.self.value
        value.weight[16:24] += 1.0
        perturbed = model(input_ids, attention_mask=attention_mask, head_mask=mask)
    torch.testing.assert_close(masked.logits, perturbed.logits, atol=1e-12, rtol=0)
    assert masked.attentions[1][:, 2].abs().max() == 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_recorder_equals_entropy_from_explicit_probabilities(model_type):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 9, LENGTHS)
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        with fastbertology.record(model) as stats:
            out = model(input_ids, attention_mask=attention_mask, output_attentions=True)
            model(input_ids[:1], attention_mask=attention_mask[:1])  # a second pass accumulates
    keep = attention_mask.to(torch.float64)
    tokens = keep.sum() + keep[0].sum()
    assert stats.token_count() == int(tokens)
    for layer, probs in enumerate(out.attentions):
        plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
        entropy = -plogp.sum(-1)  # [B, H, N]
        max_prob = probs.amax(-1)
        expected_entropy = (entropy * keep[:, None]).sum((0, 2)) + (entropy[:1] * keep[:1, None]).sum((0, 2))
        expected_max = (max_prob * keep[:, None]).sum((0, 2)) + (max_prob[:1] * keep[:1, None]).sum((0, 2))
        torch.testing.assert_close(stats.entropy()[layer], expected_entropy / tokens, atol=1e-10, rtol=0)
        torch.testing.assert_close(stats.max_prob()[layer], expected_max / tokens, atol=1e-10, rtol=0)


def test_remove_restores_stock_behaviour():
    model, _, _ = tiny_model("bert")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    with torch.no_grad():
        before = model(input_ids, attention_mask=attention_mask).logits
        handle = fastbertology.patch(model)
        assert fastbertology.is_patched(model)
        handle.remove()
        handle.remove()  # harmless twice
        assert not fastbertology.is_patched(model)
        assert model.config._attn_implementation == "sdpa"
        assert not any(hasattr(m, "_fastbertology_layer") for m in model.modules())
        assert not model._forward_pre_hooks and not model.bert._forward_pre_hooks
        after = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(after, before)


def test_remove_restores_openai_gpt_forward():
    model, _, _ = tiny_model("openai-gpt")
    with fastbertology.patch(model):
        assert "forward" in vars(model.transformer.h[0].attn)
    assert "forward" not in vars(model.transformer.h[0].attn)


def test_gradients_flow_to_weights_and_mask():
    model, layers, heads = tiny_model("gpt2")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    mask = torch.ones(layers, heads, dtype=torch.float64, requires_grad=True)
    with fastbertology.patch(model, backend="torch"):
        out = model(input_ids, attention_mask=attention_mask, head_mask=mask)
        model_loss(model, out, input_ids, attention_mask).backward()
    assert mask.grad is not None and model.transformer.h[0].attn.c_attn.weight.grad is not None


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def patched_bert():
    model, layers, heads = tiny_model("bert")
    with fastbertology.patch(model) as handle:
        yield model, handle


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(5, dtype=torch.float64), "has shape"),
        (torch.ones(3, 5, dtype=torch.float64), "has shape"),
        (torch.ones(2, 4, dtype=torch.float64), "has shape"),
        (torch.ones(4, 3, 4, dtype=torch.float64), "batch size"),
        (torch.ones(4, dtype=torch.long), "floating-point"),
        ([1.0, 1.0, 1.0, 1.0], "torch.Tensor"),
        (torch.ones(4, dtype=torch.float64, device="meta"), "is on meta"),
    ],
)
def test_bad_head_mask_raises(patched_bert, mask, message):
    model, _ = patched_bert
    input_ids, attention_mask = random_batch(2, 7)
    with pytest.raises(ValueError, match=message):
        model(input_ids, attention_mask=attention_mask, head_mask=mask)
    # the failed call left no state behind: a good call still works
    model(input_ids, attention_mask=attention_mask)
    assert model._fastbertology_state.depth == 0


def test_unsupported_model_names_supported_types():
    from transformers import CamembertConfig, CamembertModel

    model = CamembertModel(CamembertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=48))
    with pytest.raises(ValueError, match="'camembert'; supported: albert, bart, bert, bloom, clip, clip_text_model, "
                                         "clip_vision_model, deit, distilbert"):
        fastbertology.patch(model)


def test_a_model_that_declines_the_attention_functions_is_refused(monkeypatch):
    """transformers declines set_attn_implementation (a log line, nothing else) for a model that computes attention
    itself: GPT-J before transformers 5.24. A patch would then see no head and a head mask would be silently
    ignored; it is refused instead, naming the family, the transformers version and the fix, and the model is left
    as it was."""
    model, _, _ = tiny_model("gpt2")
    model.eval()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        stock = model(input_ids=input_ids).logits
    monkeypatch.setattr(model, "set_attn_implementation", lambda *args, **kwargs: None)  # what it does there
    with pytest.raises(ValueError, match=r"GPT-2's attention does not go through transformers' attention functions "
                                         r"in transformers 5\.\d+.*pip install 'transformers>=5\.24"):
        fastbertology.patch(model)
    assert not fastbertology.is_patched(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, stock, atol=0, rtol=0)


def test_patching_twice_raises(patched_bert):
    model, _ = patched_bert
    with pytest.raises(RuntimeError, match="already patched"):
        fastbertology.patch(model)


def test_unknown_backend_raises():
    model, _, _ = tiny_model("bert")
    with pytest.raises(ValueError, match="unknown backend"):
        fastbertology.patch(model, backend="cuda")


def test_record_needs_patched_model():
    model, _, _ = tiny_model("bert")
    with pytest.raises(RuntimeError, match="patch"):
        with fastbertology.record(model):
            pass


def test_training_mode_dropout_is_refused():
    model, _, _ = tiny_model("bert")
    input_ids, attention_mask = random_batch(2, 7)
    model.train()
    with fastbertology.patch(model):
        with pytest.raises(RuntimeError, match="dropout"):
            model(input_ids, attention_mask=attention_mask)
        model.config.attention_probs_dropout_prob = 0.0
        for layer in model.bert.encoder.layer:
            layer.attention.self.dropout.p = 0.0
        model(input_ids, attention_mask=attention_mask)  # training without attention dropout is fine


def test_four_d_attention_mask_is_refused(patched_bert):
    model, _ = patched_bert
    input_ids, _ = random_batch(2, 7)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids, attention_mask=torch.zeros(2, 1, 7, 7, dtype=torch.float64))


# ------------------------------------------------------------------------------------- Triton backend (interpreter)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_triton_backend_equals_torch_backend(model_type):
    """The whole patched model on the Triton kernels (interpreter on CPU) against the PyTorch backend, float32."""
    model, layers, heads = tiny_model(model_type, dtype=torch.float32)
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    mask = torch.rand(2, layers, heads, generator=torch.Generator().manual_seed(3))
    mask[0, 1, 2] = 0.0
    results = {}
    for backend in ("torch", "triton"):
        head_mask = mask.clone().requires_grad_(True)
        with fastbertology.patch(model, backend=backend), fastbertology.record(model) as stats:
            out = model(input_ids, attention_mask=attention_mask, head_mask=head_mask, output_attentions=True)
            model_loss(model, out, input_ids, attention_mask).backward()
        assert not stats.entropy().requires_grad
        results[backend] = (out, head_mask.grad, stats.entropy(), stats.max_prob())
    (torch_out, torch_grad, torch_entropy, torch_max), (out, grad, entropy, max_prob) = results.values()
    keep = attention_mask.bool()
    logits, torch_logits = (o.logits[keep] if o.logits.dim() == 3 else o.logits for o in (out, torch_out))
    torch.testing.assert_close(logits, torch_logits, atol=2e-5, rtol=1e-4)
    for ours, theirs in zip(out.attentions, torch_out.attentions):
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad, torch_grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(entropy, torch_entropy, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(max_prob, torch_max, atol=2e-6, rtol=1e-5)

"""Copies and moves of a patched model (deepcopy, .to(dtype), .half(), pickling, torch.compile): each keeps working
exactly or is refused with the reason (see fastbertology.patch_copies)."""

import copy
import io
import pickle

import pytest
import torch
from models import model_loss, random_batch, reference_head_mask, tiny_model

import fastbertology


def _mask(kind: str, layers: int, heads: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    shape = (layers, heads) if kind == "LH" else (batch, layers, heads)
    mask = torch.rand(shape, generator=generator, dtype=torch.float64)
    mask[..., 1, 2] = 0.0
    return mask


def _logits_and_grad(model, input_ids, attention_mask, mask):
    """``(logits, head-mask gradient)`` of one pass with ``mask``."""
    mask = mask.clone().requires_grad_(True)
    output = model(input_ids, attention_mask=attention_mask, head_mask=mask)
    model_loss(model, output, input_ids, attention_mask).backward()
    return output.logits.detach(), mask.grad


def _reference(model, input_ids, attention_mask, mask):
    """Logits and head-mask gradient of the stock model with 4.x head-mask semantics (no fastbertology)."""
    mask = mask.clone().requires_grad_(True)
    with reference_head_mask(model, mask):
        output = model(input_ids, attention_mask=attention_mask)
    model_loss(model, output, input_ids, attention_mask).backward()
    return output.logits.detach(), mask.grad


def _assert_close(ours, theirs, attention_mask, atol=1e-10):
    (logits, grad), (reference_logits, reference_grad) = ours, theirs
    if logits.dim() == 3:  # token-level logits: padding positions are not compared
        keep = attention_mask.bool()
        logits, reference_logits = logits[keep], reference_logits[keep]
    torch.testing.assert_close(logits, reference_logits, atol=atol, rtol=0)
    torch.testing.assert_close(grad, reference_grad, atol=atol, rtol=1e-8)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "openai-gpt"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["LH", "BLH"])
def test_deepcopy_of_patched_model_applies_the_mask(model_type, padded, kind):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 9, [9, 5, 7] if padded else [])
    mask = _mask(kind, layers, heads, 3)
    expected = _reference(model, input_ids, attention_mask, mask)
    fastbertology.patch(model, backend="torch")
    twin = copy.deepcopy(model)
    assert fastbertology.is_patched(twin)
    _assert_close(_logits_and_grad(twin, input_ids, attention_mask, mask), expected, attention_mask)
    _assert_close(_logits_and_grad(model, input_ids, attention_mask, mask), expected, attention_mask)
    unmasked = twin(input_ids, attention_mask=attention_mask).logits
    assert (unmasked - expected[0]).abs().max() > 1e-6  # the mask matters: a copy that ignored it would fail


def test_copy_is_independent_of_the_original():
    model, layers, heads = tiny_model("bert")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    mask = _mask("LH", layers, heads, 2)
    handle = fastbertology.patch(model, backend="torch")
    twin = copy.deepcopy(model)
    with fastbertology.record(model) as original_stats, fastbertology.record(twin) as twin_stats:
        twin(input_ids, attention_mask=attention_mask, head_mask=mask)
    assert original_stats.tokens == [None] * layers and twin_stats.tokens[0] is not None
    assert fastbertology.patching.calls_so_far(model) == 0 and fastbertology.patching.calls_so_far(twin) == 1
    # the copy's weights are its own
    with torch.no_grad():
        twin.bert.encoder.layer[0].attention.self.value.weight += 1.0
    assert not torch.equal(twin.bert.encoder.layer[0].attention.self.value.weight,
                           model.bert.encoder.layer[0].attention.self.value.weight)
    # removing the original's patch leaves the copy patched and correct
    handle.remove()
    assert not fastbertology.is_patched(model) and fastbertology.is_patched(twin)
    expected = _reference(copy.deepcopy(model), input_ids, attention_mask, mask)  # a stock copy of the original
    again = copy.deepcopy(twin)  # (and a copy of a copy)
    with torch.no_grad():
        again.bert.encoder.layer[0].attention.self.value.weight -= 1.0
    _assert_close(_logits_and_grad(again, input_ids, attention_mask, mask), expected, attention_mask)


def test_deepcopy_of_a_layer_of_a_patched_model_runs_on_its_own_state():
    model, _, _ = tiny_model("bert")
    fastbertology.patch(model, backend="torch")
    layer = copy.deepcopy(model.bert.encoder.layer[1])
    binding = layer.attention.self._fastbertology_layer
    assert binding.state is not model._fastbertology_state
    assert binding.state.model.bert.encoder.layer[1] is layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_changing_dtype_keeps_the_patch_working(dtype):
    model, layers, heads = tiny_model("bert", dtype=torch.float32)
    input_ids, attention_mask = random_batch(3, 9, [9, 5, 7])
    mask = _mask("BLH", layers, heads, 3).to(dtype)
    expected = _reference(copy.deepcopy(model).to(dtype), input_ids, attention_mask, mask)
    fastbertology.patch(model, backend="torch")
    moved = model.half() if dtype == torch.float16 else model.to(dtype)
    assert moved is model and fastbertology.is_patched(model)
    tolerance = 2e-2 if dtype == torch.float16 else 1e-10
    _assert_close(_logits_and_grad(model, input_ids, attention_mask, mask), expected, attention_mask, atol=tolerance)


@pytest.mark.parametrize("save", [pickle.dumps, lambda model: torch.save(model, io.BytesIO())])
def test_pickling_a_patched_model_is_refused_with_the_reason(save):
    model, _, _ = tiny_model("gpt2")
    handle = fastbertology.patch(model, backend="torch")
    with pytest.raises(TypeError, match=r"cannot be pickled.*handle\.remove\(\).*patch\(model\) again"):
        save(model)
    with pytest.raises(TypeError, match="cannot be pickled"):
        save(model.transformer.h[0])  # a part of it too
    handle.remove()
    restored = pickle.loads(pickle.dumps(model))  # the stock model pickles as before
    assert not fastbertology.is_patched(restored)


def test_torch_compile_of_a_patched_model_is_refused_with_the_reason():
    model, layers, heads = tiny_model("bert")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    fastbertology.patch(model, backend="torch")
    compiled = torch.compile(model)
    with pytest.raises(RuntimeError, match=r"cannot run under torch\.compile, torch\.export or torch\.jit\.trace.*"
                                           r"handle\.remove\(\)"):
        compiled(input_ids, attention_mask=attention_mask, head_mask=torch.ones(layers, heads, dtype=torch.float64))
    # the refused call left no state behind: the model itself still runs
    model(input_ids, attention_mask=attention_mask)
    assert fastbertology.patching.calls_so_far(model) == 1
    assert model._fastbertology_state.depth == 0


def test_tracing_a_patched_model_is_refused_with_the_reason():
    model, _, _ = tiny_model("bert")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    fastbertology.patch(model, backend="torch")
    with pytest.raises(RuntimeError, match=r"cannot run under .*torch\.jit\.trace"):
        torch.jit.trace(model, example_kwarg_inputs={"input_ids": input_ids, "attention_mask": attention_mask},
                        strict=False)
    assert model._fastbertology_state.depth == 0

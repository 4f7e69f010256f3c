"""Issue 11's families against the independent oracle of tests/families.py (float64, torch backend), and on the
Triton interpreter.

Per family: logits, loss, hidden states, attention maps and head-mask gradients for ``[R, H]`` and ``[B, R, H]``
masks against the stock model with output-projection pre-hooks; per-example masks equal each example alone;
padding-free equals padded; every analysis (importance per batch and per example, entropy, max probability,
iterative masking, sweeps with prefix reuse against the naive loop); pruned equals masked, and the save ->
``load_pruned`` round trip. Odd lengths, right padding, grouped-query attention where the family has it.

A family that needs a kernel feature (grouped-query attention, sliding windows) which this version of the kernels
lacks must refuse with an error naming the feature; the same tests check it in full once the kernels take it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from families import (
    FAMILIES,
    HEADS,
    NAMES,
    TEXT_NAMES,
    expected_attentions,
    hidden_state_fields,
    inputs,
    labels,
    loss_of,
    main_output,
    oracle_head_mask,
    rows,
    stock_precision,
    text_mask,
    with_labels,
)

import fastbertology
from fastbertology import architectures, kernels
from fastbertology.importance import analyze_heads, evaluate_metric
from fastbertology.masking import iterative_masking
from fastbertology.pruning import count_parameters, load_pruned, prune_heads, requires_patch
from fastbertology.sweeps import ablation_sweep, naive_sweep
from fastbertology.tasks import ClassificationTask, LanguageModelingTask, RetrievalTask

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [9, 5, 7]  # odd lengths, right padding
TEXT_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")  # [B, N], N sliced
ATOL = 1e-10
MAPS_ATOL = 1e-6  # stock eager attention of several families takes its softmax in float32


def _call_options(family) -> dict:
    return {"use_cache": False} if FAMILIES[family].text or FAMILIES[family].kind == "speech2text" else {}


def _real(tensor, batch):
    """Token-level outputs at the real positions of the text (all of them for images and audio)."""
    mask = text_mask(batch)
    if tensor.dim() >= 3 and mask is not None and tensor.shape[1] == mask.shape[1]:
        return tensor[mask.bool()]
    return tensor


def _mask(kind, family, model, batch_size, *, seed=7):
    count = rows(FAMILIES[family], model)
    generator = torch.Generator().manual_seed(seed)
    shape = (count, HEADS) if kind == "LH" else (batch_size, count, HEADS)
    mask = torch.rand(shape, generator=generator, dtype=torch.float64)
    mask[..., 0, 1] = 0.0
    mask[..., count - 1, :] = 0.0  # a fully masked row
    return mask


def _key_keep(name, batch, probs):
    """Which query rows / key columns of a map of output field ``name`` are real (compared): cross-attention rows
    count every decoder position (as BART's, whose decoder has no padding mask)."""
    b, _, n_q, n_k = probs.shape
    if "decoder_attention_mask" in batch:  # Whisper: the encoder has no padding, the decoder has
        real = batch["decoder_attention_mask"].bool()
        every = torch.ones(b, max(n_q, n_k), dtype=torch.bool)
        queries, keys = (real, real) if name == "decoder_attentions" else (every[:, :n_q], every[:, :n_k])
        return queries[:, None, :, None] & keys[:, None, None, :]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(b, 1, n_q, n_k, dtype=torch.bool)
    queries = mask.bool() if name in ("attentions", "encoder_attentions") else torch.ones(b, n_q, dtype=torch.bool)
    keys = torch.ones(b, n_k, dtype=torch.bool) if name == "decoder_attentions" else mask.bool()
    return queries[:, None, :, None] & keys[:, None, None, :]


# ------------------------------------------------------------------------------------------------ the oracle
@pytest.mark.parametrize("mask_kind", ["LH", "BLH"])
@pytest.mark.parametrize("family", NAMES)
def test_patched_equals_the_oracle(family, mask_kind):
    spec = FAMILIES[family]
    model = spec.model()
    batch = inputs(spec, LENGTHS)
    target = with_labels(spec, batch)
    head_mask = _mask(mask_kind, family, model, len(LENGTHS))
    options = _call_options(family)

    oracle_mask = head_mask.clone().requires_grad_(True)
    with oracle_head_mask(spec, model, oracle_mask):
        reference = model(**batch, **target, output_hidden_states=True, **options)
    loss_of(reference, batch).backward()
    with torch.no_grad(), oracle_head_mask(spec, model, head_mask, implementation="eager"):
        maps = expected_attentions(spec, model(**batch, output_attentions=True, **options), head_mask)

    def patched():
        results = {}
        with fastbertology.patch(model, backend="torch"):
            for name, extra in (("padded", dict(output_attentions=True, output_hidden_states=True)),
                                ("padding-free", {})):
                mask = head_mask.clone().requires_grad_(True)
                output = model(**batch, **target, head_mask=mask, **extra, **options)
                loss_of(output, batch).backward()
                results[name] = (output, mask.grad)
        return results

    results = patched()
    assert oracle_mask.grad.abs().sum() > 0
    for name, (output, gradient) in results.items():
        torch.testing.assert_close(_real(main_output(output), batch), _real(main_output(reference), batch),
                                   atol=ATOL, rtol=0, msg=f"{name} logits")
        if not spec.encoder_only:  # (a model without a task head has no loss)
            torch.testing.assert_close(output.loss, reference.loss, atol=ATOL, rtol=0, msg=f"{name} loss")
        torch.testing.assert_close(gradient, oracle_mask.grad, atol=1e-9, rtol=1e-9, msg=f"{name} mask gradient")
    padded = results["padded"][0]
    for field in hidden_state_fields(reference):
        ours, theirs = getattr(padded, field), getattr(reference, field)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            real = (batch.get("attention_mask") if field != "decoder_hidden_states"
                    else batch.get("decoder_attention_mask"))
            keep = real.bool() if real is not None else torch.ones(a.shape[:2], dtype=torch.bool)
            torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=0, msg=field)
    for field, expected in maps.items():
        ours = getattr(padded, field)
        assert len(ours) == len(expected)
        for a, b in zip(ours, expected):
            keep = _key_keep(field, batch, a)
            torch.testing.assert_close(a * keep, b * keep, atol=MAPS_ATOL, rtol=0, msg=field)


@pytest.mark.parametrize("family", NAMES)
def test_statistics_equal_those_of_the_stock_maps(family):
    """Entropy and max probability (of the softmax before the mask) per row, over the real query tokens, against
    the stock eager maps (with attention sinks: of the maps and the sink's probability, one minus their sum)."""
    spec = FAMILIES[family]
    model = spec.model()
    batch = inputs(spec, LENGTHS)
    head_mask = _mask("LH", family, model, len(LENGTHS))
    with torch.no_grad(), oracle_head_mask(spec, model, head_mask, implementation="eager"):
        stock = model(**batch, output_attentions=True, **_call_options(family))  # maps before the mask

    def recorded():
        with fastbertology.patch(model, backend="torch"), fastbertology.record(model) as stats, torch.no_grad():
            model(**batch, head_mask=head_mask, **_call_options(family))
        return stats

    stats = recorded()
    for field, first in spec.attentions.items():
        for index, probs in enumerate(getattr(stock, field)):
            keep = _key_keep(field, batch, probs)[:, :, :, 0].to(torch.float64)  # [B, 1, N_q]: real queries
            if spec.sinks:  # the distribution includes the sink's probability, which the maps leave out
                probs = torch.cat([probs, 1 - probs.sum(-1, keepdim=True)], dim=-1)
            plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
            for table, values in ((stats.entropy(), -plogp.sum(-1)), (stats.max_prob(), probs.amax(-1))):
                expected = (values * keep).sum((0, 2)) / keep.sum()
                torch.testing.assert_close(table[first + index], expected, atol=MAPS_ATOL, rtol=0)


@pytest.mark.parametrize("family", NAMES)
def test_per_example_masks_equal_each_example_alone(family):
    spec = FAMILIES[family]
    model = spec.model()
    batch = inputs(spec, LENGTHS)
    head_mask = _mask("BLH", family, model, len(LENGTHS))

    def compare():
        with fastbertology.patch(model, backend="torch"), torch.no_grad():
            together = main_output(model(**batch, head_mask=head_mask, **_call_options(family)))
            for row, length in enumerate(LENGTHS):
                alone_inputs = {key: value[row:row + 1, :length] if key in TEXT_KEYS else value[row:row + 1]
                                for key, value in batch.items()}
                alone = main_output(model(**alone_inputs, head_mask=head_mask[row], **_call_options(family)))
                tokens = text_mask(batch) is not None and together.dim() == 3
                ours = together[row:row + 1, :length] if tokens else together[row:row + 1]
                torch.testing.assert_close(ours, alone, atol=ATOL, rtol=0)
        return True

    compare()


# ------------------------------------------------------------------------------------------------ padding-free
class RowCounter:
    """Rows (tokens) entering the attention output projections of the stacks that may run padding-free."""

    def __init__(self, spec, model):
        self.rows = 0
        projections = spec.outputs(model)
        if spec.kind == "seq2seq":  # BART: the encoder's (its decoder runs padded)
            projections = projections[:getattr(model.config, "encoder_layers", None) or model.config.num_layers]
        first_stack = projections
        self.handles = [module.register_forward_pre_hook(self._count) for module in {id(m): m for m in first_stack}
                        .values()]

    def _count(self, module, args):
        self.rows += args[0].shape[0] * args[0].shape[1]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", TEXT_NAMES)
def test_padding_free_equals_padded(family):
    spec = FAMILIES[family]
    model = spec.model()
    lengths = [9, 5, 7, 1] if spec.kind != "seq2seq" else [9, 5, 7, 2]
    batch = inputs(spec, lengths)
    head_mask = _mask("BLH", family, model, len(lengths))

    def run(padding_free):
        mask = head_mask.clone().requires_grad_(True)
        with fastbertology.patch(model, backend="torch", padding_free=padding_free):
            counter = RowCounter(spec, model)
            with fastbertology.record(model) as stats:
                output = model(**batch, **with_labels(spec, batch), head_mask=mask, use_cache=False)
            counter.remove()
            loss = loss_of(output, batch) + (0 if spec.encoder_only else output.loss)
            loss.backward()
        return _real(main_output(output).detach(), batch), loss.detach(), mask.grad, stats.entropy(), counter.rows

    padded, packed = run(False), run(True)
    for name, a, b in zip(["logits", "loss", "mask grad", "entropy"], packed[:4], padded[:4]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)
    applications = padded[4] // batch["attention_mask"].numel()
    assert packed[4] == applications * int(batch["attention_mask"].sum()) < padded[4]


# ------------------------------------------------------------------------------------------------ analyses
def _task(spec):
    if spec.kind == "text-encoder":  # (a sentence-embedding task: mean-pooled last hidden states)
        return RetrievalTask(group_size=None)
    # (Whisper's speech recognition: the decoder text's language-modelling loss given the audio, the seq2seq loss)
    return LanguageModelingTask() if spec.kind in ("lm", "speech2text") else ClassificationTask(num_labels=3)


def _batches(spec):
    batches = []
    for index, lengths in enumerate(([9, 5, 7], [3, 8, 6, 4])):
        batch = inputs(spec, lengths, seed=10 + index)
        if spec.kind == "text-encoder":  # (query, positive) pairs
            pairs = inputs(spec, lengths[::-1], seed=20 + index)
            batch |= {"pair_input_ids": pairs["input_ids"], "pair_attention_mask": pairs["attention_mask"]}
        elif spec.kind != "speech2text":  # (its targets are the decoder text)
            batch["labels"] = labels(spec, batch) if spec.kind != "lm" else batch["input_ids"].masked_fill(
                batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


# (CLIP's vision tower has no task head: its layers are analysed through CLIPForImageClassification, "clip")
@pytest.mark.parametrize("family", [name for name in NAMES if FAMILIES[name].kind != "image-encoder"])
def test_analyses(family):
    """Importance per batch and per example, entropy, max probability, iterative masking and a heads sweep with
    prefix reuse (against the naive one-mask-per-pass loop), padded and padding-free alike."""
    spec = FAMILIES[family]
    model = spec.model()
    batches = _batches(spec)

    def analyse(padding_free):
        with fastbertology.patch(model, backend="torch", padding_free=padding_free):
            per_batch = analyze_heads(model, batches, _task(spec))
            per_example = analyze_heads(model, batches, _task(spec), importance="per_example")
            masked = evaluate_metric(model, batches, _task(spec), head_mask=(per_batch.importance > 0.3).double())
            masking = iterative_masking(model, batches, _task(spec), masking_amount=0.25, masking_threshold=0.5,
                                        initial=per_batch)
            sweep = ablation_sweep(model, batches, _task(spec), kind="heads", masks_per_pass=3)
            naive, baseline, _ = naive_sweep(model, batches, _task(spec), sweep.masks)
        return per_batch, per_example, masked, masking, sweep, naive, baseline

    results = analyse(False), analyse(True)
    count = rows(spec, model)
    for per_batch, per_example, _masked, masking, sweep, naive, baseline in results:
        for analysis in (per_batch, per_example):
            for table in (analysis.raw_importance, analysis.entropy, analysis.max_prob):
                assert table.shape == (count, HEADS) and torch.isfinite(table).all()
            assert analysis.raw_importance.sum() > 0
        assert masking.curve[0]["score"] == per_batch.metric and masking.head_mask.shape == (count, HEADS)
        torch.testing.assert_close(sweep.scores, naive, atol=1e-10, rtol=0)  # prefix reuse + batching = naive
        assert sweep.baseline_score == pytest.approx(baseline, abs=1e-12)
        assert sweep.scores.shape == (count * HEADS,)
    padded, packed = results
    for a, b in zip(packed[:2], padded[:2]):
        for field in ("raw_importance", "entropy", "max_prob"):  # (summation order; importance sums |gradients|)
            expected = getattr(b, field)
            torch.testing.assert_close(getattr(a, field), expected, atol=1e-7 * float(expected.abs().max()),
                                       rtol=1e-6, msg=field)
    assert packed[2] == pytest.approx(padded[2], abs=1e-12)
    torch.testing.assert_close(packed[4].scores, padded[4].scores, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ pruning
PRUNE = {  # rows -> current heads; ALBERT: the same heads in both applications of each shared layer module
    "albert": {0: [1], 2: [1], 1: [0, 3], 3: [0, 3]},
    "bart": {0: [1], 3: [0, 2], 4: [0, 1, 2, 3], 5: [3]},
    # T5: no heads left in the encoder layer that owns the position bias table / in the decoder's
    "t5": {0: [0, 1, 2, 3], 1: [2], 2: [1], 3: [0, 2], 4: [0, 1, 2, 3], 5: [3]},
    "mt5": {0: [1], 2: [0, 1, 2, 3], 3: [1, 3], 5: [0]},
    "whisper": {0: [1], 3: [0, 2], 4: [0, 1, 2, 3], 5: [3]},
}
DEFAULT_PRUNE = {0: [1], 1: [0, 1, 2, 3], 2: [0, 1]}  # GQA (2 groups of 2): unequal groups, no heads, equal groups


def _zero_mask(model, spec, heads):
    mask = torch.ones(rows(spec, model), HEADS, dtype=torch.float64)
    for row, row_heads in heads.items():
        mask[row, row_heads] = 0.0
    return mask


@pytest.mark.parametrize("family", NAMES)
def test_pruned_equals_masked_and_round_trips(family, tmp_path):
    spec = FAMILIES[family]
    model = spec.model()
    heads = PRUNE.get(family, DEFAULT_PRUNE)
    batch = inputs(spec, LENGTHS)
    options = _call_options(family)
    with torch.no_grad(), oracle_head_mask(spec, model, _zero_mask(model, spec, heads)):
        expected = _real(main_output(model(**batch, **options)), batch)
    before = count_parameters(model, attention_heads_only=True)

    pruned = prune_heads(copy.deepcopy(model), heads)
    assert pruned.config.pruned_heads == {row: sorted(h) for row, h in heads.items()}
    assert count_parameters(pruned, attention_heads_only=True) < before
    assert architectures.heads_per_layer(pruned) == [HEADS - len(heads.get(r, [])) for r in range(rows(spec, model))]
    unequal = requires_patch(pruned.config)
    # two groups of two: row 0 keeps one query head of its first group and both of the second (Gemma has one group;
    # Falcon's new decoder architecture cuts the groups into equal chunks instead: tests/test_families_falcon.py)
    grouped_chunks = architectures.architecture(model).projections_of(model.config).layout == "fused-grouped"
    two_groups = spec.gqa and getattr(model.config, "num_key_value_heads", None) == 2 and not grouped_chunks
    assert unequal == ([0] if two_groups else [])

    def run_pruned():
        with torch.no_grad(), stock_precision(spec):
            return _real(main_output(pruned(**batch, **options)), batch)

    # unequal groups run through fastbertology's attention, which gathers each query head's key/value head
    ours = run_pruned()
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)

    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pruned_heads"] == {str(row): sorted(h) for row, h in heads.items()}
    assert saved.get("fastbertology_unequal_groups", []) == unequal
    loaded = load_pruned(type(model), tmp_path, **spec.load)
    assert architectures.heads_per_layer(loaded) == architectures.heads_per_layer(pruned)
    assert count_parameters(loaded) == count_parameters(pruned)
    with torch.no_grad(), stock_precision(spec):
        torch.testing.assert_close(_real(main_output(loaded(**batch, **options)), batch), expected, atol=ATOL,
                                   rtol=0)

    def patched():  # the pruned model through the patch (no head mask: its rows have different head counts)
        with fastbertology.patch(loaded, backend="torch"), torch.no_grad():
            return _real(main_output(loaded(**batch, **options)), batch)

    torch.testing.assert_close(patched(), expected, atol=ATOL, rtol=0)


def test_load_pruned_refuses_weight_conversions_into_attention_weights(tmp_path, monkeypatch):
    """``load_pruned`` applies transformers' conversions of other weights (Mixtral's experts, in the round trip
    above) but refuses one that would produce attention projections, which pruning cut by head."""
    import transformers.conversion_mapping as mapping
    from transformers.core_model_loading import Concatenate, WeightConverter

    model = FAMILIES["llama"].model()
    prune_heads(model, {0: [1]})
    model.save_pretrained(tmp_path)
    stock = mapping.get_model_conversion_mapping
    merge = WeightConverter(source_patterns=["self_attn.q_proj.weight"], target_patterns="self_attn.q_proj.weight",
                            operations=[Concatenate(dim=0)])
    monkeypatch.setattr(mapping, "get_model_conversion_mapping", lambda *a, **k: [*stock(*a, **k), merge])
    with pytest.raises(ValueError, match=r"self_attn.q_proj.weight needs a weight conversion into the attention "
                                         r"weight .*cut by head.*from_pretrained and prune it again"):
        load_pruned(type(model), tmp_path)


# ------------------------------------------------------------------------------------------------ Triton
@pytest.mark.parametrize("family", NAMES)
def test_triton_backend_equals_torch_backend(family):
    """The whole patched model on the Triton kernels (the interpreter on CPU) against the PyTorch backend, float32:
    logits, mask gradients and statistics of a padding-free call with a per-example mask."""
    spec = FAMILIES[family]
    model = spec.model(torch.float32)
    batch = {key: value.float() if value.is_floating_point() else value for key, value in inputs(spec, [7, 4]).items()}
    head_mask = _mask("BLH", family, model, 2).float()

    def run(backend):
        mask = head_mask.clone().requires_grad_(True)
        with fastbertology.patch(model, backend=backend), fastbertology.record(model) as stats:
            output = model(**batch, head_mask=mask, **_call_options(family))
            loss_of(output, batch).backward()
        return _real(main_output(output).detach(), batch), mask.grad, stats.entropy(), stats.max_prob()

    results = run("torch"), run("triton")
    for name, ours, theirs in zip(["logits", "mask grad", "entropy", "max prob"], results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ rules, refusals
def test_albert_prunes_a_shared_layer_in_every_application_or_not_at_all():
    model = FAMILIES["albert"].model()
    with pytest.raises(ValueError, match=r"rows \[0, 2\] share one attention module.*same heads in every one"):
        prune_heads(model, {0: [1], 2: [2]})
    with pytest.raises(ValueError, match=r"rows \[1, 3\] share one attention module"):
        prune_heads(model, {1: [0]})
    assert not getattr(model.config, "pruned_heads", None)
    prune_heads(model, {1: [0], 3: [0]})
    assert architectures.heads_per_layer(model) == [4, 3, 4, 3]


@pytest.mark.parametrize("family", ["bart", "whisper"])
def test_encoder_decoders_take_the_three_4x_masks_or_one_table(family):
    """``head_mask`` [Le, H] (encoder), ``decoder_head_mask`` and ``cross_attn_head_mask`` [Ld, H] equal one
    ``head_mask`` [Le + 2 Ld, H] over all rows, gradients included; ``[H]`` is the encoder's, as in 4.x."""
    spec = FAMILIES[family]
    model = spec.model()
    batch = inputs(spec, LENGTHS)
    table = _mask("LH", family, model, 3)
    parts = [table[0:2].clone().requires_grad_(True), table[2:4].clone().requires_grad_(True),
             table[4:6].clone().requires_grad_(True)]
    whole = table.clone().requires_grad_(True)
    with fastbertology.patch(model, backend="torch"):
        separate = model(**batch, head_mask=parts[0], decoder_head_mask=parts[1], cross_attn_head_mask=parts[2])
        together = model(**batch, head_mask=whole)
        loss_of(separate, batch).backward()
        loss_of(together, batch).backward()
        torch.testing.assert_close(separate.logits, together.logits, atol=1e-12, rtol=0)
        torch.testing.assert_close(torch.cat([p.grad for p in parts]), whole.grad, atol=1e-12, rtol=0)
        heads = table[0]
        encoder_only = torch.ones_like(table)
        encoder_only[0:2] = heads
        with torch.no_grad():
            torch.testing.assert_close(model(**batch, head_mask=heads).logits,
                                       model(**batch, head_mask=encoder_only).logits, atol=1e-12, rtol=0)
            with pytest.raises(ValueError, match="decoder_head_mask: head_mask has shape"):
                model(**batch, decoder_head_mask=torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("model_type, feature", [("deberta", "disentangled"), ("deberta-v2", "disentangled")])
def test_families_outside_the_kernels_contract_are_refused_by_name(model_type, feature):
    with pytest.raises(ValueError, match=f"model type '{model_type}'.*{feature}"):
        architectures.architecture(model_type)


def test_a_deberta_model_is_refused_when_patched_pruned_or_loaded(tmp_path):
    from fastbertology.loading import ModelLoadingError, check_model_dir

    model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=24))
    for call in (fastbertology.patch, lambda m: prune_heads(m, {0: [0]})):
        with pytest.raises(ValueError, match="disentangled"):
            call(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadingError, match="disentangled"):
        check_model_dir(str(tmp_path))


def test_attention_modifiers_reach_the_kernels_and_the_rest_is_refused_at_run_time():
    """Soft-capping and sinks in an attention call (``softcap=``, ``s_aux=``) are handed to the kernels; position
    biases are still refused with the feature named, never computed without them."""
    from fastbertology.patching import _interface_attention

    model = FAMILIES["llama-mha"].model()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, 5, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    sinks = torch.randn(HEADS, dtype=torch.float64, generator=generator)
    with fastbertology.patch(model, backend="torch"):
        module = model.model.layers[0].self_attn
        for arguments, modifiers in (({"softcap": 0.5}, {"softcap": 0.5}), ({"s_aux": sinks}, {"sinks": sinks})):
            out, _ = _interface_attention(module, q, k, v, None, scaling=0.3, **arguments)
            expected, _ = kernels.attention(q, k, v, causal=True, scale=0.3, backend="reference", **modifiers)
            torch.testing.assert_close(out, expected.transpose(1, 2))
            plain, _ = _interface_attention(module, q, k, v, None, scaling=0.3)
            assert not torch.allclose(out, plain)
        for name, feature in (("position_bias", "an additive position bias"), ("alibi", "ALiBi")):
            with pytest.raises(ValueError, match=f"'llama' uses {feature}.*{name}="):
                _interface_attention(module, q, k, v, None, scaling=1.0, **{name: torch.zeros(1, HEADS, 5, 5)})


def test_sliding_windows_equal_the_oracle():
    """Mistral with a sliding window of 9 (no shorter than the sequences: it hides nothing) and of 4 (handed to the
    kernels' ``window``) equals the oracle's windowed attention."""
    for window in (9, 4):
        torch.manual_seed(0)
        model = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=4, sliding_window=window)).double().eval()
        spec = FAMILIES["llama-mha"]
        batch = inputs(spec, LENGTHS)
        mask = torch.rand(2, HEADS, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), oracle_head_mask(spec, model, mask):
            expected = _real(model(**batch, use_cache=False).logits, batch)
        with fastbertology.patch(model, backend="torch"), torch.no_grad():
            ours = _real(model(**batch, head_mask=mask, use_cache=False).logits, batch)
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_mixtral_router_logits_run_padded():
    """A call that returns Mixtral's per-position router logits (``output_router_logits``; its load-balancing loss
    reads them with the attention mask) runs padded: logits, router logits and both losses equal the oracle's."""
    spec = FAMILIES["mixtral"]
    model = spec.model()
    batch = inputs(spec, LENGTHS)
    target = labels(spec, batch)
    mask = _mask("LH", "mixtral", model, len(LENGTHS))
    options = dict(labels=target, output_router_logits=True, use_cache=False)
    with torch.no_grad(), oracle_head_mask(spec, model, mask):
        expected = model(**batch, **options)
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        ours = model(**batch, head_mask=mask, **options)
    assert len(ours.router_logits) == len(expected.router_logits) == 3
    for a, b in zip(ours.router_logits, expected.router_logits):
        torch.testing.assert_close(a.view(*batch["attention_mask"].shape, -1)[batch["attention_mask"].bool()],
                                   b.view(*batch["attention_mask"].shape, -1)[batch["attention_mask"].bool()],
                                   atol=ATOL, rtol=0)
    for name in ("loss", "aux_loss"):
        torch.testing.assert_close(getattr(ours, name), getattr(expected, name), atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(_real(ours.logits, batch), _real(expected.logits, batch), atol=ATOL, rtol=0)


def test_clip_dual_model_rows_are_vision_then_text(tmp_path):
    """CLIPModel runs its vision tower, then its text tower (causal, padded text): rows vision | text. Image-text
    logits, the contrastive loss and the mask gradient equal the oracle's (padding-free and padded), and the pruned
    model round-trips through ``load_pruned``."""
    from families import Family, _clip_text, _clip_vision

    def outputs(model):
        return [layer.self_attn.out_proj for tower in (model.vision_model, model.text_model)
                for layer in tower.encoder.layers]

    spec = Family("clip", lambda: tf.CLIPModel(tf.CLIPConfig(text_config=_clip_text(),
                                                             vision_config=_clip_vision())), "dual", outputs)
    model = spec.model()
    assert architectures.row_parts(model) == ["vision"] * 3 + ["text"] * 3
    batch = inputs(FAMILIES["clip-text"], LENGTHS) | inputs(FAMILIES["clip"], LENGTHS)
    mask = torch.rand(6, HEADS, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    oracle_mask = mask.clone().requires_grad_(True)
    with oracle_head_mask(spec, model, oracle_mask):
        expected = model(**batch, return_loss=True)
    expected.loss.backward()
    for padding_free in (True, False):
        ours_mask = mask.clone().requires_grad_(True)
        with fastbertology.patch(model, backend="torch", padding_free=padding_free):
            ours = model(**batch, return_loss=True, head_mask=ours_mask)
            ours.loss.backward()
        torch.testing.assert_close(ours.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.loss, expected.loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours_mask.grad, oracle_mask.grad, atol=1e-9, rtol=1e-9)

    heads = {0: [1], 4: [0, 1, 2, 3], 5: [2]}
    with torch.no_grad(), oracle_head_mask(spec, model, _zero_mask(model, spec, heads)):
        expected = model(**batch).logits_per_image
    pruned = prune_heads(copy.deepcopy(model), heads)
    pruned.save_pretrained(tmp_path)
    loaded = load_pruned(tf.CLIPModel, tmp_path)
    assert architectures.heads_per_layer(loaded) == [3, 4, 4, 4, 0, 3]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits_per_image, expected, atol=ATOL, rtol=0)


def test_unequal_groups_keep_fastbertology_attention_after_the_patch_is_removed():
    model = FAMILIES["llama"].model()
    prune_heads(model, {0: [1]})
    assert requires_patch(model.config) == [0] and model.config._attn_implementation == "fastbertology"
    handle = fastbertology.patch(model, backend="torch")
    handle.remove()
    assert model.config._attn_implementation == "fastbertology"
    prune_heads(model, {0: [1]})  # row 0 now keeps query heads 0 and 3: one per group, equal again
    assert requires_patch(model.config) == []


def test_loading_reads_the_model_classes_from_the_registry():
    from fastbertology.loading import _model_class

    assert _model_class("classification", "vit") is tf.AutoModelForImageClassification
    assert _model_class("causal-lm", "qwen3") is tf.AutoModelForCausalLM
    with pytest.raises(ValueError, match="language modelling needs a causal language model"):
        _model_class("causal-lm", "bart")
    with pytest.raises(ValueError, match="does not load BART models for encoder"):
        _model_class("encoder", "bart")

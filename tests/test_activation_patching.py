"""Activation and attribution patching against hooked runs of the stock eager model (float64)."""

import pytest
import torch
import torch.nn.functional as F
from models import random_batch, tiny_model

import fastbertology
from fastbertology.activation_patching import (
    activation_patching,
    corrupted_examples,
    pair_batches,
    rank_correlation,
)
from fastbertology.data import DataError, Example, ExampleList
from fastbertology.tasks import ClassificationTask, LanguageModelingTask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost

LENGTHS = [[7, 4, 6], [5, 5]]


def _paired_batches(kind: str):
    """Two batches of clean / corrupted inputs with the same right padding, different tokens."""
    batches = []
    for index, lengths in enumerate(LENGTHS):
        ids, mask = random_batch(len(lengths), max(lengths), lengths, seed=10 + index)
        corrupted, _ = random_batch(len(lengths), max(lengths), lengths, seed=20 + index)
        corrupted[:, 0] = ids[:, 0]  # a shared first token, as real corruptions keep most of the text
        batch = {"input_ids": ids, "attention_mask": mask, "corrupted_input_ids": corrupted,
                 "corrupted_attention_mask": mask.clone()}
        if kind == "bert":
            batch["labels"] = torch.arange(len(lengths)) % 3
        batches.append(batch)
    return batches


def _output_projections(model):
    if model.config.model_type == "bert":
        return [layer.attention.output.dense for layer in model.bert.encoder.layer]
    return [block.attn.c_proj for block in model.transformer.h]


def _reference_loss(model, batch, input_ids):
    """The batch loss of the stock model on ``input_ids``, scored against the clean batch's targets."""
    output = model(input_ids=input_ids, attention_mask=batch["attention_mask"])
    if model.config.model_type == "bert":
        return F.cross_entropy(output.logits, batch["labels"])
    targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    return F.cross_entropy(output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


def _stock_run(model, batch, input_ids, *, replace=None, keep=None):
    """One stock forward with TransformerLens-style pre-hooks on the output projections: ``replace = (layer, head,
    source [B, N, H*D])`` writes that head's slice; ``keep`` (a dict) receives every layer's input, retaining grad."""
    heads = model.config.num_attention_heads if model.config.model_type == "bert" else model.config.n_head
    handles = []
    for layer, module in enumerate(_output_projections(model)):
        def hook(module, args, layer=layer):
            x = args[0]
            if replace is not None and replace[0] == layer:
                dim = x.shape[-1] // heads
                columns = slice(replace[1] * dim, (replace[1] + 1) * dim)
                x = x.clone()
                x[..., columns] = replace[2][..., columns]
            if keep is not None:
                x.retain_grad()
                keep[layer] = x
            return (x,)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        return _reference_loss(model, batch, input_ids)
    finally:
        for handle in handles:
            handle.remove()


def _reference(model, batches, direction):
    """Per head the mean batch loss of the patched run, the base and source losses, and the attribution deltas."""
    layers, heads = 3, 4
    base_key, source_key = ("corrupted_input_ids", "input_ids") if direction == "denoising" else \
        ("input_ids", "corrupted_input_ids")
    patched = torch.zeros(layers, heads, dtype=torch.float64)
    delta = torch.zeros(layers, heads, dtype=torch.float64)
    base_loss = source_loss = 0.0
    for batch in batches:
        source = {}
        source_loss += float(_stock_run(model, batch, batch[source_key], keep=source).detach())
        base = {}
        loss = _stock_run(model, batch, batch[base_key], keep=base)
        loss.backward()
        base_loss += float(loss.detach())
        for layer in range(layers):
            change = (source[layer] - base[layer]).detach() * base[layer].grad  # [B, N, H*D]
            delta[layer] += change.view(*change.shape[:2], heads, -1).sum((0, 1, 3))
            for head in range(heads):
                with torch.no_grad():
                    patched[layer, head] += float(_stock_run(model, batch, batch[base_key],
                                                             replace=(layer, head, source[layer].detach())))
    count = len(batches)
    return patched / count, base_loss / count, source_loss / count, delta / count


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_patching_equals_hooked_stock_runs(kind, direction):
    model, _, _ = tiny_model(kind, attn_implementation="eager")
    batches = _paired_batches(kind)
    expected, base, source, delta = _reference(model, batches, direction)
    task = ClassificationTask(num_labels=3) if kind == "bert" else LanguageModelingTask()
    with fastbertology.patch(model, backend="torch"):
        result = activation_patching(model, batches, task, direction=direction, attribution=True, heads_per_pass=3)
    torch.testing.assert_close(result.values, expected, atol=1e-10, rtol=1e-9)
    assert result.base_value == pytest.approx(base, abs=1e-10)
    assert result.source_value == pytest.approx(source, abs=1e-10)
    torch.testing.assert_close(result.scores, (expected - base) / (source - base), atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(result.attribution_delta, delta, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(result.attribution, delta / (source - base), atol=1e-9, rtol=1e-8)
    assert 0 < rank_correlation(result.scores, result.attribution) <= 1  # first order tracks the real change


def test_metric_score_and_batching_do_not_change_the_values():
    model, _, _ = tiny_model("bert")
    batches = _paired_batches("bert")
    task = ClassificationTask(num_labels=3)
    with fastbertology.patch(model, backend="torch"):
        one = activation_patching(model, batches, task, heads_per_pass=1, score="metric")
        many = activation_patching(model, batches, task, heads_per_pass=12, score="metric")
    torch.testing.assert_close(one.values, many.values)
    assert one.base_value == one.corrupted_metric and one.source_value == one.clean_metric


def test_prefix_reuse_skips_the_unpatched_layers_and_changes_nothing():
    model, _, _ = tiny_model("gpt2")
    batches = _paired_batches("gpt2")
    calls = []
    hook = model.transformer.h[0].attn.register_forward_hook(lambda *args: calls.append(1))  # layer 0 computed
    with fastbertology.patch(model, backend="torch"):
        results = {}
        for reuse in (False, True):
            calls.clear()
            results[reuse] = activation_patching(model, batches, LanguageModelingTask(), reuse_prefix=reuse)
            results[reuse].calls = len(calls)
    hook.remove()
    torch.testing.assert_close(results[True].values, results[False].values, atol=1e-12, rtol=1e-12)
    assert results[False].calls == 2 * (2 + 3)  # per batch: source, base, one pass per layer (4 heads per pass)
    assert results[True].calls == 2 * (2 + 1)  # the passes of layers 1 and 2 replay layer 0


def test_rank_correlation():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert rank_correlation(a, a * 10) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, torch.tensor([[1.0, 1.0], [2.0, 2.0]])) == pytest.approx(0.8944271909999159)


def test_unequal_token_lengths_are_refused_naming_the_example():
    examples = ExampleList([Example("a b", corrupted_text="c d", line=2), Example("a b c", corrupted_text="d", line=3)],
                           source="data.jsonl")
    ids, mask = random_batch(2, 3, [2, 3])
    _, short = random_batch(2, 3, [2, 1])
    with pytest.raises(DataError, match=r"data.jsonl, line 3: example 1: the text has 3 tokens but the corrupted_text "
                                        r"has 1"):
        pair_batches([{"input_ids": ids, "attention_mask": mask}], [{"input_ids": ids, "attention_mask": short}],
                     examples=examples)


def test_corrupted_examples_need_corrupted_text():
    with pytest.raises(DataError, match="line 4: example 0 has no 'corrupted_text'"):
        corrupted_examples(ExampleList([Example("a", line=4)], source="x.csv"))
    with pytest.raises(DataError, match="has a 'text_pair' but no 'corrupted_text_pair'"):
        corrupted_examples([Example("a", "b", corrupted_text="c", line=1)])
    pairs = corrupted_examples([Example("a", "b", label=1, corrupted_text="c", corrupted_text_pair="d")])
    assert (pairs[0].text, pairs[0].text_pair, pairs[0].label) == ("c", "d", 1)


def test_readers_keep_the_corrupted_columns(tmp_path):
    from fastbertology.data import read_csv, read_jsonl

    csv = tmp_path / "d.csv"
    csv.write_text("text,corrupted_text,label\nthe cat,the dog,1\nsat on,,0\n")
    rows = read_csv(csv)
    assert (rows[0].corrupted_text, rows[1].corrupted_text) == ("the dog", None)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "text_pair": "b", "corrupted_text": "c", "corrupted_text_pair": "d", "label": 0}\n'
                     '{"text": "a", "corrupted_text": 3, "label": 1}\n')
    with pytest.raises(DataError, match="d.jsonl, line 2: 'corrupted_text' must be a string, got int"):
        read_jsonl(jsonl)
    jsonl.write_text('{"text": "a", "text_pair": "b", "corrupted_text": "c", "corrupted_text_pair": "d", "label": 0}\n')
    (row,) = read_jsonl(jsonl)
    assert (row.corrupted_text, row.corrupted_text_pair) == ("c", "d")


def _family_stock_loss(family, model, inputs, clean, *, replace=None, keep=None):
    """The stock model's loss on ``inputs`` against the clean targets, with pre-hooks on every row's output
    projection (rows found by call order, as the families oracle does): ``replace = (row, head, source)`` writes
    that head's slice; ``keep`` receives every row's input."""
    projections = family.outputs(model)
    rows_of: dict[int, list[int]] = {}
    for row, module in enumerate(projections):
        rows_of.setdefault(id(module), []).append(row)
    calls: dict[int, int] = {}

    def hook(module, args):
        count = calls.get(id(module), 0)
        calls[id(module)] = count + 1
        row = rows_of[id(module)][count]
        x = args[0]
        if replace is not None and replace[0] == row:
            x = x.clone().view(*x.shape[:-1], 4, -1)
            x[..., replace[1], :] = replace[2].view_as(x)[..., replace[1], :]
            x = x.view(args[0].shape)
        if keep is not None:
            keep[row] = x.detach()
        return (x, *args[1:])

    handles = [projections[rows[0]].register_forward_pre_hook(hook) for rows in rows_of.values()]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    if family.kind == "lm":
        targets = clean["input_ids"].masked_fill(clean["attention_mask"] == 0, -100)[:, 1:]
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)))
    return float(F.cross_entropy(logits, clean["labels"]))


@pytest.mark.parametrize("name", ["llama", "albert", "bart"])  # grouped-query, shared layers, cross-attention
def test_patching_equals_hooked_stock_runs_on_other_families(name):
    from families import FAMILIES, inputs

    family = FAMILIES[name]
    model = family.model()
    clean, corrupted = inputs(family, [6, 4, 5], seed=1), inputs(family, [6, 4, 5], seed=2)
    if family.kind != "lm":
        clean["labels"] = torch.arange(3) % 3
    source = {}
    source_loss = _family_stock_loss(family, model, clean, clean, keep=source)
    rows = len(source)
    expected = torch.tensor([[_family_stock_loss(family, model, corrupted, clean, replace=(row, head, source[row]))
                              for head in range(4)] for row in range(rows)], dtype=torch.float64)
    base_loss = _family_stock_loss(family, model, corrupted, clean)
    batch = {**clean, "corrupted_input_ids": corrupted["input_ids"]}
    task = LanguageModelingTask() if family.kind == "lm" else ClassificationTask(num_labels=3)
    with fastbertology.patch(model, backend="torch"):
        result = activation_patching(model, [batch], task)
    torch.testing.assert_close(result.values, expected, atol=1e-10, rtol=1e-9)
    assert (result.base_value, result.source_value) == pytest.approx((base_loss, source_loss), abs=1e-10)

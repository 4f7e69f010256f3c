"""fastbertology.batching: length-bucketed order, trimmed batches, and what bucketing leaves unchanged."""

import pytest
import torch

from fastbertology import patch
from fastbertology.batching import bucketed_batches, collate, length_bucketed_order, padded_batches
from fastbertology.bench.workloads import TINY_BERT, TINY_GPT2, SyntheticWorkload, build_model, synthetic_examples
from fastbertology.importance import analyze_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_length_bucketed_order_sorts_within_windows():
    lengths = torch.tensor([3, 9, 5, 5, 1, 8, 2, 7])
    order = length_bucketed_order(lengths, window=3)
    assert sorted(order.tolist()) == list(range(8))
    assert order.tolist() == [1, 2, 0, 5, 3, 4, 7, 6]  # windows [0:3], [3:6], [6:8], longest first, stable
    assert length_bucketed_order(lengths).tolist() == [1, 5, 7, 2, 3, 0, 6, 4]
    assert length_bucketed_order(lengths, descending=False)[0] == 4


def test_bucketed_batches_trim_and_cover_the_data():
    examples = synthetic_examples(TINY_BERT, 13, 16)
    batches = bucketed_batches(examples, 4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4, 1]
    for batch in batches:
        width = batch["input_ids"].shape[1]
        assert batch["attention_mask"].sum(1).max() == width  # cut at the longest example
    assert sum(int(b["attention_mask"].sum()) for b in batches) == int(examples["attention_mask"].sum())
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == sorted(examples["labels"].tolist())
    full = collate(examples, torch.tensor([0, 1]), trim=False)
    assert full["input_ids"].shape == (2, 16)
    bad = dict(examples, attention_mask=examples["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        bucketed_batches(bad, 4)


@pytest.mark.parametrize("size", [TINY_BERT, TINY_GPT2], ids=lambda s: s.kind)
def test_bucketing_leaves_order_independent_results_unchanged(size):
    """per_example importance, entropy, max prob, metric and counts: identical (float64) with bucketing."""
    model = build_model(size).double()
    examples = synthetic_examples(size, 11, 24, seed=3)
    task = SyntheticWorkload(size, 11, 24).task()
    with patch(model, backend="torch"):
        plain = analyze_heads(model, padded_batches(examples, 4), task, importance="per_example")
        bucketed = analyze_heads(model, bucketed_batches(examples, 4, window=6), task, importance="per_example")
    torch.testing.assert_close(bucketed.raw_importance, plain.raw_importance, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(bucketed.entropy, plain.entropy, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bucketed.max_prob, plain.max_prob, rtol=1e-9, atol=1e-12)
    assert bucketed.metric == pytest.approx(plain.metric, rel=1e-9)
    assert (bucketed.tokens, bucketed.examples) == (plain.tokens, plain.examples)

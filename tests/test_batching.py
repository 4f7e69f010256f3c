"""fastbertology.batching on pre-tokenized tensors: padded batches cover the data; what batching leaves unchanged."""

import pytest
import torch

from fastbertology import patch
from fastbertology.batching import collate, padded_batches
from fastbertology.bench.workloads import TINY_BERT, TINY_GPT2, SyntheticWorkload, build_model, synthetic_examples
from fastbertology.importance import analyze_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_padded_batches_cover_the_data_in_order():
    examples = synthetic_examples(TINY_BERT, 13, 16)
    batches = padded_batches(examples, 4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4, 1]
    assert all(b["input_ids"].shape[1] == 16 for b in batches)  # padded to the full length
    torch.testing.assert_close(torch.cat([b["input_ids"] for b in batches]), examples["input_ids"])
    torch.testing.assert_close(torch.cat([b["labels"] for b in batches]), examples["labels"])
    trimmed = collate(examples, torch.tensor([2, 0]), trim=True)
    assert trimmed["input_ids"].shape[1] == int(examples["attention_mask"][[2, 0]].sum(1).max())
    torch.testing.assert_close(trimmed["labels"], examples["labels"][[2, 0]])


@pytest.mark.parametrize("size", [TINY_BERT, TINY_GPT2], ids=lambda s: s.kind)
def test_per_example_results_do_not_depend_on_the_batching(size):
    """per_example importance, entropy, max prob, metric and counts: identical (float64) for other batch sizes."""
    model = build_model(size).double()
    examples = synthetic_examples(size, 11, 24, seed=3)
    task = SyntheticWorkload(size, 11, 24).task()
    with patch(model, backend="torch"):
        fours = analyze_heads(model, padded_batches(examples, 4), task, importance="per_example")
        threes = analyze_heads(model, padded_batches(examples, 3), task, importance="per_example")
    torch.testing.assert_close(threes.raw_importance, fours.raw_importance, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(threes.entropy, fours.entropy, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(threes.max_prob, fours.max_prob, rtol=1e-9, atol=1e-12)
    assert threes.metric == pytest.approx(fours.metric, rel=1e-9)
    assert (threes.tokens, threes.examples) == (fours.tokens, fours.examples)

"""The analysis step reads nothing back from the device: the padding-free plan travels with the batch, the head
mask is checked once per pass, the loss is summed on the device.

On the CPU a host read is not a synchronisation, so these tests watch for the reads themselves: the packing plan of
a mask moved by :func:`~fastbertology.batching.move_batch` is the one made on the host (the device mask is never
copied back), and inside :func:`~fastbertology.head_mask.checked_head_masks` no call checks its mask again.
"""

from __future__ import annotations

import pytest
import torch
from models import random_batch, tiny_model

import fastbertology
from fastbertology import packing
from fastbertology.batching import move_batch
from fastbertology.importance import analyze_heads
from fastbertology.tasks import ClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _right_padded(lengths, seq):
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_moved_masks_carry_the_plan_made_on_the_host(monkeypatch):
    mask = _right_padded([5, 2, 7], 7)
    batch = move_batch({"input_ids": torch.ones(3, 7, dtype=torch.long), "attention_mask": mask}, "cpu")
    planned = packing.plan_packing(batch["attention_mask"])
    assert planned is not None and planned.packing.lengths == (5, 2, 7) and planned.total == 14
    # the plan is looked up, not recomputed from the mask's values
    monkeypatch.setattr(packing, "_plan", lambda *args: pytest.fail("the mask was read again"))
    assert packing.plan_packing(batch["attention_mask"]) is planned
    monkeypatch.undo()
    # an in-place change of the mask invalidates its plan
    batch["attention_mask"][1, 4] = 1
    batch["attention_mask"][1, 3] = 1
    batch["attention_mask"][1, 2] = 1
    assert packing.plan_packing(batch["attention_mask"]).packing.lengths == (5, 5, 7)


def test_masks_without_padding_or_with_left_padding_plan_to_none():
    for mask in (torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 1, 1]])):
        moved = move_batch({"attention_mask": mask}, "cpu")["attention_mask"]
        assert packing.plan_packing(moved) is None
        assert getattr(moved, packing._PLAN)[1] is None  # planned (nothing to pack), not missing


def test_analysis_checks_the_head_mask_once_per_pass(monkeypatch):
    model, layers, heads = tiny_model("bert")
    batches = []
    for seed in range(3):
        input_ids, attention_mask = random_batch(3, 6, [6, 3, 5], seed=seed)
        batches.append(move_batch({"input_ids": input_ids, "attention_mask": attention_mask,
                                   "labels": torch.tensor([0, 1, 2])}, "cpu"))
    checks = []
    real_isfinite = torch.isfinite

    def counting_isfinite(tensor):  # the head mask (float32 [L, H]) read for NaN / inf; not the loss or the tables
        if tensor.dtype == torch.float32 and tuple(tensor.shape) == (layers, heads):
            checks.append(1)
        return real_isfinite(tensor)

    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    with fastbertology.patch(model, backend="torch"):
        analyze_heads(model, batches, ClassificationTask())
    assert len(checks) == 1  # the pass's base mask; none of the 3 batches' calls
    # outside an analysis every call is checked, and a bad mask is still refused up front
    with fastbertology.patch(model, backend="torch"):
        bad = torch.ones(layers, heads, dtype=torch.float64)
        bad[1, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN or infinite"):
            analyze_heads(model, batches, ClassificationTask(), head_mask=bad)
        with pytest.raises(ValueError, match="NaN or infinite"):
            model(**{k: v for k, v in batches[0].items() if k != "labels"}, head_mask=bad)


def test_metric_updates_read_nothing_back():
    """Every task's metric accumulates on the device: a batch's update (after the first, which moves the state
    there) dispatches no host read under the census, and the metric read at the end equals the host arithmetic."""
    from types import SimpleNamespace

    from fastbertology.bench.census import Census, tally
    from fastbertology.tasks import LanguageModelingTask, RegressionTask, RetrievalTask

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 4.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    token_losses, token_mask = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[True, True], [True, False]])
    cases = [
        (ClassificationTask(num_labels=3), SimpleNamespace(logits=logits), {"labels": labels}, "accuracy", 0.5),
        (RegressionTask(metric="mse"), SimpleNamespace(logits=torch.tensor([1.0, 2.0, 4.0])),
         {"labels": torch.tensor([1.0, 3.0, 3.0])}, "mse", 2 / 3),
        (LanguageModelingTask(), SimpleNamespace(token_losses=token_losses, token_mask=token_mask), {}, "nll", 2.0),
        (RetrievalTask(), SimpleNamespace(ranks=torch.tensor([1, 2, 1, 4]), group_sizes=torch.tensor([4, 4, 4, 4])),
         {}, "mrr", (1 + 0.5 + 1 + 0.25) / 4),
    ]
    for task, result, batch, name, expected in cases:
        state = task.metric_state()
        task.update_metric(state, result, batch)
        census = Census()
        with census:
            census.track([t for t in (*vars(result).values(), *batch.values(), *state.values())
                          if isinstance(t, torch.Tensor)])
            with census.phase("step"):
                task.update_metric(state, result, batch)
        assert tally(census.events).syncs == 0, (task.name, [e.location for e in census.events if e.sync])
        assert task.compute_metrics(state)[name] == pytest.approx(expected), task.name


@pytest.mark.parametrize("chunk", [None, 5], ids=["logits", "chunked-loss"])
def test_language_model_positions_known_on_the_host_give_the_same_losses(chunk):
    """A moved batch's projected rows are its real tokens, from the plan made on the host (an index: no count read
    back, in the forward or in the backward; the last token of each row is projected too, its target ignored);
    they give the losses, per-example losses, token losses and head-mask gradient of the boolean selection that a
    batch without a host plan takes (float64: to rounding, the sums run in another order)."""
    from fastbertology.tasks import LanguageModelingTask
    from fastbertology.tasks.language_modeling import PredictedLogits, PredictedLosses

    model, layers, heads = tiny_model("gpt2")
    input_ids, attention_mask = random_batch(3, 9, [9, 4, 1])
    plain = {"input_ids": input_ids, "attention_mask": attention_mask}
    moved = move_batch({"input_ids": input_ids, "attention_mask": attention_mask.clone()}, torch.device("cpu"))
    assert packing.known_lengths(moved["attention_mask"]) == (9, 4, 1)
    assert packing.known_lengths(plain["attention_mask"]) is None
    task = LanguageModelingTask(loss_chunk_tokens=chunk)
    results = []
    with fastbertology.patch(model, backend="torch"):
        for batch in (plain, moved):
            mask = torch.ones(layers, heads, dtype=torch.float64, requires_grad=True)
            output = task.forward(model, batch, head_mask=mask)
            assert isinstance(output, PredictedLosses if chunk else PredictedLogits)
            assert (output.index is None) == (batch is plain)
            if batch is moved:  # the 9 + 4 + 1 real tokens, row-major
                assert output.index.tolist() == [*range(9), *range(9, 13), 18]
            result = task.result(output, batch)
            (gradient,) = torch.autograd.grad(result.loss, mask)
            results.append((result.loss, result.example_losses, result.token_losses, result.token_mask, gradient))
    for first, second in zip(*results):
        torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-15)
    assert results[1][3].sum() == 8 + 3  # rows of 9, 4 and 1 tokens predict 8, 3 and 0


def test_language_model_output_with_an_index_splits_into_its_copies():
    """``PredictedLogits.split`` of a k-copies batch whose rows came by index: each copy gets its rows and its
    index relative to its own ``[B, N]``, whatever the order of the index."""
    from fastbertology.tasks.language_modeling import PredictedLogits, PredictedLosses

    positions = torch.tensor([[True, False, False], [True, True, False]] * 2)  # 2 copies of a [2, 3] batch
    index = torch.tensor([9, 0, 3, 10, 4, 6])  # rows b * 3 + n of the [4, 3] replicated batch, in any order
    logits = torch.arange(6.0)[:, None].expand(6, 5)
    first, second = PredictedLogits(logits, positions, index).split(2)
    assert first.index.tolist() == [0, 3, 4] and first.logits[:, 0].tolist() == [1.0, 2.0, 4.0]
    assert second.index.tolist() == [3, 4, 0] and second.logits[:, 0].tolist() == [0.0, 3.0, 5.0]
    assert torch.equal(first.positions, positions[:2]) and torch.equal(second.positions, positions[2:])
    losses = PredictedLosses(torch.arange(6.0), positions, index).split(2)
    assert [part.index.tolist() for part in losses] == [[0, 3, 4], [3, 4, 0]]


def test_language_model_batch_that_is_not_right_padded_selects_by_its_mask():
    """A left-padded batch has no padding-free plan (nor known lengths): the projected positions come from the
    boolean mask (the fallback), and the losses are still those of the stock model's loss."""
    from fastbertology.tasks import LanguageModelingTask

    model, _, _ = tiny_model("gpt2")
    input_ids, attention_mask = random_batch(2, 6, [6, 6])
    attention_mask[1, :2] = 0  # left padding
    batch = move_batch({"input_ids": input_ids, "attention_mask": attention_mask}, torch.device("cpu"))
    assert not packing.planned_on_host(batch["attention_mask"])
    task = LanguageModelingTask()
    output = task.forward(model, batch)
    assert output.index is None
    result = task.result(output, batch)
    with torch.no_grad():
        logits = model(**batch).logits
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
    torch.testing.assert_close(result.loss.detach(), expected, rtol=1e-12, atol=1e-12)

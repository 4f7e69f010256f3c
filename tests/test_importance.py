"""Head importance, entropy and iterative masking against an independent eager reference of run_bertology."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from models import random_batch, reference_head_mask, tiny_model

import fastbertology
from fastbertology.importance import analyze_heads, evaluate_metric, normalize_importance
from fastbertology.masking import heads_to_mask_next, iterative_masking, relative_quality


class ClassificationTask:
    """Minimal task for these tests: mean cross-entropy, accuracy."""

    higher_is_better = True

    def evaluate(self, model, batch, head_mask=None):
        kwargs = {} if head_mask is None else {"head_mask": head_mask}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        return SimpleNamespace(loss=losses.mean(), example_losses=losses, logits=logits)

    def metric_state(self):
        return {"correct": 0, "total": 0}

    def update_metric(self, state, result, batch):
        state["correct"] += int((result.logits.argmax(-1) == batch["labels"]).sum())
        state["total"] += len(batch["labels"])

    def compute_metric(self, state):
        return state["correct"] / state["total"]


def _batches():
    batches = []
    for seed, lengths in [(1, [9, 5, 7]), (2, [6, 6]), (3, [8, 3, 8, 1])]:
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), lengths, seed=seed)
        labels = torch.arange(len(lengths)) % 3
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def _reference_run_bertology(model, batches, layers, heads):
    """run_bertology's compute_heads_importance on eager 4.x semantics (grad zeroed per batch)."""
    importance = torch.zeros(layers, heads, dtype=torch.float64)
    entropy = torch.zeros(layers, heads, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        mask = torch.ones(layers, heads, dtype=torch.float64, requires_grad=True)
        with reference_head_mask(model, mask):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], output_attentions=True)
        out.loss.backward()
        importance += mask.grad.abs()
        keep = batch["attention_mask"].double()
        for layer, probs in enumerate(out.attentions):
            plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
            entropy[layer] += (-plogp.sum(-1) * keep[:, None]).sum((0, 2)).detach()
        tokens += int(keep.sum())
    return importance / tokens, entropy / tokens


def test_per_batch_importance_and_entropy_equal_reference():
    model, layers, heads = tiny_model("bert")
    batches = _batches()
    expected_importance, expected_entropy = _reference_run_bertology(model, batches, layers, heads)
    with fastbertology.patch(model, backend="torch"):
        analysis = analyze_heads(model, batches, ClassificationTask())
    torch.testing.assert_close(analysis.raw_importance, expected_importance, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(analysis.entropy, expected_entropy, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(analysis.importance, normalize_importance(expected_importance))
    assert analysis.importance.min() == 0 and analysis.importance.max() == 1
    assert analysis.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert analysis.examples == 9


def test_per_example_importance_equals_one_example_at_a_time():
    model, layers, heads = tiny_model("bert")
    batches = _batches()
    expected = torch.zeros(layers, heads, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        for row in range(len(batch["labels"])):
            length = int(batch["attention_mask"][row].sum())
            mask = torch.ones(layers, heads, dtype=torch.float64, requires_grad=True)
            with reference_head_mask(model, mask):
                logits = model(input_ids=batch["input_ids"][row:row + 1, :length]).logits
            F.cross_entropy(logits, batch["labels"][row:row + 1]).backward()
            expected += mask.grad.abs()
            tokens += length
    with fastbertology.patch(model, backend="torch"):
        analysis = analyze_heads(model, batches, ClassificationTask(), importance="per_example")
    torch.testing.assert_close(analysis.raw_importance, expected / tokens, atol=1e-12, rtol=1e-9)


def test_no_weight_gradients_and_flags_restored():
    model, _, _ = tiny_model("bert")
    model.classifier.weight.requires_grad_(False)
    with fastbertology.patch(model, backend="torch"):
        analyze_heads(model, _batches(), ClassificationTask())
    assert all(p.grad is None for p in model.parameters())
    assert not model.classifier.weight.requires_grad
    assert model.bert.embeddings.word_embeddings.weight.requires_grad


def test_metric_equals_evaluate_metric_and_masking_changes_it():
    model, layers, heads = tiny_model("bert")
    batches = _batches()
    task = ClassificationTask()
    with fastbertology.patch(model, backend="torch"):
        analysis = analyze_heads(model, batches, task)
        assert analysis.metric == evaluate_metric(model, batches, task)
        zero = torch.zeros(layers, heads, dtype=torch.float64)
        masked = analyze_heads(model, batches, task, head_mask=zero)
    assert masked.loss != analysis.loss


def test_analyses_refuse_unpatched_model():
    model, _, _ = tiny_model("bert")
    with pytest.raises(RuntimeError, match="silently ignores head_mask"):
        analyze_heads(model, _batches(), ClassificationTask())


def test_base_mask_forms():
    """A [heads] base mask is every layer's, as the model takes it: an [L, H] table equal to the [L, H] mask's (it
    was an [H] table, the layers' gradients summed). An integer or bool mask, or a per-example one, is refused
    before the pass (an integer mask failed inside autograd: "only Tensors of floating point dtype can require
    gradients"; a [B, L, H] mask gave a [B, L, H] table, and failed on the first batch of another size)."""
    model, layers, heads = tiny_model("bert")
    batches, task = _batches(), ClassificationTask()
    row = torch.ones(heads)
    row[1] = 0.0
    with fastbertology.patch(model, backend="torch"):
        for importance in ("per_batch", "per_example"):
            whole = analyze_heads(model, batches, task, head_mask=row.expand(layers, heads).clone(),
                                  importance=importance)
            one_row = analyze_heads(model, batches, task, head_mask=row, importance=importance)
            assert one_row.raw_importance.shape == (layers, heads)
            torch.testing.assert_close(one_row.raw_importance, whole.raw_importance)
        for dtype in (torch.int64, torch.bool):
            with pytest.raises(ValueError, match=f"floating-point tensor .*got dtype {dtype}"):
                analyze_heads(model, batches, task, head_mask=torch.ones(layers, heads, dtype=dtype))
        with pytest.raises(ValueError, match=r"every batch under one \[layers, heads\]"):
            analyze_heads(model, batches, task, head_mask=torch.ones(3, layers, heads))


def test_normalisation_options():
    raw = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(normalize_importance(raw, by_layer=False, global_minmax=False), raw)
    by_layer = normalize_importance(raw, global_minmax=False)
    torch.testing.assert_close(by_layer, torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(normalize_importance(raw, by_layer=False), raw / 4)


# ------------------------------------------------------------------------------------------ iterative masking
class CraftedTask:
    """Loss and metric are explicit functions of the head mask: importance of head i is |weight_i|, and the
    score is the fraction of total weight still unmasked. Lets the masking schedule be worked out by hand."""

    higher_is_better = True

    def __init__(self, weights):
        self.weights = weights

    def evaluate(self, model, batch, head_mask=None):
        mask = head_mask if head_mask.dim() == 2 else head_mask[0]
        loss = (self.weights * mask).sum()
        score = float(loss.detach() / self.weights.sum())
        return SimpleNamespace(loss=loss, example_losses=loss[None], score=score)

    def metric_state(self):
        return []

    def update_metric(self, state, result, batch):
        state.append(result.score)

    def compute_metric(self, state):
        return sum(state) / len(state)

    def batch_size(self, batch):
        return 1


def test_iterative_masking_on_crafted_case():
    model, layers, heads = tiny_model("bert")  # 3 x 4 = 12 heads; 10% -> 1 head per step
    weights = torch.tensor([[1.0, 30.0, 2.0, 40.0], [3.0, 50.0, 4.0, 60.0], [5.0, 70.0, 6.0, 80.0]])
    task = CraftedTask(weights)
    with fastbertology.patch(model, backend="torch"):
        result = iterative_masking(model, [{}], task, masking_amount=0.1, masking_threshold=0.9)
    # Per-layer L2 normalisation orders the small heads 1, 3, 2, 5, 4, 6 (1/50.0 < 3/78.3 < 2/50.0 < ...);
    # masking them loses 21/351 = 6%; masking the next one (30) loses 14.5% in all, below the 0.9 threshold.
    total = float(weights.sum())
    scores = [point["score"] for point in result.curve]
    removed = [1, 3, 2, 5, 4, 6, 30]
    expected = [1.0] + [1 - sum(removed[:n]) / total for n in range(1, 8)]
    assert scores == pytest.approx(expected)
    assert [p["heads_remaining"] for p in result.curve] == list(range(12, 4, -1))
    assert result.curve[1]["masked"] == [[0, 0]] and result.curve[2]["masked"] == [[1, 0]]
    assert result.curve[7]["masked"] == [[0, 1]]
    expected_mask = torch.ones(3, 4)
    expected_mask[:, [0, 2]] = 0
    torch.testing.assert_close(result.head_mask, expected_mask)
    assert result.final_score == pytest.approx(expected[6])


def test_masking_direction_for_perplexity():
    assert relative_quality(11.0, 10.0, higher_is_better=False) == pytest.approx(10 / 11)
    assert relative_quality(9.0, 10.0, higher_is_better=True) == pytest.approx(0.9)


def test_heads_to_mask_next_skips_masked_heads():
    importance = torch.tensor([[0.1, 0.5], [0.2, 0.05]])
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert heads_to_mask_next(importance, mask, 2).tolist() == [3, 2]


def test_masking_bad_options():
    model, _, _ = tiny_model("bert")
    with fastbertology.patch(model), pytest.raises(ValueError, match="masking_amount"):
        iterative_masking(model, [{}], CraftedTask(torch.ones(3, 4)), masking_amount=1.5)

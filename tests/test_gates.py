"""Hard-concrete L0 head gates: the distribution's math, the Lagrangian, and learning on a model with dead heads."""

import math

import pytest
import torch
from families import FAMILIES
from models import random_batch
from transformers import BertConfig, BertForSequenceClassification

import fastbertology
from fastbertology.gates import (
    deterministic_gates,
    expand_groups,
    gate_mask,
    lagrangian,
    learn_gates,
    open_probability,
    sample_gates,
)
from fastbertology.tasks import RegressionTask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost

DEAD = [(0, 1), (1, 0), (1, 3)]  # (layer, head) whose output projection columns are zero
LAYERS, HEADS, DIM = 2, 4, 8


def test_open_probability_is_the_probability_that_a_sample_is_not_zero():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    samples = sample_gates(log_alpha, (200_000,), generator=torch.Generator().manual_seed(0))
    assert samples.min() == 0 and samples.max() == 1  # the stretch makes exact 0 and 1 likely
    torch.testing.assert_close((samples > 0).double().mean(0), open_probability(log_alpha), atol=4e-3, rtol=0)
    # closed form: P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)); beta = 2/3, (gamma, zeta) = (-.1, 1.1)
    torch.testing.assert_close(open_probability(log_alpha),
                               torch.sigmoid(log_alpha - 2 / 3 * math.log(0.1 / 1.1)))
    # z = 1 when s >= (1 - gamma) / (zeta - gamma) = 11/12: P = sigmoid(log_alpha - beta * log(11))
    expected_one = torch.sigmoid(log_alpha - 2 / 3 * math.log(1.1 / 0.1))
    torch.testing.assert_close((samples == 1).double().mean(0), expected_one, atol=4e-3, rtol=0)


def test_samples_are_differentiable_and_deterministic_gates_open_above_zero():
    log_alpha = torch.tensor([-0.2, 0.0, 0.3], requires_grad=True)
    sample_gates(log_alpha, (64,), generator=torch.Generator().manual_seed(1)).sum().backward()
    assert (log_alpha.grad > 0).all()
    gates = deterministic_gates(torch.tensor([-5.0, -0.01, 0.01, 5.0]))
    assert gates[0] == 0 and gates[-1] == 1 and gates[1] < 0.5 < gates[2]
    assert gate_mask(torch.tensor([[-0.01, 0.01], [3.0, -2.0]])).tolist() == [[0, 1], [1, 0]]


def test_top_k_mask_and_groups():
    log_alpha = torch.tensor([[0.5, 2.0, -1.0], [2.0, 0.1, 0.5]])
    assert gate_mask(log_alpha, target=3).tolist() == [[1, 1, 0], [1, 0, 0]]  # tie at 0.5: the lower index wins
    assert gate_mask(log_alpha, target=1).sum() == 1
    assert expand_groups(torch.tensor([[1.0, 0.0]]), 4).tolist() == [[1, 1, 0, 0]]
    assert expand_groups(torch.ones(2, 3), 3).shape == (2, 3)


def test_lagrangian_and_its_gradients():
    l0 = torch.tensor(7.0, requires_grad=True)
    lambdas = torch.tensor([0.5, 2.0], requires_grad=True)
    value = lagrangian(l0, 5.0, lambdas[0], lambdas[1])
    assert float(value.detach()) == pytest.approx(0.5 * 2 + 2.0 * 4)
    value.backward()
    assert float(l0.grad) == pytest.approx(0.5 + 2 * 2.0 * 2)  # the gates are pushed towards the target
    assert lambdas.grad.tolist() == pytest.approx([2.0, 4.0])  # ascent raises both while L0 is above it


def _dead_head_model():
    """A tiny BERT regressor whose heads in DEAD write nothing (zero output-projection columns); the others are
    made to matter (output projections x4, the regression head x1000). Labels: the model's own outputs, so
    keeping exactly the live heads is the best any mask can do."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
                                                     num_attention_heads=HEADS, intermediate_size=48,
                                                     max_position_embeddings=64, num_labels=1))
    model = model.double().eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.output.dense.weight.mul_(4)
        for layer, head in DEAD:
            model.bert.encoder.layer[layer].attention.output.dense.weight[:, head * DIM:(head + 1) * DIM] = 0
        model.classifier.weight.mul_(1000)
    ids, mask = random_batch(4, 8, [8, 5, 7, 6], seed=1)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        batch["labels"] = model(**batch).logits.squeeze(-1)
    return model, [batch]


def _live_mask():
    mask = torch.ones(LAYERS, HEADS)
    for layer, head in DEAD:
        mask[layer, head] = 0
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_target_heads_keeps_exactly_the_live_heads(seed):
    model, batches = _dead_head_model()
    live = LAYERS * HEADS - len(DEAD)
    with fastbertology.patch(model, backend="torch"):
        result = learn_gates(model, batches, RegressionTask(metric="mse"), steps=200, target=live, seed=seed)
    assert result.head_mask.tolist() == _live_mask().tolist()
    dead = result.log_alpha[_live_mask() == 0]
    assert torch.equal(dead, dead[:1].expand_as(dead))  # dead heads only ever see the Lagrangian: identical
    assert result.curve[-1]["l0"] == pytest.approx(live, abs=0.2)
    assert result.curve[0]["lambda1"] > 0  # L0 above the target at first: the multiplier rises
    assert result.gates.shape == (LAYERS, HEADS) and ((result.gates >= 0) & (result.gates <= 1)).all()


def test_penalty_closes_everything_or_nothing():
    model, batches = _dead_head_model()
    task = RegressionTask(metric="mse")
    with fastbertology.patch(model, backend="torch"):
        free = learn_gates(model, batches, task, steps=15, l0_penalty=0.0)
        costly = learn_gates(model, batches, task, steps=40, l0_penalty=100.0)
    assert free.head_mask.sum() == LAYERS * HEADS and free.mode == "penalty"
    assert costly.head_mask.sum() == 0
    assert costly.curve[-1]["l0"] < costly.curve[0]["l0"]


def test_per_kv_group_gates_share_a_value_across_their_query_heads():
    family = FAMILIES["llama"]
    model = family.model()
    ids, mask = random_batch(2, 6, [6, 4], seed=3)
    batch = {"input_ids": ids, "attention_mask": mask}
    from fastbertology.tasks import LanguageModelingTask

    with fastbertology.patch(model, backend="torch"):
        result = learn_gates(model, [batch], LanguageModelingTask(), steps=3, target=3, per_kv_group=True)
    assert result.log_alpha.shape == (3, 2)  # 3 layers x 2 key/value heads
    assert result.head_mask.shape == (3, 4) and result.head_mask.sum() == 6  # 3 groups of 2 query heads
    assert torch.equal(result.head_mask[:, 0::2], result.head_mask[:, 1::2])
    with pytest.raises(ValueError, match="target must be between 1 and the model's 6 key/value groups"):
        with fastbertology.patch(model, backend="torch"):
            learn_gates(model, [batch], LanguageModelingTask(), steps=1, target=7, per_kv_group=True)


def test_options_are_checked():
    model, batches = _dead_head_model()
    task = RegressionTask(metric="mse")
    with fastbertology.patch(model, backend="torch"):
        with pytest.raises(ValueError, match="exactly one of l0_penalty"):
            learn_gates(model, batches, task, steps=1)
        with pytest.raises(ValueError, match="exactly one of l0_penalty"):
            learn_gates(model, batches, task, steps=1, l0_penalty=0.1, target=2)
        with pytest.raises(ValueError, match="steps must be at least 1"):
            learn_gates(model, batches, task, steps=0, target=2)
    with pytest.raises(RuntimeError, match="not patched"):
        learn_gates(model, batches, task, steps=1, target=2)

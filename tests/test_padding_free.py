"""Padding-free execution gives exactly the padded results (float64), and padding costs nothing.

For every model type (bidirectional BERT / RoBERTa, causal GPT-2 / OpenAI GPT): logits at real positions, a loss,
head-mask gradients (``[L, H]`` and per-example ``[B, L, H]`` masks), recorded statistics, and every analysis
(importance per batch and per example, entropy, max probability, metric, masking, sweeps with prefix reuse),
padded (``patch(model, padding_free=False)``) against padding-free (the default), and against the independent 4.x
eager oracle of tests/models.py. Odd lengths, and a batch whose examples are one token each.
"""

from __future__ import annotations

import pytest
import torch
from models import MODEL_TYPES, model_loss, random_batch, reference_head_mask, retrieval_batches, tiny_model

import fastbertology
from fastbertology import patching
from fastbertology.importance import analyze_heads, evaluate_metric
from fastbertology.sweeps import ablation_sweep
from fastbertology.tasks import ClassificationTask, LanguageModelingTask, RegressionTask, RetrievalTask

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [9, 5, 7, 1]  # odd lengths, a one-token example, right padding


class TokenCounter:
    """Counts the rows every attention module is given (``[B, N]`` padded, ``[1, T]`` packed)."""

    def __init__(self, model):
        self.rows = 0
        self.handles = [module.register_forward_pre_hook(self._count)
                        for module in patching.attention_modules(model)]

    def _count(self, module, args):
        hidden = args[0]
        self.rows += hidden.shape[0] * hidden.shape[1]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _run(model, input_ids, attention_mask, head_mask, *, padding_free):
    """logits (real positions for token-level outputs), loss, mask gradient, entropy, rows seen per layer."""
    mask = head_mask.clone().requires_grad_(True)
    with fastbertology.patch(model, backend="torch", padding_free=padding_free):
        counter = TokenCounter(model)
        with fastbertology.record(model) as stats:
            output = model(input_ids, attention_mask=attention_mask, head_mask=mask, use_cache=False)
        counter.remove()
        loss = model_loss(model, output, input_ids, attention_mask)
        loss.backward()
    logits = output.logits.detach()
    if logits.dim() == 3:
        logits = logits[attention_mask.bool()]
    return logits, loss.detach(), mask.grad, stats.entropy(), stats.max_prob(), counter.rows


@pytest.mark.parametrize("mask_kind", ["LH", "BLH"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padding_free_equals_padded_and_the_4x_oracle(model_type, mask_kind):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(len(LENGTHS), max(LENGTHS), LENGTHS)
    generator = torch.Generator().manual_seed(5)
    shape = (layers, heads) if mask_kind == "LH" else (len(LENGTHS), layers, heads)
    head_mask = torch.rand(shape, generator=generator, dtype=torch.float64)
    head_mask[..., 0, 1] = 0.0
    padded = _run(model, input_ids, attention_mask, head_mask, padding_free=False)
    packed = _run(model, input_ids, attention_mask, head_mask, padding_free=True)
    for name, a, b in zip(["logits", "loss", "mask grad", "entropy", "max prob"], packed[:5], padded[:5]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)
    real = int(attention_mask.sum())
    assert packed[5] == layers * real  # every layer saw the real tokens only
    assert padded[5] == layers * attention_mask.numel()
    # the independent 4.x implementation (eager attention, probabilities times the head mask)
    mask = head_mask.clone().requires_grad_(True)
    with reference_head_mask(model, mask):
        output = model(input_ids, attention_mask=attention_mask, use_cache=False)
        loss = model_loss(model, output, input_ids, attention_mask)
    loss.backward()
    logits = output.logits.detach()
    logits = logits[attention_mask.bool()] if logits.dim() == 3 else logits
    torch.testing.assert_close(packed[0], logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(packed[2], mask.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_one_token_per_example(model_type):
    model, layers, heads = tiny_model(model_type)
    input_ids, attention_mask = random_batch(3, 4, [1, 1, 1])
    head_mask = torch.rand(layers, heads, dtype=torch.float64)
    padded = _run(model, input_ids, attention_mask, head_mask, padding_free=False)
    packed = _run(model, input_ids, attention_mask, head_mask, padding_free=True)
    for a, b in zip(packed[:5], padded[:5]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert packed[5] == layers * 3
    torch.testing.assert_close(packed[3], torch.zeros(layers, heads, dtype=torch.float64))  # one key: entropy 0


def test_padding_positions_are_zero_and_outputs_keep_their_shapes():
    model, _, _ = tiny_model("bert")
    input_ids, attention_mask = random_batch(len(LENGTHS), max(LENGTHS), LENGTHS)
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        hidden = model.base_model(input_ids, attention_mask=attention_mask).last_hidden_state
        stock_shaped = model(input_ids, attention_mask=attention_mask)
    assert hidden.shape == (len(LENGTHS), max(LENGTHS), 32)
    assert torch.count_nonzero(hidden[~attention_mask.bool()]) == 0
    assert stock_shaped.logits.shape == (len(LENGTHS), 3)


def test_calls_that_need_per_position_outputs_run_padded():
    """output_attentions / output_hidden_states, a cache for generation, left padding: no packing."""
    model, _, _ = tiny_model("gpt2")
    input_ids, attention_mask = random_batch(len(LENGTHS), max(LENGTHS), LENGTHS)
    plans = []
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        hook = patching.transformer_layers(model)[0].register_forward_pre_hook(
            lambda module, args: plans.append(patching.current_packing(model) is not None))
        model(input_ids, attention_mask=attention_mask, use_cache=False)
        model(input_ids, attention_mask=attention_mask, use_cache=False, output_attentions=True)
        model(input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
        model(input_ids, attention_mask=attention_mask)  # GPT-2 builds a cache by default
        model(input_ids, attention_mask=attention_mask.flip(-1), use_cache=False)  # left padding
        model(input_ids[:, :5], attention_mask=attention_mask[:, :5] * 0 + 1, use_cache=False)  # no padding
        hook.remove()
    assert plans == [True, False, False, False, False, False]


def _classification_batches(lengths_per_batch, *, num_labels=3, regression=False):
    batches = []
    for index, lengths in enumerate(lengths_per_batch):
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), lengths, seed=10 + index)
        generator = torch.Generator().manual_seed(index)
        labels = torch.rand(len(lengths), generator=generator, dtype=torch.float64) if regression else \
            torch.randint(0, num_labels, (len(lengths),), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


ANALYSES = {
    "classification": ("bert", lambda: ClassificationTask(num_labels=3), lambda: _classification_batches(
        [[9, 5, 7], [3, 8, 1]])),
    "regression": ("roberta", lambda: RegressionTask(), None),
    "lm-gpt2": ("gpt2", lambda: LanguageModelingTask(), lambda: _classification_batches([[9, 5, 7], [3, 8, 2]])),
    "lm-openai": ("openai-gpt", lambda: LanguageModelingTask(), lambda: _classification_batches([[6, 9, 2]])),
    "retrieval": ("bert", lambda: RetrievalTask(group_size=4), retrieval_batches),
}


def _analysis_model(model_type, name):
    model, _, _ = tiny_model(model_type)
    if name == "regression":  # a regression head on RoBERTa
        from transformers import RobertaForSequenceClassification

        torch.manual_seed(0)
        model = RobertaForSequenceClassification(model.config.__class__(**{**model.config.to_dict(),
                                                                          "num_labels": 1})).double().eval()
    return model


@pytest.mark.parametrize("name", list(ANALYSES))
def test_analyses_equal_padded(name):
    model_type, make_task, make_batches = ANALYSES[name]
    model = _analysis_model(model_type, name)
    batches = make_batches() if make_batches else _classification_batches([[9, 5, 7], [3, 8, 1]], regression=True)
    results = {}
    for padding_free in (False, True):
        with fastbertology.patch(model, backend="torch", padding_free=padding_free):
            per_batch = analyze_heads(model, batches, make_task())
            per_example = analyze_heads(model, batches, make_task(), importance="per_example")
            masked = evaluate_metric(model, batches, make_task(), head_mask=(per_batch.importance > 0.3).double())
            sweep = ablation_sweep(model, batches, make_task(), kind="heads", masks_per_pass=3)
        results[padding_free] = (per_batch, per_example, masked, sweep)
    (a_batch, a_example, a_masked, a_sweep), (b_batch, b_example, b_masked, b_sweep) = results[True], results[False]
    for a, b in ((a_batch, b_batch), (a_example, b_example)):
        for field in ("raw_importance", "entropy", "max_prob"):
            # float64 summation order
            torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-10, rtol=1e-8, msg=field)
        assert a.metric == pytest.approx(b.metric, abs=1e-12) and a.loss == pytest.approx(b.loss, abs=1e-12)
        assert a.tokens == b.tokens
    assert a_masked == pytest.approx(b_masked, abs=1e-12)
    torch.testing.assert_close(a_sweep.scores, b_sweep.scores, atol=1e-12, rtol=0)
    torch.testing.assert_close(a_sweep.losses, b_sweep.losses, atol=1e-12, rtol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "openai-gpt"])
def test_language_model_projects_only_predicted_positions(model_type):
    """LanguageModelingTask applies the vocabulary projection at the K predicting positions only; losses equal
    those from the model's full ``[B, N, V]`` logits, and the compact output splits per copy."""
    from fastbertology.tasks import PredictedLogits

    model, _, _ = tiny_model(model_type)
    batch = _classification_batches([[9, 5, 7, 1]])[0]
    task = LanguageModelingTask()
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        compact = task.forward(model, batch)
        full = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert isinstance(compact, PredictedLogits)
    assert compact.logits.shape[0] == sum(n - 1 for n in [9, 5, 7, 1])  # the last token of a sequence predicts nothing
    ours, theirs = task.result(compact, batch), task.result(full, batch)
    for field in ("loss", "example_losses", "token_losses", "token_mask"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), atol=1e-12, rtol=0)
    doubled = PredictedLogits(torch.cat([compact.logits, compact.logits]), compact.positions.repeat(2, 1))
    for part in task.split(doubled, 2):
        torch.testing.assert_close(task.result(part, batch).loss, ours.loss)

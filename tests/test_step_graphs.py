"""CUDA-graph replay of analysis steps, on the CPU: the buckets (fastbertology/buckets.py), and the step runner
(fastbertology/step_graphs.py, fastbertology/graph_passes.py) with its CPU stand-in for a graph.

The stand-in (``EmulatedGraph``) replays by calling the captured body again; the model is patched with the Triton
backend under the interpreter, whose kernels, like a real replay, see only the bucket's static buffers and the
launch plan made when the bucket was captured (the packed lengths of *another* batch). So a step that depended on
anything a replay does not redo — a host value of the batch, an accumulator replaced instead of updated — gives
different numbers here than the eager pass, and these tests compare the two. The capture itself (and replay speed)
needs CUDA: benchmarks/gpu_check.sh runs the same comparison there.
"""

from __future__ import annotations

import pytest
import torch
from models import random_batch, tiny_model

import fastbertology
from fastbertology import importance as importance_module
from fastbertology.batching import move_batch
from fastbertology.bench.census import Census, tally
from fastbertology.buckets import LENGTH_STEP, bucket_length, bucket_tokens, plan_bucket
from fastbertology.importance import analyze_heads, evaluate_metric
from fastbertology.step_graphs import GraphUse, StaticBatch, graph_refusal
from fastbertology.tasks import ClassificationTask, LanguageModelingTask, RegressionTask, RetrievalTask

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------------------------
def test_bucket_sizes():
    assert bucket_length(1) == LENGTH_STEP and bucket_length(33) == 2 * LENGTH_STEP
    assert bucket_length(40, limit=50) == 50 and bucket_length(60, limit=50) == 60  # never below the batch
    assert bucket_tokens(1, 4, 32) == 64 and bucket_tokens(65, 4, 32) == 128 and bucket_tokens(128, 4, 32) == 128
    assert bucket_tokens(1000, 32, 128) == 1024  # steps of 32 * 128 / 16 = 256
    assert bucket_tokens(4000, 32, 128) == 4096  # never past B * N_b


@pytest.mark.parametrize("lengths", [(5, 2, 7), (32, 32), (1,), (3, 0, 9, 31, 17), (40, 1)])
def test_bucket_plan_packs_real_tokens_first_and_filler_on_padding(lengths):
    plan = plan_bucket(lengths)
    bucket = plan.bucket
    batch, seq = len(lengths), bucket_length(max(lengths))
    assert (bucket.batch, bucket.seq) == (batch, seq) and plan.real_tokens == sum(lengths)
    assert bucket.tokens == bucket_tokens(sum(lengths), batch, seq) >= sum(lengths)
    assert len(plan.lengths) == 2 * batch and sum(plan.lengths) == bucket.tokens
    assert plan.lengths[:batch] == lengths and max(plan.lengths) <= seq
    assert plan.cu_seqlens.tolist() == torch.tensor((0, *plan.lengths)).cumsum(0).tolist()
    rows, columns = plan.index // seq, plan.index % seq
    real = sum(lengths)
    lengths_tensor = torch.tensor(lengths)
    assert bool((columns[:real] < lengths_tensor[rows[:real]]).all())  # real tokens, in order
    assert plan.index[:real].tolist() == sorted(plan.index[:real].tolist())
    assert bool((columns[real:] >= lengths_tensor[rows[real:]]).all())  # filler: padding positions only
    assert len(set(plan.index.tolist())) == bucket.tokens
    assert plan.query_weights.tolist() == [[1.0] * real + [0.0] * (bucket.tokens - real)]


def test_bucket_plan_refuses_a_batch_without_tokens():
    with pytest.raises(ValueError, match="at least one real token"):
        plan_bucket((0, 0))


# --------------------------------------------------------------------------------------------------------------
# The runner, with the CPU stand-in for graphs
# --------------------------------------------------------------------------------------------------------------
BUCKET_BATCHES = ((7, 3, 12, 5), (9, 12, 2, 6), (33, 1, 8, 13))  # 1 and 2: bucket (4, 32, 64); 3: (4, 64, 64)


def _batches(lengths_per_batch=BUCKET_BATCHES, labels="classes"):
    """Batches on the CPU as the commands make them (moved by move_batch: the lengths are known on the host)."""
    batches = []
    for seed, lengths in enumerate(lengths_per_batch):
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), list(lengths), seed=seed)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels == "classes":
            batch["labels"] = torch.arange(len(lengths)) % 3
        elif labels == "values":
            batch["labels"] = torch.linspace(-1.0, 1.0, len(lengths))
        batches.append(move_batch(batch, "cpu"))
    return batches


@pytest.fixture
def graphs_on_the_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("interpreter test on CPU tensors; on CUDA: tests/test_triton_gpu.py::"
                    "test_cuda_graph_replay_equals_eager")
    """Lift the refusal that keeps the CPU eager (no CUDA): the runner then replays EmulatedGraph."""
    monkeypatch.setattr(importance_module, "graph_refusal",
                        lambda model, task, mode, device: None if mode == "auto" else graph_refusal(model, task, mode,
                                                                                                   device))


def _triton_bert(num_labels: int = 3):
    """A one-layer float32 BERT (2 heads of 8): the Triton interpreter runs every step of these tests."""
    pytest.importorskip("triton")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def _assert_same_analysis(result, expected):
    torch.testing.assert_close(result.raw_importance, expected.raw_importance, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(result.entropy, expected.entropy, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.max_prob, expected.max_prob, rtol=1e-5, atol=1e-7)
    assert result.tokens == expected.tokens and result.examples == expected.examples
    assert result.metric == pytest.approx(expected.metric) and result.loss == pytest.approx(expected.loss, rel=1e-5)


def test_replayed_importance_equals_the_eager_pass(graphs_on_the_cpu):
    model = _triton_bert()
    batches, task = _batches(), ClassificationTask(num_labels=3)
    with fastbertology.patch(model, backend="triton"):
        eager = analyze_heads(model, batches, task, cuda_graphs="off")
        replayed = analyze_heads(model, batches, task)
        again = analyze_heads(model, batches, task)  # the next pass replays the same graphs
    assert eager.cuda_graphs["enabled"] is False and "--cuda-graphs off" in eager.cuda_graphs["reason"]
    use = replayed.cuda_graphs
    assert use["enabled"] and use["reason"] is None and use["buckets"] == [[4, 32, 64], [4, 64, 64]]
    assert (use["captured"], use["replays"], use["eager_steps"]) == (2, 1, 2)  # batch 2 replays batch 1's graph
    assert (again.cuda_graphs["captured"], again.cuda_graphs["replays"]) == (0, 3)
    _assert_same_analysis(replayed, eager)
    _assert_same_analysis(again, eager)


def test_replayed_per_example_importance_equals_the_eager_pass(graphs_on_the_cpu):
    model = _triton_bert()
    batches, task = _batches()[:2], ClassificationTask(num_labels=3)
    with fastbertology.patch(model, backend="triton"):
        eager = analyze_heads(model, batches, task, importance="per_example", cuda_graphs="off")
        replayed = analyze_heads(model, batches, task, importance="per_example")
    assert replayed.cuda_graphs["replays"] == 1
    _assert_same_analysis(replayed, eager)


def test_replayed_evaluation_and_regression_equal_eager(graphs_on_the_cpu):
    model = _triton_bert()
    batches, task = _batches(), ClassificationTask(num_labels=3, metric="mcc")
    mask = torch.ones(1, 2)
    mask[0, 1] = 0.0
    with fastbertology.patch(model, backend="triton"):
        report = {}
        eager = evaluate_metric(model, batches, task, head_mask=mask, cuda_graphs="off")
        replayed = evaluate_metric(model, batches, task, head_mask=mask, graph_report=report)
    assert report["enabled"] and report["replays"] == 1
    assert replayed == pytest.approx(eager, abs=1e-12)
    regression = _triton_bert(num_labels=1)
    batches, task = _batches(BUCKET_BATCHES[:2], labels="values"), RegressionTask()
    with fastbertology.patch(regression, backend="triton"):
        eager = analyze_heads(regression, batches, task, cuda_graphs="off")
        replayed = analyze_heads(regression, batches, task)
    assert replayed.cuda_graphs["replays"] == 1
    assert replayed.metric == pytest.approx(eager.metric, rel=1e-5)
    torch.testing.assert_close(replayed.raw_importance, eager.raw_importance, rtol=1e-5, atol=1e-9)


def test_steps_that_cannot_replay_run_eagerly_and_say_why(graphs_on_the_cpu):
    model = _triton_bert()
    task = ClassificationTask(num_labels=3)
    batches = _batches()[:2]
    # a batch whose lengths the host does not know (not moved by move_batch): eager, the others replay
    unknown = {key: value.clone() for key, value in batches[0].items()}
    with fastbertology.patch(model, backend="triton"):
        result = analyze_heads(model, [unknown, *batches[:2]], task)
    assert result.cuda_graphs["eager_steps"] == 2 and result.cuda_graphs["replays"] == 1

    class RebindingTask(ClassificationTask):
        """A task whose update_metric replaces its state: a replay would not accumulate."""

        def update_metric(self, state, result, batch):
            super().update_metric(state, result, batch)
            state["confusion"] = state["confusion"].clone()

    with fastbertology.patch(model, backend="triton"):
        expected = analyze_heads(model, batches, task, cuda_graphs="off")
        result = analyze_heads(model, batches, RebindingTask(num_labels=3))
    assert not result.cuda_graphs["enabled"] and "in place" in result.cuda_graphs["reason"]
    torch.testing.assert_close(result.raw_importance, expected.raw_importance, rtol=1e-5, atol=1e-9)
    assert result.metric == pytest.approx(expected.metric)


def _triton_gpt2():
    """A one-layer float32 GPT-2 (2 heads of 8) for the interpreter."""
    pytest.importorskip("triton")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=101, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("chunk", [None, 16], ids=["logits", "chunked-loss"])
def test_replayed_language_model_importance_equals_the_eager_pass(graphs_on_the_cpu, chunk):
    """Language modelling replays too: its vocabulary projection runs on the bucket's packed tokens (real and
    filler: fixed shapes), the filler's targets are ignored, and its metric is updated in place."""
    model = _triton_gpt2()
    batches, task = _batches(labels=None), LanguageModelingTask(loss_chunk_tokens=chunk)
    with fastbertology.patch(model, backend="triton"):
        eager = analyze_heads(model, batches, task, cuda_graphs="off")
        replayed = analyze_heads(model, batches, task)
        per_example = analyze_heads(model, batches[:2], task, importance="per_example")
        per_example_eager = analyze_heads(model, batches[:2], task, importance="per_example", cuda_graphs="off")
        mask = torch.ones(1, 2)
        mask[0, 0] = 0.0
        report = {}
        eager_metric = evaluate_metric(model, batches, task, head_mask=mask, cuda_graphs="off")
        graph_metric = evaluate_metric(model, batches, task, head_mask=mask, graph_report=report)
    use = replayed.cuda_graphs
    assert use["enabled"] and (use["captured"], use["replays"]) == (2, 1), use
    _assert_same_analysis(replayed, eager)
    assert per_example.cuda_graphs["replays"] == 1
    _assert_same_analysis(per_example, per_example_eager)
    assert report["enabled"] and report["replays"] == 1  # iterative masking's evaluation step replays too
    assert graph_metric == pytest.approx(eager_metric, rel=1e-6)


def test_refusals_name_the_reason():
    model = tiny_model("gpt2", dtype=torch.float32)[0]
    cpu = torch.device("cpu")
    with fastbertology.patch(model, backend="torch") as handle:
        assert "--cuda-graphs off" in graph_refusal(model, LanguageModelingTask(), "off", cpu)
        assert "no CUDA device" in graph_refusal(model, LanguageModelingTask(), "auto", cpu)
        state = model._fastbertology_state
        assert "'torch' attention backend" in graph_refusal(model, LanguageModelingTask(), "auto",
                                                             torch.device("cuda"))
        state.backend = "triton"
        assert graph_refusal(model, LanguageModelingTask(), "auto", torch.device("cuda")) is None
        assert "two inputs per example" in graph_refusal(model, RetrievalTask(), "auto", torch.device("cuda"))
        assert handle is not None
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        graph_refusal(model, LanguageModelingTask(), "on", cpu)


def test_refilling_a_bucket_reads_nothing_back():
    """The host work of a replayed step outside its graph (copies into the static buffers) never waits for the
    device."""
    batches = _batches()
    plans = [plan_bucket(tuple(int(n) for n in batch["attention_mask"].sum(1))) for batch in batches[:2]]
    static = StaticBatch(batches[0], plans[0], torch.device("cpu"))
    assert static.fits(batches[1]) and not static.fits(batches[2])
    census = Census()
    with census:
        census.track([t for batch in batches[:2] for t in batch.values()] + [*static.tensors.values(),
                     static.index, static.cu_seqlens, static.query_weights])
        with census.phase("step"):
            filled = static.fill(batches[1], plans[1])
    counts = tally(census.events)
    assert counts.syncs == 0 and counts.launches <= 12, counts
    widened = filled["input_ids"]
    assert widened.shape == (4, 32) and torch.equal(widened[:, :12], batches[1]["input_ids"])
    assert bool((filled["attention_mask"][:, 12:] == 0).all())


def test_graph_use_reports_as_a_dict():
    use = GraphUse("auto", enabled=True)
    use.turn_off("because")
    assert use.as_dict() == {"mode": "auto", "enabled": False, "reason": "because", "captured": 0, "replays": 0,
                             "eager_steps": 0, "buckets": []}


def test_a_failed_capture_or_a_replay_that_differs_turns_graphs_off(graphs_on_the_cpu, monkeypatch):
    """Either way the pass goes on eagerly with the same numbers, and says why."""
    from fastbertology.step_graphs import EmulatedGraph

    model = _triton_bert()
    batches, task = _batches()[:2], ClassificationTask(num_labels=3)
    with fastbertology.patch(model, backend="triton"):
        expected = analyze_heads(model, batches, task, cuda_graphs="off")

        def refused(self, function):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(EmulatedGraph, "capture", refused)
        failed = analyze_heads(model, batches, ClassificationTask(num_labels=3))
        monkeypatch.undo()
        monkeypatch.setattr(importance_module, "graph_refusal", lambda *args: None)
        monkeypatch.setattr(EmulatedGraph, "replay", lambda self: self.function() + 1.0)  # a wrong replay
        differing = analyze_heads(model, batches, ClassificationTask(num_labels=3))
    assert "capture failed" in failed.cuda_graphs["reason"] and "stream is capturing" in failed.cuda_graphs["reason"]
    assert "did not reproduce the eager step" in differing.cuda_graphs["reason"]
    for result in (failed, differing):
        assert not result.cuda_graphs["enabled"] and result.cuda_graphs["replays"] == 0
        _assert_same_analysis(result, expected)


@pytest.mark.parametrize("kind", ["bert", "gpt2"], ids=["classification", "language-modelling"])
def test_the_step_a_graph_captures_reads_nothing_back(monkeypatch, kind):
    """The body a graph captures, run on a bucketed batch through the GPU code path under the census (Triton
    launches recorded, CPU tensors posing as CUDA): no host-device sync, which would make a capture fail."""
    from fastbertology.bench.census_step import census_batches, count_step
    from fastbertology.bench.workloads import TINY_BERT, TINY_GPT2, SyntheticWorkload, build_model
    from fastbertology.step_graphs import StepRunner

    size = TINY_BERT if kind == "bert" else TINY_GPT2
    warm, counted = census_batches(size, 4, 16)
    # the bucket plans are host work outside the graph: made here, before the census (which could mistake a host
    # tensor at the address of a freed "device" one for a device tensor)
    plans = {lengths: plan_bucket(lengths) for lengths in
             (tuple(int(n) for n in batch["attention_mask"].sum(1)) for batch in (warm, counted))}

    def bucketed_body(self, batch):
        from fastbertology.packing import known_lengths

        plan = plans[known_lengths(batch["attention_mask"])]
        static = StaticBatch(batch, plan, batch["attention_mask"].device)
        return self.body(static.fill(batch, plan))

    monkeypatch.setattr(importance_module, "graph_refusal", lambda *args: None)
    monkeypatch.setattr(StepRunner, "run", bucketed_body)
    events = count_step(build_model(size), warm, counted, SyntheticWorkload(size, 4, 16).task(),
                        cuda_graphs="auto")
    step = [event for event in events if event.phase == "step"]
    assert sum(event.kind == "triton" for event in step) >= 4  # the attention kernels ran (were recorded)
    assert tally(step).syncs == 0, [(event.name, event.location) for event in step if event.sync]

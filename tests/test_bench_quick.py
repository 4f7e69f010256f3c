"""The end-to-end benchmark (fastbertology.bench): quick cases on the CPU, and its reference loop.

The benchmark doubles as a correctness check: fastbertology's importance and entropy must equal the independent
run_bertology reference loop's on the same batches, iterative masking must keep the same heads and the sweep must
give the same losses. The reference loop itself is checked against a separate computation (finite differences
under tests/models.py's 4.x head masking, entropy from ``output_attentions``). Timings are only checked for being
positive; they are never compared here (see benchmarks/).
"""

import copy
import json

import pytest
import torch
from conftest import single_thread
from models import random_batch, reference_head_mask, retrieval_batches, tiny_model

from fastbertology import bench, cli, patch
from fastbertology.bench.memory import PeakMemory
from fastbertology.bench.reference import reference_analysis, reference_model
from fastbertology.bench.runner import measure, relative_max_diff
from fastbertology.bench.workloads import TINY_GPT2, synthetic_examples
from fastbertology.importance import analyze_heads
from fastbertology.tasks import ClassificationTask, RetrievalTask

FP32_TOLERANCE = {"importance_diff": 5e-6, "entropy_diff": 1e-6}
BF16_TOLERANCE = {"importance_diff": 5e-2, "entropy_diff": 2e-2}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every quick case through the command-line entry (rows appended to a JSON-lines file)."""
    out = tmp_path_factory.mktemp("bench") / "rows.jsonl"
    with single_thread():
        rows = bench.bench_main(["--quick", "--device", "cpu", "--out", str(out)])
    return rows, out


def _by_case(rows):
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["mode"]] = row
    return by_case


def test_quick_rows_complete_and_timed(quick_run):
    rows, _ = quick_run
    by_case = _by_case(rows)
    assert list(by_case) == [case.name for case in bench.QUICK_CASES]
    for case in bench.QUICK_CASES:
        modes = by_case[case.name]
        assert tuple(modes) == case.modes
        for mode, row in modes.items():
            if mode == "fastbertology-eager":  # CUDA graphs' A/B: without CUDA the fastbertology row itself
                assert row["status"].startswith("skipped: the fastbertology row without CUDA"), row["status"]
                continue
            assert row["status"] == "ok", (case.name, mode, row["status"])
            assert row["seconds"] > 0 and row["s_per_pass"] > 0 and row["ex_per_s"] > 0
            assert row["peak_kind"] == "cpu-rss-growth" and row["peak_mib"] >= 0
            assert row["dtype"] == case.mode_dtype(mode)
            assert row["speedup_vs_reference"] > 0
            assert 0 < row["real_tokens"] <= row["padded_tokens"]
            assert row["real_token_fraction"] == pytest.approx(row["real_tokens"] / row["padded_tokens"])
        assert modes["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
        if case.kind == "analysis":
            assert modes["sdpa-forward"]["speedup_vs_sdpa_forward"] == pytest.approx(1.0)
            assert modes["fastbertology"]["padding_free"] is True
            assert modes["fastbertology"]["cuda_graphs"].startswith("off: no CUDA device")
            assert modes["fastbertology-padded"]["padding_free"] is False


@pytest.mark.parametrize("case", [c for c in bench.QUICK_CASES if c.kind == "analysis"], ids=lambda c: c.name)
def test_quick_analysis_equals_the_reference(quick_run, case):
    modes = _by_case(quick_run[0])[case.name]
    fp32 = case.dtype == case.mode_dtype("reference") == "fp32"
    tolerance = FP32_TOLERANCE if fp32 else BF16_TOLERANCE
    for mode in ("fastbertology", "fastbertology-padded"):
        row = modes[mode]
        for column, limit in tolerance.items():
            assert row[column] < limit, (case.name, mode, column, row[column])
        if fp32:
            assert row["metric"] == pytest.approx(modes["reference"]["metric"], rel=1e-6)  # perplexity: fp32 sums
    assert modes["sdpa-forward"]["importance_diff"] is None and modes["sdpa-frozen"]["metric"] is None


def test_quick_batch_one_defaults_run_per_example_at_a_large_batch(quick_run):
    """run_bertology's defaults: the loop at batch 1 (per-batch importance = per-example), fastbertology's
    per-example importance at the case's fast batch; the importance tables agree (checked above for every
    analysis case), and the rows say which batch and importance each mode ran."""
    modes = _by_case(quick_run[0])["quick-bert-16x16-b1-defaults-fp32"]
    assert (modes["reference"]["batch"], modes["reference"]["importance"]) == (1, "per_batch")
    for mode in ("fastbertology", "fastbertology-padded"):
        assert (modes[mode]["batch"], modes[mode]["importance"]) == (8, "per_example")
    assert modes["sdpa-frozen"]["batch"] == 1


def test_quick_masking_and_sweep_equal_the_reference(quick_run):
    by_case = _by_case(quick_run[0])
    masking = by_case["quick-masking-bert-16x16-b8-fp32"]
    assert masking["fastbertology"]["passes"] == masking["reference"]["passes"] >= 2
    assert masking["fastbertology"]["mask_mismatch"] == 0
    assert masking["fastbertology"]["metric"] == masking["reference"]["metric"]
    sweep = by_case["quick-sweep-bert-16x16-b8-fp32"]
    heads = sweep["reference"]["layers"] * sweep["reference"]["heads"]
    assert sweep["fastbertology"]["passes"] == sweep["reference"]["passes"] == heads + 1
    assert sweep["fastbertology"]["sweep_loss_diff"] < 1e-6
    assert sweep["fastbertology"]["metric"] == sweep["reference"]["metric"]


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_quick_ablation_sweeps_equal_the_hook_loop(quick_run, ablation):
    sweep = _by_case(quick_run[0])[f"quick-sweep-{ablation}-bert-16x16-b8-fp32"]
    heads = sweep["reference"]["layers"] * sweep["reference"]["heads"]
    assert sweep["fastbertology"]["passes"] == sweep["reference"]["passes"] == heads + 1
    assert sweep["fastbertology"]["sweep_loss_diff"] < 1e-6


def test_quick_head_types_equal_the_eager_maps(quick_run):
    modes = _by_case(quick_run[0])["quick-head-types-gpt2-16x32-b8-fp32"]
    assert modes["fastbertology"]["head_types_diff"] < 1e-6  # float32 probabilities
    assert modes["reference"]["head_types_diff"] is None


def test_quick_gates_equal_the_eager_training(quick_run):
    """The same gate training on the fused path and on explicit eager attention (the reference backend, every map
    stored) ends at the same gate probabilities."""
    modes = _by_case(quick_run[0])["quick-gates-bert-16x16-b8-fp32"]
    assert modes["fastbertology"]["gates_diff"] < 1e-4
    assert modes["reference"]["gates_diff"] is None and modes["fastbertology"]["passes"] == 40


def test_quick_jsonl_and_results_block(quick_run):
    rows, out = quick_run
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["case"], r["mode"]) for r in written] == [(r["case"], r["mode"]) for r in rows]
    assert all(set(row) == set(bench.ROW_KEYS) for row in written)
    block = bench.results_snippet(rows, "fastbertology bench --quick")
    assert block.startswith(f"* Machine: {rows[0]['device_name']}")
    assert "* Command: `fastbertology bench --quick`" in block
    assert "| case | mode | dtype | passes | s/pass |" in block
    assert all(case.name in block for case in bench.QUICK_CASES)
    assert "real tokens" in block and "resident set" in block


def test_case_selection():
    assert [c.name for c in bench.select_cases(["gpt2-8x32"], group="quick")] == ["quick-gpt2-8x32-b4-bf16"]
    assert [c.name for c in bench.select_cases(["cpu-minilm-retrieval-256-b32-fp32"])] == [
        "cpu-minilm-retrieval-256-b32-fp32"]
    exact = bench.select_cases(["bert-408x128-b32-bf16"])  # exact names do not pull in masking-/sweep- cases
    assert [c.name for c in exact] == ["bert-408x128-b32-bf16"]
    assert bench.select_cases(cuda=True) == bench.FULL_CASES and bench.select_cases() == bench.CPU_CASES
    assert all(case.device == "cpu" for case in bench.CPU_CASES)
    with pytest.raises(ValueError, match="no case matches"):
        bench.select_cases(["nonexistent"])
    with pytest.raises(ValueError, match="unknown mode"):
        bench.run_bench(["quick-bert-16x16-b8-fp32"], group="quick", device="cpu", modes=["sdpa"])


def test_synthetic_examples_right_padded():
    examples = synthetic_examples(TINY_GPT2, 20, 16)
    lengths = examples["attention_mask"].sum(1)
    assert lengths.min() >= 4 and lengths.max() <= 16
    assert torch.equal(examples["attention_mask"], (torch.arange(16)[None] < lengths[:, None]).long())
    assert (examples["input_ids"][examples["attention_mask"] == 0] == TINY_GPT2.vocab - 1).all()
    assert torch.equal(synthetic_examples(TINY_GPT2, 20, 16)["input_ids"], examples["input_ids"])  # fixed seed


def test_time_budget_skips_cases_without_numbers():
    rows = bench.run_bench(["quick-bert-16x16-b8-fp32", "quick-masking"], group="quick", device="cpu",
                           time_budget=0)
    assert [(r["case"], r["mode"]) for r in rows] == [
        ("quick-bert-16x16-b8-fp32", mode) for mode in bench.ANALYSIS_MODES] + [
        ("quick-masking-bert-16x16-b8-fp32", mode) for mode in bench.MASKING_MODES]
    assert all(r["status"].startswith("skipped") and r["seconds"] is None and r["ex_per_s"] is None for r in rows)
    assert "skipped: time budget" in bench.format_table(rows)
    assert bench.exit_code(rows) == 0 and bench.exit_code([{"status": "error: boom"}]) == 1


def test_cli_hands_the_bench_its_arguments(one_thread, capsys):
    argv = ["--quick", "--device", "cpu", "--case", "quick-bert-16x16-b8-fp32", "--modes", "sdpa-forward"]
    assert cli.main(["bench", "--", *argv]) == 0
    out, err = capsys.readouterr()
    assert out.count("| quick-bert-16x16-b8-fp32 | sdpa-forward |") == 1
    assert "timings are NOT meaningful" in out and "timings are NOT meaningful" in err
    assert "s/pass" not in err  # each row's numbers once, in the table (stderr only says what finished)
    assert "finished quick-bert-16x16-b8-fp32 sdpa-forward: ok" in err
    assert "* Command: `fastbertology bench --quick --device cpu --case quick-bert-16x16-b8-fp32" in out


def test_repeated_runs_report_the_median(monkeypatch):
    """--repeat N: N timed runs after one untimed warmup; the median of their times, the last run's result."""
    durations = iter([0.3, 0.1, 0.2])
    clock = [0.0]

    class Prepared:
        runs = warmups = 0

        def warmup(self):
            self.warmups += 1

        def run(self):
            self.runs += 1
            clock[0] += next(durations)
            return self.runs

    monkeypatch.setattr("fastbertology.bench.runner.time.perf_counter", lambda: clock[0])
    prepared = Prepared()
    result, seconds, _ = measure(prepared, torch.device("cpu"), repeats=3)
    assert (prepared.warmups, prepared.runs, result) == (1, 3, 3)
    assert seconds == pytest.approx(0.2)
    with pytest.raises(ValueError, match="repeats"):
        measure(Prepared(), torch.device("cpu"), repeats=0)


def test_peak_memory_sees_cpu_allocations():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so that it is resident
        del block
    assert peak.kind == "cpu-rss-growth" and 60 < peak.mib < 200


# ------------------------------------------------------------------------------------- the reference loop itself
def _classification_batches():
    batches = []
    for seed, lengths in [(1, [9, 5, 7]), (2, [6, 8, 3, 8])]:
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), lengths, seed=seed)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask,
                        "labels": torch.arange(len(lengths)) % 3})
    return batches


CALLS = {  # the (input_ids, attention_mask) of every model call a task makes on a batch
    "classification": lambda b: [(b["input_ids"], b["attention_mask"])],
    "retrieval": lambda b: [(b["input_ids"], b["attention_mask"]), (b["pair_input_ids"], b["pair_attention_mask"])],
}
TASKS = {"classification": (lambda: ClassificationTask(num_labels=3), _classification_batches),
         "retrieval": (lambda: RetrievalTask(group_size=4), retrieval_batches)}


def _independent(model, batches, task, calls, layers, heads, eps=1e-4):
    """run_bertology's per-batch importance by central finite differences of the batch loss under tests/models.py's
    4.x head masking, and its entropy from ``output_attentions`` of every call (``torch.special.entr``)."""
    importance = torch.zeros(layers, heads, dtype=torch.float64)
    entropy = torch.zeros(layers, heads, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            for index in range(layers * heads):
                step = torch.zeros(layers * heads, dtype=torch.float64)
                step[index] = eps
                losses = []
                for sign in (1, -1):
                    with reference_head_mask(model, 1 + sign * step.view(layers, heads)):
                        losses.append(task.evaluate(model, batch).loss)
                importance.view(-1)[index] += abs(float(losses[0] - losses[1]) / (2 * eps))
            for input_ids, attention_mask in calls(batch):
                with reference_head_mask(model, None):
                    output = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                              output_attentions=True)
                for layer, probs in enumerate(output.attentions):  # [B, H, N, N]
                    per_query = torch.special.entr(probs).sum(-1)  # [B, H, N]
                    entropy[layer] += (per_query * attention_mask[:, None, :]).sum((0, 2))
                tokens += int(attention_mask.sum())
    return importance / tokens, entropy / tokens, tokens


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_loop_equals_an_independent_computation(name, one_thread):
    """Both calls of a retrieval batch are captured: entropy and tokens cover queries and positives."""
    make_task, make_batches = TASKS[name]
    model, layers, heads = tiny_model("bert")
    model.requires_grad_(True)
    batches, task = make_batches(), make_task()
    analysis = reference_analysis(model, batches, task)
    importance, entropy, tokens = _independent(model, batches, task, CALLS[name], layers, heads)
    assert analysis.tokens == tokens
    # the mask is float32, as run_bertology's: its gradient carries float32 rounding (and the differences ~1e-10)
    assert relative_max_diff(analysis.raw_importance, importance) < 1e-6
    torch.testing.assert_close(analysis.entropy, entropy, rtol=1e-10, atol=1e-12)
    assert model.base_model.encoder.layer[0].attention.self.query.weight.grad is not None  # weight gradients too
    assert analysis.max_prob.isnan().all()


@pytest.mark.parametrize("importance", ["per_batch", "per_example"])
def test_reference_loop_equals_fastbertology_on_retrieval(importance, one_thread):
    model, _, _ = tiny_model("bert")
    batches, task = retrieval_batches(), RetrievalTask(group_size=4)
    reference = reference_analysis(copy.deepcopy(model).requires_grad_(True), batches, task, importance=importance)
    with patch(model, backend="torch"):
        ours = analyze_heads(model, batches, task, importance=importance)
    assert ours.tokens == reference.tokens
    assert relative_max_diff(ours.raw_importance, reference.raw_importance) < 1e-6  # float32 masks (both)
    torch.testing.assert_close(ours.entropy, reference.entropy, rtol=1e-9, atol=1e-14)
    assert ours.metric == reference.metric


def test_reference_model_restores_the_model():
    model, _, _ = tiny_model("gpt2")
    previous = model.config._attn_implementation
    with reference_model(model) as capture:
        assert capture.maps and model.config._attn_implementation != previous
    assert model.config._attn_implementation == previous
    assert not model.base_model._forward_hooks and not model.base_model._forward_pre_hooks
    assert not any(hasattr(block.attn, "_fastbertology_bench_reference") for block in model.base_model.h)
    with pytest.raises(ValueError, match="AttentionInterface"), reference_model(tiny_model("openai-gpt")[0]):
        pass


def test_quick_patching_equals_the_eager_loop(tmp_path):
    """Activation patching, batched, against the TransformerLens-style eager loop (one pass per head)."""
    with single_thread():
        rows = bench.bench_main(["--quick", "--device", "cpu", "--cases", "quick-patching",
                                 "--out", str(tmp_path / "rows.jsonl")])
    modes = _by_case(rows)["quick-patching-gpt2-8x16-b4-fp32"]
    assert tuple(modes) == ("reference", "fastbertology")
    heads = modes["reference"]["layers"] * modes["reference"]["heads"]
    assert modes["fastbertology"]["passes"] == modes["reference"]["passes"] == heads + 2
    assert modes["fastbertology"]["status"] == "ok" and modes["fastbertology"]["sweep_loss_diff"] < 1e-5
    assert modes["fastbertology"]["metric"] == pytest.approx(modes["reference"]["metric"], rel=1e-6)

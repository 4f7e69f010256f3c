"""Quick mode of the end-to-end benchmark (tiny configs, CPU) and the length-bucketed batching it uses.

The benchmark doubles as a correctness check: fastbertology's importance and entropy must equal the independent
run_bertology reference loop's on the same batches, and iterative masking must pick the same heads.
Timings are only checked for being positive; they are never compared here (see benchmarks/).
"""

import json

import pytest
import torch

from fastbertology import bench, patch
from fastbertology.batching import (bucketed_batches, collate, example_lengths, length_bucketed_order,
                                    padded_batches)
from conftest import single_thread
from fastbertology.importance import analyze_heads


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every quick case through the command-line entry (rows appended to a JSON-lines file)."""
    out = tmp_path_factory.mktemp("bench") / "rows.jsonl"
    with single_thread():
        rows = bench.bench_main(["--quick", "--device", "cpu", "--out", str(out)])
    return rows, out


def test_quick_rows_complete_and_sane(quick_run):
    rows, _ = quick_run
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["mode"]] = row
    assert list(by_case) == [case.name for case in bench.QUICK_CASES]
    for case in bench.QUICK_CASES:
        modes = by_case[case.name]
        assert tuple(modes) == case.modes
        if case.kind == "sweep" and bench.sweeps_module() is None:  # a TODO hook: no numbers, never fake ones
            for row in modes.values():
                assert row["status"].startswith("todo") and row["seconds"] is None and row["ex_per_s"] is None
            continue
        for mode, row in modes.items():
            assert row["status"] == "ok", (case.name, mode, row["status"])
            assert row["seconds"] > 0 and row["s_per_pass"] > 0 and row["ex_per_s"] > 0
            assert row["peak_mib"] is None  # CPU
            assert row["dtype"] == case.mode_dtype(mode)
            assert row["speedup_vs_reference"] > 0
            assert row["tokens"] >= case.examples * (case.seq // 4)
        assert modes["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
        if case.kind == "analysis":
            assert set(modes) == {"reference", "sdpa-frozen", "fastbertology", "fastbertology-bucketed"}
            assert modes["sdpa-frozen"]["speedup_vs_sdpa"] == pytest.approx(1.0)
            ours = modes["fastbertology"]
            same_dtype_fp32 = case.dtype == case.ref_dtype == "fp32"
            # same batches, same per-batch importance: equal to the reference loop (bf16: within bf16 noise)
            assert ours["importance_diff"] < (1e-4 if same_dtype_fp32 else 5e-2), case.name
            assert ours["entropy_diff"] < (1e-5 if same_dtype_fp32 else 2e-2), case.name
            assert modes["fastbertology-bucketed"]["entropy_diff"] < (1e-5 if same_dtype_fp32 else 2e-2)
            if same_dtype_fp32:
                assert ours["metric"] == modes["reference"]["metric"]
                assert modes["fastbertology-bucketed"]["metric"] == modes["reference"]["metric"]
        if case.kind == "masking":
            assert modes["fastbertology"]["passes"] == modes["reference"]["passes"] >= 2
            assert modes["fastbertology"]["mask_mismatch"] == 0
            assert modes["fastbertology"]["metric"] == modes["reference"]["metric"]
        if case.kind == "sweep":  # batched masks + prefix reuse vs one eager pass per mask: same losses
            assert modes["fastbertology"]["passes"] == modes["reference"]["passes"] == case.model.layers * (
                case.model.heads) + 1
            assert modes["fastbertology"]["sweep_loss_diff"] < 1e-5
            assert modes["fastbertology"]["metric"] == modes["reference"]["metric"]


def test_quick_table_and_jsonl(quick_run, capsys):
    rows, out = quick_run
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["case"], r["mode"]) for r in written] == [(r["case"], r["mode"]) for r in rows]
    table = bench.format_table(rows)
    assert "| case | mode | dtype | passes | s/pass |" in table
    assert all(case.name in table for case in bench.QUICK_CASES)
    assert rows[0]["device_name"] in table.splitlines()[0]


def test_case_selection():
    assert [c.name for c in bench.select_cases(["gpt2"], quick=True)] == ["quick-gpt2-8x32-b4-bf16"]
    assert len(bench.select_cases(quick=False)) == len(bench.QUICK_CASES)
    with pytest.raises(ValueError, match="no case matches"):
        bench.select_cases(["nonexistent"])


def test_synthetic_examples_right_padded():
    size = bench.TINY_GPT2
    examples = bench.synthetic_examples(size, 20, 16)
    lengths = example_lengths(examples)
    assert lengths.min() >= 4 and lengths.max() <= 16
    assert (examples["input_ids"][examples["attention_mask"] == 0] == size.vocab - 1).all()
    again = bench.synthetic_examples(size, 20, 16)
    assert torch.equal(again["input_ids"], examples["input_ids"])  # fixed seed


# --------------------------------------------------------------------------------------------------- batching
def test_length_bucketed_order_sorts_within_windows():
    lengths = torch.tensor([3, 9, 5, 5, 1, 8, 2, 7])
    order = length_bucketed_order(lengths, window=3)
    assert sorted(order.tolist()) == list(range(8))
    assert order.tolist() == [1, 2, 0, 5, 3, 4, 7, 6]  # windows [0:3], [3:6], [6:8], longest first, stable
    assert length_bucketed_order(lengths).tolist() == [1, 5, 7, 2, 3, 0, 6, 4]
    assert length_bucketed_order(lengths, descending=False)[0] == 4


def test_bucketed_batches_trim_and_cover_the_data():
    examples = bench.synthetic_examples(bench.TINY_BERT, 13, 16)
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


@pytest.mark.parametrize("size", [bench.TINY_BERT, bench.TINY_GPT2], ids=lambda s: s.kind)
def test_bucketing_leaves_order_independent_results_unchanged(size, one_thread):
    """per_example importance, entropy, max prob, metric and counts: identical (float64) with bucketing."""
    model = bench.build_model(size).double()
    examples = bench.synthetic_examples(size, 11, 24, seed=3)
    task = bench.make_task(size)
    with patch(model, backend="torch"):
        plain = analyze_heads(model, padded_batches(examples, 4), task, importance="per_example")
        bucketed = analyze_heads(model, bucketed_batches(examples, 4, window=6), task, importance="per_example")
    torch.testing.assert_close(bucketed.raw_importance, plain.raw_importance, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(bucketed.entropy, plain.entropy, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bucketed.max_prob, plain.max_prob, rtol=1e-9, atol=1e-12)
    assert bucketed.metric == pytest.approx(plain.metric, rel=1e-9)
    assert (bucketed.tokens, bucketed.examples) == (plain.tokens, plain.examples)


def test_compile_flag_path(one_thread):
    """torch.compile (off by default) on the fastbertology mode: the results still match the reference loop.
    The 'eager' dynamo backend keeps this fast on CPU; on the GPU use --compile reduce-overhead (CUDA graphs)."""
    case = bench.BenchCase("compile-check", bench.TINY_BERT, 8, 16, 8, "fp32")
    rows = bench.run_case(case, device="cpu", modes=["reference", "fastbertology"], warmup=False,
                          compile_options={"backend": "eager"})
    ours = next(row for row in rows if row["mode"] == "fastbertology")
    assert ours["status"] == "ok" and ours["compiled"]
    assert ours["importance_diff"] < 1e-4 and ours["entropy_diff"] < 1e-5


def test_time_budget_skips_cases_without_numbers():
    rows = bench.run_bench(["quick-bert-16x16-b8-fp32", "quick-masking"], quick=True, device="cpu", time_budget=0)
    assert [(r["case"], r["mode"]) for r in rows] == [
        ("quick-bert-16x16-b8-fp32", mode) for mode in bench.MODES] + [
        ("quick-masking-bert-16x16-b8-fp32", mode) for mode in bench.MASKING_MODES]
    assert all(r["status"].startswith("skipped") and r["seconds"] is None and r["ex_per_s"] is None for r in rows)
    assert "skipped: time budget" in bench.format_table(rows)


def test_cli_entry_returns_exit_status(one_thread, capsys):
    assert bench.main(["--", "--quick", "--device", "cpu", "--cases", "quick-bert-16x16-b8-fp32",
                       "--modes", "sdpa-frozen"]) == 0
    assert "| quick-bert-16x16-b8-fp32 | sdpa-frozen |" in capsys.readouterr().out
    assert bench.exit_code([{"status": "error: boom"}]) == 1

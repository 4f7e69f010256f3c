"""pytest-benchmark suite: end-to-end head analysis, fastbertology vs the run_bertology reference loop and frozen SDPA.

    pytest benchmarks/test_bench_e2e.py                       # full cases on CUDA, quick (tiny) cases on CPU
    pytest benchmarks/test_bench_e2e.py -k "b32 and bf16"     # a subset
    FASTBERTOLOGY_BENCH_QUICK=1 pytest benchmarks/test_bench_e2e.py   # tiny cases on any device

Cases and modes are those of :mod:`fastbertology.bench` (see its docstring for exactly what each mode does).
Each benchmark is one case x mode; ``group`` is the case, so pytest-benchmark's table shows the modes of a case
side by side with their ratios (measured in the same session). One timed round = one full pass over the data
(masking: the whole masking run), after one untimed warmup pass; CUDA is synchronised at the end of the round.
``extra_info`` holds examples/s per pass, passes, peak CUDA memory and the correctness columns.
For one table with ratios and a JSON-lines file, use ``python -m fastbertology.bench`` instead.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from fastbertology import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type != "cuda" or os.environ.get("FASTBERTOLOGY_BENCH_QUICK") == "1"
CASES = bench.QUICK_CASES if QUICK else bench.FULL_CASES
ROUNDS = int(os.environ.get("FASTBERTOLOGY_BENCH_ROUNDS", "1"))

_data_cache: dict[str, tuple] = {}


def _case_data(case):
    """The case's master model and examples, built once per case (the previous case's are dropped)."""
    if case.name not in _data_cache:
        _data_cache.clear()
        _data_cache[case.name] = bench.case_data(case, DEVICE)
    return _data_cache[case.name]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu" and QUICK:
        torch.set_num_threads(1)  # tiny models: one thread is faster and steadier
    yield
    torch.set_num_threads(threads)
    _data_cache.clear()


PARAMS = [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in CASES for mode in case.modes]


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_e2e(benchmark, case, mode):
    if case.kind == "sweep" and bench.sweeps_module() is None:
        pytest.skip("TODO: fastbertology.sweeps not available yet; no sweep benchmark (no fake numbers)")
    master, examples = _case_data(case)
    prepared = bench.prepare_mode(case, mode, master, examples, DEVICE)
    try:
        if prepared.todo is not None:
            pytest.skip(prepared.todo)
        prepared.warmup()

        seconds = []

        def one_round():
            start = time.perf_counter()
            result = prepared.run()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)
            seconds.append(time.perf_counter() - start)
            return result

        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
        benchmark.group = case.name
        result = benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        passes = result["passes"]
        median = statistics.median(seconds)  # (also with --benchmark-disable, where benchmark.stats is None)
        benchmark.extra_info.update({
            "mode": mode, "dtype": case.mode_dtype(mode), "examples": case.examples, "seq": case.seq,
            "batch": case.batch, "passes": passes, "backend": prepared.backend,
            "ex_per_s": case.examples * passes / median,
            "peak_mib": torch.cuda.max_memory_allocated(DEVICE) / 2**20 if DEVICE.type == "cuda" else None,
            "metric": result.get("metric"),
        })
        assert passes >= 1
        if result.get("analysis") is not None:
            analysis = result["analysis"]
            assert torch.isfinite(analysis.raw_importance).all() and torch.isfinite(analysis.entropy).all()
    finally:
        prepared.close()

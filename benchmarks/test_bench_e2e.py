"""pytest-benchmark suite: end-to-end head analysis, fastbertology vs the run_bertology reference loop and SDPA.

    pytest benchmarks/test_bench_e2e.py                                  # full cases on CUDA, quick cases on CPU
    FASTBERTOLOGY_BENCH_CASES=cpu pytest benchmarks/test_bench_e2e.py    # the CPU cases (real MiniLM, small GPT-2)
    FASTBERTOLOGY_BENCH_QUICK=1 pytest benchmarks/test_bench_e2e.py      # tiny cases on any device
    pytest benchmarks/test_bench_e2e.py -k "minilm"                      # a subset

Cases and modes are those of :mod:`fastbertology.bench` (``FASTBERTOLOGY_BENCH_CASES``: full, cpu or quick). Each
benchmark is one case x mode; ``group`` is the case, so pytest-benchmark's table shows the modes of a case side by
side. One timed round = one full pass over the data (masking: the whole masking run), after one untimed warmup
pass; memory is released untimed before each round. ``extra_info`` holds examples/s, passes, peak memory, the
speedups over the reference and the sdpa-forward modes of the same session, and the correctness columns against
the reference (modes run in case order, the reference first). For one table and JSON lines, use
``python -m fastbertology.bench`` instead.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastbertology.bench.cases import GROUPS
from fastbertology.bench.memory import release_memory
from fastbertology.bench.modes import prepare_mode
from fastbertology.bench.runner import ModeOutcome, case_device, comparison, default_device, measure

DEVICE = default_device()
QUICK = os.environ.get("FASTBERTOLOGY_BENCH_QUICK") == "1"
GROUP = os.environ.get("FASTBERTOLOGY_BENCH_CASES") or ("quick" if QUICK or DEVICE.type != "cuda" else "full")
CASES = GROUPS[GROUP]
ROUNDS = int(os.environ.get("FASTBERTOLOGY_BENCH_ROUNDS", "1"))

_workloads: dict[str, object] = {}
_outcomes: dict[str, dict[str, ModeOutcome]] = {}


def _workload(case, device):
    """The case's workload, built once per case (the previous case's is dropped)."""
    if case.name not in _workloads:
        _workloads.clear()
        _workloads[case.name] = case.workload.build(case.batch, device)
    return _workloads[case.name]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu" and GROUP == "quick":
        torch.set_num_threads(1)  # tiny models: one thread is faster and steadier
    yield
    torch.set_num_threads(threads)
    _workloads.clear()
    _outcomes.clear()


PARAMS = [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in CASES for mode in case.modes]


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_e2e(benchmark, case, mode):
    device = case_device(case, DEVICE)
    workload = _workload(case, device)
    prepared = prepare_mode(case, mode, workload, device)
    try:
        prepared.warmup()
        rounds = []

        def one_round():
            result, seconds, peak = measure(prepared, device, warmup=False, release=False)
            rounds.append(ModeOutcome(mode, result=result, seconds=seconds, peak_mib=peak.mib, peak_kind=peak.kind,
                                      backend=prepared.backend, padding_free=prepared.padding_free))
            return result

        benchmark.group = case.name
        benchmark.pedantic(one_round, setup=lambda: release_memory(device), rounds=ROUNDS, iterations=1,
                           warmup_rounds=0)
    finally:
        prepared.close()
    outcome = rounds[-1]
    outcome.seconds = statistics.median(r.seconds for r in rounds)  # (also with --benchmark-disable)
    outcome.peak_mib = max((r.peak_mib for r in rounds if r.peak_mib is not None), default=None)
    seen = _outcomes.setdefault(case.name, {})
    seen[mode] = outcome
    reference, forward = seen.get("reference"), seen.get("sdpa-forward")
    benchmark.extra_info.update({
        "mode": mode, "dtype": case.mode_dtype(mode), "device": device.type, "backend": prepared.backend,
        "examples": workload.examples, "batch": case.batch, "real_token_fraction": workload.real_token_fraction,
        "passes": outcome.result.passes, "ex_per_s": workload.examples / outcome.s_per_pass,
        "peak_mib": outcome.peak_mib, "peak_kind": outcome.peak_kind, "metric": outcome.result.metric,
        "speedup_vs_reference": reference.s_per_pass / outcome.s_per_pass if reference else None,
        "speedup_vs_sdpa_forward": forward.s_per_pass / outcome.s_per_pass if forward else None,
        **comparison(outcome, reference),
    })
    assert outcome.result.passes >= 1
    if outcome.result.analysis is not None:
        analysis = outcome.result.analysis
        assert torch.isfinite(analysis.raw_importance).all() and torch.isfinite(analysis.entropy).all()

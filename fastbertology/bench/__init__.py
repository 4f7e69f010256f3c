"""End-to-end benchmark: fastbertology's analyses against the run_bertology reference loop and stock SDPA.

One concern per module:

* :mod:`~fastbertology.bench.workloads` — models, batches and library tasks (random-init BERT / GPT-2 on synthetic
  data; pretrained MiniLM on real retrieval pairs);
* :mod:`~fastbertology.bench.cases` — the case lists (``FULL_CASES`` on a GPU, ``CPU_CASES``, ``QUICK_CASES``);
* :mod:`~fastbertology.bench.reference` — the transformers 4.x / run_bertology loops, independent of the patch;
* :mod:`~fastbertology.bench.modes` — what each mode runs (reference, sdpa-forward, sdpa-frozen, fastbertology,
  fastbertology-padded);
* :mod:`~fastbertology.bench.memory` — peak memory (CUDA allocator; CPU resident-set growth);
* :mod:`~fastbertology.bench.runner` — timing, correctness columns, rows;
* :mod:`~fastbertology.bench.report` — markdown table and the RESULTS.md block;
* :mod:`~fastbertology.bench.command` — the command line (``fastbertology bench``, ``python -m fastbertology.bench``).
"""

import importlib

# The names below load their module on first use (PEP 562), so that ``fastbertology bench --help`` stays fast:
# most modules import torch and transformers.
_HOMES = {
    "ANALYSIS_MODES": "names", "MASKING_MODES": "names", "CPU_CASES": "cases", "FULL_CASES": "cases",
    "QUICK_CASES": "cases",
    "BenchCase": "cases", "select_cases": "cases", "bench_main": "command", "main": "command", "ModeResult": "modes",
    "PreparedMode": "modes", "prepare_mode": "modes", "reference_analysis": "reference",
    "reference_masking": "reference", "reference_model": "reference", "reference_sweep": "reference",
    "exit_code": "report", "format_table": "report", "results_snippet": "report", "ROW_KEYS": "runner",
    "measure": "runner", "run_bench": "runner", "run_case": "runner",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = [
    "ANALYSIS_MODES",
    "MASKING_MODES",
    "CPU_CASES",
    "FULL_CASES",
    "QUICK_CASES",
    "ROW_KEYS",
    "BenchCase",
    "ModeResult",
    "PreparedMode",
    "bench_main",
    "exit_code",
    "format_table",
    "main",
    "measure",
    "prepare_mode",
    "reference_analysis",
    "reference_masking",
    "reference_model",
    "reference_sweep",
    "results_snippet",
    "run_bench",
    "run_case",
    "select_cases",
]

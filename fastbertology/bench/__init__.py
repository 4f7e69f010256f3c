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

from .cases import ANALYSIS_MODES, CPU_CASES, FULL_CASES, QUICK_CASES, BenchCase, select_cases
from .command import bench_main, main
from .modes import ModeResult, PreparedMode, prepare_mode
from .reference import reference_analysis, reference_masking, reference_model, reference_sweep
from .report import exit_code, format_table, results_snippet
from .runner import ROW_KEYS, measure, run_bench, run_case

__all__ = [
    "ANALYSIS_MODES",
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

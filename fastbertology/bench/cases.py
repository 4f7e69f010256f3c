"""Benchmark cases: what runs (a workload, batch size, dtypes, analysis kind) and in which modes.

Case groups:

* ``FULL_CASES`` — GPU-sized (BERT-base at seq 128 / 512, GPT-2 small at seq 1024, a GPT-2 LM case at seq 256,
  iterative masking, single-head sweeps (zero, mean and resample ablation), head-type scores (BERT-base, GPT-2
  small), activation patching, a Llama-3-8B-shaped model (bf16, up to 4096 tokens), and run_bertology's batch
  size 1 (its defaults: per-example importance at batch 32; and fastbertology at batch 1 too), last so that a time
  budget cuts it first). The default on CUDA.
* ``CPU_CASES`` — run on the CPU whatever the machine: issue 9's real MiniLM retrieval case, a GPT-2 LM case
  that takes well under a minute per mode on two cores, and the CPU twin of the Llama-3-8B-shaped case (minutes).
  The default on a machine without CUDA.
* ``QUICK_CASES`` — tiny versions of all of them (seconds on a CPU, any device); the tests run these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .names import (  # noqa: F401 - re-exported
    ANALYSIS_MODES,
    GATES_MODES,
    HEAD_TYPE_MODES,
    MASKING_MODES,
    PATCHING_MODES,
    SWEEP_MODES,
)
from .workloads import (
    BERT_BASE,
    GPT2_MINI,
    GPT2_SMALL,
    LLAMA3_8B,
    LLAMA_TWIN,
    TINY_BERT,
    TINY_GPT2,
    TINY_LLAMA,
    PairsWorkload,
    SyntheticWorkload,
)

KIND_MODES = {"analysis": ANALYSIS_MODES, "masking": MASKING_MODES, "sweep": SWEEP_MODES,
              "head-types": HEAD_TYPE_MODES, "patching": PATCHING_MODES, "gates": GATES_MODES}


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case.

    workload:        a :class:`~fastbertology.bench.workloads.SyntheticWorkload` or ``PairsWorkload``.
    batch:           batch size. dtype: of every mode but the reference, which uses ``reference_dtype``
                     (default: the same; fp32 where the H200 anchors used an fp32 reference loop).
    kind:            ``"analysis"`` (one importance + entropy pass), ``"masking"`` (iterative masking to
                     ``masking_threshold``), ``"sweep"`` (single-head ablation sweep), ``"head-types"``
                     (head-type scores: from the fused pass against the eager ``output_attentions`` maps) or
                     ``"patching"`` (activation patching of every head between the inputs and a corrupted copy)
                     or ``"gates"`` (learned hard-concrete head gates towards half the heads; the reference: the same
                     training on explicit eager attention with the head mask on its stored maps).
    device:          ``"cpu"`` pins the case to the CPU; None runs it on the benchmark's device.
    ablation:        sweep cases: ``"zero"`` (the head mask; reference: the 4.x eager loop), ``"mean"`` or
                     ``"resample"`` (reference: hooks on the stock eager model's output projections, one pass per
                     mask; :mod:`fastbertology.bench.ablation_reference`).
    fast_batch:      run_bertology's defaults (``batch`` 1, synthetic workloads only): the reference loop runs at
                     batch 1, whose per-batch importance is per-example importance, and fastbertology's modes compute
                     that same per-example importance (per-example masks ``[B, L, H]``) at this physical batch.
    """

    name: str
    workload: SyntheticWorkload | PairsWorkload
    batch: int
    dtype: str = "fp32"
    reference_dtype: str | None = None
    kind: str = "analysis"
    device: str | None = None
    masking_threshold: float = 0.9
    masking_amount: float = 0.1
    ablation: str = "zero"
    fast_batch: int | None = None

    def mode_batch(self, mode: str) -> int:
        """The physical batch size ``mode`` runs at."""
        return self.fast_batch if self.fast_batch and mode.startswith("fastbertology") else self.batch

    def mode_importance(self, mode: str, importance: str) -> str:
        """The importance mode ``mode`` computes (per-example where it runs ``fast_batch`` for batch-1 defaults)."""
        return "per_example" if self.fast_batch and mode.startswith("fastbertology") else importance

    @property
    def modes(self) -> tuple[str, ...]:
        return KIND_MODES[self.kind]

    def mode_dtype(self, mode: str) -> str:
        return (self.reference_dtype or self.dtype) if mode == "reference" else self.dtype


def _synthetic(name, size, examples, seq, batch, dtype, **options) -> BenchCase:
    return BenchCase(name, SyntheticWorkload(size, examples, seq), batch, dtype, **options)


FULL_CASES = [
    _synthetic("bert-408x128-b32-fp32", BERT_BASE, 408, 128, 32, "fp32"),
    _synthetic("bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16"),
    _synthetic("bert-1024x128-b128-bf16", BERT_BASE, 1024, 128, 128, "bf16"),
    _synthetic("bert-256x512-b32-bf16", BERT_BASE, 256, 512, 32, "bf16", reference_dtype="fp32"),
    _synthetic("gpt2-128x1024-b8-bf16", GPT2_SMALL, 128, 1024, 8, "bf16", reference_dtype="fp32"),
    _synthetic("gpt2-lm-512x256-b32-fp32", GPT2_SMALL, 512, 256, 32, "fp32"),  # twin of cpu-gpt2-lm-*
    _synthetic("masking-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="masking"),
    _synthetic("sweep-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="sweep"),
    _synthetic("sweep-mean-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="sweep", ablation="mean"),
    _synthetic("sweep-resample-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="sweep",
               ablation="resample"),
    _synthetic("head-types-bert-408x128-b32-fp32", BERT_BASE, 408, 128, 32, "fp32", kind="head-types"),
    _synthetic("head-types-gpt2-128x1024-b8-fp32", GPT2_SMALL, 128, 1024, 8, "fp32", kind="head-types"),
    # run_bertology's defaults: the loop at batch 1, fastbertology's per-example importance at batch 32
    _synthetic("bert-408x128-b1-defaults-fp32", BERT_BASE, 408, 128, 1, "fp32", fast_batch=32),
    _synthetic("patching-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="patching"),
    _synthetic("gates-bert-408x128-b32-fp32", BERT_BASE, 408, 128, 32, "fp32", kind="gates"),
    # issue 20: Llama-3-8B's shape, random bf16 weights, sequences of up to 4096 tokens
    _synthetic("llama3-8b-shaped-16x4096-b1-bf16", LLAMA3_8B, 16, 4096, 1, "bf16"),
    _synthetic("bert-408x128-b1-fp32", BERT_BASE, 408, 128, 1, "fp32"),
]

CPU_CASES = [
    BenchCase("cpu-minilm-retrieval-256-b32-fp32",
              PairsWorkload(pairs=256, max_seq_length=128, group_size=32, max_query_chars=250, max_positive_chars=300),
              32, "fp32", device="cpu"),
    _synthetic("cpu-gpt2-lm-32x256-b8-fp32", GPT2_MINI, 32, 256, 8, "fp32", device="cpu"),
    # the CPU twin of llama3-8b-shaped (4 layers, hidden 512, 8 heads / 2 key-value heads, vocabulary 32000)
    _synthetic("cpu-llama-twin-lm-4x2048-b2-fp32", LLAMA_TWIN, 4, 2048, 2, "fp32", device="cpu"),
]

QUICK_CASES = [  # tiny versions of every case above, the batch-1 cases last
    _synthetic("quick-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32"),
    _synthetic("quick-bert-16x16-b8-bf16", TINY_BERT, 16, 16, 8, "bf16"),
    _synthetic("quick-bert-32x16-b16-bf16", TINY_BERT, 32, 16, 16, "bf16"),
    _synthetic("quick-bert-16x32-b8-bf16", TINY_BERT, 16, 32, 8, "bf16", reference_dtype="fp32"),
    _synthetic("quick-gpt2-8x32-b4-bf16", TINY_GPT2, 8, 32, 4, "bf16", reference_dtype="fp32"),
    _synthetic("quick-gpt2-lm-16x32-b4-fp32", TINY_GPT2, 16, 32, 4, "fp32"),
    _synthetic("quick-llama-lm-8x32-b4-fp32", TINY_LLAMA, 8, 32, 4, "fp32"),
    BenchCase("quick-minilm-retrieval-16-b8-fp32", PairsWorkload(pairs=16, max_seq_length=64, group_size=8), 8,
              "fp32"),
    _synthetic("quick-masking-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="masking"),
    _synthetic("quick-sweep-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="sweep"),
    _synthetic("quick-sweep-mean-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="sweep", ablation="mean"),
    _synthetic("quick-sweep-resample-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="sweep",
               ablation="resample"),
    _synthetic("quick-head-types-gpt2-16x32-b8-fp32", TINY_GPT2, 16, 32, 8, "fp32", kind="head-types"),
    _synthetic("quick-bert-16x16-b1-defaults-fp32", TINY_BERT, 16, 16, 1, "fp32", fast_batch=8),
    _synthetic("quick-patching-gpt2-8x16-b4-fp32", TINY_GPT2, 8, 16, 4, "fp32", kind="patching"),
    _synthetic("quick-gates-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="gates"),
    _synthetic("quick-bert-16x16-b1-fp32", TINY_BERT, 16, 16, 1, "fp32"),
]

GROUPS = {"full": FULL_CASES, "cpu": CPU_CASES, "quick": QUICK_CASES}


def select_cases(names: Sequence[str] | None = None, *, group: str | None = None,
                 cuda: bool = False) -> list[BenchCase]:
    """The cases of ``group`` (``"full"``, ``"cpu"``, ``"quick"``; default ``"full"`` with ``cuda``, else ``"cpu"``),
    or, with ``names``, those named exactly so, or else (per name) those whose name contains it, from ``group``
    if given, else from every group; in list order."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown case group {group!r}; groups: {', '.join(GROUPS)}")
    if not names:
        return list(GROUPS[group or ("full" if cuda else "cpu")])
    pool = GROUPS[group] if group else [case for cases in GROUPS.values() for case in cases]
    wanted = set()
    for name in names:
        exact = [case.name for case in pool if case.name == name]
        wanted.update(exact or [case.name for case in pool if name in case.name])
    if not wanted:
        raise ValueError(f"no case matches {list(names)}; cases: {', '.join(case.name for case in pool)}")
    return [case for case in pool if case.name in wanted]

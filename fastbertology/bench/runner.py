"""Running cases: build the workload once, time every mode on it, and turn the outcomes into rows.

A row is a flat dict (one per case and mode, JSON-serialisable); :data:`ROW_KEYS` lists its keys:

* identification: case, kind, workload, model_type, layers, heads, examples, seq (widest input), batch, dtype,
  device, backend, padding_free, importance; real_tokens / padded_tokens / real_token_fraction of the batches;
* timing: passes (over the data; masking: steps, sweep: masks + 1, patching: heads + 2, gates: steps of one
  batch), seconds (the timed run; with ``repeats`` > 1 the median of that many timed runs, ``repeats`` in the
  row), s_per_pass, ex_per_s
  (examples per pass per second), peak_mib and peak_kind (see :mod:`fastbertology.bench.memory`),
  speedup_vs_reference / speedup_vs_sdpa_forward (the other mode's seconds per pass over this one's, same run);
* correctness against the reference loop: importance_diff / entropy_diff (max relative difference of the raw
  importance / entropy tables), metric, mask_mismatch (masking: heads whose kept mask differs), sweep_loss_diff
  (sweep: max absolute difference of the per-mask mean loss), head_types_diff (head-type cases: max absolute
  difference of the four score tables); patching: sweep_loss_diff is the max absolute difference of the per-head
  patched mean loss, and metric is the corrupted run's loss;
* status (``"ok"``, ``"error: ..."``, ``"skipped: ..."``) and the environment (device_name, threads, load_average,
  torch, transformers, triton, python, date).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..architectures import heads_per_layer
from .cases import ANALYSIS_MODES, BenchCase, select_cases
from .memory import PeakMemory
from .modes import ModeResult, PreparedMode, prepare_mode
from .names import GRAPH_AB_MODE
from .workloads import Workload

ROW_KEYS = (
    "case", "kind", "workload", "model_type", "layers", "heads", "examples", "seq", "batch", "mode", "dtype",
    "device", "backend", "padding_free", "importance", "real_tokens", "padded_tokens", "real_token_fraction",
    "passes", "repeats", "seconds", "s_per_pass", "ex_per_s", "peak_mib", "peak_kind", "speedup_vs_reference",
    "speedup_vs_sdpa_forward", "importance_diff", "entropy_diff", "metric", "mask_mismatch", "sweep_loss_diff",
    "head_types_diff", "gates_diff", "cuda_graphs",
    "status", "device_name", "threads", "load_average", "torch", "transformers", "triton", "python", "date",
)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device) -> dict:
    """The machine and library versions, for every row."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as cpuinfo:
                name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                            name)
        name = f"CPU {name} ({os.cpu_count()} cores)"
    return {"device_name": name, "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


@dataclass
class ModeOutcome:
    """One mode's timed run: ``result`` (None when it failed), seconds, peak memory, status."""

    mode: str
    status: str = "ok"
    result: ModeResult | None = None
    seconds: float | None = None
    repeats: int | None = None
    peak_mib: float | None = None
    peak_kind: str | None = None
    backend: str | None = None
    padding_free: bool | None = None

    @property
    def s_per_pass(self) -> float | None:
        if self.seconds is None or self.result is None or self.result.passes < 1:
            return None
        return self.seconds / self.result.passes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(prepared: PreparedMode, device: torch.device, *, warmup: bool = True, release: bool = True,
            repeats: int = 1) -> tuple[ModeResult, float, PeakMemory]:
    """``(result, wall seconds, peak)`` of ``prepared.run()``, after an untimed ``prepared.warmup()`` (with
    ``warmup``): the median seconds of ``repeats`` timed runs (the result of the last; the peak over all);
    ``release``: see :class:`~fastbertology.bench.memory.PeakMemory`."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        prepared.warmup()
    _synchronize(device)
    times = []
    with PeakMemory(device, release=release) as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            result = prepared.run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return result, statistics.median(times), peak


def run_mode(case: BenchCase, mode: str, workload: Workload, device: torch.device, *, backend: str = "auto",
             importance: str = "per_batch", warmup: bool = True, repeats: int = 1) -> ModeOutcome:
    """Prepare, time (median of ``repeats`` runs) and close one mode; a failure becomes the outcome's status (the
    benchmark goes on)."""
    prepared = None
    try:
        prepared = prepare_mode(case, mode, workload, device, backend=backend, importance=importance)
        result, seconds, peak = measure(prepared, device, warmup=warmup, repeats=repeats)
        return ModeOutcome(mode, result=result, seconds=seconds, repeats=repeats, peak_mib=peak.mib,
                           peak_kind=peak.kind,
                           backend=prepared.backend, padding_free=prepared.padding_free)
    except torch.cuda.OutOfMemoryError:
        return ModeOutcome(mode, status="error: out of memory")
    except Exception as error:  # noqa: BLE001 - the row says what failed
        return ModeOutcome(mode, status=f"error: {type(error).__name__}: {error}"[:300])
    finally:
        if prepared is not None:
            prepared.close()


def relative_max_diff(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|`` of two tables (the plain maximum when the reference is 0)."""
    difference = float((value.double() - reference.double()).abs().max())
    scale = float(reference.double().abs().max())
    return difference / scale if scale > 0 else difference


def comparison(outcome: ModeOutcome, reference: ModeOutcome | None) -> dict:
    """The correctness columns of ``outcome`` against the reference loop's outcome (None where not comparable)."""
    columns = dict.fromkeys(("importance_diff", "entropy_diff", "mask_mismatch", "sweep_loss_diff", "head_types_diff",
                             "gates_diff"))
    mine, theirs = outcome.result, reference.result if reference is not None else None
    if outcome.mode == "reference" or mine is None or theirs is None:
        return columns
    if mine.analysis is not None and theirs.analysis is not None:
        columns["importance_diff"] = relative_max_diff(mine.analysis.raw_importance, theirs.analysis.raw_importance)
        columns["entropy_diff"] = relative_max_diff(mine.analysis.entropy, theirs.analysis.entropy)
    if mine.mask is not None and theirs.mask is not None:
        columns["mask_mismatch"] = int((mine.mask.cpu() != theirs.mask.cpu()).sum())
    if mine.sweep is not None and theirs.sweep is not None:
        columns["sweep_loss_diff"] = float((mine.sweep.losses - theirs.sweep.losses).abs().max())
    if mine.head_types is not None and theirs.head_types is not None:
        columns["head_types_diff"] = max(float((mine.head_types[name] - theirs.head_types[name]).abs().max())
                                         for name in theirs.head_types)
    if mine.gates is not None and theirs.gates is not None:
        columns["gates_diff"] = float((mine.gates - theirs.gates).abs().max())
    if mine.patching is not None and theirs.patching is not None:
        columns["sweep_loss_diff"] = float((mine.patching - theirs.patching).abs().max())
    return columns


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def blank_row(case: BenchCase, mode: str, device: torch.device, importance: str) -> dict:
    """A row with the case's identification columns and every measurement None."""
    row = dict.fromkeys(ROW_KEYS)
    analysing = mode in ("reference", "fastbertology", "fastbertology-eager", "fastbertology-padded")
    row.update(case=case.name, kind=case.kind, workload=case.workload.describe(), batch=case.mode_batch(mode),
               mode=mode, dtype=case.mode_dtype(mode), device=device.type, status="ok",
               importance=case.mode_importance(mode, importance) if analysing else None)
    return row


def case_rows(case: BenchCase, workload: Workload, outcomes: dict[str, ModeOutcome], device: torch.device,
              importance: str) -> list[dict]:
    """One row per outcome (see the module docstring)."""
    env = environment(device)
    counts = heads_per_layer(workload.model)
    reference, forward = outcomes.get("reference"), outcomes.get("sdpa-forward")
    rows = []
    for mode, outcome in outcomes.items():
        row = blank_row(case, mode, device, importance)
        s_per_pass = outcome.s_per_pass
        row.update(
            model_type=workload.model.config.model_type, layers=len(counts), heads=counts[0],
            examples=workload.examples, seq=workload.max_length, backend=outcome.backend,
            padding_free=outcome.padding_free, real_tokens=workload.real_tokens,
            padded_tokens=workload.padded_tokens, real_token_fraction=workload.real_token_fraction,
            passes=outcome.result.passes if outcome.result is not None else None, repeats=outcome.repeats,
            seconds=outcome.seconds,
            s_per_pass=s_per_pass, ex_per_s=_ratio(workload.examples, s_per_pass), peak_mib=outcome.peak_mib,
            peak_kind=outcome.peak_kind,
            speedup_vs_reference=_ratio(reference and reference.s_per_pass, s_per_pass),
            speedup_vs_sdpa_forward=_ratio(forward and forward.s_per_pass, s_per_pass),
            metric=outcome.result.metric if outcome.result is not None else None, status=outcome.status,
            cuda_graphs=_graphs_column(outcome.result), **comparison(outcome, reference), **env)
        rows.append(row)
    return rows


def _graphs_column(result) -> str | None:
    """``"R/S replayed"`` (steps replayed of the last pass's steps) or ``"off: reason"``; None where not an
    analysis."""
    use = getattr(result, "cuda_graphs", None)
    if not use:
        return None
    if not use["enabled"] and not use["replays"]:
        return f"off: {use['reason']}"
    return f"{use['replays']}/{use['replays'] + use['eager_steps']} replayed"


def case_device(case: BenchCase, device=None) -> torch.device:
    """The device a case runs on: its own pin (CPU cases), else ``device``, else CUDA when available."""
    return torch.device(case.device or device or default_device())


def run_case(case: BenchCase, *, device=None, backend: str = "auto", modes: Sequence[str] | None = None,
             importance: str = "per_batch", warmup: bool = True, keep_results: bool = False,
             repeats: int = 1) -> list[dict]:
    """Build the case's workload once, run every requested mode on it (``case.modes`` by default, in that order)
    and return one row per mode. With ``keep_results`` each row also holds ``"result"``: the mode's
    :class:`~fastbertology.bench.modes.ModeResult` (not JSON-serialisable; for tests)."""
    device = case_device(case, device)
    workload = case.workload.build(case.batch, device)
    fast = dataclasses.replace(workload, batches=case.workload.batches(case.fast_batch, device)) \
        if case.fast_batch else workload
    wanted = [mode for mode in case.modes if modes is None or mode in modes]
    same_without_cuda = [mode for mode in wanted if mode == GRAPH_AB_MODE and device.type != "cuda"]
    outcomes = {mode: run_mode(case, mode, fast if case.mode_batch(mode) != case.batch else workload, device,
                               backend=backend, importance=case.mode_importance(mode, importance), warmup=warmup,
                               repeats=repeats)
                for mode in wanted if mode not in same_without_cuda}
    rows = case_rows(case, workload, outcomes, device, importance)
    for mode in same_without_cuda:  # (graphs need CUDA: without it the mode is the fastbertology row)
        rows.insert(wanted.index(mode), {**blank_row(case, mode, device, importance), **environment(device),
                                         "status": "skipped: the fastbertology row without CUDA (no graphs)"})
    if keep_results:
        for row in rows:
            row["result"] = outcomes[row["mode"]].result if row["mode"] in outcomes else None
    return rows


def run_bench(cases: Sequence[BenchCase | str] | None = None, *, group: str | None = None, device=None,
              backend: str = "auto", modes: Sequence[str] | None = None, importance: str = "per_batch",
              warmup: bool = True, time_budget: float | None = None, repeats: int = 1,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run benchmark cases; return one row per (case, mode).

    cases:       :class:`BenchCase` objects, or names for :func:`~fastbertology.bench.cases.select_cases` (with
                 ``group``); default: the group's cases (``"full"`` on CUDA, else ``"cpu"``).
    device:      default CUDA when available, else CPU (cases pinned to the CPU stay there).
    repeats:     timed runs per mode (after the warmup); rows report the median.
    time_budget: seconds; a case that would start later than this is not run (its rows say
                 ``status="skipped: time budget ..."``, with no numbers).
    on_row:      called with each row as soon as its case has finished (e.g. to append it to a file).
    """
    unknown = sorted(set(modes or ()) - set(ANALYSIS_MODES))
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(ANALYSIS_MODES)}")
    if cases is None or all(isinstance(case, str) for case in cases):
        cases = select_cases(cases, group=group, cuda=torch.device(device or default_device()).type == "cuda")
    rows = []
    start = time.perf_counter()
    for case in cases:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            device_of_case = case_device(case, device)
            new_rows = [dict(blank_row(case, mode, device_of_case, importance),
                               status=f"skipped: time budget {time_budget:g} s", **environment(device_of_case))
                          for mode in case.modes if modes is None or mode in modes]
        else:
            new_rows = run_case(case, device=device, backend=backend, modes=modes, importance=importance,
                                  warmup=warmup, repeats=repeats)
        for row in new_rows:
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows

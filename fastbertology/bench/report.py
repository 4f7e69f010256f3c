"""Rows -> text: the markdown table, the block to paste into ``benchmarks/RESULTS.md``, the progress line, the
exit status."""

from __future__ import annotations

import math
from collections.abc import Sequence

LEGEND = (
    "×ref / ×fwd: speedup over the reference loop / over the no-analysis SDPA forward (seconds per pass, same run); "
    "Δimp / ΔH: max relative difference of the raw importance / entropy from the reference loop's; Δmask: heads "
    "whose kept masking mask differs from the reference's; Δsweep: max absolute difference of the per-mask mean "
    "loss (patching: of the per-head patched loss) from the naive eager loop's (one pass per mask or head); "
    "Δtypes: max absolute difference of the head-type scores from the eager attention maps'; Δgates: of the learned "
    "gates' open probabilities from the same training on eager attention; peak: {peak}."
)
PEAK_KINDS = {"cuda-max-allocated": "torch.cuda.max_memory_allocated (MiB, absolute)",
              "cpu-rss-growth": "growth of the process's resident set during the timed pass (MiB)"}


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of benchmark rows, one line per (case, mode)."""
    columns = ("case", "mode", "dtype", "passes", "s/pass", "ex/s", "peak MiB", "×ref", "×fwd", "Δimp", "ΔH", "Δmask",
               "Δsweep", "Δtypes", "Δgates", "metric", "graphs", "status")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['mode']} | {row['dtype']} | {_fmt(row['passes'], 'd')} | "
            f"{_fmt(row['s_per_pass'], '.4g')} | {_fmt(row['ex_per_s'], '.4g')} | {_fmt(row['peak_mib'], '.0f')} | "
            f"{_fmt(row['speedup_vs_reference'], '.2f')} | {_fmt(row['speedup_vs_sdpa_forward'], '.2f')} | "
            f"{_fmt(row['importance_diff'], '.1e')} | {_fmt(row['entropy_diff'], '.1e')} | "
            f"{_fmt(row['mask_mismatch'], 'd')} | {_fmt(row['sweep_loss_diff'], '.1e')} | "
            f"{_fmt(row['head_types_diff'], '.1e')} | {_fmt(row['gates_diff'], '.1e')} | "
            f"{_fmt(row['metric'], '.4g')} | {_graphs(row.get('cuda_graphs'))} | {row['status']} |")
    return "\n".join(lines)


def _graphs(column: str | None) -> str:
    """The table's graphs cell: ``"R/S replayed"``, ``"off"`` (the reason is in the JSON row), or ``"—"``."""
    if column is None:
        return "—"
    return "off" if column.startswith("off") else column


def case_lines(rows: Sequence[dict]) -> list[str]:
    """One line per case: its workload and how much of its batches is real tokens."""
    lines, seen = [], set()
    for row in rows:
        if row["case"] in seen:
            continue
        seen.add(row["case"])
        tokens = ""
        if row["real_tokens"] is not None:
            tokens = (f"; real tokens {row['real_tokens']:,} of {row['padded_tokens']:,} "
                      f"({100 * row['real_token_fraction']:.0f}%)")
        shape = f", {row['layers']}x{row['heads']} heads" if row["layers"] is not None else ""
        lines.append(f"* `{row['case']}`: {row['workload']}{shape}, batch {row['batch']}{tokens}.")
    return lines


QUICK_NOTE = ("Quick cases: tiny shapes that check that every mode runs and agrees with the reference loop; their "
              "timings are NOT meaningful (use --cpu-cases or --full-cases for numbers).")


def results_snippet(rows: Sequence[dict], command: str, *, quick: bool = False) -> str:
    """The block for ``benchmarks/RESULTS.md``: machine, software, command, cases, legend, table. ``quick``: the
    rows come from quick cases, whose timings mean nothing (said first)."""
    if not rows:
        return "(no rows)"
    first = rows[0]
    peaks = sorted({row["peak_kind"] for row in rows if row["peak_kind"]})
    load = f", load average {first['load_average']}" if first["load_average"] is not None else ""
    return "\n".join([
        *([f"**{QUICK_NOTE}**", ""] if quick else []),
        f"* Machine: {first['device_name']}, {first['threads']} torch threads{load}.",
        (f"* Software: Python {first['python']}, torch {first['torch']}, transformers {first['transformers']}, "
         f"triton {first['triton']}; {first['date']}."),
        f"* Command: `{command}`",
        *case_lines(rows),
        *([f"* Timing: the median of {first['repeats']} timed runs per mode, after an untimed warmup run."]
          if (first.get("repeats") or 1) > 1 else []),
        "",
        LEGEND.format(peak="; ".join(PEAK_KINDS[kind] for kind in peaks) or "not measured"),
        "",
        format_table(rows),
    ])


def progress_line(row: dict) -> str:
    """A one-line summary of a row, for progress output."""
    return (f"{row['case']} {row['mode']}: {_fmt(row['s_per_pass'], '.4g')} s/pass, {_fmt(row['ex_per_s'], '.4g')} "
            f"ex/s, {row['status']}")


def exit_code(rows: Sequence[dict]) -> int:
    """0 when every row is ok or skipped by the time budget; 1 when a mode failed."""
    return 0 if all(row["status"] == "ok" or row["status"].startswith("skipped") for row in rows) else 1

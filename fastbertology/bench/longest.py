"""The longest sequence each mode survives: one sequence of each length (no padding), importance + entropy, until a
mode runs out of memory. For the Llama-3-8B-shaped case on a GPU: the reference loop's eager ``[H, N, N]`` maps
and weight gradients against fastbertology's O(N) kernels with the memory plan.

``longest_rows(size, lengths, dtype=..., device=...)`` returns one row per (length, mode): status (``"ok"`` or
``"error: out of memory"``), seconds, tokens per second, peak memory (MiB). A mode is not tried at lengths above one
it failed at.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cases import BenchCase, SyntheticWorkload
from .runner import run_mode
from .workloads import ModelSize, _workload, build_model

MODES = ("reference", "sdpa-forward", "fastbertology")


def longest_rows(size: ModelSize, lengths: Sequence[int], *, dtype: str = "bf16", device=None,
                 modes: Sequence[str] = MODES) -> list[dict]:
    """Rows of the longest-length search (see the module docstring); ``device`` defaults to CUDA when available."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(size, device=device).cpu()
    failed: dict[str, int] = {}
    rows = []
    for length in lengths:
        ids = torch.randint(0, size.vocab - 1, (1, length), generator=torch.Generator().manual_seed(length))
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        case = BenchCase(f"longest-{size.kind}-{length}", SyntheticWorkload(size, 1, length), 1, dtype)
        workload = _workload(model, [batch], case.workload.task())
        for mode in modes:
            if mode in failed:
                rows.append({"length": length, "mode": mode, "status": f"skipped: failed at {failed[mode]}"})
                continue
            outcome = run_mode(case, mode, workload, device, warmup=False)
            if outcome.status != "ok":
                failed[mode] = length
            rows.append({"length": length, "mode": mode, "status": outcome.status, "seconds": outcome.seconds,
                         "tokens_per_s": length / outcome.seconds if outcome.seconds else None,
                         "peak_mib": outcome.peak_mib})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def longest_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, and the longest length each mode survived."""
    lines = ["| length | mode | seconds | tokens/s | peak MiB | status |", "|---|---|---|---|---|---|"]
    for row in rows:
        seconds, rate, peak = (row.get(key) for key in ("seconds", "tokens_per_s", "peak_mib"))
        lines.append(f"| {row['length']} | {row['mode']} | {'—' if seconds is None else f'{seconds:.3f}'} | "
                     f"{'—' if rate is None else f'{rate:,.0f}'} | {'—' if peak is None else f'{peak:,.0f}'} | "
                     f"{row['status']} |")
    survived = {}
    for row in rows:
        if row["status"] == "ok":
            survived[row["mode"]] = max(survived.get(row["mode"], 0), row["length"])
    lines.append("\nLongest length survived: " + ", ".join(f"{mode} {length}" for mode, length in survived.items()))
    return "\n".join(lines)

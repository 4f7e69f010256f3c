"""``fastbertology bench`` / ``python -m fastbertology.bench``: argparse and file IO only."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

from .names import ANALYSIS_MODES

DESCRIPTION = ("End-to-end head analysis benchmark: the run_bertology reference loop, stock SDPA and fastbertology, "
               "side by side in one run, with correctness columns against the reference.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbertology bench", description=DESCRIPTION)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="group", action="store_const", const="quick",
                       help="tiny versions of every case, to check that every mode runs and agrees with the "
                            "reference (any device; minutes on 2 CPU cores); their timings are not meaningful")
    group.add_argument("--cpu-cases", dest="group", action="store_const", const="cpu",
                       help="the CPU cases (real MiniLM retrieval, small GPT-2 LM); default without CUDA")
    group.add_argument("--full-cases", dest="group", action="store_const", const="full",
                       help="the GPU-sized cases; default with CUDA")
    parser.add_argument("--cases", "--case", default=None,
                        help="comma-separated case names (or parts of names) from any group")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(ANALYSIS_MODES)}")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--backend", default="auto", help="fastbertology attention backend (default auto)")
    parser.add_argument("--importance", default="per_batch", choices=("per_batch", "per_example"))
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warmup pass of every mode")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="timed runs per mode; the table reports the median (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no case after this many seconds (its rows say skipped)")
    parser.add_argument("--out", default=None, help="append one JSON line per row to this file")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser


def _list_cases() -> str:
    from .cases import GROUPS  # lazy, as in bench_main

    return "\n".join(f"{group:6} {case.name:36} {case.kind}: {case.workload.describe()}, batch {case.batch}, "
                     f"{case.dtype}" for group, cases in GROUPS.items() for case in cases)


def bench_main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parse ``argv``, run the benchmark (progress on stderr, rows appended to ``--out``), print the RESULTS.md
    block last; return the rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # ``fastbertology bench -- --quick`` hands the separator through
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    # Lazy: torch and the benchmark's modules load only after the options parsed (``--help`` stays fast).
    import torch

    from .cases import select_cases
    from .report import QUICK_NOTE, progress_line, results_snippet
    from .runner import run_bench

    if args.list:
        print(_list_cases())
        return []
    if args.threads:
        torch.set_num_threads(args.threads)

    quick = args.group == "quick" or bool(args.cases) and all(
        case.name.startswith("quick-") for case in select_cases(args.cases.split(","), group=args.group))
    terminal = sys.stderr.isatty()
    if quick:
        print(QUICK_NOTE, file=sys.stderr, flush=True)
    shown = [0]

    def on_row(row):
        # The numbers are printed once, in the final table. On a terminal: one status line that the table
        # replaces; in a log: which case and mode finished (stderr; the table goes to stdout).
        if terminal:
            line = progress_line(row)
            print("\r" + line.ljust(shown[0]), end="", file=sys.stderr, flush=True)
            shown[0] = len(line)
        else:
            print(f"finished {row['case']} {row['mode']}: {row['status']}", file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps(row) + "\n")

    rows = run_bench(args.cases.split(",") if args.cases else None, group=args.group, device=args.device,
                     backend=args.backend, modes=args.modes.split(",") if args.modes else None,
                     importance=args.importance, warmup=not args.no_warmup, time_budget=args.time_budget,
                     repeats=args.repeat,
                     on_row=on_row)
    if terminal and shown[0]:
        print("\r" + " " * shown[0] + "\r", end="", file=sys.stderr, flush=True)
    print(results_snippet(rows, shlex.join(["fastbertology", "bench", *argv]), quick=quick))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``fastbertology bench`` and ``python -m fastbertology.bench``: :func:`bench_main`'s exit status."""
    from .report import exit_code  # lazy, as in bench_main

    return exit_code(bench_main(argv))

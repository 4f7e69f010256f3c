"""Kernel report: Triton kernels compiled ahead of time for sm_90 and sm_80, read from their SASS (no GPU needed).

    python benchmarks/kernel_report.py                       # every project kernel configuration + yardstick
    python benchmarks/kernel_report.py --quick               # BERT and GPT-2 cases at bf16 D=64 only
    python benchmarks/kernel_report.py --arch 90 --dtype bf16 --head-dim 64 --kernel fwd --breakdown
    python benchmarks/kernel_report.py --json report.json    # also write every result as JSON
    python benchmarks/kernel_report.py --head-dim 48,96       # head dims padded to BLOCK_D (64, 128)

For each kernel configuration that the launchers of ``fastbertology_kernels/triton_attention.py`` can pick (listed in
``benchmarks/kernel_specs.py``) and for the yardstick (``benchmarks/yardstick_attention.py``, a minimal
tutorial-style forward with the entropy accumulator), it prints per target architecture: registers per thread,
spilled bytes (local-memory stores / loads), shared memory per CTA, CTAs per SM and what limits them, the SASS
instruction count of every loop body (innermost first, ``*`` = the hottest loop), for the forward the ratio of
its hottest loop to the yardstick's for the same dtype and head dim, and for the forward, dK/dV and dQ kernels the
ratio to the same kernel without any mask ("vs plain"). Needs only triton (with its NVIDIA backend: ``ptxas``,
``nvdisasm`` and ``cuobjdump`` ship in ``triton/backends/nvidia/bin``) and torch.

Loops are told apart by the compiled code's line information: the kernels call their loop helpers from the kernel
itself, on lines marked ``# loop: interior`` (blocks every query sees in full: no masks) or ``# loop: edge``
(causal diagonal, the last partial block, padding holes); the hottest loop is the largest interior one, the loop
that runs almost every iteration for all but the shortest sequences (an ``i`` / ``e`` after a count marks them).

The parts, each generic (any ``@triton.jit`` function): ``kernel_compile.py`` (launch arguments -> Triton
signature the way the JIT specialises them, ahead-of-time compilation, the NVIDIA tools), ``kernel_sass.py`` (SASS
listings: instructions, loops, opcode classes), ``kernel_occupancy.py`` (CTAs per SM), ``kernel_loop_roles.py``
(which loop is which, from the ``# loop:`` markers) and ``kernel_analysis.py`` (one launch analysed; many in worker
processes, whose environment lacks ``TRITON_INTERPRET``). This file: the ratios, the tables and the command line.
Triton's on-disk cache (``TRITON_CACHE_DIR``) and the analyses stored beside it make a second run fast.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from kernel_analysis import run_specs
from kernel_compile import tool_path, toolchain_problem
from kernel_occupancy import ARCH_LIMITS


def hottest_instructions(row: dict) -> int | None:
    """Instructions of the hottest loop of a result row (None without loops or on error)."""
    index = row.get("hottest_loop")
    return None if index is None else row["loops"][index]["instructions"]


def _block_key(row: dict) -> tuple:
    """Arch, dtype, head dim and block configuration of a row: loops compare per iteration only within it."""
    constexprs, options = row.get("constexprs", {}), row.get("options", {})
    return (row["arch"], row["dtype"], row["head_dim"], constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N"),
            options.get("num_warps"))


def add_yardstick_ratios(rows: list[dict]) -> None:
    """Set ``vs_yardstick`` on every forward row: its hottest loop over the yardstick's for the same arch, dtype,
    head dim and block configuration (None where there is no such yardstick, e.g. fp32 or short-sequence
    blocks)."""
    sticks = {_block_key(row): hottest_instructions(row) for row in rows if row["role"] == "yardstick"}
    for row in rows:
        if row["role"] == "forward":
            stick = sticks.get(_block_key(row))
            mine = hottest_instructions(row)
            row["vs_yardstick"] = round(mine / stick, 2) if stick and mine else None


PLAIN_FLAGS = {"_attn_fwd": set(), "_attn_bwd_dkdv": set(), "_attn_bwd_dq": {"compute_dq"}}


def config_flags(row: dict) -> set[str]:
    """The flags of a row's config label (``"bf16 D64 | causal varlen | ..."`` -> ``{"causal", "varlen"}``)."""
    parts = row["config"].split("|")
    return set(parts[1].split()) - {"plain"} if len(parts) > 2 else set()


def add_plain_ratios(rows: list[dict]) -> None:
    """Set ``vs_plain`` on the rows of the forward, dK/dV and dQ kernels: their hottest loop over that of the same
    kernel without any mask (dense layout, not causal, no head mask) for the same arch, dtype and head dim; what
    causal masking, padding, packing and head masks cost in the loop that runs the most (same block configuration;
    None without such a row)."""
    plain = {}
    for row in rows:
        if row["kernel"] in PLAIN_FLAGS and "error" not in row and config_flags(row) == PLAIN_FLAGS[row["kernel"]]:
            plain[(row["kernel"], *_block_key(row))] = hottest_instructions(row)
    for row in rows:
        if row["kernel"] in PLAIN_FLAGS and "error" not in row:
            base = plain.get((row["kernel"], *_block_key(row)))
            mine = hottest_instructions(row)
            row["vs_plain"] = round(mine / base, 2) if base and mine else None


def format_loops(row: dict) -> str:
    """Loop bodies as ``"360i* 430e"`` / ``"296* 40(d0)"``: instructions, innermost first, ``i`` / ``e`` = interior
    / edge loop (where the kernel marks them), ``*`` = hottest, ``(dN)`` = depth of a loop that contains others."""
    parts = []
    for index, loop in enumerate(row["loops"]):
        role = {"interior": "i", "edge": "e"}.get(loop.get("role") or "", "")
        text = str(loop["instructions"]) + role + ("*" if index == row["hottest_loop"] else "")
        if not loop["innermost"] or loop["depth"]:
            text += f"(d{loop['depth']})"
        parts.append(text)
    return " ".join(parts) or "-"


def format_breakdown(loop: dict) -> str:
    """``"tensor 8, mufu 34, fp 226, ..."`` for one loop."""
    return ", ".join(f"{name} {count}" for name, count in loop["classes"].items())


TABLE_HEADER = ["kernel", "config", "regs", "spill st/ld B", "smem KiB", "CTAs/SM", "loop bodies (instr.)",
                "vs yardstick", "vs plain"]


def table_cells(row: dict) -> list[str]:
    """The cells of one result row under :data:`TABLE_HEADER`."""
    if "error" in row:
        return [row["kernel"], row["config"], "ERROR", row["error"].splitlines()[0][:80], "", "", "", "", ""]
    ratio, plain = row.get("vs_yardstick"), row.get("vs_plain")
    return [row["kernel"], row["config"], str(row["regs"]), f"{row['spill_store_bytes']}/{row['spill_load_bytes']}",
            f"{row['smem_bytes'] / 1024:.1f}", f"{row['ctas_per_sm']} ({row['ctas_limiter']})", format_loops(row),
            "" if ratio is None else f"{ratio:.2f}x", "" if plain is None else f"{plain:.2f}x"]


def format_table(rows: list[dict], breakdown: bool = False) -> str:
    """A fixed-width table of result rows (one arch), a blank line between kernels; with ``breakdown``, the
    opcode classes of each hottest loop on a line below its row."""
    cells = [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [TABLE_HEADER, *cells]) for i in range(len(TABLE_HEADER))]

    def join(line):
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    out = [join(TABLE_HEADER), join("-" * width for width in widths)]
    for index, (row, line) in enumerate(zip(rows, cells)):
        if index and row["kernel"] != rows[index - 1]["kernel"]:
            out.append("")
        out.append(join(line))
        if breakdown and row.get("hottest_loop") is not None:
            out.append(" " * (widths[0] + 2) + "hottest: " + format_breakdown(row["loops"][row["hottest_loop"]]))
    return "\n".join(out)


def _versions() -> str:
    import triton

    versions = [f"triton {triton.__version__}"]
    for tool in ("ptxas", "nvdisasm"):
        try:
            text = subprocess.run([str(tool_path(tool)), "--version"], capture_output=True, text=True).stdout
            release = re.search(r"release ([\d.]+)", text)
            versions.append(f"{tool} {release.group(1) if release else '?'}")
        except FileNotFoundError:
            versions.append(f"{tool} missing")
    return ", ".join(versions)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    parser.add_argument("--dtype", default=None, help="bf16,fp16,fp32 (default: all)")
    parser.add_argument("--head-dim", default=None, help="head dims, e.g. 64 or 32,48,64,128 (default 32,64,128)")
    parser.add_argument("--kernel", default=None,
                        help="kernels whose name contains one of these, comma-separated (e.g. fwd,dq,yardstick)")
    parser.add_argument("--quick", action="store_true",
                        help="only the BERT case (bf16 D64, key padding, head mask with gradient) and the GPT-2 case "
                             "(bf16 D64 causal), with the yardstick")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="sequence length behind the launch values (only its divisibility by 16 matters; 512)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes compiling in parallel (default 2)")
    parser.add_argument("--breakdown", action="store_true", help="opcode classes of each hottest loop")
    parser.add_argument("--json", metavar="PATH", help="write every result row as JSON ('-' for stdout)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """CLI entry point; returns 1 when a kernel failed to compile, 2 when nothing can be compiled here, else 0.
    With ``--json -`` the JSON goes to stdout and the tables to stderr."""
    started = time.perf_counter()
    args = _parse_args(argv)
    out = sys.stderr if args.json == "-" else sys.stdout
    archs = [int(arch) for arch in args.arch.split(",")]
    problem = toolchain_problem(archs)
    if problem:
        print(f"kernel report: cannot compile here: {problem}", file=sys.stderr)
        return 2
    import kernel_specs  # noqa: PLC0415 - the project's launches; benchmarks/ is on sys.path

    dtypes = args.dtype.split(",") if args.dtype else None
    head_dims = [int(d) for d in args.head_dim.split(",")] if args.head_dim else None
    kernels = args.kernel.split(",") if args.kernel else None
    specs = kernel_specs.report_specs(dtypes=dtypes, head_dims=head_dims, kernels=kernels, quick=args.quick,
                                      shape=kernel_specs.Shape(seq=args.seq_len), archs=archs)
    print(f"kernel report: {len(specs)} kernel launches for {', '.join(f'sm_{arch}' for arch in archs)}; "
          f"{_versions()}", file=out, flush=True)

    def progress(done, total):
        if done == total or done % 25 == 0:
            print(f"  compiled {done}/{total} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    rows = run_specs(specs, archs, jobs=args.jobs, progress=progress)
    add_yardstick_ratios(rows)
    add_plain_ratios(rows)
    for arch in archs:
        print(f"\n== {ARCH_LIMITS[arch].name} (per CTA; loop bodies: SASS instructions per iteration per warp, "
              "innermost first, * = hottest)", file=out)
        print(format_table([row for row in rows if row["arch"] == arch], breakdown=args.breakdown), file=out)
    if args.json:
        text = json.dumps(rows, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    errors = sum(1 for row in rows if "error" in row)
    spilled = sum(1 for row in rows if row.get("spill_store_bytes") or row.get("spill_load_bytes"))
    print(f"\n{len(rows)} rows, {errors} compile errors, {spilled} with spills; total wall time "
          f"{time.perf_counter() - started:.1f} s", file=out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

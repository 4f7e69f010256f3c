"""Host census of one importance batch on the GPU code path, without a GPU (issue 18).

Runs ``analyze_heads`` over one batch of a random-init BERT-base- and/or GPT-2-small-shaped model patched with the
Triton backend (padding-free), on CPU tensors that Python sees as CUDA tensors, with the Triton launches recorded
instead of executed (the method and its limits: ``fastbertology/bench/census.py``), and prints per layer and per
batch the dispatched aten ops, allocations, GPU launches (torch ops and Triton), host<->device syncs with their
source lines, split by region (``patch``: fastbertology's attention path, ``model``: the model's own,
``analysis``: the analysis loop around the model), and host µs per layer (thread time on a host twin; indicative).

    python benchmarks/host_census.py                     # BERT-base and GPT-2 small, batch 32, seq 128
    python benchmarks/host_census.py --model bert --layers 2 --json census.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

from fastbertology.bench.census_step import census_importance, host_time
from fastbertology.bench.workloads import BERT_BASE, GPT2_SMALL

MODELS = {"bert": BERT_BASE, "gpt2": GPT2_SMALL}
COLUMNS = ("ops", "allocs", "launches", "triton", "syncs")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("bert", "gpt2", "all"), default="all")
    parser.add_argument("--batch", type=int, default=32, help="examples in the counted batch (default 32)")
    parser.add_argument("--seq", type=int, default=128, help="padded length; lengths uniform in [seq/4, seq]")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the model's 12)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps for host µs (minimum; 0: no timing)")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: the folder {os.path.dirname(os.path.abspath(args.json))} does not exist; "
                     "create it or choose another path")
    if args.seq < 4:
        parser.error(f"--seq must be at least 4 (lengths are drawn in [seq/4, seq]), got {args.seq}")
    return args


def _row(label: str, counts: dict) -> str:
    return f"  {label:<32}" + "".join(f"{counts[c]:>10g}" for c in COLUMNS)


def format_report(result: dict) -> str:
    """The printed table of one census (see the module docstring)."""
    lines = [f"{result['model']}: batch {result['batch']}, seq {result['seq']} ({result['tokens']} real tokens), "
             f"{result['layers']} layers",
             f"  {'':<32}" + "".join(f"{c:>10}" for c in COLUMNS)]
    for section, label in (("per_layer", "per layer (batch / layers)"), ("layer_0", "layer 0 (inside it)"),
                           ("layer_1_on", "layers 1+ (inside, mean)"), ("per_batch", "per batch")):
        lines.append(f"  {label}")
        for region in ("patch", "model", "analysis", "total"):
            lines.append(_row(f"  {region}", result[section][region]))
    lines.append(_row("outside the layers (per batch)", result["outside_layers"]))
    lines.append(_row("pass end (once per pass)", result["pass_end"]))
    launches = ", ".join(f"{name} {count}" for name, count in sorted(result["triton_launches"].items()))
    lines.append(f"  Triton launches per batch: {launches or 'none'}")
    syncs = [s for s in result["syncs"] if s["phase"] == "step"]
    lines.append(f"  syncs per batch: {len(syncs)}")
    lines += [f"    {s['what']:<28} {s['where']} ({s['region']})" for s in syncs]
    ends = sorted({s["where"] for s in result["syncs"] if s["phase"] == "pass_end"})
    lines.append(f"  syncs at the pass end: {len(result['syncs']) - len(syncs)} ({', '.join(ends)})")
    timing = result.get("host_time")
    if timing:
        lines.append(f"  host µs per layer ({timing['twin']}, thread time, min of {timing['repeats']}): patched "
                     f"{timing['patched_us']}, stock model, no-op attention {timing['stock_noop_us']}, difference "
                     f"{timing['difference_us']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # host work is what is counted; one thread keeps the thread time comparable
    results = []
    for name in (("bert", "gpt2") if args.model == "all" else (args.model,)):
        size = MODELS[name]
        if args.layers is not None:
            size = dataclasses.replace(size, layers=args.layers)
        started = time.perf_counter()
        result = census_importance(size, args.batch, args.seq)
        if args.repeats:
            result["host_time"] = host_time(size, args.batch, args.seq, repeats=args.repeats)
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(format_report(result), flush=True)
        results.append(result)
    machine = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
               "machine": platform.machine(), "processor": platform.processor() or "?"}
    print(f"({machine['date']}, Python {machine['python']}, torch {machine['torch']}, {machine['machine']})")
    if args.json:
        try:
            with open(args.json, "w") as file:
                json.dump({"machine": machine, "results": results}, file, indent=1)
        except OSError as error:
            print(f"host_census.py: cannot write --json {args.json}: {error.strerror}; choose another path",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

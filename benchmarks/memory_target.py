"""Issue 20's CPU memory target on the Llama twin (4 layers, hidden 512, 8 heads / 2 key-value heads, vocabulary
32000; random weights): ``fastbertology importance --task lm`` over blocks of 2048 tokens of Python's documentation,
batch 2, unconstrained and then under ``--max-memory`` = half the unconstrained peak resident memory, each in a fresh
process (:mod:`fastbertology.bench.memory_target`). Prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/memory_target.py [--blocks 4] [--seq 2048] [--batch 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from fastbertology.bench.memory_target import corpus_text, memory_target, save_random_llama, table
from fastbertology.bench.runner import environment
from fastbertology.bench.workloads import LLAMA_TWIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks of --seq tokens (examples)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--fractions", default="0.5",
                        help="--max-memory of the bounded runs, as fractions of the unconstrained peak")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        text = corpus_text()
        data = work / "pydoc.txt"
        data.write_text(text)
        model = save_random_llama(work / "llama-twin", LLAMA_TWIN, text)
        rows = memory_target(model, data, work, seq=args.seq, batch=args.batch, blocks=args.blocks,
                             fractions=tuple(float(f) for f in args.fractions.split(",")))
    import torch

    env = environment(torch.device("cpu"))
    print(f"* Machine: {env['device_name']}, {env['threads']} torch threads, load average {env['load_average']}; "
          f"Python {platform.python_version()}, torch {env['torch']}, transformers {env['transformers']}; "
          f"{env['date']}.")
    print(f"* Case: {LLAMA_TWIN.describe()} (vocabulary {LLAMA_TWIN.vocab}), {args.blocks} blocks of {args.seq} "
          f"tokens, batch {args.batch}, fp32, `--task lm`.\n")
    print(table(rows))
    for row in rows[1:]:  # the plan each bounded run printed
        plan = [line for line in row["stdout"].splitlines() if line.startswith(("Memory plan", "  "))][:5]
        print("\n```\n" + "\n".join(plan) + "\n```")


if __name__ == "__main__":
    main()

"""The longest single sequence each mode survives (importance + entropy; reference loop, SDPA forward,
fastbertology), doubling the length until a mode runs out of memory (:mod:`fastbertology.bench.longest`).

    python benchmarks/longest_length.py [--size llama3-8b|twin|tiny] [--lengths 4096,8192,16384,32768] [--dtype bf16]

GPU only for the 8B shape (its bf16 weights are 16 GB; the reference keeps weight gradients and [H, N, N] maps).
"""

from __future__ import annotations

import argparse

from fastbertology.bench.longest import longest_rows, longest_table
from fastbertology.bench.workloads import LLAMA3_8B, LLAMA_TWIN, TINY_LLAMA

SIZES = {"llama3-8b": LLAMA3_8B, "twin": LLAMA_TWIN, "tiny": TINY_LLAMA}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="llama3-8b")
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    rows = longest_rows(SIZES[args.size], [int(n) for n in args.lengths.split(",")], dtype=args.dtype,
                        device=args.device)
    print(longest_table(rows))


if __name__ == "__main__":
    main()

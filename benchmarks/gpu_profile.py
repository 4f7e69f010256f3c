"""Where the GPU time goes: kernel time against host time, for the attention call and a patched model pass.

    python benchmarks/gpu_profile.py [--out DIR]        (CUDA only)

Part 1, attention alone (bf16, 12 heads, D 64; the cases and the steps of bench_attention.py, whose gradients are
reset before each call): per forward + backward, the host
time of the Python call sequence (many calls queued without synchronising, divided by the count), the wall time
with a synchronisation after each call, and the sum of the GPU kernel times from torch.profiler; a call whose wall
time is near its host time and far above its kernel time is bound by host overhead, not by the kernels.

Part 2, one case of the end-to-end benchmark (``--case``, default BERT-base seq 128 batch 32 bf16) in the
fastbertology mode under torch.profiler: the top CUDA kernels by total time and the CPU total.

Prints tables; with --out writes the profiler tables there as text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import make_inputs, make_step  # noqa: E402

CASES = [(32, 128, False), (32, 512, False), (8, 1024, True), (4, 4096, True)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_profile(device, out_dir=None, cases=CASES):
    from torch.profiler import ProfilerActivity, profile

    print("| case | method | host µs/call | wall µs/call (sync each) | kernel µs/call | kernels/call |")
    print("|---|---|---|---|---|---|")
    for batch, seq, causal in cases:
        inputs = make_inputs(batch, seq, torch.bfloat16, device)
        for method in ("fused", "fused+pad", "fused+packed"):
            step = make_step(method, inputs, causal, "triton")  # exactly what bench_attention.py times
            for _ in range(3):
                step()
            _sync(device)
            calls = 20
            start = time.perf_counter()
            for _ in range(calls):
                step()
            host = (time.perf_counter() - start) / calls  # includes waiting only if the queue fills
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                step()
                _sync(device)
            wall = (time.perf_counter() - start) / calls
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    step()
                _sync(device)
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernel_us = sum(e.device_time_total for e in events) / calls
            count = sum(e.count for e in events) / calls
            name = f"B{batch} N{seq}{' causal' if causal else ''}"
            print(f"| {name} | {method} | {host * 1e6:.0f} | {wall * 1e6:.0f} | {kernel_us:.0f} | {count:.0f} |")
            if out_dir:
                with open(os.path.join(out_dir, "profile_attention.txt"), "a") as f:
                    f.write(f"\n== {name} {method}\n")
                    f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=25))


def model_profile(case_name, device, out_dir=None):
    from torch.profiler import ProfilerActivity, profile

    from fastbertology.bench.cases import select_cases
    from fastbertology.bench.modes import prepare_mode

    case = select_cases([case_name])[0]
    workload = case.workload.build(case.batch, device)
    prepared = prepare_mode(case, "fastbertology", workload, device)
    prepared.warmup()
    _sync(device)
    start = time.perf_counter()
    prepared.run()
    _sync(device)
    print(f"\n{case_name} fastbertology: one pass {time.perf_counter() - start:.3f} s")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prepared.run()
        _sync(device)
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=30)
    print(table)
    if out_dir:
        with open(os.path.join(out_dir, "profile_model.txt"), "w") as f:
            f.write(table)
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    prepared.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the profiler tables")
    parser.add_argument("--case", default="bert-408x128-b32-bf16", help="end-to-end case for part 2")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs CUDA")
    device = torch.device("cuda")
    attention_profile(device, args.out)
    try:
        model_profile(args.case, device, args.out)
    except Exception as error:  # part 1 stands on its own
        print(f"model profile failed: {error!r}")
        raise


if __name__ == "__main__":
    main()

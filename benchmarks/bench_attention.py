"""Attention alone, forward + backward: fastbertology's fused kernels vs SDPA and eager attention.

    python benchmarks/bench_attention.py [--out results.jsonl] [--dtypes bf16,fp32] [--reps 20]
    python benchmarks/bench_attention.py --quick      # CPU, tiny shapes, torch backend (smoke test)

Cases (12 heads, head dim 64): B32 N128, B32 N512, B8 N1024 causal, B4 N4096 causal; bf16 and fp32. Padded
variants use sequence lengths uniform in [(1 - 2p) N, N] (right padding; p = --padding, default 0.2: 20% of the
batch is padding). Methods, each timed as forward + backward:

* ``fused``      fastbertology (Triton on CUDA; the PyTorch backend with --quick): statistics (lse, entropy,
                 max prob) always, head mask [B, H] requiring grad (so its gradient is computed), no padding;
* ``fused+pad``  the same with the key padding mask;
* ``fused+packed`` the same sequences packed without padding ([1, H, T, D] and a Packing: what a patched model
                 runs on padded batches);
* ``sdpa``       torch.nn.functional.scaled_dot_product_attention, no mask (no statistics, no head mask);
* ``sdpa+pad``   SDPA with a boolean attn_mask [B, 1, N, N] for the padding (and the causal triangle);
* ``eager+pad``  explicit softmax with the padding mask and a head mask requiring grad (transformers 4.x style).

Timing: CUDA events around each forward + backward, after warmup, median of --reps; peak memory is
torch.cuda.max_memory_allocated during one forward + backward minus the memory held before it (inputs).
Prints a markdown table (device, versions, date) last; --out appends one JSON line per (case, dtype, method).
On CPU (--quick) times are wall-clock and memory is not measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 12, 64
FULL_CASES = [(32, 128, False), (32, 512, False), (8, 1024, True), (4, 4096, True)]  # (batch, seq, causal)
QUICK_CASES = [(2, 16, False), (2, 24, True)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ["fused", "fused+pad", "fused+packed", "sdpa", "sdpa+pad", "eager+pad"]
# Issue 14's targets for the fused kernels (bf16, milliseconds for forward + backward) on an H100/H200
TARGETS_MS = {(32, 128, False, "bf16", "fused"): 0.27, (32, 512, False, "bf16", "fused+packed"): 0.49,
              (8, 1024, True, "bf16", "fused"): 0.47, (4, 4096, True, "bf16", "fused"): 3.1}


def make_inputs(batch, seq, dtype, device, seed=0, padding=0.2):
    """q, k, v, dO ``[B, H, N, D]`` (views of ``[B, N, H, D]``, as transformers hands them over), head mask
    ``[B, H]`` float32, key padding mask ``[B, N]`` with lengths uniform in ``[(1 - 2 padding) N, N]``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, grad_out = (torch.randn(batch, seq, HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
                         .transpose(1, 2) for _ in range(4))
    head_mask = torch.rand(batch, HEADS, generator=gen, device=device)
    shortest = max(1, round(seq * (1 - 2 * padding)))
    lengths = torch.randint(shortest, seq + 1, (batch,), generator=gen, device=device)
    key_padding_mask = torch.arange(seq, device=device)[None, :] < lengths[:, None]
    return q, k, v, grad_out, head_mask, key_padding_mask


def make_step(method, inputs, causal, backend):
    """A closure running one forward + backward of ``method`` (its ``reset`` attribute frees the leaves'
    gradients, which each call does first)."""
    q, k, v, grad_out, head_mask, key_padding_mask = inputs
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    mask_leaf = head_mask.detach().requires_grad_(True)
    scale = HEAD_DIM**-0.5

    def reset():
        for t in (*leaves, mask_leaf):
            t.grad = None

    if method == "fused+packed":
        from fastbertology.kernels import Packing, attention

        index = key_padding_mask.flatten().nonzero().squeeze(1)
        packing = Packing.from_lengths(key_padding_mask.sum(1).tolist(), q.device)

        def pack(t):  # [B, H, N, D] -> [1, H, T, D] (a view of [1, T, H, D])
            return t.transpose(1, 2).reshape(-1, HEADS, HEAD_DIM)[index].transpose(0, 1).unsqueeze(0)

        leaves = [pack(t).detach().requires_grad_(True) for t in (q, k, v)]
        grad_out = pack(grad_out)

        def forward():
            out, _stats = attention(*leaves, head_mask=mask_leaf, causal=causal, scale=scale, packing=packing,
                                    backend=backend)
            return out
    elif method.startswith("fused"):
        from fastbertology.kernels import attention

        padding = key_padding_mask if method == "fused+pad" else None

        def forward():
            out, _stats = attention(*leaves, head_mask=mask_leaf, key_padding_mask=padding, causal=causal,
                                    scale=scale, backend=backend)
            return out
    elif method.startswith("sdpa"):
        attn_mask = None
        if method == "sdpa+pad":
            attn_mask = key_padding_mask[:, None, None, :]  # [B, 1, 1, N]
            if causal:
                seq = q.shape[2]
                attn_mask = attn_mask & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
            attn_mask = attn_mask.expand(-1, 1, q.shape[2], -1)

        def forward():
            return F.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                                  scale=scale)
    elif method == "eager+pad":
        seq = q.shape[2]
        keep = key_padding_mask[:, None, None, :]
        if causal:
            keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        additive = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, torch.finfo(q.dtype).min)

        def forward():
            lq, lk, lv = leaves
            scores = torch.matmul(lq, lk.transpose(-1, -2)) * scale + additive  # [B, H, N, N]
            probs = torch.softmax(scores, dim=-1) * mask_leaf.to(q.dtype)[:, :, None, None]
            return torch.matmul(probs, lv)
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        reset()
        forward().backward(grad_out)

    step.reset = reset
    return step


def time_step(step, device, warmup, reps):
    """Median milliseconds of ``step()`` and the peak extra memory in MiB (None on CPU)."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    step.reset()  # free the previous gradients so that they count in the peak
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return statistics.median(times), peak


def environment(device):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def run(args):
    device = torch.device(args.device) if args.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if args.quick:
        cases, warmup, reps, backend = QUICK_CASES, 1, 2, "torch"
    else:
        if device.type != "cuda":
            sys.exit("the full benchmark needs a CUDA GPU; use --quick on CPU")
        cases, warmup, reps, backend = FULL_CASES, args.warmup, args.reps, "triton"
    dtypes = [name.strip() for name in args.dtypes.split(",")]
    env = environment(device)
    rows = []
    for batch, seq, causal in cases:
        for dtype_name in dtypes:
            inputs = make_inputs(batch, seq, DTYPES[dtype_name], device, padding=args.padding)
            for method in METHODS:
                try:
                    ms, peak = time_step(make_step(method, inputs, causal, backend), device, warmup, reps)
                    error = None
                except torch.cuda.OutOfMemoryError:
                    ms, peak, error = math.nan, math.nan, "out of memory"
                except Exception as exc:  # keep measuring the other methods; the table shows the failure
                    if args.quick:
                        raise
                    traceback.print_exc()
                    ms, peak, error = math.nan, math.nan, f"{type(exc).__name__}"
                if error is not None and device.type == "cuda":
                    torch.cuda.empty_cache()
                row = {"batch": batch, "seq": seq, "causal": causal, "heads": HEADS, "head_dim": HEAD_DIM,
                       "dtype": dtype_name, "method": method, "backend": backend if method.startswith("fused") else
                       "torch", "ms": ms, "peak_mib": peak, "reps": reps, "error": error, **env}
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as file:
                        file.write(json.dumps(row) + "\n")
            del inputs
    print(table(rows, env, backend, args.padding))
    return rows


def table(rows, env, backend, padding=0.2):
    """Markdown table: one row per (case, dtype), one column per method with "ms / peak MiB"; a fused cell with a
    target (:data:`TARGETS_MS`) also says whether it met it."""
    lines = [f"Attention fwd+bwd, {HEADS} heads, d={HEAD_DIM} — {env['device']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']} (fused = fastbertology {backend} backend: statistics + head-mask "
             f"gradient; pad / packed = lengths uniform in [{1 - 2 * padding:.2g} N, N]); cells: median ms / peak "
             "extra MiB [target ms]", "",
             "| case | dtype | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    keys = []
    for row in rows:
        key = (row["batch"], row["seq"], row["causal"], row["dtype"])
        if key not in keys:
            keys.append(key)
    for batch, seq, causal, dtype in keys:
        cells = []
        for method in METHODS:
            row = next(r for r in rows if (r["batch"], r["seq"], r["causal"], r["dtype"], r["method"])
                       == (batch, seq, causal, dtype, method))
            if row["error"]:
                cells.append(row["error"])
            elif row["peak_mib"] is None:
                cells.append(f"{row['ms']:.2f}")
            else:
                cells.append(f"{row['ms']:.2f} / {row['peak_mib']:.0f}")
            target = TARGETS_MS.get((batch, seq, causal, dtype, method))
            if target is not None and not row["error"] and backend == "triton":
                cells[-1] += f" [{target}: {'met' if row['ms'] <= target else 'MISSED'}]"
        case = f"B{batch} N{seq}" + (" causal" if causal else "")
        lines.append(f"| {case} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, torch backend (runs on CPU)")
    parser.add_argument("--out", help="append one JSON line per measurement to this file")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--padding", type=float, default=0.2, help="expected fraction of padding (0 to 0.5)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

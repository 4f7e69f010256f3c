"""Launch configurations (block sizes, warps, pipeline stages) of the Triton attention kernels.

One small fixed table, keyed on the device kind, the dtype, the padded head dim, causal or not, and the longest
sequence (short sequences waste less of a 64-row query block than of a 128-row one). No autotuning at run time:
results never depend on timing (block sizes change the floating-point summation order). The table was chosen from
the compiled code (``python benchmarks/kernel_report.py``: no register spills, registers per thread within the
budget that keeps the listed CTAs per SM); ``benchmarks/gpu_check.sh`` times the alternatives on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KernelConfig(NamedTuple):
    """Block sizes and launch options of one kernel: ``block_m`` query rows, ``block_n`` key rows per block."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def launch_options(self) -> dict:
        """Keyword options of a kernel launch: ``num_warps``, ``num_stages``. (A register cap, ``maxnreg=128``, would
        fit two 8-warp CTAs of the causal forward and of dK/dV per SM, but the report shows it spills: 16-108
        bytes per thread. Not used.)"""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


class AttentionConfigs(NamedTuple):
    """The launch configurations of every kernel for one call."""

    fwd: KernelConfig
    probs: KernelConfig
    preprocess: KernelConfig  # only block_m is used
    dkdv: KernelConfig
    dq: KernelConfig


# Small blocks on the interpreter: short sequences in tests still cross several blocks (interior and edge).
INTERPRETER_CONFIGS = AttentionConfigs(
    fwd=KernelConfig(32, 16), probs=KernelConfig(32, 16), preprocess=KernelConfig(32, 16),
    dkdv=KernelConfig(16, 32), dq=KernelConfig(32, 16),
)

SHORT_SEQUENCE = 64  # longest sequence up to which 64-row query blocks are used on the GPU


def gpu_configs(block_d: int, dtype: torch.dtype, *, max_seqlen: int = 512, causal: bool = False) -> AttentionConfigs:
    """Configurations for H100/H200 (sm_90; also valid on sm_80) for a padded head dim ``block_d`` and ``dtype``."""
    short = max_seqlen <= SHORT_SEQUENCE
    if dtype == torch.float32:  # twice the bytes per element, and tf32x3 dots need three times the operands
        if block_d <= 64:
            return AttentionConfigs(
                fwd=KernelConfig(64, 32, 4, 2), probs=KernelConfig(64, 32, 4, 2), preprocess=KernelConfig(64, 64),
                dkdv=KernelConfig(16, 32, 4, 2), dq=KernelConfig(32, 32, 4, 2),
            )
        return AttentionConfigs(
            fwd=KernelConfig(64, 16, 4, 2), probs=KernelConfig(64, 32, 4, 2), preprocess=KernelConfig(64, 64),
            dkdv=KernelConfig(16, 16, 4, 1), dq=KernelConfig(16, 32, 4, 2),
        )
    if block_d <= 64:
        fwd = KernelConfig(64, 64, 4, 3) if short else KernelConfig(128, 64, 8, 3)
        dq = KernelConfig(64, 32, 4, 2) if short else KernelConfig(128, 32, 8, 2)
        return AttentionConfigs(
            fwd=fwd, probs=KernelConfig(64, 64, 4, 2), preprocess=KernelConfig(128, 64),
            dkdv=KernelConfig(32, 64, 4, 2) if short else KernelConfig(32, 128, 8, 2), dq=dq,
        )
    return AttentionConfigs(
        fwd=KernelConfig(64, 64, 4, 2) if short else KernelConfig(128, 64, 8, 2), probs=KernelConfig(64, 64, 4, 2),
        preprocess=KernelConfig(64, 64), dkdv=KernelConfig(32, 64, 8, 2), dq=KernelConfig(64, 32, 4, 2),
    )


def configs_for(device: torch.device, block_d: int, dtype: torch.dtype, *, max_seqlen: int,
                causal: bool) -> AttentionConfigs:
    """The table entry for CUDA tensors; small blocks for the interpreter (CPU tensors)."""
    if device.type == "cuda":
        return gpu_configs(block_d, dtype, max_seqlen=max_seqlen, causal=causal)
    return INTERPRETER_CONFIGS

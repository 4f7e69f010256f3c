"""Launch configurations (block sizes, warps, pipeline stages) of the Triton attention kernels.

One small fixed table, keyed on the GPU architecture, the dtype, the padded head dim and the longest sequence
(short sequences waste less of a 64-row query block than of a 128-row one). No autotuning at run time:
results never depend on timing (block sizes change the floating-point summation order). The table was chosen from
the compiled code (``python benchmarks/kernel_report.py``: no register spills, registers per thread within the
budget that keeps the listed CTAs per SM); ``benchmarks/gpu_check.sh`` times the alternatives on a GPU.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1024)  # asked twice per attention call: built once per distinct call shape
def gpu_configs(block_d: int, dtype: torch.dtype, *, max_seqlen: int = 512, causal: bool = False,
                arch: int = 90, bias_table: bool = False) -> AttentionConfigs:
    """Configurations for a padded head dim ``block_d`` and ``dtype`` on an H100/H200 (``arch`` 90) or an A100
    (80: a few entries differ, where the sm_90 choice spills registers there). ``causal`` is accepted for a
    table that would tell the two apart; today's entries do not. ``bias_table``: the launch gathers a relative
    position bias table (one load per score, which costs registers): at head dim 128 the forward and the float32
    dQ take smaller blocks. Every entry compiles without register spills for both architectures
    (``python benchmarks/kernel_report.py``)."""
    short = max_seqlen <= SHORT_SEQUENCE
    if dtype == torch.float32:  # twice the bytes per element, and tf32x3 dots need three times the operands
        if block_d <= 64:
            return AttentionConfigs(
                fwd=KernelConfig(64, 16, 4, 2), probs=KernelConfig(64, 32, 4, 2), preprocess=KernelConfig(64, 64),
                dkdv=KernelConfig(16, 32, 4, 2), dq=KernelConfig(16, 32, 8, 2),
            )
        return AttentionConfigs(
            fwd=KernelConfig(16, 32, 4, 2), probs=KernelConfig(64, 16, 4, 2), preprocess=KernelConfig(64, 64),
            dkdv=KernelConfig(16, 16, 4, 1), dq=KernelConfig(16, 16 if bias_table else 32, 4, 2),
        )
    if block_d <= 64:
        if short:
            fwd, dq, dkdv = KernelConfig(64, 64, 4, 3), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 4, 2)
        else:
            fwd = KernelConfig(128, 32, 8, 3) if arch < 90 and block_d <= 32 else KernelConfig(128, 64, 8, 3)
            dq, dkdv = KernelConfig(128, 32, 8, 2), KernelConfig(32, 128, 8, 2)
        return AttentionConfigs(fwd=fwd, probs=KernelConfig(64, 64, 4, 2), preprocess=KernelConfig(128, 64),
                                dkdv=dkdv, dq=dq)
    fwd = KernelConfig(64, 32, 4, 2) if short or arch < 90 or bias_table else KernelConfig(128, 64, 8, 2)
    dq = KernelConfig(64, 32, 8, 2) if arch < 90 else KernelConfig(64, 32, 4, 2)
    return AttentionConfigs(fwd=fwd, probs=KernelConfig(64, 64, 4, 2), preprocess=KernelConfig(64, 64),
                            dkdv=KernelConfig(32, 64, 8, 2), dq=dq)


def configs_for(device: torch.device, block_d: int, dtype: torch.dtype, *, max_seqlen: int,
                causal: bool, bias_table: bool = False) -> AttentionConfigs:
    """The table entry for CUDA tensors (by the device's compute capability); small blocks for the interpreter
    (CPU tensors)."""
    if device.type == "cuda":
        return gpu_configs(block_d, dtype, max_seqlen=max_seqlen, causal=causal, arch=_arch(device.index),
                           bias_table=bias_table)
    return INTERPRETER_CONFIGS


@functools.cache
def _arch(device_index: int | None) -> int:
    """The compute capability of a CUDA device as ``10 * major + minor`` (asked once per device)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor

"""Resident CTAs per SM of a compiled kernel on sm_90 / sm_80: the CUDA occupancy calculator's rules, for
benchmarks/kernel_report.py."""

from __future__ import annotations

from typing import NamedTuple


class ArchLimits(NamedTuple):
    """Per-SM resources of one compute capability (CUDA C Programming Guide, compute capabilities table)."""

    name: str
    regs_per_sm: int = 65536
    reg_partitions: int = 4  # the register file is split between 4 SM sub-partitions (warp schedulers)
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_regs_per_block: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    max_smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024  # cudaDevAttrReservedSharedMemoryPerBlock


ARCH_LIMITS = {
    90: ArchLimits("sm_90", smem_per_sm=228 * 1024, max_smem_per_block=227 * 1024),
    80: ArchLimits("sm_80", smem_per_sm=164 * 1024, max_smem_per_block=163 * 1024),
}


class Occupancy(NamedTuple):
    """Resident CTAs per SM (``ctas``), what limits it (``limiter``, e.g. ``"regs"`` or ``"regs+threads"``) and
    the bound from each resource."""

    ctas: int
    limiter: str
    by_regs: int
    by_threads: int
    by_smem: int


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def ctas_per_sm(regs_per_thread: int, num_warps: int, smem_per_cta: int, limits: ArchLimits) -> Occupancy:
    """Resident CTAs per SM for a kernel of ``num_warps`` warps (the CUDA occupancy calculator's rules).

    * registers: a warp takes ``regs_w = round_up(regs_per_thread * 32, 256)`` registers; warps are placed in the
      4 sub-partitions of the register file, each of ``regs_per_sm / 4`` registers, so an SM holds
      ``W = 4 * floor(regs_per_sm / 4 / regs_w)`` warps and ``floor(W / num_warps)`` CTAs (0 when
      ``round_up(num_warps, 4) * regs_w > max_regs_per_block``: the launch fails);
    * threads: ``floor(max_threads_per_sm / (32 * num_warps))``, and at most ``max_ctas_per_sm`` (32);
    * shared memory: ``floor(smem_per_sm / (smem_per_cta + smem_reserved_per_block))`` with 228 KiB per SM on
      sm_90 (164 KiB on sm_80) and 1 KiB reserved per CTA by the driver; 0 when ``smem_per_cta`` exceeds the
      per-block maximum (227 KiB, 163 KiB).

    Returns the minimum of the three and the binding resources (``"regs"``, ``"threads"``, ``"smem"``, joined by
    ``+`` when several bind).
    """
    regs_per_warp = _round_up(max(regs_per_thread, 1) * 32, limits.reg_alloc_unit)
    if _round_up(num_warps, limits.reg_partitions) * regs_per_warp > limits.max_regs_per_block:
        by_regs = 0
    else:
        warps = limits.reg_partitions * (limits.regs_per_sm // limits.reg_partitions // regs_per_warp)
        by_regs = warps // num_warps
    by_threads = min(limits.max_threads_per_sm // (32 * num_warps), limits.max_ctas_per_sm)
    if smem_per_cta > limits.max_smem_per_block:
        by_smem = 0
    else:
        by_smem = limits.smem_per_sm // (smem_per_cta + limits.smem_reserved_per_block)
    bounds = {"regs": by_regs, "threads": by_threads, "smem": by_smem}
    ctas = min(bounds.values())
    limiter = "+".join(name for name, bound in bounds.items() if bound == ctas)
    return Occupancy(ctas, limiter, by_regs, by_threads, by_smem)

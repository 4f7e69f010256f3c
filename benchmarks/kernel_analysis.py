"""Compile and analyse kernel launches: one :class:`~kernel_compile.KernelSpec` at a time in this process
(:func:`analyse_spec`), or many in spawned worker processes (:func:`run_specs`), with the analyses of cubins kept
on disk beside Triton's cache (:func:`cached_analysis`). For benchmarks/kernel_report.py.

Compilation runs in spawned worker processes whose environment lacks ``TRITON_INTERPRET``: a process in which
triton was imported with ``TRITON_INTERPRET=1`` (the CPU test suite) holds interpreter functions, not JIT
functions, and cannot compile them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import kernel_occupancy
import kernel_sass
from kernel_compile import KernelSpec, compile_kernel, disassemble, resolve_kernel, resource_usage, specialize
from kernel_loop_roles import assign_roles


def analyse_cubin(cubin: bytes, num_warps: int, dynamic_smem: int, arch: int) -> dict[str, Any]:
    """Resources, occupancy and loops of a one-kernel cubin.

    Returns a dict: ``function``, ``regs`` (per thread), ``spill_store_bytes``, ``spill_load_bytes``,
    ``stack_bytes``, ``smem_bytes`` (dynamic + static shared memory per CTA), ``ctas_per_sm``, ``ctas_limiter``,
    ``occupancy`` (the bound from each resource), ``instructions`` (whole kernel), ``loops`` (list of
    :class:`Loop` as dicts, innermost first) and ``hottest_loop`` (its index in ``loops``, or None).
    """
    usage = resource_usage(cubin)
    instructions = kernel_sass.parse_sass(disassemble(cubin))
    kernels = [name for name in usage if any(i.function == name for i in instructions)] or list(usage)
    function = kernels[0]
    own = [i for i in instructions if i.function == function]
    stored, loaded = kernel_sass.local_memory_bytes(own)
    smem = dynamic_smem + usage[function]["static_smem"]
    limits = kernel_occupancy.ARCH_LIMITS[arch]
    occupancy = kernel_occupancy.ctas_per_sm(usage[function]["regs"], num_warps, smem, limits)
    loops = kernel_sass.find_loops(own)
    hot = kernel_sass.hottest_loop(loops)
    return {
        "function": function, "regs": usage[function]["regs"], "spill_store_bytes": stored,
        "spill_load_bytes": loaded, "stack_bytes": usage[function]["stack"], "smem_bytes": smem,
        "ctas_per_sm": occupancy.ctas, "ctas_limiter": occupancy.limiter,
        "occupancy": {"regs": occupancy.by_regs, "threads": occupancy.by_threads, "smem": occupancy.by_smem},
        "instructions": len(own), "loops": [loop._asdict() for loop in loops],
        "hottest_loop": None if hot is None else loops.index(hot),
    }


def analysis_cache_dir() -> Path:
    """Where :func:`cached_analysis` keeps its results: ``kernel_report/`` in Triton's cache directory
    (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so that a fresh Triton cache starts a fresh report."""
    try:
        from triton import knobs

        root = knobs.cache.dir
    except (ImportError, AttributeError):
        root = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Path(root) / "kernel_report"


def cached_analysis(cubin: bytes, num_warps: int, dynamic_smem: int, arch: int) -> dict[str, Any]:
    """:func:`analyse_cubin`, stored on disk under :func:`analysis_cache_dir` by a hash of the cubin, the launch
    values and the source of the analysis (this file, the SASS parser and the occupancy rules: a changed parser
    recomputes): disassembling takes ~0.4 s a kernel, a Triton cache hit ~5 ms."""
    digest = hashlib.sha256(cubin)
    digest.update(f"{num_warps}-{dynamic_smem}-{arch}".encode())
    for module in (__file__, kernel_sass.__file__, kernel_occupancy.__file__):
        digest.update(Path(module).read_bytes())
    path = analysis_cache_dir() / f"{digest.hexdigest()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    result = analyse_cubin(cubin, num_warps, dynamic_smem, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(result))
        temporary.replace(path)  # atomic: concurrent workers never read half a file
    except OSError:
        pass  # a read-only cache only costs time
    return result


def analyse_spec(spec: KernelSpec, arch: int) -> dict[str, Any]:
    """Compile one :class:`KernelSpec` for ``arch`` in this process and analyse it (:func:`cached_analysis`),
    adding ``compile_s`` (wall time of ``triton.compile``: near 0 on a Triton cache hit) and the ``signature``
    used. Needs JIT functions (no ``TRITON_INTERPRET`` in this process)."""
    fn = resolve_kernel(spec.kernel)
    constexpr_names = {param.name for param in fn.params if param.is_constexpr}
    signature, constexprs, attrs = specialize(fn.arg_names, constexpr_names, spec.args, spec.constexprs)
    started = time.perf_counter()
    compiled = compile_kernel(fn, signature, constexprs, attrs, arch, spec.options)
    compile_s = time.perf_counter() - started
    result = cached_analysis(compiled.asm["cubin"], compiled.metadata.num_warps, compiled.metadata.shared, arch)
    assign_roles(result)
    result.update(compile_s=round(compile_s, 3), signature=signature)
    return result


# ----------------------------------------------------------------------------------------------------------
# Many kernels: worker processes and the in-process cache
# ----------------------------------------------------------------------------------------------------------

_RESULTS: dict[tuple, dict] = {}  # (spec key, arch) -> result of analyse_spec, or {"error": ...}


def _spec_key(spec: KernelSpec, arch: int) -> tuple:
    """What determines the compiled code of a spec (its description fields aside)."""
    return (spec.kernel, repr(spec.args), repr(sorted(spec.constexprs.items())), repr(sorted(spec.options.items())),
            arch)


def _worker_init(paths: list[str]) -> None:
    """Worker start: the parent's import path, and no Triton interpreter (kernels must be JIT functions)."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.pop("TRITON_INTERPRET", None)
    if "triton" in sys.modules:  # imported while unpickling (before this ran): override the knob as well
        knobs = getattr(sys.modules["triton"], "knobs", None)
        if knobs is not None:
            knobs.runtime.interpret = False


def _analyse_task(spec: KernelSpec, arch: int) -> dict[str, Any]:
    """Worker task: :func:`analyse_spec`, errors returned as ``{"error": message}``."""
    try:
        return analyse_spec(spec, arch)
    except Exception as error:  # a failing compile is reported in its row, not fatal to the report
        message = f"{type(error).__name__}: {error}"
        return {"error": message[:2000]}


def run_specs(specs: list[KernelSpec], archs: list[int], jobs: int = 2, progress=None) -> list[dict]:
    """Compile and analyse every spec for every arch in ``jobs`` spawned worker processes (at least one: this
    process may hold interpreter functions); returns one row per (arch, spec), in the order of ``archs`` then
    ``specs``: ``{"arch", "kernel", "dtype", "head_dim", "config", "role", "options", "constexprs", **result}``.

    Identical compiles are done once, and results are cached in this process (a second call is free).
    ``progress(done, total)`` is called as compiles finish.
    """
    keys = {}
    for arch in archs:
        for spec in specs:
            if spec.arch not in (None, arch):
                continue
            key = _spec_key(spec, arch)
            if key not in _RESULTS:
                keys.setdefault(key, (spec, arch))
    if keys:
        context = multiprocessing.get_context("spawn")
        saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
        try:
            with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=context, initializer=_worker_init,
                                                        initargs=(list(sys.path),)) as pool:
                futures = {pool.submit(_analyse_task, spec, arch): key for key, (spec, arch) in keys.items()}
                for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                    _RESULTS[futures[future]] = future.result()
                    if progress:
                        progress(done, len(futures))
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
    rows = []
    for arch in archs:
        for spec in specs:
            if spec.arch not in (None, arch):
                continue
            rows.append({"arch": arch, "kernel": spec.name, "dtype": spec.dtype, "head_dim": spec.head_dim,
                         "config": spec.config, "role": spec.role, "options": spec.options,
                         "constexprs": spec.constexprs, **_RESULTS[_spec_key(spec, arch)]})
    return rows

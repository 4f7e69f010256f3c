"""Compiling a Triton kernel ahead of time for an NVIDIA target without a GPU, and the NVIDIA tools that read the
cubin (for benchmarks/kernel_report.py).

:class:`KernelSpec` describes one launch (tensors as :class:`Ptr`); :func:`specialize` turns its arguments into
Triton's signature the way the JIT does; :func:`compile_kernel` compiles a JIT function for ``cuda:<arch>``;
:func:`resource_usage` and :func:`disassemble` read the cubin with ``cuobjdump`` / ``nvdisasm`` (shipped with
triton's NVIDIA backend).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple


class Ptr(NamedTuple):
    """A tensor argument in a :class:`KernelSpec`: its Triton element type (``"bf16"``, ``"fp32"``, ``"u8"``...)
    and whether its data pointer is 16-byte aligned (torch allocations are)."""

    dtype: str
    aligned: bool = True


class KernelSpec(NamedTuple):
    """One kernel launch to compile: ``kernel`` is ``"module:function"`` (importable in a worker: put the module's
    directory on ``sys.path``), ``args`` the positional launch arguments with tensors as :class:`Ptr`,
    ``constexprs`` the keyword ``tl.constexpr`` arguments, ``options`` the compile options (``num_warps``,
    ``num_stages``, ...). ``dtype``, ``head_dim``, ``config`` (a label) and ``role`` (``"forward"``,
    ``"yardstick"`` or ``""``) only describe it in the report; ``arch``, when set, limits it to that target."""

    kernel: str
    args: tuple
    constexprs: dict
    options: dict
    dtype: str = ""
    head_dim: int = 0
    config: str = ""
    role: str = ""
    arch: int | None = None  # the only architecture this launch is for (its launcher picks configs by arch)

    @property
    def name(self) -> str:
        """The kernel's function name."""
        return self.kernel.rpartition(":")[2]


def specialize(arg_names: list[str], constexpr_names: set[str], args: tuple, kwargs: dict):
    """Triton's ``(signature, constexprs, attrs)`` for a launch ``fn[grid](*args, **kwargs)``, as the JIT builds them.

    The rules of the JIT's specialisation (Triton 3.3 to 3.9): ``tl.constexpr`` parameters and ints equal to 1
    (and ``None``) become constants; other ints are ``i32`` (``i64`` outside the int32 range) and get
    ``tt.divisibility = 16`` when divisible by 16; tensors are pointers ``*<dtype>`` with divisibility 16 when
    aligned; floats are ``fp32``, bools ``u1``. ``signature`` maps every parameter name to its type (``"constexpr"``
    for constants), ``constexprs`` maps names to values and ``attrs`` maps ``(index,)`` to
    ``[["tt.divisibility", 16]]`` (the formats that ``triton.compiler.ASTSource`` takes in Triton 3.3+).
    """
    values = dict(zip(arg_names, args))
    unknown = set(kwargs) - set(arg_names)
    if unknown or len(args) > len(arg_names):
        raise TypeError(f"arguments that the kernel does not take: {sorted(unknown) or args[len(arg_names):]}")
    values.update(kwargs)
    missing = [name for name in arg_names if name not in values]
    if missing:
        raise TypeError(f"missing kernel arguments: {missing}")
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for index, name in enumerate(arg_names):
        value = values[name]
        if name in constexpr_names or value is None or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            if value.aligned:
                attrs[(index,)] = divisible
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot specialise {type(value).__name__}")
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------------------
# Compiling and the NVIDIA tools
# ----------------------------------------------------------------------------------------------------------


def resolve_kernel(reference: str):
    """The ``triton.runtime.JITFunction`` named ``"module:function"`` (TypeError if triton was imported under
    ``TRITON_INTERPRET=1`` in this process: interpreter functions cannot be compiled)."""
    from triton.runtime.jit import JITFunction

    module_name, _, function_name = reference.partition(":")
    fn = getattr(importlib.import_module(module_name), function_name)
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{reference} is a {type(fn).__name__}, not a JITFunction (was it imported with "
                        "TRITON_INTERPRET=1? compile in a process without it: see run_specs)")
    return fn


def compile_kernel(fn, signature: dict, constexprs: dict, attrs: dict, arch: int, options: dict):
    """``triton.compile`` of a JIT function for ``cuda:<arch>`` (warp size 32); returns the ``CompiledKernel``
    (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata.shared`` = dynamic shared memory in bytes, ...).

    ``options`` defaults: ``enable_fp_fusion=True`` (what a launch does by default in Triton <= 3.9).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"enable_fp_fusion": True, **options}
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def tool_path(name: str) -> Path:
    """Path of an NVIDIA tool shipped with triton (``ptxas``, ``nvdisasm``, ``cuobjdump``) or the file named by
    Triton's variable ``TRITON_<NAME>_PATH`` where it exists (as Triton does). FileNotFoundError when absent."""
    import triton

    override = os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH")
    default = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    path = Path(override) if override and Path(override).is_file() else default
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found at {path}")
    return path


def toolchain_problem(archs=(90, 80)) -> str | None:
    """Why kernels cannot be compiled and read on this machine (None when they can): triton missing, no NVIDIA
    backend, or a missing tool: the ptxas that Triton uses for each arch, and cuobjdump (``nvdisasm`` is
    optional: ``cuobjdump -sass`` stands in)."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError as error:
        return f"triton with its NVIDIA backend is not importable ({error})"
    try:
        tool_path("cuobjdump")
        get_ptxas = getattr(compiler, "get_ptxas", None)  # Triton 3.9: ptxas-blackwell for sm_90 and newer
        for arch in archs if get_ptxas else ():
            if not Path(get_ptxas(arch).path).is_file():
                return f"no ptxas for sm_{arch} at {get_ptxas(arch).path}"
        if not get_ptxas:
            tool_path("ptxas")
    except (FileNotFoundError, RuntimeError) as error:
        return f"missing NVIDIA tool: {error}"
    return None


def _run_tool_on_cubin(tool: str, flags: list[str], cubin: bytes) -> str:
    """Stdout of ``tool *flags file.cubin`` (the cubin written to a temporary file)."""
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([str(tool_path(tool)), *flags, str(path)], capture_output=True, text=True,
                              check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(flags)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per function of the cubin (``cuobjdump -res-usage``): ``{"regs", "stack", "static_smem", "local"}`` in
    registers per thread and bytes (static shared memory only: Triton's is dynamic, see ``metadata.shared``)."""
    text = _run_tool_on_cubin("cuobjdump", ["-res-usage"], cubin)
    usage = {}
    for name, fields in re.findall(r"Function ([\w$.]+):\s*\n\s*(.*)", text):
        values = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", fields))
        usage[name] = {"regs": int(values.get("REG", 0)), "stack": int(values.get("STACK", 0)),
                       "static_smem": int(values.get("SHARED", 0)), "local": int(values.get("LOCAL", 0))}
    return usage


def disassemble(cubin: bytes) -> str:
    """SASS text of the cubin: ``nvdisasm -c -ndf -gi`` (labelled branch targets, source lines with the lines they
    were inlined at), or ``cuobjdump -sass`` when nvdisasm is missing; both formats are understood by
    :func:`parse_sass`."""
    try:
        return _run_tool_on_cubin("nvdisasm", ["-c", "-ndf", "-gi"], cubin)  # no dataflow analysis: 30% faster
    except FileNotFoundError:
        return _run_tool_on_cubin("cuobjdump", ["-sass"], cubin)

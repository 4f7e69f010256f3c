"""Kernel report: Triton kernels compiled ahead of time for sm_90 and sm_80, read from their SASS (no GPU needed).

    python benchmarks/kernel_report.py                       # every project kernel configuration + yardstick
    python benchmarks/kernel_report.py --quick               # BERT and GPT-2 cases at bf16 D=64 only
    python benchmarks/kernel_report.py --arch 90 --dtype bf16 --head-dim 64 --kernel fwd --breakdown
    python benchmarks/kernel_report.py --json report.json    # also write every result as JSON
    python benchmarks/kernel_report.py --head-dim 48,96       # head dims padded to BLOCK_D (64, 128)

For each kernel configuration that the launchers of ``fastbertology_kernels/triton_attention.py`` can pick (listed in
``benchmarks/kernel_specs.py``) and for the yardstick (``benchmarks/yardstick_attention.py``, a minimal
tutorial-style forward with the entropy accumulator), it prints per target architecture: registers per thread,
spilled bytes (local-memory stores / loads), shared memory per CTA, CTAs per SM and what limits them, the SASS
instruction count of every loop body (innermost first, ``*`` = the hottest loop), for the forward the ratio of
its hottest loop to the yardstick's for the same dtype and head dim, and for the forward, dK/dV and dQ kernels the
ratio to the same kernel without any mask ("vs plain"). Needs only triton (with its NVIDIA backend: ``ptxas``,
``nvdisasm`` and ``cuobjdump`` ship in ``triton/backends/nvidia/bin``) and torch.

Loops are told apart by the compiled code's line information: the kernels call their loop helpers from the kernel
itself, on lines marked ``# loop: interior`` (blocks every query sees in full: no masks) or ``# loop: edge``
(causal diagonal, the last partial block, padding holes); the hottest loop is the largest interior one, the loop
that runs almost every iteration for all but the shortest sequences (an ``i`` / ``e`` after a count marks them).

The library part is generic: :func:`specialize` (launch arguments -> Triton signature, the way the JIT
specialises them), :func:`compile_kernel`, :func:`resource_usage`, :func:`disassemble`, :func:`parse_sass`,
:func:`find_loops`, :func:`opcode_class`, :func:`ctas_per_sm` and :func:`analyse_spec` take any ``@triton.jit``
function; :func:`run_specs` compiles a list of :class:`KernelSpec` in worker processes.

Compilation runs in spawned worker processes whose environment lacks ``TRITON_INTERPRET``: a process in which
triton was imported with ``TRITON_INTERPRET=1`` (the CPU test suite) holds interpreter functions, not JIT
functions, and cannot compile them. Triton's on-disk cache (``TRITON_CACHE_DIR``) and the analyses stored beside it
(:func:`cached_analysis`) make a second run fast.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

# ----------------------------------------------------------------------------------------------------------
# Target limits and occupancy
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Launch arguments -> Triton signature
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# SASS: instructions, loops, opcode classes
# ----------------------------------------------------------------------------------------------------------


class Instruction(NamedTuple):
    """One SASS instruction: its function, byte address, opcode with modifiers (``"HGMMA.64x64x16.F32.BF16"``),
    the whole text without the trailing ``;``, the address a branch jumps to (None if not a branch), and its source
    ``sites`` (``"file:line"`` of the line, then of the line it was inlined at; empty without line info)."""

    function: str
    address: int
    opcode: str
    text: str
    target: int | None
    sites: tuple = ()

    @property
    def base(self) -> str:
        """The opcode without modifiers (``"HGMMA"``)."""
        return self.opcode.split(".", 1)[0]


class Loop(NamedTuple):
    """A loop: the body runs from the branch target ``start`` to the backward branch at ``end`` (addresses,
    both included, ``instructions`` of them); ``depth`` 0 is outermost; ``innermost`` = contains no other loop;
    ``classes`` counts the body's instructions per :func:`opcode_class`."""

    function: str
    start: int
    end: int
    instructions: int
    depth: int
    innermost: bool
    classes: dict
    sites: dict = {}  # "file:line" -> instructions of the body from (or inlined at) that source line


_FUNCTION_RE = re.compile(r"^\s*(?:Function\s*:\s*([\w$.]+)|//-+\s*\.text\.([\w$.]+)\s*-+)")
_LABEL_RE = re.compile(r"^\s*(\.L[\w$.]*):")
_INSTRUCTION_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_PREDICATE_RE = re.compile(r"^@!?U?P(?:T|\d+)\s+")
_BRANCH_OPCODES = {"BRA", "JMP"}
_LABEL_TARGET_RE = re.compile(r"`\((\.L[\w$.]*)\)")
_LINE_INFO_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_ADDRESS_TARGET_RE = re.compile(r"(?:^|[\s,])(0x[0-9a-fA-F]+)\s*$")


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of an ``nvdisasm -c`` or ``cuobjdump -sass`` listing, in order.

    Branch targets are resolved to addresses: nvdisasm writes them as labels (``BRA `(.L_x_1)``), cuobjdump as
    addresses (``BRA 0x38c0``). Only ``BRA`` / ``JMP`` count as branches (not ``BSSY``, ``CALL``, ``BRX``).
    """
    rows, labels = [], {}
    function, pending, sites = "", [], ()
    for line in text.splitlines():
        found = _LINE_INFO_RE.match(line)
        if found:
            sites = tuple(f"{path}:{number}" for path, number in (found.group(1, 2), found.group(3, 4)) if path)
            continue
        found = _FUNCTION_RE.match(line)
        if found:
            function = found.group(1) or found.group(2)
            pending, sites = [], ()
            continue
        found = _LABEL_RE.match(line)
        if found:
            pending.append(found.group(1))
            continue
        found = _INSTRUCTION_RE.match(line)
        if not found:
            continue
        address, body = int(found.group(1), 16), found.group(2).strip()
        for label in pending:
            labels[(function, label)] = address
        pending = []
        opcode = _PREDICATE_RE.sub("", body).split(None, 1)[0] if body else ""
        rows.append((function, address, opcode, body, sites))
    instructions = []
    for function, address, opcode, body, sites in rows:
        target = None
        if opcode.split(".", 1)[0] in _BRANCH_OPCODES:
            label = _LABEL_TARGET_RE.search(body)
            if label:
                target = labels.get((function, label.group(1)))
            else:
                hex_target = _ADDRESS_TARGET_RE.search(body)
                target = int(hex_target.group(1), 16) if hex_target else None
        instructions.append(Instruction(function, address, opcode, body, target, sites))
    return instructions


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop of the listing: a backward branch (target at or before the branch, same function) closes a
    loop whose body runs from the target to the branch, both included.

    A branch to itself (the ``BRA`` spin that ends every kernel after ``EXIT``) is not a loop. Two backward
    branches to the same target (``continue``) make one loop, up to the last of them. A loop nested in another
    (its body within the other's) has ``depth`` one more; innermost loops contain no other. Sorted innermost
    first, then by depth (deepest first), then by size (largest first).
    """
    spans = {}
    for branch in instructions:
        if branch.target is None or branch.target >= branch.address:
            continue
        key = (branch.function, branch.target)
        spans[key] = max(spans.get(key, branch.address), branch.address)
    by_function = collections.defaultdict(list)
    for instruction in instructions:
        by_function[instruction.function].append(instruction)
    loops = []
    for (function, start), end in spans.items():
        body = [i for i in by_function[function] if start <= i.address <= end]
        depth = sum(1 for (f, s), e in spans.items() if f == function and (s, e) != (start, end)
                    and s <= start and end <= e)
        innermost = not any(f == function and (s, e) != (start, end) and start <= s and e <= end
                            for (f, s), e in spans.items())
        classes = collections.Counter(opcode_class(i.opcode) for i in body)
        sites = collections.Counter(site for i in body for site in i.sites)
        loops.append(Loop(function, start, end, len(body), depth, innermost, dict(classes.most_common()),
                          dict(sites.most_common())))
    return sorted(loops, key=lambda loop: (not loop.innermost, -loop.depth, -loop.instructions))


def hottest_loop(loops: list[Loop]) -> Loop | None:
    """The loop reported as the hot one: the innermost loop with the most instructions (None without loops).
    Its trip count is not known from the code; innermost loops run the most iterations in these kernels. See
    :func:`hot_loop_index` for kernels whose loops are marked with roles."""
    innermost = [loop for loop in loops if loop.innermost]
    return max(innermost, key=lambda loop: loop.instructions) if innermost else None


_ROLE_RE = re.compile(r"#\s*loop:\s*([\w-]+)")


REPOSITORY = Path(__file__).resolve().parents[1]
KERNEL_DIRECTORIES = ("fastbertology_kernels", "benchmarks")  # where the report's kernels live (the yardstick's too)


def local_source(path: str, root: Path = REPOSITORY) -> Path:
    """The file of *this* checkout that a line-info path names. Triton's on-disk cache is shared by every checkout
    on a machine and keyed by the kernel's source, not its path: a cubin compiled from another (perhaps deleted)
    clone of the same source names that clone's absolute path. The longest trailing part of ``path`` that exists
    under ``root`` (e.g. ``fastbertology_kernels/triton_forward.py``) is taken; else the file of that name in this
    checkout's kernel directories (a cubin compiled before the kernels' directory was renamed: ``kernels/``); ``path``
    itself where neither exists."""
    parts = Path(path).parts
    for start in range(1, len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    for directory in KERNEL_DIRECTORIES:
        candidate = root / directory / Path(path).name
        if candidate.is_file():
            return candidate
    return Path(path)


@functools.cache
def _source_roles(path: str) -> dict[int, str]:
    """``{line number: role}`` of the lines of a source file that carry a ``# loop: <role>`` marker, read from
    this checkout's copy of the file (:func:`local_source`)."""
    try:
        lines = local_source(path).read_text().splitlines()
    except OSError:
        return {}
    return {number: found.group(1) for number, line in enumerate(lines, 1) if (found := _ROLE_RE.search(line))}


def loop_role(loop: dict) -> str | None:
    """The role of a loop (a dict of :class:`Loop`): kernels mark the source line that calls a loop helper with
    ``# loop: interior`` or ``# loop: edge`` (the line a loop's instructions were inlined at); the role of the most
    instructions wins. None without markers or line info."""
    votes = collections.Counter()
    for site, count in loop.get("sites", {}).items():
        path, _, number = site.rpartition(":")
        role = _source_roles(path).get(int(number))
        if role:
            votes[role] += count
    return votes.most_common(1)[0][0] if votes else None


def assign_roles(result: dict) -> None:
    """Set ``role`` on every loop of an analysis (from the current source, so an edited marker counts) and make
    ``hottest_loop`` the largest ``interior`` loop where there are any: the loop over the key (or query) blocks
    that every query sees in full, which runs almost every iteration for all but the shortest sequences."""
    loops = result.get("loops", [])
    for loop in loops:
        loop["role"] = loop_role(loop)
    interior = [index for index, loop in enumerate(loops) if loop["role"] == "interior" and loop["innermost"]]
    if interior:
        result["hottest_loop"] = max(interior, key=lambda index: loops[index]["instructions"])


# Opcode classes, by opcode without modifiers. Uniform-datapath opcodes (U...) not listed are "uniform".
OPCODE_CLASSES = {
    "tensor": {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA", "BGMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA",
               "UTCOMMA"},
    "mufu": {"MUFU"},
    "fp": {"FFMA", "FMUL", "FADD", "FMNMX", "FCHK", "FSWZADD", "FFMA2", "FMUL2", "FADD2", "FMNMX2", "HFMA2",
           "HMUL2", "HADD2", "HMNMX2", "DFMA", "DMUL", "DADD"},
    "convert": {"F2F", "F2FP", "F2I", "I2F", "I2FP", "F2IP", "FRND", "I2I", "I2IP"},
    "int": {"IMAD", "IADD3", "IADD", "IMUL", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "VIADD", "VIADDMNMX",
            "VIMNMX", "VIMNMX3", "IMNMX", "IABS", "POPC", "FLO", "BREV", "PRMT", "IDP", "BMSK", "SGXT", "IMNMX3"},
    "pred/select": {"ISETP", "FSETP", "HSETP2", "DSETP", "PLOP3", "PSETP", "SEL", "FSEL", "P2R", "R2P", "VOTE",
                    "VOTEU", "CSETP"},
    "move": {"MOV", "S2R", "CS2R", "S2UR", "R2UR", "MOVM"},
    "shuffle": {"SHFL", "REDUX", "MATCH"},
    "load": {"LDG", "LDS", "LDSM", "LDC", "LD", "LDL", "LDGSTS", "ULDC", "UTMALDG", "UBLKCP", "UTMAPF", "LDTM",
             "TLD", "TEX"},
    "store": {"STG", "STS", "STSM", "ST", "STL", "ATOM", "ATOMS", "ATOMG", "RED", "UTMASTG", "UTMAREDG", "STTM"},
    "sync": {"BAR", "MEMBAR", "FENCE", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "BSSY", "BSYNC", "ERRBAR", "SYNCS",
             "WARPGROUP", "ARRIVES", "CCTL", "CCTLL", "NANOSLEEP", "ELECT", "UCGABAR_ARV", "UCGABAR_WAIT"},
    "control": {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "NOP", "BPT", "YIELD", "KILL", "BREAK", "ACQBULK",
                "PREEXIT"},
}
_CLASS_OF = {opcode: name for name, opcodes in OPCODE_CLASSES.items() for opcode in opcodes}


def opcode_class(opcode: str) -> str:
    """The class of a SASS opcode (modifiers ignored): ``tensor`` (HMMA, HGMMA...), ``mufu`` (exp2, log2, rcp...),
    ``fp`` (FFMA, FMUL, FADD, FMNMX...), ``convert`` (F2FP...), ``int`` (integer and address arithmetic),
    ``pred/select`` (ISETP, FSETP, SEL, FSEL, P2R...), ``move``, ``shuffle`` (SHFL), ``load``, ``store``,
    ``sync`` (barriers, fences, warpgroup arrive/wait), ``control`` (branches, EXIT, NOP), ``uniform`` (other
    uniform-datapath ops) or ``other``."""
    base = opcode.split(".", 1)[0]
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    return "uniform" if base.startswith("U") else "other"


_WIDTH_RE = re.compile(r"\.(?:U|S)?(8|16|32|64|128)\b")


def local_memory_bytes(instructions: list[Instruction]) -> tuple[int, int]:
    """``(stored, loaded)`` bytes of the local-memory instructions (``STL`` / ``LDL``, 4 bytes unless ``.64`` /
    ``.128``...): what ptxas reports as spill stores / loads for a kernel without local arrays (Triton's)."""
    totals = {"STL": 0, "LDL": 0}
    for instruction in instructions:
        if instruction.base in totals:
            width = _WIDTH_RE.search(instruction.opcode)
            totals[instruction.base] += int(width.group(1)) // 8 if width else 4
    return totals["STL"], totals["LDL"]


# ----------------------------------------------------------------------------------------------------------
# One kernel: compile and analyse
# ----------------------------------------------------------------------------------------------------------


def analyse_cubin(cubin: bytes, num_warps: int, dynamic_smem: int, arch: int) -> dict[str, Any]:
    """Resources, occupancy and loops of a one-kernel cubin.

    Returns a dict: ``function``, ``regs`` (per thread), ``spill_store_bytes``, ``spill_load_bytes``,
    ``stack_bytes``, ``smem_bytes`` (dynamic + static shared memory per CTA), ``ctas_per_sm``, ``ctas_limiter``,
    ``occupancy`` (the bound from each resource), ``instructions`` (whole kernel), ``loops`` (list of
    :class:`Loop` as dicts, innermost first) and ``hottest_loop`` (its index in ``loops``, or None).
    """
    usage = resource_usage(cubin)
    instructions = parse_sass(disassemble(cubin))
    kernels = [name for name in usage if any(i.function == name for i in instructions)] or list(usage)
    function = kernels[0]
    own = [i for i in instructions if i.function == function]
    stored, loaded = local_memory_bytes(own)
    smem = dynamic_smem + usage[function]["static_smem"]
    occupancy = ctas_per_sm(usage[function]["regs"], num_warps, smem, ARCH_LIMITS[arch])
    loops = find_loops(own)
    hot = hottest_loop(loops)
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
    values and this file's source (a changed parser recomputes): disassembling takes ~0.4 s a kernel, a Triton
    cache hit ~5 ms."""
    digest = hashlib.sha256(cubin)
    digest.update(f"{num_warps}-{dynamic_smem}-{arch}".encode())
    digest.update(Path(__file__).read_bytes())
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


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def hottest_instructions(row: dict) -> int | None:
    """Instructions of the hottest loop of a result row (None without loops or on error)."""
    index = row.get("hottest_loop")
    return None if index is None else row["loops"][index]["instructions"]


def _block_key(row: dict) -> tuple:
    """Arch, dtype, head dim and block configuration of a row: loops compare per iteration only within it."""
    constexprs, options = row.get("constexprs", {}), row.get("options", {})
    return (row["arch"], row["dtype"], row["head_dim"], constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N"),
            options.get("num_warps"))


def add_yardstick_ratios(rows: list[dict]) -> None:
    """Set ``vs_yardstick`` on every forward row: its hottest loop over the yardstick's for the same arch, dtype,
    head dim and block configuration (None where there is no such yardstick, e.g. fp32 or short-sequence
    blocks)."""
    sticks = {_block_key(row): hottest_instructions(row) for row in rows if row["role"] == "yardstick"}
    for row in rows:
        if row["role"] == "forward":
            stick = sticks.get(_block_key(row))
            mine = hottest_instructions(row)
            row["vs_yardstick"] = round(mine / stick, 2) if stick and mine else None


PLAIN_FLAGS = {"_attn_fwd": set(), "_attn_bwd_dkdv": set(), "_attn_bwd_dq": {"compute_dq"}}


def config_flags(row: dict) -> set[str]:
    """The flags of a row's config label (``"bf16 D64 | causal varlen | ..."`` -> ``{"causal", "varlen"}``)."""
    parts = row["config"].split("|")
    return set(parts[1].split()) - {"plain"} if len(parts) > 2 else set()


def add_plain_ratios(rows: list[dict]) -> None:
    """Set ``vs_plain`` on the rows of the forward, dK/dV and dQ kernels: their hottest loop over that of the same
    kernel without any mask (dense layout, not causal, no head mask) for the same arch, dtype and head dim; what
    causal masking, padding, packing and head masks cost in the loop that runs the most (same block configuration;
    None without such a row)."""
    plain = {}
    for row in rows:
        if row["kernel"] in PLAIN_FLAGS and "error" not in row and config_flags(row) == PLAIN_FLAGS[row["kernel"]]:
            plain[(row["kernel"], *_block_key(row))] = hottest_instructions(row)
    for row in rows:
        if row["kernel"] in PLAIN_FLAGS and "error" not in row:
            base = plain.get((row["kernel"], *_block_key(row)))
            mine = hottest_instructions(row)
            row["vs_plain"] = round(mine / base, 2) if base and mine else None


def format_loops(row: dict) -> str:
    """Loop bodies as ``"360i* 430e"`` / ``"296* 40(d0)"``: instructions, innermost first, ``i`` / ``e`` = interior
    / edge loop (where the kernel marks them), ``*`` = hottest, ``(dN)`` = depth of a loop that contains others."""
    parts = []
    for index, loop in enumerate(row["loops"]):
        role = {"interior": "i", "edge": "e"}.get(loop.get("role") or "", "")
        text = str(loop["instructions"]) + role + ("*" if index == row["hottest_loop"] else "")
        if not loop["innermost"] or loop["depth"]:
            text += f"(d{loop['depth']})"
        parts.append(text)
    return " ".join(parts) or "-"


def format_breakdown(loop: dict) -> str:
    """``"tensor 8, mufu 34, fp 226, ..."`` for one loop."""
    return ", ".join(f"{name} {count}" for name, count in loop["classes"].items())


TABLE_HEADER = ["kernel", "config", "regs", "spill st/ld B", "smem KiB", "CTAs/SM", "loop bodies (instr.)",
                "vs yardstick", "vs plain"]


def table_cells(row: dict) -> list[str]:
    """The cells of one result row under :data:`TABLE_HEADER`."""
    if "error" in row:
        return [row["kernel"], row["config"], "ERROR", row["error"].splitlines()[0][:80], "", "", "", "", ""]
    ratio, plain = row.get("vs_yardstick"), row.get("vs_plain")
    return [row["kernel"], row["config"], str(row["regs"]), f"{row['spill_store_bytes']}/{row['spill_load_bytes']}",
            f"{row['smem_bytes'] / 1024:.1f}", f"{row['ctas_per_sm']} ({row['ctas_limiter']})", format_loops(row),
            "" if ratio is None else f"{ratio:.2f}x", "" if plain is None else f"{plain:.2f}x"]


def format_table(rows: list[dict], breakdown: bool = False) -> str:
    """A fixed-width table of result rows (one arch), a blank line between kernels; with ``breakdown``, the
    opcode classes of each hottest loop on a line below its row."""
    cells = [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [TABLE_HEADER, *cells]) for i in range(len(TABLE_HEADER))]

    def join(line):
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    out = [join(TABLE_HEADER), join("-" * width for width in widths)]
    for index, (row, line) in enumerate(zip(rows, cells)):
        if index and row["kernel"] != rows[index - 1]["kernel"]:
            out.append("")
        out.append(join(line))
        if breakdown and row.get("hottest_loop") is not None:
            out.append(" " * (widths[0] + 2) + "hottest: " + format_breakdown(row["loops"][row["hottest_loop"]]))
    return "\n".join(out)


def _versions() -> str:
    import triton

    versions = [f"triton {triton.__version__}"]
    for tool in ("ptxas", "nvdisasm"):
        try:
            text = subprocess.run([str(tool_path(tool)), "--version"], capture_output=True, text=True).stdout
            release = re.search(r"release ([\d.]+)", text)
            versions.append(f"{tool} {release.group(1) if release else '?'}")
        except FileNotFoundError:
            versions.append(f"{tool} missing")
    return ", ".join(versions)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    parser.add_argument("--dtype", default=None, help="bf16,fp16,fp32 (default: all)")
    parser.add_argument("--head-dim", default=None, help="head dims, e.g. 64 or 32,48,64,128 (default 32,64,128)")
    parser.add_argument("--kernel", default=None,
                        help="kernels whose name contains one of these, comma-separated (e.g. fwd,dq,yardstick)")
    parser.add_argument("--quick", action="store_true",
                        help="only the BERT case (bf16 D64, key padding, head mask with gradient) and the GPT-2 case "
                             "(bf16 D64 causal), with the yardstick")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="sequence length behind the launch values (only its divisibility by 16 matters; 512)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes compiling in parallel (default 2)")
    parser.add_argument("--breakdown", action="store_true", help="opcode classes of each hottest loop")
    parser.add_argument("--json", metavar="PATH", help="write every result row as JSON ('-' for stdout)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """CLI entry point; returns 1 when a kernel failed to compile, 2 when nothing can be compiled here, else 0.
    With ``--json -`` the JSON goes to stdout and the tables to stderr."""
    started = time.perf_counter()
    args = _parse_args(argv)
    out = sys.stderr if args.json == "-" else sys.stdout
    archs = [int(arch) for arch in args.arch.split(",")]
    problem = toolchain_problem(archs)
    if problem:
        print(f"kernel report: cannot compile here: {problem}", file=sys.stderr)
        return 2
    import kernel_specs  # noqa: PLC0415 - the project's launches; benchmarks/ is on sys.path

    dtypes = args.dtype.split(",") if args.dtype else None
    head_dims = [int(d) for d in args.head_dim.split(",")] if args.head_dim else None
    kernels = args.kernel.split(",") if args.kernel else None
    specs = kernel_specs.report_specs(dtypes=dtypes, head_dims=head_dims, kernels=kernels, quick=args.quick,
                                      shape=kernel_specs.Shape(seq=args.seq_len), archs=archs)
    print(f"kernel report: {len(specs)} kernel launches for {', '.join(f'sm_{arch}' for arch in archs)}; "
          f"{_versions()}", file=out, flush=True)

    def progress(done, total):
        if done == total or done % 25 == 0:
            print(f"  compiled {done}/{total} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    rows = run_specs(specs, archs, jobs=args.jobs, progress=progress)
    add_yardstick_ratios(rows)
    add_plain_ratios(rows)
    for arch in archs:
        print(f"\n== {ARCH_LIMITS[arch].name} (per CTA; loop bodies: SASS instructions per iteration per warp, "
              "innermost first, * = hottest)", file=out)
        print(format_table([row for row in rows if row["arch"] == arch], breakdown=args.breakdown), file=out)
    if args.json:
        text = json.dumps(rows, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    errors = sum(1 for row in rows if "error" in row)
    spilled = sum(1 for row in rows if row.get("spill_store_bytes") or row.get("spill_load_bytes"))
    print(f"\n{len(rows)} rows, {errors} compile errors, {spilled} with spills; total wall time "
          f"{time.perf_counter() - started:.1f} s", file=out)
    return 1 if errors else 0


if __name__ == "__main__":
    # run as the module `kernel_report` (not `__main__`), so that the specs built by kernel_specs.py and the worker
    # processes see one set of classes (Ptr, KernelSpec)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernel_report

    sys.exit(kernel_report.main())

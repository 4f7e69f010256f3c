"""SASS listings read as data: instructions (with their source lines), loops (backward branches, nesting), opcode
classes and local-memory traffic (for benchmarks/kernel_report.py). Understands ``nvdisasm -c`` and
``cuobjdump -sass`` listings; standard library only."""

from __future__ import annotations

import collections
import re
from typing import NamedTuple


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

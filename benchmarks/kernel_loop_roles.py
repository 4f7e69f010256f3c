"""Which loop of a compiled kernel is which: the project's kernels mark the source line that calls a loop helper
with ``# loop: interior`` or ``# loop: edge``; a loop's role is read from the source lines its instructions were
inlined at, in *this* checkout's copy of the file (for benchmarks/kernel_report.py)."""

from __future__ import annotations

import collections
import functools
import re
from pathlib import Path

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

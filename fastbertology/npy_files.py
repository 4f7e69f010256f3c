"""Reading ``.npy`` files that come from outside (a mask file, a shared run directory) without trusting them.

:func:`read_numeric_npy` checks the header before any data is read: the magic string, a header NumPy can parse, a
plain real-number dtype (booleans, integers, floats; never pickled objects, strings, structures or complex
numbers), and a data size that matches the file's length, so a forged header that claims terabytes is refused
instead of allocating them. Every problem is a :class:`NpyFileError` (a ValueError) saying what is wrong.
"""

from __future__ import annotations

import os

import numpy as np
from numpy.lib import format as npy_format

MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000  # bytes; NumPy's own default limit


class NpyFileError(ValueError):
    """A file that is not a readable ``.npy`` of real numbers; the message says why (without the file's name)."""


def _header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from the header at the start of ``handle``."""
    if handle.read(len(MAGIC)) != MAGIC:
        raise NpyFileError("is not a .npy file (it does not start with the NumPy header)")
    handle.seek(0)
    try:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(handle, max_header_size=MAX_HEADER)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(handle, max_header_size=MAX_HEADER)
    except (ValueError, SyntaxError, TypeError, EOFError, OverflowError, MemoryError) as error:
        raise NpyFileError(f"has a damaged .npy header ({str(error).splitlines()[0][:200]})") from None
    raise NpyFileError(f"is a .npy file of format version {version[0]}.{version[1]}, which holds no plain numeric "
                       "array")


def dtype_problem(dtype: np.dtype) -> str | None:
    """Why ``dtype`` is not a plain real-number dtype, or None when it is one."""
    if dtype.hasobject:
        return "holds Python objects (pickled data), which are never loaded"
    if dtype.names is not None or dtype.subdtype is not None:
        return f"has the structured dtype {dtype}"
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        return f"has dtype {dtype}"
    return None


def read_numeric_npy(path) -> np.ndarray:
    """The array in ``path``, checked as described in the module docstring. :class:`NpyFileError` otherwise;
    OSError when the file cannot be opened."""
    with open(path, "rb") as handle:
        shape, fortran_order, dtype = _header(handle)
        problem = dtype_problem(dtype)
        if problem:
            raise NpyFileError(f"{problem}; expected real numbers or booleans")
        if not all(isinstance(n, int) and n >= 0 for n in shape) or \
                int(np.prod([max(n, 1) for n in shape], dtype=object)) * dtype.itemsize >= 2 ** 62:
            raise NpyFileError(f"has an impossible shape {shape} in its header")
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
        available = os.fstat(handle.fileno()).st_size - handle.tell()
        if expected != available:
            raise NpyFileError(f"is damaged: its header says shape {shape} of {dtype} ({expected} bytes of data) but "
                               f"the file holds {available} bytes of data")
        data = handle.read(expected)
    array = np.frombuffer(data, dtype=dtype)
    array = array.view(np.uint8) != 0 if dtype == np.bool_ else array.copy()  # a bool byte of 2 is True, not 2
    return array.reshape(shape, order="F" if fortran_order else "C")

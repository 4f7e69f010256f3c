"""Writing results: atomic files (temp file + rename) in an output directory that is never silently overwritten."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


class OutputDirectoryError(ValueError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


def check_output_dir(path, *, overwrite: bool) -> Path:
    """Refuse a path that is not a directory, or a non-empty directory unless ``overwrite`` (files are then
    replaced one by one as results are written; nothing is deleted). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputDirectoryError(f"output directory {path} is not empty; pass --overwrite to replace its results")
    return path


def prepare_output_dir(path, *, overwrite: bool) -> Path:
    """:func:`check_output_dir`, then create the directory if needed."""
    path = check_output_dir(path, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename, so that an
    interrupted run leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def write_npy(path, array) -> Path:
    """Atomically save an array (torch tensors are converted) as ``.npy``."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array.cpu() if hasattr(array, "cpu") else array))
    return write_bytes_atomic(path, buffer.getvalue())


def write_json(path, payload) -> Path:
    """Atomically save ``payload`` as indented JSON (NaN written as null)."""
    text = json.dumps(_jsonable(payload), indent=2, allow_nan=False)
    return write_bytes_atomic(path, (text + "\n").encode())


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch
        return _jsonable(value.tolist())
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, Path):
        return str(value)
    return value

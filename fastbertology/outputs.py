"""Writing results: atomic files (temp file + rename) in an output directory that is never silently overwritten."""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path

import numpy as np


class OutputDirectoryError(ValueError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


class OutputWriteError(OSError):
    """Writing an output failed (a full disk, a quota, an I/O error); the message names the file and the reason."""


def check_output_dir(path, *, overwrite: bool) -> Path:
    """Refuse a path that is not a directory, a directory this process cannot write into (or, when it does not
    exist yet, cannot create), or a non-empty directory unless ``overwrite`` (the run's outputs then replace the
    old run's when the run has succeeded: :mod:`fastbertology.run_directory`). Creates nothing. Returns the path
    with ``~`` expanded."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"output path {path} exists and is not a directory; choose another --output-dir")
    check_writable_dir(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputDirectoryError(f"output directory {path} is not empty; pass --overwrite to replace its results")
    return path


def check_writable_dir(path) -> None:
    """OutputDirectoryError unless ``path`` is a directory this process can write into, or does not exist and
    can be created: its nearest existing ancestor must be a directory in which a file can really be created
    (a probe file, removed at once; permission bits alone say nothing for root or read-only file systems)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirectoryError(f"output directory {path} cannot be created: {existing} is not a directory; "
                                   "choose another --output-dir")
    try:
        if existing == path:
            handle, probe = _create_temporary_file(path / ".probe")
            os.close(handle)
            os.unlink(probe)
        else:  # what must work is creating a directory there
            os.rmdir(make_temporary_dir(existing / ".probe"))
    except OSError as error:
        what = "is not writable" if existing == path else "cannot be created"
        raise OutputDirectoryError(f"output directory {path} {what} ({error.strerror or error}); choose another "
                                   "--output-dir or fix the permissions") from None


def _temporary_name(path: Path, suffix: str = "") -> Path:
    """A fresh hidden sibling name of ``path`` (``.<name>.<random><suffix>``)."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def make_temporary_dir(path, *, suffix: str = "") -> Path:
    """Create an empty hidden sibling directory of ``path`` (for building ``path`` and renaming it into place),
    ``.<name>.<12 hex digits><suffix>``.

    Unlike ``tempfile.mkdtemp`` (always mode 0700) the directory gets the usual mode 0777 minus the umask, so it
    keeps the permissions every other output has once it is renamed into place."""
    path = Path(path)
    for _ in range(100):
        temporary = _temporary_name(path, suffix)
        try:
            os.mkdir(temporary, 0o777)
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"cannot create a temporary directory next to {path}")


def current_umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory) -> None:
    """Give every file (0666) and directory (0777) under ``directory``, itself included, the usual permissions
    minus the umask: some writers ignore it (safetensors' ``save_file`` creates its files 0600)."""
    mask = current_umask()
    for root, _directories, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _create_temporary_file(path: Path) -> tuple[int, Path]:
    """Open a new hidden sibling file of ``path`` for writing: ``(file descriptor, its path)``. Mode 0666 minus
    the umask (``tempfile.mkstemp`` would make it 0600 whatever the umask says)."""
    for _ in range(100):
        temporary = _temporary_name(path, ".tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), \
                temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _write_file(handle: int, data: bytes) -> None:
    """Write ``data`` to the open file ``handle`` and flush it to the disk (closes ``handle``)."""
    with os.fdopen(handle, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename, so that an
    interrupted run leaves either the old file or the new one, never half of one. The file gets the usual
    permissions (0666 minus the umask). OutputWriteError naming the file when the system refuses (a full disk)."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_temporary_file(path)
        _write_file(handle, data)
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise OutputWriteError(f"cannot write {path.name} ({error.strerror or error})") from None
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

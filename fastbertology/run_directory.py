"""A run's output directory as one transaction: a run that fails, is killed or collides with another never leaves
a set of files that mixes two runs or looks finished.

* **Lock.** :func:`open_run_directory` takes an exclusive ``flock`` on ``.<name>.lock`` beside the directory
  (``runs/.x.lock`` for ``runs/x``) for the run's whole life, before the model is loaded: a second run into the
  same directory fails at once, naming the process that holds it. The kernel releases the lock when a process
  dies however it dies, so a lock is never stale; the file is removed when the run ends.
* **Staging.** The run writes into a hidden sibling, ``.<name>.<random>.staging``, which :meth:`RunDirectory.commit`
  moves into place when the run has succeeded: renamed to the directory when there is none; with ``--overwrite``
  the old ``summary.json`` and ``report.html`` (what marks a finished run) go first, then the old run's other
  outputs, then the new files move in, ``summary.json`` last. Files fastbertology does not write are kept. A
  failed or interrupted run removes its staging directory; one left by a killed process (SIGKILL, power loss) is
  removed by the next run that takes the lock.
* **Live files.** A sweep's checkpoint is the one file written into the directory itself during the run
  (:meth:`RunDirectory.live`), so that a killed sweep can be resumed.

Signals are held back (:func:`~fastbertology.interrupts.deferred`) while files move, so SIGTERM or Ctrl-C cannot
cut a commit or a clean-up in half. Under torchrun only rank 0 opens the directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from . import interrupts
from .outputs import OutputDirectoryError, OutputWriteError, make_temporary_dir

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None

STAGING_SUFFIX = ".staging"
FINISHED_MARKERS = ("summary.json", "report.html")  # a directory holding these looks like a finished run
# Everything a command writes into its output directory (docs/bad-input.md): what --overwrite replaces.
RUN_OUTPUTS = frozenset({
    "head_importance.npy", "attn_entropy.npy", "attn_max_prob.npy", "head_importance.png", "attn_entropy.png",
    "attn_max_prob.png", "attention_patterns.json", "head_mask.npy", "masking_curve.png", "pruned_model",
    "sweep_scores.npy", "sweep_delta.npy", "sweep_losses.npy", "sweep_masks.npy", "sweep_delta.png",
    "sweep_checkpoint.json", *FINISHED_MARKERS,
})


class OutputDirectoryBusyError(OutputDirectoryError):
    """Another fastbertology process holds the output directory's lock."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class _Lock:
    """An exclusive ``flock`` on a lock file, taken without waiting; the file holds the owner's process id."""

    def __init__(self, path: Path, directory: Path):
        self.path, self.fd = path, None
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise OutputDirectoryError(f"output directory {directory} cannot be locked: {path} cannot be "
                                           f"created ({error.strerror or error}); a run stages its outputs beside "
                                           "the directory, so its parent must be writable: choose another "
                                           "--output-dir") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 100).decode("ascii", "replace").strip()
                os.close(fd)
                raise OutputDirectoryBusyError(
                    f"output directory {directory} is in use by another fastbertology run"
                    f"{f' (process {owner})' if owner.isdigit() else ''}: two runs never write into one directory; "
                    "wait for that run to end, or choose another --output-dir") from None
            except OSError as error:
                os.close(fd)
                raise OutputDirectoryError(f"output directory {directory} cannot be locked ({error.strerror or error}"
                                           f" on {path}); choose an --output-dir on a local file system") from None
            if self._is_current(fd):  # not a file its previous owner removed after we opened it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise OutputDirectoryBusyError(f"output directory {directory}: its lock {path} keeps changing hands; try again")

    def _is_current(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self._is_current(self.fd):
                os.unlink(self.path)  # while still holding it: whoever opens it next sees it is gone
        os.close(self.fd)
        self.fd = None


def _make_parents(directory: Path) -> list[Path]:
    """Create the missing ancestors of ``directory`` (not itself); the ones created, deepest first."""
    created, missing = [], directory.parent
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    for path in reversed(created):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
    return created


class RunDirectory:
    """An open output directory: ``path`` (where the outputs end up), ``staging`` (where they are written;
    ``directory / "name"`` is ``staging / "name"``). Use as a context manager: leaving it without
    :meth:`commit` removes the staging directory; leaving it always releases the lock."""

    def __init__(self, path: Path, staging: Path, lock: _Lock, created: list[Path]):
        self.path, self.staging = path, staging
        self._lock, self._created, self._live, self._committed = lock, created, set(), False
        self.written: list[str] = []
        self._existed = os.path.lexists(path)

    def __truediv__(self, name: str) -> Path:
        return self.staging / name

    def live(self, name: str) -> Path:
        """``path / name``: a file written into the directory itself while the run goes on, kept at commit."""
        self._live.add(name)
        return self.path / name

    def commit(self) -> None:
        """Move the staged outputs into place (see the module docstring); signals wait until it is done.
        ``written`` then lists the names of this run's outputs (staged and live), not other files kept there."""
        self.written = sorted(set(os.listdir(self.staging))
                              | {name for name in self._live if os.path.lexists(self.path / name)})
        with interrupts.deferred():
            if not os.path.lexists(self.path):
                os.rename(self.staging, self.path)
            else:
                self._replace_into(self.path)
            self._committed = True

    def _replace_into(self, target: Path) -> None:
        new = set(os.listdir(self.staging))
        for name in FINISHED_MARKERS:  # first of all, the old set stops looking finished
            _remove(target / name)
        for name in sorted(RUN_OUTPUTS - new - self._live):  # the old run's outputs this run did not write
            _remove(target / name)
        for name in sorted(new - set(FINISHED_MARKERS)) + [m for m in reversed(FINISHED_MARKERS) if m in new]:
            if (target / name).is_dir() and not (target / name).is_symlink():
                shutil.rmtree(target / name)
            os.replace(self.staging / name, target / name)
        os.rmdir(self.staging)

    def close(self) -> None:
        """Remove the staging directory unless committed, release the lock, remove the parents this run
        created when they stayed empty."""
        with interrupts.deferred():
            if not self._committed:
                shutil.rmtree(self.staging, ignore_errors=True)
            self._lock.release()
            for path in self._created:
                with contextlib.suppress(OSError):
                    os.rmdir(path)

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close()
        if isinstance(error, OutputWriteError) and not self._committed:
            if self._existed or self._live:
                but = f" but its {', '.join(sorted(self._live))} (kept for --resume)" if self._live else ""
                left = f"nothing of this run{but} was moved into {self.path}"
            else:
                left = f"{self.path} was not created"
            raise OutputWriteError(f"{error}; {left}: free some space or choose another --output-dir, and "
                                   "rerun") from None


def _stale_staging(parent: Path, name: str) -> Iterator[Path]:
    pattern = re.compile(re.escape(f".{name}.") + r"[0-9a-f]{12}" + re.escape(STAGING_SUFFIX))
    for entry in parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            yield entry


def open_run_directory(path, check: Callable[[Path], object]) -> RunDirectory:
    """Lock the output directory ``path`` and open a staging directory beside it. ``check(path)`` raises when the
    directory cannot be used (not empty without --overwrite...): called before anything is created, and again
    once the lock is held. OutputDirectoryBusyError when another run holds the lock."""
    path = Path(os.path.expanduser(str(path)))
    check(path)
    real = path.resolve()
    if real.name in ("", ".", ".."):
        raise OutputDirectoryError(f"output directory {path} is a file system root; choose a directory inside it")
    created = _make_parents(real)
    lock = None
    try:
        lock = _Lock(real.parent / f".{real.name}.lock", path)
        check(path)  # again: another run may have finished into it meanwhile
        for stale in _stale_staging(real.parent, real.name):  # left by a killed run; the lock says it is dead
            shutil.rmtree(stale, ignore_errors=True)
        staging = make_temporary_dir(real, suffix=STAGING_SUFFIX)
    except BaseException:
        if lock is not None:
            lock.release()
        for directory in created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    interrupts.stage("locked")
    return RunDirectory(path, staging, lock, created)


@contextlib.contextmanager
def locked_run_directory(path) -> Iterator[None]:
    """Hold ``path``'s lock for a short job on a finished run (``report`` rewriting report.html), so that it
    never interleaves with a run that is replacing the directory. Busy: OutputDirectoryBusyError. Where no lock
    file can be created (a read-only parent), the job runs unlocked."""
    real = Path(os.path.expanduser(str(path))).resolve()
    try:
        lock = _Lock(real.parent / f".{real.name}.lock", real)
    except OutputDirectoryBusyError:
        raise
    except OutputDirectoryError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()

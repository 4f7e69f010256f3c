"""Signals on the command line: SIGINT (Ctrl-C), SIGTERM and SIGHUP end a command at any moment — start-up
imports included — with one line on stderr and the conventional exit code 128 + the signal's number (130, 143,
129), after the run's cleanup (its staged outputs removed, its lock released: :mod:`fastbertology.run_directory`).

:func:`install` (called first thing by :func:`fastbertology.cli.main`, before torch is imported) turns each of the
three signals into a :class:`Interrupted` exception raised in the main thread; :func:`deferred` holds them back
while a few lines must not be cut in half (moving a finished run into place, removing a failed one's files).

:func:`stage` is a test hook: with ``FASTBERTOLOGY_TEST_STAGES=FILE`` every stage reached is appended to FILE, and
with ``FASTBERTOLOGY_TEST_PAUSE_AT=NAME`` the command waits at stage NAME until ``FILE.go`` exists, so that a test
can send a signal at a known moment. This module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
STAGES_ENV = "FASTBERTOLOGY_TEST_STAGES"
PAUSE_ENV = "FASTBERTOLOGY_TEST_PAUSE_AT"
PAUSE_LIMIT_S = 120.0


class Interrupted(BaseException):
    """A signal ended the command (a BaseException, like KeyboardInterrupt: ``except Exception`` lets it pass)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_deferring = 0
_pending: list[int] = []


def _handler(signum, frame) -> None:
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def install() -> dict | None:
    """Raise :class:`Interrupted` on SIGINT, SIGTERM and SIGHUP; returns the previous handlers for
    :func:`restore` (None, changing nothing, outside the main thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}
    for signum in SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # started with the signal ignored (nohup, a background job): keep it so
        previous[signum] = signal.signal(signum, _handler)
    return previous


def restore(previous: dict | None) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back inside the block; the first one that came is raised at its end."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)


def interrupt_from(error: BaseException) -> Interrupted:
    """``error`` as an :class:`Interrupted` (a KeyboardInterrupt from Python's own handler is SIGINT)."""
    return error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)


def stage(name: str) -> None:
    """Test hook (see the module docstring); does nothing unless ``FASTBERTOLOGY_TEST_STAGES`` is set."""
    path = os.environ.get(STAGES_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(name + "\n")
    if os.environ.get(PAUSE_ENV) == name:
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not os.path.exists(path + ".go") and time.monotonic() < deadline:
            time.sleep(0.02)

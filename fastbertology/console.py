"""Talking to the user: printed lines (rank 0 only), ``[L, H]`` tables as text, and the one progress setting.

Progress bars — fastbertology's own (importance, masking, evaluation, sweep) and transformers' "Loading weights"
bar — all follow one setting: drawn when ``--no-progress`` is not given and stderr is a terminal, so a log file or
a pipe gets plain lines. transformers' log records (its load report colours some words even when piped) lose
their ANSI colour codes, and its warnings are silenced for the run: fastbertology checks and reports what matters
(missing weights, truncation) itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging

from . import distributed
from .report.scales import decimals_for

ANSI_CODE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def progress_wanted(no_progress: bool, stream=None) -> bool:
    """Whether progress bars are drawn: not switched off, and ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return not no_progress and bool(getattr(stream, "isatty", lambda: False)())


class _StripAnsi(logging.Filter):
    """Removes ANSI colour codes from a log record's message (and its arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = ANSI_CODE.sub("", str(record.msg))
        if record.args:
            record.args = tuple(ANSI_CODE.sub("", a) if isinstance(a, str) else a for a in record.args)
        return True


def _set_library_bars(enabled: bool) -> None:
    """transformers' progress bars (it switches huggingface_hub's with them); an environment variable that pins
    huggingface_hub's setting wins quietly."""
    if transformers_logging.is_progress_bar_enabled() == enabled:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()


@contextlib.contextmanager
def library_output(*, progress: bool) -> Iterator[None]:
    """For the duration of a command: transformers' (and huggingface_hub's) progress bars on or off with
    ``progress``, transformers' warnings off, ANSI codes stripped from its log records. Restored afterwards."""
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    handlers = list(transformers_logging.get_logger("transformers").handlers)  # records of every transformers.*
    strip = _StripAnsi()                                                       # logger reach these handlers
    for handler in handlers:
        handler.addFilter(strip)
    transformers_logging.set_verbosity_error()
    _set_library_bars(progress)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(strip)
        transformers_logging.set_verbosity(verbosity)
        _set_library_bars(bars)


class Console:
    """What a command prints. ``progress``: whether long work draws progress bars (see :func:`progress_wanted`).
    Under torchrun only rank 0 prints and draws."""

    def __init__(self, *, progress: bool):
        self.progress = progress and distributed.is_main()

    def say(self, text: str = "") -> None:
        if distributed.is_main():
            print(text, flush=True)

    def warn(self, text: str) -> None:
        if distributed.is_main():
            print(f"fastbertology: warning: {text}", file=sys.stderr, flush=True)


def format_table(table, *, title: str, digits: int | None = None) -> str:
    """An ``[L, H]`` table as text: one row per layer, one column per head (run_bertology's print_2d_tensor).
    ``digits``: decimals (default: at least 3, more where the values differ only further down)."""
    if digits is None:
        digits = max(3, decimals_for(table.tolist()))
    values = table.tolist()
    width = max(6, digits + 4)
    lines = [title, "layer " + "".join(f"{h:>{width}d}" for h in range(len(values[0])))]
    for layer, row in enumerate(values):
        cells = "".join(f"{v:>{width}.{digits}f}" if v == v else f"{'-':>{width}}" for v in row)
        lines.append(f"{layer:>5d} " + cells)
    return "\n".join(lines)

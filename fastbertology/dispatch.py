"""Running a parsed command: offline mode, the process group under torchrun, the one progress setting, and errors.

Bad input never gives a traceback or a silent wrong result: every option and path is checked before the model is
loaded, the model and the data are checked against each other before any pass over the data (see
:mod:`fastbertology.run_setup`), and :func:`run` turns every known kind of error into one line on stderr and exit
code 2 (docs/bad-input.md). Signals (Ctrl-C: exit code 130, SIGTERM: 143) are handled by
:func:`fastbertology.cli.main`, around the imports as well. The network is never used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from safetensors import SafetensorError

from . import distributed
from .commands import run_demo, run_importance, run_mask, run_prune, run_report
from .console import Console, library_output, progress_wanted
from .gates_command import run_gates
from .loading import set_offline
from .outputs import OutputDirectoryError
from .patching_command import run_patching
from .stream_command import run_streamed_importance
from .sweep_command import run_sweep

EXIT_ERROR = 2
TRACEBACK_ENV = "FASTBERTOLOGY_TRACEBACK"  # set to 1 to get the traceback of an error instead of one line


def _importance(args, console: Console) -> int:
    """``importance``, or ``importance --stream`` (a corpus read in pieces: :mod:`fastbertology.stream_command`)."""
    return (run_streamed_importance if args.stream else run_importance)(args, console)


HANDLERS = {"demo": run_demo, "importance": _importance, "mask": run_mask, "prune": run_prune,
            "sweep": run_sweep, "gates": run_gates, "patching": run_patching, "report": run_report}
DATA_PARALLEL = ("importance", "mask", "sweep")

# Exception types that mean bad input or an unusable environment (one line, exit code 2), not a bug in fastbertology
# (those keep their traceback).
KNOWN_ERRORS = (OutputDirectoryError, ValueError, RuntimeError, OSError, ImportError, SafetensorError)


def error_line(command: str, error: BaseException) -> str:
    """``fastbertology <command>: error: <message>`` on one line (multi-line messages are joined)."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)) and error.filename and \
            str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return f"fastbertology {command}: error: {message}"


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, without the source file and line that Python shows by default."""
    kind = "" if issubclass(category, UserWarning) else f" ({category.__name__})"
    return f"fastbertology: warning{kind}: {message}\n"


@contextlib.contextmanager
def _one_line_warnings():
    previous = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def run(args) -> int:
    """Run the command ``args.command`` with its parsed options; its exit status."""
    set_offline()  # fastbertology never needs the network
    console = Console(progress=progress_wanted(getattr(args, "no_progress", True)))
    try:
        if distributed.env_world_size() > 1 and args.command not in DATA_PARALLEL:
            raise ValueError(f"only {', '.join(DATA_PARALLEL)} run data-parallel under torchrun; run this command as "
                             "a single process")
        with distributed.session(device=getattr(args, "device", None)), library_output(progress=console.progress), \
                _one_line_warnings():
            return HANDLERS[args.command](args, console)
    except KNOWN_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return EXIT_ERROR

"""A run's record: its output directory, its ``summary.json`` (options, setup, environment, results, timings) and
the last step of every command — write the summary and ``report.html``, move the outputs into place, list them.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime

import torch
import transformers

try:  # optional dependency: only its version is recorded
    import triton
except ImportError:
    triton = None

from . import __version__, interrupts
from .console import Console
from .outputs import write_json
from .report import write_report
from .run_directory import RunDirectory


def default_output_dir(command: str) -> str:
    """``runs/<command>-<YYYYmmdd-HHMMSS>``, relative to the working directory."""
    return os.path.join("runs", f"{command}-{datetime.now():%Y%m%d-%H%M%S}")


def versions() -> dict:
    """Versions of fastbertology, torch, transformers, triton (None when absent) and Python."""
    return {"fastbertology": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": None if triton is None else triton.__version__, "python": platform.python_version()}


def new_summary(command: str, options: dict, description: dict) -> dict:
    """The summary a command fills in: ``options`` (as given), ``setup`` (the run's description), versions, date."""
    return {"command": command, "options": dict(options), "setup": description, "versions": versions(),
            "platform": f"{platform.system()} {platform.machine()}",
            "date": datetime.now().isoformat(timespec="seconds")}


def subtitle(description: dict) -> str:
    """``model · task (metric) · N examples``: the line every figure carries under its title."""
    return (f"{description['model_label']} · {description['task_name']} ({description['metric']}) · "
            f"{description['examples']} examples")


def describe_setup(console: Console, description: dict) -> None:
    """The lines every command prints before its work: data, labels, model, device, attention backend."""
    console.say(f"Data: {description['data']}")
    labels = description.get("labels")
    if labels:
        pairs = ", ".join(f"{name} -> {i}" for name, i in labels["ids"].items())
        console.say(f"Labels -> class ids: {pairs} ({labels['order']})")
    console.say(f"Model: {description['model_label']} ({description['model_type']}), task {description['task_name']}"
                f", metric {description['metric']}; {description['examples']} examples in {description['batches']} "
                f"batches; {description['device']}, {description['dtype']}, {description['attention']}\n")
    if description["random_head"]:
        console.warn(f"the task head of {description['model_dir']} is not in the checkpoint "
                     f"({', '.join(description['random_head'])}): it was initialised at random (--allow-random-head)")


def finish(console: Console, output: RunDirectory | None, summary: dict, started: float) -> None:
    """Write ``summary.json`` and ``report.html`` into the run's staging directory, move the whole set into place
    (:meth:`~fastbertology.run_directory.RunDirectory.commit`) and list what the run wrote there (rank 0 only:
    ``output`` is None elsewhere)."""
    if output is None:
        return
    summary["seconds_total"] = time.perf_counter() - started
    write_json(output / "summary.json", summary)
    write_report(output.staging)
    interrupts.stage("commit")
    output.commit()
    path = output.path
    console.say(f"\nOutputs in {path}/ ({', '.join(output.written)})")
    console.say(f"Open {path / 'report.html'} in a browser for the whole run on one page.")
    console.say(f"Total {summary['seconds_total']:.0f} s")

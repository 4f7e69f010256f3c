"""A finished run's files, read back for the report: ``summary.json``, the ``.npy`` tables and
``attention_patterns.json``, each checked against what fastbertology writes (:mod:`~fastbertology.report.schema`).
Only files that exist are read; ``summary.json`` must."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..npy_files import NpyFileError, read_numeric_npy
from .schema import FIX, RunFilesError, check_head_scores, check_patterns, check_summary, check_table, check_tables

# Table name -> file, in the order the report shows them.
TABLE_FILES = {
    "importance": "head_importance.npy",
    "entropy": "attn_entropy.npy",
    "max_prob": "attn_max_prob.npy",
    "head_mask": "head_mask.npy",
    "sweep_delta": "sweep_delta.npy",
    "sweep_scores": "sweep_scores.npy",
    "head_gates": "head_gates.npy",
    "patching_scores": "patching_scores.npy",
    "attribution_scores": "attribution_scores.npy",
}
PATTERNS_FILE = "attention_patterns.json"
HEAD_SCORES_FILE = "head_scores.json"


@dataclass
class RunFiles:
    """What a run left in its directory. ``tables``: name -> array (``[L, H]``; sweeps of layers or masks ``[L]`` /
    ``[M]``); ``patterns``: the content of ``attention_patterns.json`` or None."""

    directory: Path
    summary: dict
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    patterns: dict | None = None
    head_scores: dict[str, np.ndarray] = field(default_factory=dict)  # head_scores.json: name -> [L, H] (NaN: null)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; RunFilesError naming the file for anything else (bad UTF-8 or JSON, numbers
    Python refuses to read, nesting too deep to read, text that is not valid Unicode)."""
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
        json.dumps(payload, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\\ud800") cannot be shown
    except OSError as error:
        raise RunFilesError(f"{path} cannot be read ({error.strerror or error})") from None
    except RecursionError:
        raise RunFilesError(f"{path} is nested too deeply to be a fastbertology file; {FIX}") from None
    except ValueError as error:  # UnicodeError, JSONDecodeError, integers of more than 4300 digits
        raise RunFilesError(f"{path} is not valid JSON ({str(error)[:200]}); {FIX}") from None
    if not isinstance(payload, dict):
        raise RunFilesError(f"{path} is not a JSON object; {FIX}")
    return payload


def _present(directory: Path, file: str) -> bool:
    """Whether the run has ``file`` as a regular file. A symbolic link out of the run directory is refused: a
    shared directory must not make the report read (and show) a file of the person who opens it."""
    path = directory / file
    if path.is_symlink():
        target = path.resolve()
        if directory.resolve() not in target.parents:
            raise RunFilesError(f"{path} is a symbolic link to {target}, outside the run directory; a run's files are "
                                "its own: copy the file into the directory instead")
    return path.is_file()


def read_run(directory) -> RunFiles:
    """Read the run in ``directory`` and check its structure (:mod:`~fastbertology.report.schema`).
    RunFilesError (a ValueError) naming the file, the field and the problem when it is not a finished
    fastbertology run."""
    path = Path(os.path.expanduser(str(directory)))
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; give the output directory of a fastbertology run")
    summary_path = path / "summary.json"
    if not _present(path, "summary.json"):
        raise ValueError(f"{path} has no summary.json, so it is not a finished fastbertology run (a run writes it "
                         "last); give the output directory of a finished run")
    run = RunFiles(directory=path, summary=_read_json(summary_path))
    check_summary(run.summary, summary_path)
    for name, file in TABLE_FILES.items():
        if _present(path, file):
            try:
                run.tables[name] = read_numeric_npy(path / file)
            except NpyFileError as error:
                raise RunFilesError(f"{path / file} {error}; {FIX}") from None
            except OSError as error:
                raise RunFilesError(f"{path / file} cannot be read ({error.strerror or error})") from None
            check_table(name, run.tables[name], path / file)
    check_tables(run.tables, TABLE_FILES, run.summary, path)
    if _present(path, PATTERNS_FILE):
        run.patterns = _read_json(path / PATTERNS_FILE)
        check_patterns(run.patterns, path / PATTERNS_FILE)
    if _present(path, HEAD_SCORES_FILE):
        run.head_scores = _head_scores(path / HEAD_SCORES_FILE, run.tables)
    return run


def _head_scores(path: Path, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``head_scores.json`` -> ``{score: [L, H] float64}`` (null read as NaN), of the other tables' shape."""
    payload = _read_json(path)
    if not payload:
        raise RunFilesError(f"{path} holds no scores; {FIX}")
    scores = check_head_scores(payload, path, tuple(payload))
    shape = next(iter(scores.values())).shape
    others = {array.shape for name, array in tables.items() if array.ndim == 2 and not name.startswith("sweep")}
    if others and others != {shape}:
        raise RunFilesError(f"{path} holds tables of shape {shape}, but the run's other tables have shape "
                            f"{others.pop()}: the files come from different runs; rerun the command that wrote them")
    return scores

"""A finished run's files, read back for the report: ``summary.json``, the ``.npy`` tables and
``attention_patterns.json``. Only files that exist are read; ``summary.json`` must."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the command that wrote it") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a JSON object; rerun the command that wrote it")
    return payload


def read_run(directory) -> RunFiles:
    """Read the run in ``directory``. ValueError naming the problem when it is not a finished fastbertology run."""
    path = Path(os.path.expanduser(str(directory)))
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; give the output directory of a fastbertology run")
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{path} has no summary.json, so it is not a finished fastbertology run (a run writes it "
                         "last); give the output directory of a finished run")
    run = RunFiles(directory=path, summary=_read_json(summary_path))
    for name, file in TABLE_FILES.items():
        if (path / file).is_file():
            try:
                run.tables[name] = np.load(path / file, allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise ValueError(f"{path / file} cannot be read ({error}); rerun the command that wrote it") from None
    if (path / PATTERNS_FILE).is_file():
        run.patterns = _read_json(path / PATTERNS_FILE)
    if (path / HEAD_SCORES_FILE).is_file():
        run.head_scores = _head_scores(path / HEAD_SCORES_FILE)
    return run


def _head_scores(path: Path) -> dict[str, np.ndarray]:
    """``head_scores.json`` -> ``{score: [L, H] float64}`` (null read as NaN)."""
    scores = {}
    for name, rows in _read_json(path).items():
        try:
            table = np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {name!r} is not a [layers][heads] table of numbers; rerun the command that "
                             "wrote it") from None
        if table.ndim != 2:
            raise ValueError(f"{path}: {name!r} is not a [layers][heads] table; rerun the command that wrote it")
        scores[name] = table
    return scores

"""A complete run directory written by hand (every section the report shows: importance, patterns, masking,
pruning, sweep, timings, setup, options, environment), for the report's safety and schema tests. No model."""

from __future__ import annotations

import copy
import json

import numpy as np

LAYERS, HEADS = 2, 3


def _table(seed: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (LAYERS, HEADS)).astype(np.float32)


TABLES = {
    "head_importance.npy": _table(0),
    "attn_entropy.npy": _table(1, 0.5, 3.0),
    "attn_max_prob.npy": _table(2),
    "head_mask.npy": np.array([[1, 0, 1], [1, 1, 0]], dtype=np.float32),
    "sweep_delta.npy": _table(3, -0.1, 0.1),
    "sweep_scores.npy": _table(4),
}


def summary() -> dict:
    """A summary.json as the commands write it (shapes and types), every section present."""
    tables = {name: array.tolist() for name, array in TABLES.items()}
    return copy.deepcopy({
        "command": "demo",
        "options": {"command": "demo", "batch_size": 4, "output_dir": "runs/x", "model": None, "seed": 42},
        "setup": {"model": "tiny", "model_dir": "/models/tiny", "model_label": "tiny BERT", "model_type": "bert",
                  "objective": "classification", "task_name": "classification", "task": "Classification(2)",
                  "metric": "accuracy", "data": "d.csv: 8 examples", "examples": 8, "batches": 2, "batch_size": 4,
                  "max_seq_length": 16, "device": "cpu (x86_64, 2 cores)", "dtype": "float32", "backend": "auto",
                  "attention": "torch backend", "random_head": ["classifier.weight"],
                  "labels": {"ids": {"neg": 0, "pos": 1}, "order": "label names in sorted order"}},
        "versions": {"fastbertology": "0.1.0", "torch": "2.13.0", "transformers": "5.0", "triton": None,
                     "python": "3.11"},
        "platform": "Linux x86_64", "date": "2026-12-03T10:00:00",
        "importance": {"metric": 0.75, "loss": 0.6, "tokens": 90, "examples": 8, "seconds": 1.5,
                       "mode": "per_batch", "importance": tables["head_importance.npy"],
                       "raw_importance": (TABLES["head_importance.npy"] * 7).tolist(),
                       "entropy": tables["attn_entropy.npy"],
                       "max_prob": tables["attn_max_prob.npy"]},
        "patterns": {"seconds": 0.2, "examples": 1},
        "masking": {"original_score": 0.75, "final_score": 0.7, "threshold_score": 0.675, "higher_is_better": True,
                    "heads_remaining": 4, "heads_total": 6,
                    "curve": [{"heads_remaining": 6, "score": 0.75, "masked": []},
                              {"heads_remaining": 4, "score": 0.7, "masked": [[0, 1], [1, 2]]}],
                    "seconds": 2.0, "threshold": 0.9, "amount": 0.25, "head_mask": tables["head_mask.npy"]},
        "pruning": {"masked_score": 0.7, "pruned_score": 0.7, "parameters_before": 1000, "parameters_after": 900,
                    "masked_seconds": 0.5, "pruned_seconds": 0.4, "heads_pruned": 2, "heads_total": 6,
                    "model_dir": "runs/x/pruned_model"},
        "sweep": {"kind": "heads", "masks": 6, "masks_per_pass": 3, "prefix_reuse": True, "metric": "accuracy",
                  "higher_is_better": True, "baseline_score": 0.75, "baseline_loss": 0.6,
                  "scores": tables["sweep_scores.npy"], "delta": tables["sweep_delta.npy"],
                  "most_harmful": [{"layer": 0, "head": 1, "delta": -0.05}, {"layer": 1, "head": 0, "delta": -0.01}],
                  "batches": 2, "seconds": 3.0},
        "seconds_total": 9.5,
    })


def patterns() -> dict:
    maps = np.full((2, 3, 3), 1 / 3).round(6).tolist()
    return {"heads": [{"role": "most important", "layer": 0, "head": 1, "importance": 1.0},
                      {"role": "least important", "layer": 1, "head": 2, "importance": 0.0}],
            "examples": [{"row": 0, "length": 3, "shown": 3, "tokens": ["[CLS]", "hello", "[SEP]"], "maps": maps}],
            "source": "hand-written"}


def write_run(directory, *, summary_payload: dict | None = None, patterns_payload: dict | None = None,
              tables: dict | None = None):
    """Write the run into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in (TABLES if tables is None else tables).items():
        np.save(directory / name, array)
    (directory / "summary.json").write_text(json.dumps(summary() if summary_payload is None else summary_payload))
    (directory / "attention_patterns.json").write_text(json.dumps(patterns() if patterns_payload is None
                                                                  else patterns_payload))
    return directory

"""Issue 20's CPU memory target at a small size, through the command line in fresh processes: the LM importance
under --max-memory set to half of the unconstrained run's peak resident memory equals the unconstrained run's and
stays within the limit (benchmarks/memory_target.py measures the twin itself)."""

from __future__ import annotations

import json

import pytest

from fastbertology.bench.memory_target import corpus_text, memory_target, save_random_llama
from fastbertology.bench.workloads import ModelSize

# a vocabulary of 32000 makes the logits most of the unconstrained peak, as in the twin
SMALL_LLAMA = ModelSize("llama", 2, 4, 64, 128, 32000, 1024, kv_heads=2)


def test_half_the_memory_gives_the_same_importance(tmp_path):
    text = corpus_text()[:150_000]
    data = tmp_path / "docs.txt"
    data.write_text(text)
    model = save_random_llama(tmp_path / "model", SMALL_LLAMA, text)
    free, bounded = memory_target(model, data, tmp_path, seq=1024, batch=2, blocks=2, threads=1)
    assert not free["checkpointing"] and free["loss_chunk_tokens"] is None
    assert bounded["loss_chunk_tokens"] is not None  # (and checkpointing, when chunks alone do not fit)
    assert bounded["within_limit"] and bounded["peak"] <= bounded["max_memory"] < free["peak"]
    assert bounded["importance_diff"] <= 1e-6
    assert "Memory plan: weights" in bounded["stdout"] and "language-model loss in chunks of" in bounded["stdout"]


def _importance(tmp_path, *extra):
    from cli_models import save_tiny_gpt2, sentences

    from fastbertology.cli import main

    model = save_tiny_gpt2(tmp_path / "gpt2")
    data = tmp_path / "text.txt"
    data.write_text(" ".join(sentences(60)))
    return main(["importance", "--model", str(model), "--data", str(data), "--task", "lm", "--max-seq-length", "32",
                 "--batch-size", "4", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "out"),
                 *extra])


@pytest.mark.parametrize("size", ["24", "lots", "0MiB", "24 GiBs"])
def test_bad_max_memory_is_refused_before_loading(tmp_path, capsys, size):
    assert _importance(tmp_path, "--max-memory", size) == 2
    err = capsys.readouterr().err
    assert "--max-memory: " in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_max_memory_too_small_is_refused_with_numbers(tmp_path, capsys):
    assert _importance(tmp_path, "--max-memory", "1MiB") == 2
    err = capsys.readouterr().err
    assert "--max-memory: the process already reached" in err and "raise --max-memory above" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_memory_plan_is_printed_and_written(tmp_path, capsys):
    assert _importance(tmp_path, "--max-memory", "20GiB") == 0
    out = capsys.readouterr().out
    assert out.index("Memory plan: weights") < out.index("Head importance")
    memory = json.loads((tmp_path / "out" / "summary.json").read_text())["memory"]
    assert memory["max_memory"] == 20 * 2**30 and memory["within_limit"] is True and memory["peak"] > 0
    assert memory["plan"]["checkpointing"] is False and memory["plan"]["longest_sequence"] == 32

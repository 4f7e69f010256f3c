"""Issue 20's CPU memory target at a small size, through the command line in fresh processes: the LM importance
under --max-memory set to half of the unconstrained run's peak resident memory equals the unconstrained run's and
stays within the limit (benchmarks/memory_target.py measures the twin itself)."""

from __future__ import annotations

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
    assert bounded["checkpointing"] and bounded["loss_chunk_tokens"] is not None
    assert bounded["within_limit"] and bounded["peak"] <= bounded["max_memory"] < free["peak"]
    assert bounded["importance_diff"] <= 1e-6
    assert "Memory plan: weights" in bounded["stdout"] and "checkpointing on" in bounded["stdout"]

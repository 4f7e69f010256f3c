"""Issue 20's CPU memory target, measured through the command line: ``fastbertology importance --task lm`` on a
random-init Llama and Python's documentation, once with the default budget and once with ``--max-memory`` set to
half of that run's peak resident memory; each run in a fresh process (its peak is the process's own).

What a row holds: the run's ``--max-memory`` (or None), the plan (checkpointing, loss chunk, estimated peak), the
measured peak (``summary.json``'s ``memory.peak``: the process's peak RSS), seconds and tokens per second of the
importance pass, and for the constrained run the largest relative difference of its raw importance from the
unconstrained run's (``max |a - b| / max |b|``); each run's printed memory plan is in its row's ``stdout``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .workloads import ModelSize, build_model


def corpus_text() -> str:
    """Python's own reference documentation (``pydoc_data.topics``), one topic after another."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def save_random_llama(directory: Path, size: ModelSize, text: str) -> Path:
    """A random-init Llama of ``size`` (fp32, safetensors) with a byte-level BPE tokenizer trained on ``text`` (at
    most ``size.vocab`` tokens), saved in ``directory``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.split("\n\n"), vocab_size=size.vocab, min_frequency=2, special_tokens=["<|eos|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>", pad_token="<|eos|>")
    tokenizer.model_max_length = size.positions
    model = build_model(size)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def run_importance(model_dir: Path, data: Path, output_dir: Path, *, seq: int, batch: int, blocks: int,
                   max_memory: str | None = None, threads: int | None = None) -> dict:
    """One ``fastbertology importance --task lm`` run in a fresh process; its summary's memory section and timings
    and its raw importance ``[L, H]``."""
    command = [sys.executable, "-m", "fastbertology", "importance", "--model", str(model_dir), "--data", str(data),
               "--task", "lm", "--max-seq-length", str(seq), "--batch-size", str(batch), "--data-subset",
               str(blocks), "--device", "cpu", "--no-progress", "--overwrite", "--output-dir", str(output_dir)]
    if max_memory is not None:
        command += ["--max-memory", max_memory]
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
    summary = json.loads((output_dir / "summary.json").read_text())
    importance = summary["importance"]
    plan = summary["memory"]["plan"]
    return {"max_memory": summary["memory"]["max_memory"], "checkpointing": plan["checkpointing"],
            "loss_chunk_tokens": plan["loss_chunk_tokens"], "estimated_peak": plan["estimated_peak"],
            "peak": summary["memory"]["peak"], "within_limit": summary["memory"]["within_limit"],
            "pass_seconds": importance["seconds"], "tokens": importance["tokens"],
            "tokens_per_s": importance["tokens"] / importance["seconds"], "process_seconds": seconds,
            "raw_importance": np.asarray(importance["raw_importance"], dtype=np.float64), "stdout": finished.stdout}


def memory_target(model_dir: Path, data: Path, work: Path, *, seq: int, batch: int, blocks: int,
                  threads: int | None = None, fractions: tuple[float, ...] = (0.5,)) -> list[dict]:
    """The unconstrained run, then one run under ``--max-memory`` = each of ``fractions`` of its peak (in MiB);
    every row has ``importance_diff`` against the unconstrained run's."""
    options = dict(seq=seq, batch=batch, blocks=blocks, threads=threads)
    free = run_importance(model_dir, data, work / "unconstrained", **options)
    free["importance_diff"] = 0.0
    rows, reference = [free], free["raw_importance"]
    for index, fraction in enumerate(fractions):
        limit = f"{int(free['peak'] * fraction) // 2**20}MiB"
        bounded = run_importance(model_dir, data, work / f"bounded-{index}", max_memory=limit, **options)
        bounded["importance_diff"] = float(np.abs(bounded["raw_importance"] - reference).max()
                                           / np.abs(reference).max())
        rows.append(bounded)
    return rows


def _mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| --max-memory (MiB) | checkpointing | loss chunk (tokens) | estimated peak (MiB) | peak RSS (MiB) | "
             "within | importance pass (s) | tokens/s | importance vs unconstrained |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {_mib(row['max_memory'])} | {'on' if row['checkpointing'] else 'off'} | "
                     f"{row['loss_chunk_tokens'] or 'all'} | {_mib(row['estimated_peak'])} | {_mib(row['peak'])} | "
                     f"{'—' if row['within_limit'] is None else 'yes' if row['within_limit'] else 'NO'} | "
                     f"{row['pass_seconds']:.1f} | {row['tokens_per_s']:,.0f} | {row['importance_diff']:.1e} |")
    return "\n".join(lines)

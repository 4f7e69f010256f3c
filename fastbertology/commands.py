"""The analysis commands — ``importance``, ``mask``, ``prune``, ``demo`` — and ``report``.

Each takes the parsed options (from :mod:`fastbertology.cli`) and a :class:`~fastbertology.console.Console`, sets the
run up with :mod:`fastbertology.run_setup`, runs its steps and writes the outputs (rank 0 only under torchrun):

* importance step: ``head_importance.npy``, ``attn_entropy.npy``, ``attn_max_prob.npy`` ``[L, H]``, their PNG
  heatmaps, ``attention_patterns.json`` (the most and least important heads on a few examples);
* masking step: ``head_mask.npy`` ``[L, H]`` and ``masking_curve.png``;
* pruning step: ``pruned_model/`` (safetensors; reload with :func:`fastbertology.pruning.load_pruned`);
* always: ``summary.json`` (options, setup, environment, results, timings) and ``report.html``.

The output directory is one transaction (:mod:`fastbertology.run_directory`): locked for the run's life, the
outputs written into a staging directory beside it and moved into place only when the run has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from . import distributed, interrupts, plots
from .attention_patterns import attention_patterns, choose_rows, extreme_heads
from .console import Console, format_table
from .data import demo_pairs
from .degenerate import zero_importance_warning
from .distributed import analysis_reducer, shard_checked
from .head_types import HEAD_TYPES, check_head_type_options, head_type_scores
from .importance import analyze_heads, evaluate_metric
from .loading import minilm_path, resolve_device
from .mask_files import check_mask_shape, read_pruning_mask
from .masking import iterative_masking
from .memory_plan import (
    current_memory,
    device_memory,
    format_bytes,
    parse_memory_size,
    peak_memory,
    plan_memory,
    return_freed_memory,
)
from .model_sharding import check_sharding, join_patterns, loading_options, shard_run
from .outputs import OutputWriteError, apply_umask, check_output_dir, make_temporary_dir, write_json, write_npy
from .pruning import count_parameters, heads_to_prune_from_mask, prune_heads
from .report import write_report
from .run_directory import RunDirectory, locked_run_directory, open_run_directory
from .run_setup import Run, RunOptions, check_options, resolve_model, setup
from .runs import default_output_dir, describe_setup, finish, new_summary, subtitle
from .tasks.language_modeling import chunkable_vocabulary

DEMO_MODEL_LABEL = "all-MiniLM-L6-v2"
DEMO_DATA_LABEL = "Python documentation pairs"


@dataclass
class Inputs:
    """What :func:`check_inputs` found: the model's local directory and ``--head-mask``'s array, already read."""

    model_path: str
    head_mask: np.ndarray | None = None  # prune --head-mask: [L, H] float32 of 0 / 1
    max_memory: int | None = None  # --max-memory in bytes


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_inputs(args, options: RunOptions, *, model_path=None) -> Inputs:
    """Every option and path of a command before any work (nothing is loaded or written); ``~`` expanded."""
    for name in ("output_dir", "head_mask"):
        if getattr(args, name, None) is not None:
            setattr(args, name, os.path.expanduser(str(getattr(args, name))))
    if hasattr(args, "masking_threshold"):
        _require(0 < args.masking_threshold <= 1, "--masking-threshold must be in (0, 1] (a fraction of the "
                                                  f"original score), got {args.masking_threshold}")
        _require(0 < args.masking_amount < 1, "--masking-amount must be in (0, 1) (the fraction of heads masked "
                                              f"per step), got {args.masking_amount}")
    if hasattr(args, "pairs"):
        _require(args.pairs >= 1, f"--pairs must be at least 1, got {args.pairs}")
    if getattr(args, "head_types", False):
        _require(args.induction_period >= 1, f"--induction-period must be positive, got {args.induction_period}")
        _require(args.induction_sequences >= 1,
                 f"--induction-sequences must be positive, got {args.induction_sequences}")
    check_options(options)
    max_memory = parse_memory_size(args.max_memory) if getattr(args, "max_memory", None) is not None else None
    head_mask = read_pruning_mask(args.head_mask) if getattr(args, "head_mask", None) else None
    return Inputs(model_path=resolve_model(model_path or options.model), head_mask=head_mask, max_memory=max_memory)


def _open_output(args) -> RunDirectory | None:
    """The command's output directory, checked, locked and staged (rank 0 only; None elsewhere). Nothing appears
    at ``--output-dir`` before the run has succeeded."""
    if not distributed.is_main():
        return None
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.command)
    return open_run_directory(args.output_dir, lambda path: check_output_dir(path, overwrite=args.overwrite))


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------
def _analysis_options(args, run: Run) -> dict:
    return dict(importance=args.importance, normalize_by_layer=not args.dont_normalize_importance_by_layer,
                normalize_global=not args.dont_normalize_global_importance, cuda_graphs=args.cuda_graphs,
                checkpoint_layers=run.checkpoint_layers)


def _say_graphs(console: Console, use: dict | None) -> None:
    """One line on the CUDA graphs of a pass, where they were asked for and a GPU is there (not on the CPU)."""
    if not use or use["mode"] == "off" or (not use["enabled"] and use["reason"].startswith("no CUDA device")):
        return
    if use["enabled"]:
        console.say(f"CUDA graphs: {use['replays']} steps replayed, {use['eager_steps']} eager "
                    f"({use['captured']} graphs captured)")
    else:
        console.warn(f"CUDA graphs off, steps ran eagerly: {use['reason']}")


def _heatmaps(output: Path, analysis, description: dict) -> None:
    if not plots.available():
        return
    line = subtitle(description)
    plots.heatmap(output / "head_importance.png", analysis.importance, title="Head importance |dL/dmask|",
                  subtitle=line, colorbar_label="importance (normalised)")
    plots.heatmap(output / "attn_entropy.png", analysis.entropy, title="Attention entropy (mean per token)",
                  subtitle=line, colorbar_label="nats", cmap="magma")
    plots.heatmap(output / "attn_max_prob.png", analysis.max_prob, title="Max attention probability (mean per token)",
                  subtitle=line, colorbar_label="probability")


def warn_all(console: Console, description: dict) -> None:
    """Print the run's warnings (:mod:`fastbertology.degenerate`); they are in ``summary.json`` already."""
    for warning in description.get("warnings", []):
        console.warn(warning)


def importance_step(args, console: Console, run: Run, output: RunDirectory | None, summary: dict):
    """Importance, entropy and max probability in one pass; tables, heatmaps, attention patterns."""
    started = time.perf_counter()
    analysis = analyze_heads(run.model, run.batches, run.task, progress=console.progress and output is not None,
                             reduce=analysis_reducer(run.model, run.task), **_analysis_options(args, run))
    seconds = time.perf_counter() - started
    if output is None:  # not rank 0
        if getattr(run.model, "_fastbertology_sharded", False):  # rank 0's pattern pass needs every process
            join_patterns(run, analysis.importance)
        return analysis
    write_importance(console, run, analysis, output, summary, seconds=seconds, mode=args.importance)
    summary["importance"]["cuda_graphs"] = analysis.cuda_graphs
    _say_graphs(console, analysis.cuda_graphs)
    console.say(format_table(analysis.importance, title="Head importance (normalised; rows = layers)"))
    console.say(format_table(analysis.entropy, title="\nAttention entropy (nats per token)"))
    console.say(format_table(analysis.max_prob, title="\nMax attention probability (mean per token)"))
    console.say(f"\n{run.description['metric']} = {analysis.metric:.4f} on {analysis.examples} examples "
                f"({seconds:.1f} s for importance + entropy + metric)")
    patterns_step(run, analysis.importance, output, summary)
    return analysis


def write_importance(console: Console, run: Run, analysis, output: RunDirectory, summary: dict, *, seconds: float,
                     mode: str) -> None:
    """The importance step's files (tables, heatmaps), its warning of an all-zero table, and ``summary.json``'s
    ``importance`` section (what the importance command and the streamed one share)."""
    write_npy(output / "head_importance.npy", analysis.importance.numpy())
    write_npy(output / "attn_entropy.npy", analysis.entropy.numpy())
    write_npy(output / "attn_max_prob.npy", analysis.max_prob.numpy())
    _heatmaps(output, analysis, run.description)
    zero = zero_importance_warning(analysis.raw_importance)
    if zero is not None:
        console.warn(zero)
        summary["setup"].setdefault("warnings", []).append(zero)
    summary["importance"] = {
        "metric": analysis.metric, "loss": analysis.loss, "tokens": analysis.tokens, "examples": analysis.examples,
        "seconds": seconds, "mode": mode, "importance": analysis.importance,
        "raw_importance": analysis.raw_importance, "entropy": analysis.entropy, "max_prob": analysis.max_prob,
    }


def patterns_step(run: Run, importance: torch.Tensor, output: RunDirectory, summary: dict, *, count: int = 3,
                  max_tokens: int = 32) -> None:
    """``attention_patterns.json``: the maps of the most and least important heads on ``count`` examples of the
    first batch (the model inputs ``input_ids``: for retrieval, the queries)."""
    started = time.perf_counter()
    batch = run.batches[0]
    heads = extreme_heads(importance)
    rows = choose_rows(batch["attention_mask"], count=count, max_tokens=max_tokens)
    patterns = attention_patterns(run.model, batch, [(layer, head) for _, layer, head in heads], rows,
                                  max_tokens=max_tokens)
    write_json(output / "attention_patterns.json", {
        "heads": [{"role": role, "layer": layer, "head": head, "importance": float(importance[layer, head])}
                  for role, layer, head in heads],
        "examples": [{"row": p.row, "length": p.length, "shown": p.shown,
                      "tokens": run.tokenizer.convert_ids_to_tokens(p.input_ids),
                      "maps": [np.round(p.maps[(layer, head)].numpy().astype(np.float64), 6)
                               for _, layer, head in heads]} for p in patterns],
        "source": "output_attentions=True of the patched model (probabilities per query row, first batch)",
    })
    summary["patterns"] = {"seconds": time.perf_counter() - started, "examples": len(patterns)}


def masking_step(args, console: Console, run: Run, output: RunDirectory | None, summary: dict, initial=None):
    """Iterative masking from ``initial`` (the importance step's analysis); the mask and its curve."""
    started = time.perf_counter()
    result = iterative_masking(run.model, run.batches, run.task, masking_amount=args.masking_amount,
                               masking_threshold=args.masking_threshold,
                               progress=console.progress and output is not None, initial=initial,
                               reduce=analysis_reducer(run.model, run.task), **_analysis_options(args, run))
    seconds = time.perf_counter() - started
    if output is None:  # not rank 0
        return result
    metric = run.description["metric"]
    write_npy(output / "head_mask.npy", result.head_mask.numpy())
    threshold_score = result.original_score * args.masking_threshold if result.higher_is_better else \
        result.original_score / args.masking_threshold
    if plots.available():
        plots.masking_curve(output / "masking_curve.png", result.curve, metric_name=metric,
                            threshold_score=threshold_score, subtitle=subtitle(run.description))
    summary["masking"] = {"original_score": result.original_score, "final_score": result.final_score,
                          "threshold_score": threshold_score, "higher_is_better": result.higher_is_better,
                          "heads_remaining": int(result.head_mask.sum()), "heads_total": result.head_mask.numel(),
                          "curve": result.curve, "seconds": seconds, "threshold": args.masking_threshold,
                          "amount": args.masking_amount, "head_mask": result.head_mask,
                          "cuda_graphs": result.cuda_graphs}
    _say_graphs(console, result.cuda_graphs)
    console.say("\nIterative masking: heads remaining -> " + metric)
    for point in result.curve:
        console.say(f"  {point['heads_remaining']:>4d}  {point['score']:.4f}")
    console.say(format_table(result.head_mask.double(), title="\nFinal head mask (1 = kept)", digits=0))
    return result


def pruning_step(args, console: Console, run: Run, head_mask, output: RunDirectory, summary: dict) -> None:
    """Score with the mask, prune the masked heads, score the pruned model, save it."""
    model, task, batches = run.model, run.task, run.batches
    mask = torch.as_tensor(head_mask, dtype=torch.float32).to(run.device)
    started = time.perf_counter()
    masked_score = evaluate_metric(model, batches, task, head_mask=mask, progress=console.progress,
                                   desc="masked model")
    masked_seconds = time.perf_counter() - started
    parameters_before = count_parameters(model)
    prune_heads(model, heads_to_prune_from_mask(mask.cpu()))
    parameters_after = count_parameters(model)
    started = time.perf_counter()
    pruned_score = evaluate_metric(model, batches, task, progress=console.progress, desc="pruned model")
    pruned_seconds = time.perf_counter() - started
    model_dir = output / "pruned_model"
    _save_model_atomic(model, run.tokenizer, model_dir)
    pruned = int((mask == 0).sum())
    summary["pruning"] = {
        "masked_score": masked_score, "pruned_score": pruned_score, "parameters_before": parameters_before,
        "parameters_after": parameters_after, "masked_seconds": masked_seconds, "pruned_seconds": pruned_seconds,
        "heads_pruned": pruned, "heads_total": mask.numel(), "model_dir": str(output.path / "pruned_model"),
    }
    console.say(f"\nPruning {pruned} heads: parameters {parameters_before:,} -> {parameters_after:,} "
                f"({100 * (1 - parameters_after / parameters_before):.1f}% fewer)")
    console.say(f"  score with masked heads: {masked_score:.4f}   pruned model: {pruned_score:.4f}")
    console.say(f"  evaluation time: masked {masked_seconds:.2f} s, pruned {pruned_seconds:.2f} s")


def _save_model_atomic(model, tokenizer, directory: Path) -> None:
    """save_pretrained into a temporary sibling directory, then rename it into place."""
    temporary = None
    try:
        temporary = make_temporary_dir(directory)  # mode 0777 minus the umask, like every other output
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        apply_umask(temporary)  # safetensors writes its files 0600 whatever the umask
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temporary, directory)
    except BaseException as error:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)) and not isinstance(error, OutputWriteError):
            raise OutputWriteError(f"cannot save the pruned model ({getattr(error, 'strerror', None) or error})") \
                from None
        raise


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------
def _run_command(args, console: Console, steps, *, data_parallel: bool = False, examples=None, model_path=None,
                 **labels) -> int:
    """Check every option and path, check the output directory, set up model, data and task, run
    ``steps(run, inputs, output, summary)``, write the summary and the report. ``data_parallel``: under torchrun,
    each process takes its shard of the batches. ``labels``: ``model_label`` / ``data_label`` for titles."""
    started = time.perf_counter()
    options = RunOptions.pick(vars(args), **labels)
    inputs = check_inputs(args, options, model_path=model_path)  # fail fast, before the slow setup
    output = _open_output(args)  # locked from here to the end, whatever the end
    sharded = check_sharding(args)  # --shard-model: docs/large-models.md
    with output if output is not None else contextlib.nullcontext():
        interrupts.stage("setup")
        run = setup(loading_options(options) if sharded else options, examples=examples, model_path=inputs.model_path)
        if inputs.head_mask is not None:
            check_mask_shape(inputs.head_mask, run.model, args.head_mask)
        if data_parallel:
            run.batches = shard_checked(run.model, run.batches)
        if sharded:
            shard_run(run, resolve_device(options.device), options.backend)
        describe_setup(console, run.description)
        warn_all(console, run.description)
        if not plots.available():
            console.warn(plots.MISSING)
        summary = new_summary(args.command, vars(args), run.description)
        if hasattr(args, "max_memory"):
            memory_plan_step(console, run, inputs.max_memory, summary)
        steps(run, inputs, output, summary)
        if hasattr(args, "max_memory"):
            memory_peak_step(console, run, inputs.max_memory, summary)
        interrupts.stage("finish")
        finish(console, output, summary, started)
    return 0


def memory_plan_step(console: Console, run: Run, limit: int | None, summary: dict) -> None:
    """The memory plan (:mod:`fastbertology.memory_plan`), printed and in ``summary.json`` before any work; it sets
    the run's layer checkpointing and the language-model loss chunk."""
    if run.device.type == "cpu":
        return_freed_memory()  # resident memory then follows the live tensors (heap holes are not given back)
    vocabulary = chunkable_vocabulary(run.task, run.model)
    budget, source = (limit, "--max-memory") if limit is not None else (
        device_memory(run.device), "the GPU's memory" if run.device.type == "cuda" else "memory available")
    plan = plan_memory(run.model, run.batches, vocabulary=vocabulary, device=run.device, budget=budget,
                       budget_source=source, in_use=current_memory(run.device), peak_so_far=peak_memory(run.device))
    console.say("Memory plan: " + "\n  ".join(plan.lines()))
    run.checkpoint_layers = plan.checkpointing
    if vocabulary is not None:
        run.task.loss_chunk_tokens = plan.loss_chunk_tokens
    summary["memory"] = {"plan": plan.to_json(), "max_memory": limit}


def memory_peak_step(console: Console, run: Run, limit: int | None, summary: dict) -> None:
    """The measured peak (``torch.cuda.max_memory_allocated`` / peak resident memory) beside the plan's estimate."""
    peak = peak_memory(run.device)
    summary["memory"].update(peak=peak, within_limit=None if limit is None else peak <= limit)
    line = f"Peak memory {format_bytes(peak)} (estimated {format_bytes(summary['memory']['plan']['estimated_peak'])})"
    if limit is not None and peak > limit:
        console.warn(f"{line} exceeded --max-memory {format_bytes(limit)}: the estimate was too low for this run; "
                     "lower --batch-size or --max-seq-length")
    else:
        console.say(line + (f", within --max-memory {format_bytes(limit)}" if limit is not None else ""))


def _importance_and_masking(args, console, run, output, summary):
    analysis = importance_step(args, console, run, output, summary)
    return masking_step(args, console, run, output, summary, initial=analysis)


def head_types_step(args, console: Console, run: Run, output: Path | None, summary: dict) -> None:
    """Head-type scores (:mod:`fastbertology.head_types`); ``head_scores.json``."""
    started = time.perf_counter()
    scores = head_type_scores(run.model, run.batches, induction_period=args.induction_period,
                              induction_count=args.induction_sequences, seed=args.seed, batch_size=args.batch_size,
                              progress=console.progress and output is not None,
                              sum_tensors=distributed.all_reduce_sums if distributed.is_distributed() else None)
    seconds = time.perf_counter() - started
    if output is None:  # not rank 0
        return
    tables = scores.tables()
    write_json(output / "head_scores.json", tables)
    summary["head_types"] = {"queries": scores.queries, "induction_period": scores.induction_period,
                             "induction_sequences": scores.induction_sequences, "seed": scores.seed,
                             "seconds": seconds, **tables}
    for name in HEAD_TYPES:
        console.say(format_table(tables[name], title=f"\n{name.replace('_', '-')} score (mean probability)"))
    console.say(f"\nHead-type scores in {seconds:.1f} s")


def run_importance(args, console: Console) -> int:
    def steps(run, inputs, output, summary):
        if args.head_types:  # before the importance pass: a bad option fails at once
            check_head_type_options(run.model, induction_period=args.induction_period)
        importance_step(args, console, run, output, summary)
        if args.head_types:
            head_types_step(args, console, run, output, summary)

    return _run_command(args, console, steps, data_parallel=True)


def run_mask(args, console: Console) -> int:
    return _run_command(args, console, lambda run, inputs, output, summary:
                        _importance_and_masking(args, console, run, output, summary), data_parallel=True)


def run_prune(args, console: Console) -> int:
    def steps(run, inputs, output, summary):
        if inputs.head_mask is not None:
            head_mask = inputs.head_mask
            summary["head_mask_file"] = args.head_mask
        else:
            head_mask = _importance_and_masking(args, console, run, output, summary).head_mask
        pruning_step(args, console, run, head_mask, output, summary)

    return _run_command(args, console, steps)


def run_demo(args, console: Console) -> int:
    model_path = args.model or minilm_path()
    candidates = max(1, min(args.group_size, args.pairs))  # fewer pairs than --group-size: one group of them all
    console.say(f"fastbertology demo: pretrained MiniLM ({model_path})\nTask: given the first sentence of a paragraph "
                f"of Python's own documentation, find the sentences that follow it among {candidates} "
                f"candidates (chance = {1 / candidates:.3f})")

    def steps(run, inputs, output, summary):
        result = _importance_and_masking(args, console, run, output, summary)
        pruning_step(args, console, run, result.head_mask, output, summary)

    return _run_command(args, console, steps, examples=demo_pairs(args.pairs, name="--pairs"), model_path=model_path,
                        model_label=None if args.model else DEMO_MODEL_LABEL, data_label=DEMO_DATA_LABEL)


def run_report(args, console: Console) -> int:
    """Rebuild ``report.html`` in a finished run's directory from its files (under the directory's lock, so that
    it never interleaves with a run replacing the directory)."""
    with locked_run_directory(args.directory):
        path = write_report(os.path.expanduser(args.directory))
    console.say(f"Wrote {path}")
    return 0

"""``fastbertology patching``: activation (and attribution) patching of every head (:mod:`.activation_patching`).

Not to be confused with :mod:`fastbertology.patching`, the model patch. The data is a .csv/.tsv/.jsonl file whose
rows have ``text`` and ``corrupted_text`` (and ``text_pair`` / ``corrupted_text_pair``) of the same token length,
with ``label`` for classification, or without for language modelling (``--task lm``: one example per row).

Outputs: ``patching_scores.npy`` ``[L, H]`` (share of the gap recovered), ``patching_values.npy`` (the patched
runs' loss or metric), with ``--attribution`` ``attribution_scores.npy`` (the first-order estimate of the scores)
and ``attribution_delta.npy`` (its estimated loss change), PNG heatmaps, ``summary.json``, ``report.html``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from . import interrupts, plots
from .activation_patching import activation_patching, corrupted_examples, pair_batches, rank_correlation
from .batching import check_token_ids, make_batches, move_batch
from .commands import _open_output
from .console import Console, format_table
from .data import GLUE_TASKS, load_examples
from .loading import usable_positions
from .outputs import write_npy
from .run_setup import RunOptions, check_options, resolve_model, setup
from .runs import describe_setup, finish, new_summary, subtitle


def _check(args, options: RunOptions) -> str:
    """Options and the data path before any work; the objective."""
    if args.heads_per_pass is not None and args.heads_per_pass < 1:
        raise ValueError(f"--heads-per-pass must be positive, got {args.heads_per_pass}")
    if options.task and options.task.lower() in GLUE_TASKS:
        raise ValueError(f"--task {options.task}: GLUE directories have no corrupted texts; give --data a .csv, .tsv "
                         "or .jsonl file with text and corrupted_text columns (and label), without --task")
    objective = check_options(options, rows=True)
    if objective == "retrieval":
        raise ValueError("--task retrieval runs the model twice per batch (queries and passages); activation "
                         "patching takes classification data (text, corrupted_text, label) or --task lm")
    if args.output_dir is not None:
        args.output_dir = os.path.expanduser(str(args.output_dir))
    return objective


def _paired_batches(run, examples, options: RunOptions) -> list[dict]:
    """The run's clean batches with the corrupted inputs of the same examples added."""
    corrupted = corrupted_examples(examples)
    batches = make_batches(corrupted, run.tokenizer, max_seq_length=options.max_seq_length,
                           batch_size=options.batch_size, max_positions=usable_positions(run.model.config))
    check_token_ids(batches, corrupted, vocab_size=run.model.get_input_embeddings().num_embeddings,
                    type_vocab_size=getattr(run.model.config, "type_vocab_size", None))
    return pair_batches(run.batches, [move_batch(batch, run.device) for batch in batches], examples=examples)


def _write(output: Path, result, description: dict) -> None:
    write_npy(output / "patching_scores.npy", result.scores.numpy())
    write_npy(output / "patching_values.npy", result.values.numpy())
    if result.attribution is not None:
        write_npy(output / "attribution_scores.npy", result.attribution.numpy())
        write_npy(output / "attribution_delta.npy", result.attribution_delta.numpy())
    if not plots.available() or bool(result.scores.isnan().all()):  # no gap: nothing to draw
        return
    line = subtitle(description)
    what = f"share of the {result.score} gap recovered ({result.direction})"
    plots.heatmap(output / "patching_scores.png", result.scores, title="Activation patching per head", subtitle=line,
                  colorbar_label=what, diverging=True)
    if result.attribution is not None:
        plots.heatmap(output / "attribution_scores.png", result.attribution, subtitle=line, diverging=True,
                      title="Attribution patching per head (first-order estimate)", colorbar_label=what)


def run_patching(args, console: Console) -> int:
    started = time.perf_counter()
    options = RunOptions.pick(vars(args))
    objective = _check(args, options)
    model_path = resolve_model(options.model)
    examples = load_examples(options.data, require_label=objective != "lm", data_subset=options.data_subset)
    corrupted_examples(examples)  # every example has its corrupted text, before the model is loaded
    output = _open_output(args)  # checked, locked for the run's life, staged
    with output:
        interrupts.stage("setup")
        _patch(args, console, options, objective, model_path, examples, output, started)
    return 0


def _patch(args, console: Console, options: RunOptions, objective: str, model_path, examples, output,
           started: float) -> None:
    """The run proper, with the output directory open."""
    run = setup(options, examples=examples, model_path=model_path)
    if objective == "lm":
        run.description["data"] = (f"{Path(options.data).name}: {len(examples)} examples (one per row), each scored "
                                   "by its next-token loss")
    batches = _paired_batches(run, examples, options)
    describe_setup(console, run.description)
    summary = new_summary(args.command, vars(args), run.description)
    result = activation_patching(run.model, batches, run.task, direction=args.direction, score=args.score,
                                 attribution=args.attribution, heads_per_pass=args.heads_per_pass,
                                 reuse_prefix=not args.no_prefix_reuse, progress=console.progress)
    if math.isnan(result.base_value - result.source_value) or result.base_value == result.source_value:
        console.warn(f"the clean and corrupted inputs have the same {result.score} ({result.base_value:.6g}): there "
                     "is no gap to recover, so the scores are undefined (NaN)")
    _write(output, result, run.description)
    correlation = rank_correlation(result.scores, result.attribution) if result.attribution is not None else None
    summary["patching"] = {
        "direction": result.direction, "score": result.score, "metric": result.metric_name,
        "higher_is_better": result.higher_is_better, "scores": result.scores, "values": result.values,
        "base_value": result.base_value, "source_value": result.source_value, "clean_loss": result.clean_loss,
        "corrupted_loss": result.corrupted_loss, "clean_metric": result.clean_metric,
        "corrupted_metric": result.corrupted_metric, "heads_per_pass": result.heads_per_pass,
        "batches": result.batches, "seconds": result.seconds, "prefix_reuse": not args.no_prefix_reuse,
        "attribution": result.attribution, "attribution_delta": result.attribution_delta,
        "attribution_seconds": result.attribution_seconds if result.attribution is not None else None,
        "rank_correlation": correlation,
    }
    console.say(f"clean: loss {result.clean_loss:.4f}, {result.metric_name} {result.clean_metric:.4f}; corrupted: "
                f"loss {result.corrupted_loss:.4f}, {result.metric_name} {result.corrupted_metric:.4f}")
    console.say(format_table(result.scores, title=f"\nActivation patching ({result.direction}): share of the "
                                                  f"{result.score} gap recovered (rows = layers)"))
    if result.attribution is not None:
        console.say(format_table(result.attribution, title="\nAttribution patching (first-order estimate)"))
        console.say("\nSpearman rank correlation of the two: " + (
            f"{correlation:.3f}" if math.isfinite(correlation) else
            "undefined (fewer than 2 heads with both scores, or a table of equal values)"))
    finish(console, output, summary, started)

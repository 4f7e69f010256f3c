"""``fastbertology sweep``: ablation sweeps from the command line, resumable and data-parallel under torchrun.

The library side is :mod:`fastbertology.sweeps`; the checkpoint format and its checks are
:mod:`fastbertology.sweep_checkpoint`. ``--resume`` continues from the checkpoint in ``--output-dir`` without
recomputing the finished batches and ends with exactly the results of an uninterrupted run; it never writes into a
non-empty directory that holds no checkpoint (without ``--overwrite``).

Outputs (rank 0 only): ``sweep_scores.npy``, ``sweep_delta.npy`` (score - unmasked score), ``sweep_losses.npy``
— ``[L, H]`` for ``--kind heads``, ``[L]`` for ``--kind layers``, ``[M]`` for ``--masks`` — ``sweep_masks.npy``
``[M, L, H]``, ``sweep_delta.png``, ``summary.json`` and ``report.html``. Like every command's, the outputs are
staged and moved into place when the sweep has succeeded (:mod:`fastbertology.run_directory`); the checkpoint is
the one file written into ``--output-dir`` while the sweep runs, so that a killed sweep can be resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed, interrupts, plots
from .commands import warn_all
from .console import Console, format_table
from .degenerate import resample_warnings
from .mask_files import read_sweep_masks
from .outputs import OutputDirectoryError, check_output_dir, check_writable_dir, write_npy
from .run_directory import RunDirectory, open_run_directory
from .run_setup import RunOptions, check_options, resolve_model, setup
from .runs import default_output_dir, describe_setup, finish, new_summary, subtitle
from .sweep_checkpoint import (
    CHECKPOINT,
    decode_state,
    encode_state,
    json_normal,
    read_checkpoint,
    validate_checkpoint,
    write_checkpoint,
)
from .sweeps import ablation_sweep, steps_for, sweep_masks

# Test hook: exit abruptly (as if killed) right after writing this many checkpoints.
STOP_AFTER_ENV = "FASTBERTOLOGY_SWEEP_STOP_AFTER_CHECKPOINTS"
STOPPED_EXIT_CODE = 75


class RankZeroError(RuntimeError):
    """Rank 0 failed in a step that only it runs; the other processes stop with its message."""


@dataclass
class SweepInputs:
    """What :func:`check_inputs` found: the model's directory and the ``--masks`` array ``[M, L, H]`` (or None)."""

    model_path: str
    masks: np.ndarray | None = None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_inputs(args, options: RunOptions) -> SweepInputs:
    """Every option and path of the sweep before any work (nothing is loaded or written); ``~`` expanded."""
    for name in ("output_dir", "masks"):
        if getattr(args, name, None) is not None:
            setattr(args, name, os.path.expanduser(str(getattr(args, name))))
    _require(args.checkpoint_every >= 1, f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    _require(args.masks_per_pass is None or args.masks_per_pass >= 1,
             f"--masks-per-pass must be positive, got {args.masks_per_pass}")
    _require(not (args.masks and args.kind), "--kind and --masks exclude each other: sweep the built-in masks or "
                                             "your own")
    _require(not args.resume or args.output_dir, "--resume needs --output-dir: the directory of the interrupted sweep")
    check_options(options)
    masks = read_sweep_masks(args.masks) if args.masks else None
    return SweepInputs(model_path=resolve_model(options.model), masks=masks)


def _on_main(function):
    """Run ``function`` on rank 0 only; every process gets its result or raises an error (no process is left
    waiting in a collective when rank 0 fails). Rank 0 raises the original exception; the others raise
    :class:`RankZeroError` with its message (any exception type works, whatever its constructor takes)."""
    outcome, failure = None, None
    if distributed.is_main():
        try:
            outcome = ("ok", function())
        except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            outcome, failure = ("error", f"{type(error).__name__}: {error}"), error
    outcome = distributed.broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome[0] == "error":
        raise RankZeroError(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def check_output(args) -> Path:
    """The sweep's output directory, checked and not created. Without ``--resume``: a directory holding a
    checkpoint needs ``--overwrite`` (or ``--resume``), any other non-empty one ``--overwrite``. With
    ``--resume``: a directory with a checkpoint is resumed; an empty or missing one starts from the beginning; a
    non-empty one without a checkpoint (other results) is refused unless ``--overwrite``, since the sweep's
    outputs and summary.json would replace files there."""
    if args.output_dir is None:
        args.output_dir = default_output_dir("sweep")
    path = Path(args.output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"output path {path} exists and is not a directory; choose another --output-dir")
    check_writable_dir(path)
    has_checkpoint = (path / CHECKPOINT).is_file()
    if args.resume:
        if not has_checkpoint and path.is_dir() and any(path.iterdir()) and not args.overwrite:
            raise OutputDirectoryError(
                f"--resume: output directory {path} holds no sweep checkpoint ({CHECKPOINT}) but other files "
                f"({', '.join(sorted(p.name for p in path.iterdir())[:5])}), which the sweep would overwrite. Give "
                "the directory of the interrupted sweep, an empty one, or pass --overwrite")
        return path
    if has_checkpoint and not args.overwrite:
        raise OutputDirectoryError(f"output directory {path} holds a sweep checkpoint ({CHECKPOINT}): pass --resume to "
                                   "continue that sweep, or --overwrite to start over")
    return check_output_dir(path, overwrite=args.overwrite)


def _load_masks(args, model, masks):
    """``(kind, masks [M, L, H])``: the built-in masks of ``--kind``, or ``masks`` (``--masks``) checked against
    the model."""
    if masks is None:
        return sweep_masks(model, args.kind or "heads")
    try:
        return sweep_masks(model, torch.from_numpy(np.ascontiguousarray(masks)).to(torch.float32))
    except ValueError as error:
        raise ValueError(f"--masks {args.masks}: {error}") from None


def _fingerprint(args, run, masks, kind, agreement, masks_per_pass) -> dict:
    options = {
        "kind": kind, "masks_shape": list(masks.shape),
        "masks_sha256": hashlib.sha256(masks.to(torch.float32).numpy().tobytes()).hexdigest()[:20],
        "masks_per_pass": masks_per_pass, "prefix_reuse": not args.no_prefix_reuse,
        "ablation": args.ablation, "ablation_seed": args.seed if args.ablation == "resample" else None,
        "task": run.description["task"], "metric": run.description["metric"], "objective": run.description["objective"],
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "data_subset": args.data_subset,
        "dtype": run.description["dtype"], "backend": args.backend, "device": run.device.type,
    }
    return json_normal({"options": options, "model": agreement["model"], "data": agreement["data"],
                        "processes": distributed.world_size()})


def _resume_state(console: Console, run, output: Path, fingerprint: dict, steps: int, masks: int):
    """The checkpointed state of this process, or None (no checkpoint: start from the beginning)."""
    total_batches, world = len(run.batches), distributed.world_size()
    shard_sizes = [len(range(r, total_batches, world)) for r in range(world)]
    path = output / CHECKPOINT

    def load():
        if not path.exists():
            return None
        payload = read_checkpoint(path, fingerprint)
        validate_checkpoint(payload, path, steps=steps, shard_sizes=shard_sizes, masks=masks, task=run.task)
        return payload

    payload = _on_main(load)
    if payload is None:
        console.say(f"No checkpoint in {output}: starting the sweep from the beginning")
        return None
    state = decode_state(payload["ranks"][distributed.rank()])
    console.say(f"Resuming the sweep in {output} after {state.steps_done} of {steps} batches")
    return state


def _checkpointer(args, path: Path, fingerprint: dict, steps: int):
    """The sweep's ``on_step``: every ``--checkpoint-every`` batches (and at the end) gather every process's state
    and write the checkpoint (rank 0)."""
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    written = [0]

    def on_step(state):
        if state.steps_done % args.checkpoint_every and state.steps_done != steps:
            return
        gathered = distributed.all_gather_objects(encode_state(state))
        if distributed.is_main():
            write_checkpoint(path, fingerprint, steps, gathered)
        written[0] += 1
        if stop_after and written[0] >= stop_after and state.steps_done < steps:
            distributed.barrier()
            os._exit(STOPPED_EXIT_CODE)

    return on_step


def run_sweep(args, console: Console) -> int:
    started = time.perf_counter()
    options = RunOptions.pick(vars(args))
    inputs = check_inputs(args, options)  # every option and path, before any work
    opened: list[RunDirectory] = []

    def open_output() -> str:  # rank 0: checked, locked for the sweep's life, staged
        if args.output_dir is None:
            args.output_dir = default_output_dir("sweep")
        opened.append(open_run_directory(args.output_dir, lambda path: check_output(args)))
        return str(opened[0].path)

    output = Path(_on_main(open_output))  # the final directory, on every rank
    directory = opened[0] if opened else None
    with directory if directory is not None else contextlib.nullcontext():
        interrupts.stage("setup")
        return _sweep(args, console, options, inputs, output, directory, started)


def _sweep(args, console: Console, options: RunOptions, inputs: SweepInputs, output: Path,
           directory: RunDirectory | None, started: float) -> int:
    """The sweep proper, with the output directory open (``directory``: rank 0 only)."""
    run = setup(options, model_path=inputs.model_path)
    kind, masks = _on_main(lambda: _load_masks(args, run.model, inputs.masks))
    agreement = distributed.check_agreement(run.model, run.batches)
    masks_per_pass = args.masks_per_pass or masks.shape[2]
    fingerprint = _fingerprint(args, run, masks, kind, agreement, masks_per_pass)
    total_batches = len(run.batches)
    steps = steps_for(total_batches, distributed.world_size())
    if args.ablation == "resample":
        run.description["warnings"] = [*run.description.get("warnings", []),
                                       *resample_warnings([run.task.batch_size(batch) for batch in run.batches])]
    describe_setup(console, run.description)
    warn_all(console, run.description)
    resume = _resume_state(console, run, output, fingerprint, steps, len(masks)) if args.resume else None
    resumed_at = resume.steps_done if resume is not None else 0  # the sweep advances the state in place
    summary = new_summary(args.command, vars(args), run.description)
    console.say(f"Sweep: {len(masks)} masks ({kind}) over {total_batches} batches"
                + (f" on {distributed.world_size()} processes" if distributed.is_distributed() else "")
                + f", {masks_per_pass} masks per pass, prefix reuse {'off' if args.no_prefix_reuse else 'on'}, "
                f"{args.ablation} ablation")
    result = ablation_sweep(
        run.model, distributed.shard(run.batches), run.task, kind=masks if kind == "masks" else kind,
        masks_per_pass=masks_per_pass, reuse_prefix=not args.no_prefix_reuse, progress=console.progress,
        resume=resume, steps=steps,
        on_step=_checkpointer(args, directory.live(CHECKPOINT) if directory else output / CHECKPOINT, fingerprint,
                              steps),
        reduce=distributed.sweep_reducer(run.task), ablation=args.ablation, seed=args.seed,
        sum_tensors=distributed.all_reduce_sums if distributed.is_distributed() else None,
    )
    if not distributed.is_main():
        return 0
    interrupts.stage("results")
    _write_results(console, directory, result, kind, masks, run.description)
    sign = 1 if result.higher_is_better else -1
    order = torch.argsort(sign * result.delta, stable=True)  # most harmful first
    summary["sweep"] = {
        "kind": kind, "masks": len(masks), "masks_per_pass": masks_per_pass, "prefix_reuse": not args.no_prefix_reuse,
        "ablation": args.ablation, "ablation_seed": args.seed if args.ablation == "resample" else None,
        "metric": result.metric_name, "higher_is_better": result.higher_is_better,
        "baseline_score": result.baseline_score, "baseline_loss": result.baseline_loss,
        "baseline_metrics": result.baseline_metrics,
        "scores": result.table(result.scores), "delta": result.table(), "losses": result.table(result.losses),
        "most_harmful": [_describe(kind, int(i), masks.shape[2]) | {"delta": float(result.delta[i])}
                         for i in order[:10]],
        "metrics": result.metrics, "batches": total_batches, "processes": distributed.world_size(),
        "resumed_after_batches": resumed_at,
        "seconds": time.perf_counter() - started,
        "model_fingerprint": agreement["model"], "data_fingerprint": agreement["data"],
    }
    finish(console, directory, summary, started)
    return 0


def _write_results(console: Console, output: RunDirectory, result, kind: str, masks, description: dict) -> None:
    """The sweep's arrays and heatmap, and its table printed."""
    write_npy(output / "sweep_scores.npy", result.table(result.scores).numpy())
    write_npy(output / "sweep_delta.npy", result.table().numpy())
    write_npy(output / "sweep_losses.npy", result.table(result.losses).numpy())
    write_npy(output / "sweep_masks.npy", result.masks.numpy())
    if plots.available():
        plots.heatmap(output / "sweep_delta.png", result.table(), diverging=True, subtitle=subtitle(description),
                      title=f"Change of {result.metric_name} when masked ({kind}; unmasked "
                            f"{result.baseline_score:.4g})", colorbar_label=f"Δ {result.metric_name}",
                      column_label="head" if kind == "heads" else "", row_label="mask" if kind == "masks" else "layer")
    console.say(f"\nUnmasked {result.metric_name} = {result.baseline_score:.4f}")
    if kind == "heads":
        console.say(format_table(result.table(), title=f"\n{result.metric_name} change when each head is masked (rows "
                                                       "= layers)", digits=4))
        return
    label = "layer" if kind == "layers" else "mask"
    for index, value in enumerate(result.delta.tolist()[:50]):
        console.say(f"  {label} {index:>4d}  {result.scores[index]:.4f}  ({value:+.4f})")


def _describe(kind: str, index: int, heads: int) -> dict:
    if kind == "heads":
        return {"layer": index // heads, "head": index % heads}
    return {"layer": index} if kind == "layers" else {"mask": index}

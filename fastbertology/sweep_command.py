"""``fastbertology sweep``: ablation sweeps from the command line, resumable and data-parallel under torchrun.

File IO lives here (the library side is :mod:`fastbertology.sweeps`). The sweep checkpoints its accumulated state
(``sweep_checkpoint.json``: per-mask metric states and loss sums of every process, written atomically every
``--checkpoint-every`` batches) together with a fingerprint of everything that determines the results (options,
masks, model checksum, data hash, number of processes). ``--resume`` continues from it without recomputing the
finished batches and ends with exactly the results of an uninterrupted run; a checkpoint from a different setup
is refused with the differences named.

Outputs (rank 0 only): ``sweep_scores.npy``, ``sweep_delta.npy`` (score - unmasked score), ``sweep_losses.npy``
— ``[L, H]`` for ``--kind heads``, ``[L]`` for ``--kind layers``, ``[M]`` for ``--masks`` — ``sweep_masks.npy``
``[M, L, H]``, ``sweep_delta.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .outputs import OutputDirectoryError, prepare_output_dir, write_bytes_atomic, write_npy

CHECKPOINT = "sweep_checkpoint.json"
CHECKPOINT_FORMAT = "fastbertology-sweep-checkpoint"
CHECKPOINT_VERSION = 1
# Test hook: exit abruptly (as if killed) right after writing this many checkpoints.
STOP_AFTER_ENV = "FASTBERTOLOGY_SWEEP_STOP_AFTER_CHECKPOINTS"
STOPPED_EXIT_CODE = 75


class CheckpointMismatchError(ValueError):
    """The checkpoint in the output directory belongs to a different sweep."""


def add_sweep_arguments(parser) -> None:
    """The sweep's own options (the common ones come from the CLI's ``_add_common``)."""
    parser.add_argument("--kind", choices=["heads", "layers"], default=None,
                        help="heads: mask every head on its own (L*H masks, [L, H] results, the default); "
                             "layers: mask every layer (L masks, [L] results)")
    parser.add_argument("--masks", default=None,
                        help="a .npy file of masks [M, L, H] (or one [L, H]) to evaluate instead of --kind")
    parser.add_argument("--masks-per-pass", type=int, default=None,
                        help="masks evaluated together in one forward pass of masks*batch rows (default: heads "
                             "per layer); lower it if memory runs out")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="run every mask through the whole model (by default the layers before a mask's first "
                             "masked layer are computed once per batch and reused)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the interrupted sweep whose {CHECKPOINT} is in --output-dir")
    parser.add_argument("--checkpoint-every", type=int, default=10,
                        help="write the checkpoint every this many batches (per process)")


# --------------------------------------------------------------------------------------------------------------
# Lossless JSON for metric states (numbers, tensors, nested dicts/lists)
# --------------------------------------------------------------------------------------------------------------
def encode_value(value):
    """Metric-state values -> JSON-safe values that :func:`decode_value` turns back into exactly the same."""
    if isinstance(value, torch.Tensor):
        cpu = value.detach().cpu()
        return {"__tensor__": {"dtype": str(cpu.dtype).replace("torch.", ""), "shape": list(cpu.shape),
                               "values": [encode_value(v) for v in cpu.reshape(-1).tolist()]}}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot checkpoint a metric state holding {type(value).__name__}")


def decode_value(value):
    if isinstance(value, dict):
        if "__tensor__" in value:
            spec = value["__tensor__"]
            values = [decode_value(v) for v in spec["values"]]
            return torch.tensor(values, dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])
        if "__float__" in value:
            return float(value["__float__"])
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def encode_state(state) -> dict:
    return {"steps_done": state.steps_done, "batches": state.batches, "states": encode_value(state.states),
            "loss_sums": encode_value(state.loss_sums), "baseline_state": encode_value(state.baseline_state),
            "baseline_loss_sum": encode_value(state.baseline_loss_sum)}


def decode_state(payload: dict):
    from .sweeps import SweepState

    return SweepState(steps_done=payload["steps_done"], states=decode_value(payload["states"]),
                      loss_sums=decode_value(payload["loss_sums"]),
                      baseline_state=decode_value(payload["baseline_state"]),
                      baseline_loss_sum=decode_value(payload["baseline_loss_sum"]), batches=payload["batches"])


def _json_normal(value):
    """What ``value`` looks like after a JSON round trip (tuples become lists...)."""
    return json.loads(json.dumps(value))


def _differences(found: dict, expected: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def read_checkpoint(path: Path, fingerprint: dict) -> dict:
    """The checkpoint at ``path`` if it matches ``fingerprint``; CheckpointMismatchError naming what differs."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointMismatchError(f"cannot read the sweep checkpoint {path}: {error}") from error
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointMismatchError(f"{path} is not a version-{CHECKPOINT_VERSION} fastbertology sweep checkpoint")
    differences = _differences(payload.get("fingerprint", {}), _json_normal(fingerprint))
    if differences:
        raise CheckpointMismatchError(
            f"the checkpoint {path} belongs to a different sweep, so it cannot be resumed: " + "; ".join(differences)
            + ". Rerun with the same options, model, data and number of processes, or start over with --overwrite "
              "(without --resume)")
    return payload


def write_checkpoint(path: Path, fingerprint: dict, steps: int, rank_states: list[dict]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
               "steps": steps, "steps_done": min(s["steps_done"] for s in rank_states), "ranks": rank_states}
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    write_bytes_atomic(path, (text + "\n").encode())


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
def _on_main(function):
    """Run ``function`` on rank 0 only; every process gets its result or raises its error (no process is left
    waiting in a collective when rank 0 fails)."""
    outcome = None
    if distributed.is_main():
        try:
            outcome = ("ok", function())
        except (OutputDirectoryError, ValueError, RuntimeError, OSError) as error:
            outcome = ("error", type(error), str(error))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1](outcome[2])
    return outcome[1]


def _prepare_output(args) -> Path:
    from datetime import datetime

    path = Path(args.output_dir or os.path.join("runs", f"sweep-{datetime.now():%Y%m%d-%H%M%S}"))
    if args.resume:
        if not args.output_dir:
            raise ValueError("--resume needs --output-dir: the directory of the interrupted sweep")
        if path.exists() and not path.is_dir():
            raise OutputDirectoryError(f"output path {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        return path
    if (path / CHECKPOINT).exists() and not args.overwrite:
        raise OutputDirectoryError(f"output directory {path} holds a sweep checkpoint ({CHECKPOINT}): pass --resume to "
                                   "continue that sweep, or --overwrite to start over")
    return prepare_output_dir(path, overwrite=args.overwrite)


def _load_masks(args, model):
    from .sweeps import sweep_masks

    if args.masks and args.kind:
        raise ValueError("--kind and --masks exclude each other: sweep the built-in masks or your own")
    if not args.masks:
        return sweep_masks(model, args.kind or "heads")
    masks = np.load(args.masks, allow_pickle=False)
    if masks.ndim == 2:
        masks = masks[None]
    if not np.issubdtype(masks.dtype, np.number) and masks.dtype != np.bool_:
        raise ValueError(f"--masks {args.masks}: expected numbers, got dtype {masks.dtype}")
    try:
        return sweep_masks(model, torch.from_numpy(np.ascontiguousarray(masks)).to(torch.float32))
    except ValueError as error:
        raise ValueError(f"--masks {args.masks}: {error}") from None


def _fingerprint(args, run, masks, kind, agreement, masks_per_pass) -> dict:
    import hashlib

    options = {
        "kind": kind, "masks_shape": list(masks.shape),
        "masks_sha256": hashlib.sha256(masks.to(torch.float32).numpy().tobytes()).hexdigest()[:20],
        "masks_per_pass": masks_per_pass, "prefix_reuse": not args.no_prefix_reuse,
        "task": run.description["task"], "metric": run.description["metric"], "objective": run.description["objective"],
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "data_subset": args.data_subset,
        "dtype": run.description["dtype"], "backend": args.backend, "device": run.device.type,
    }
    return _json_normal({"options": options, "model": agreement["model"], "data": agreement["data"],
                         "processes": distributed.world_size()})


def run_sweep(args) -> int:
    from . import cli
    from .plots import heatmap
    from .sweeps import ablation_sweep, steps_for

    started = time.perf_counter()
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    if args.masks_per_pass is not None and args.masks_per_pass < 1:
        raise ValueError(f"--masks-per-pass must be positive, got {args.masks_per_pass}")
    output = _on_main(lambda: _prepare_output(args))
    run = cli.setup(args)
    agreement = distributed.check_agreement(run.model, run.batches)
    kind, masks = _on_main(lambda: _load_masks(args, run.model))
    masks_per_pass = args.masks_per_pass or masks.shape[2]
    fingerprint = _fingerprint(args, run, masks, kind, agreement, masks_per_pass)
    total_batches = len(run.batches)
    steps = steps_for(total_batches, distributed.world_size())
    batches = distributed.shard(run.batches)
    checkpoint_path = output / CHECKPOINT

    resume = None
    if args.resume:
        def load():
            return read_checkpoint(checkpoint_path, fingerprint) if checkpoint_path.exists() else None
        payload = _on_main(load)
        if payload is not None:
            resume = decode_state(payload["ranks"][distributed.rank()])
            cli._say(args, f"Resuming the sweep in {output} after {resume.steps_done} of {steps} batches")
        else:
            cli._say(args, f"No checkpoint in {output}: starting the sweep from the beginning")
    resumed_at = resume.steps_done if resume is not None else 0

    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    written = [0]

    def on_step(state):
        if state.steps_done % args.checkpoint_every and state.steps_done != steps:
            return
        gathered = distributed.all_gather_objects(encode_state(state))
        if distributed.is_main():
            write_checkpoint(checkpoint_path, fingerprint, steps, gathered)
        written[0] += 1
        if stop_after and written[0] >= stop_after and state.steps_done < steps:
            distributed.barrier()
            os._exit(STOPPED_EXIT_CODE)

    summary = cli._new_summary(args, run)
    cli._say(args, f"Sweep: {len(masks)} masks ({kind}) over {total_batches} batches"
                   + (f" on {distributed.world_size()} processes" if distributed.is_distributed() else "")
                   + f", {masks_per_pass} masks per pass, prefix reuse {'off' if args.no_prefix_reuse else 'on'}")
    result = ablation_sweep(
        run.model, batches, run.task, kind=masks if kind == "masks" else kind, masks_per_pass=masks_per_pass,
        reuse_prefix=not args.no_prefix_reuse, progress=not args.no_progress and distributed.is_main(),
        resume=resume, on_step=on_step, steps=steps, reduce=distributed.sweep_reducer(run.task),
    )
    if not distributed.is_main():
        return 0

    write_npy(output / "sweep_scores.npy", result.table(result.scores).numpy())
    write_npy(output / "sweep_delta.npy", result.table().numpy())
    write_npy(output / "sweep_losses.npy", result.table(result.losses).numpy())
    write_npy(output / "sweep_masks.npy", result.masks.numpy())
    delta_table = result.table()
    heatmap(output / "sweep_delta.png", delta_table if delta_table.dim() == 2 else delta_table[:, None],
            title=f"{result.metric_name} change when masked ({kind})", colorbar_label=f"Δ {result.metric_name}",
            cmap="coolwarm")
    sign = 1 if result.higher_is_better else -1
    order = torch.argsort(sign * result.delta, stable=True)  # most harmful first
    summary["sweep"] = {
        "kind": kind, "masks": len(masks), "masks_per_pass": masks_per_pass, "prefix_reuse": not args.no_prefix_reuse,
        "metric": result.metric_name, "higher_is_better": result.higher_is_better,
        "baseline_score": result.baseline_score, "baseline_loss": result.baseline_loss,
        "baseline_metrics": result.baseline_metrics,
        "scores": result.table(result.scores), "delta": result.table(), "losses": result.table(result.losses),
        "most_harmful": [_describe(kind, int(i), masks.shape[2]) | {"delta": float(result.delta[i])}
                         for i in order[:10]],
        "metrics": result.metrics, "batches": total_batches, "processes": distributed.world_size(),
        "resumed_after_batches": resumed_at, "seconds": time.perf_counter() - started,
        "model_fingerprint": agreement["model"], "data_fingerprint": agreement["data"],
    }
    cli._say(args, f"\nUnmasked {result.metric_name} = {result.baseline_score:.4f}")
    if kind == "heads":
        cli._say(args, cli.format_table(result.table(), title=f"\n{result.metric_name} change when each head is "
                                                              "masked (rows = layers)", digits=4))
    else:
        label = "layer" if kind == "layers" else "mask"
        for index, value in enumerate(result.delta.tolist()[:50]):
            cli._say(args, f"  {label} {index:>4d}  {result.scores[index]:.4f}  ({value:+.4f})")
    cli._finish(args, output, summary, started)
    return 0


def _describe(kind: str, index: int, heads: int) -> dict:
    if kind == "heads":
        return {"layer": index // heads, "head": index % heads}
    return {"layer": index} if kind == "layers" else {"mask": index}

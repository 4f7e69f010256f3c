"""``fastbertology sweep``: ablation sweeps from the command line, resumable and data-parallel under torchrun.

File IO lives here (the library side is :mod:`fastbertology.sweeps`). The sweep checkpoints its accumulated state
(``sweep_checkpoint.json``: per-mask metric states and loss sums of every process, written atomically every
``--checkpoint-every`` batches) together with a fingerprint of everything that determines the results (options,
masks, a hash of every byte of the model, data hash, number of processes) and a SHA-256 of its own content.
``--resume`` continues from it without recomputing the finished batches and ends with exactly the results of an
uninterrupted run; a checkpoint from a different setup is refused with the differences named, and a checkpoint
that was edited or damaged (checksum, types, ranges and consistency of every field) is refused with the reason.
``--resume`` never writes into a non-empty directory that holds no checkpoint (without ``--overwrite``).

Outputs (rank 0 only): ``sweep_scores.npy``, ``sweep_delta.npy`` (score - unmasked score), ``sweep_losses.npy``
— ``[L, H]`` for ``--kind heads``, ``[L]`` for ``--kind layers``, ``[M]`` for ``--masks`` — ``sweep_masks.npy``
``[M, L, H]``, ``sweep_delta.png`` and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .outputs import OutputDirectoryError, check_output_dir, check_writable_dir, write_bytes_atomic, write_npy

CHECKPOINT = "sweep_checkpoint.json"
CHECKPOINT_FORMAT = "fastbertology-sweep-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a checksum of the content; model fingerprints over every byte
_RANK_FIELDS = ("steps_done", "batches", "states", "loss_sums", "baseline_state", "baseline_loss_sum")
# Test hook: exit abruptly (as if killed) right after writing this many checkpoints.
STOP_AFTER_ENV = "FASTBERTOLOGY_SWEEP_STOP_AFTER_CHECKPOINTS"
STOPPED_EXIT_CODE = 75


class CheckpointMismatchError(ValueError):
    """The checkpoint in the output directory belongs to a different sweep."""


class CheckpointError(CheckpointMismatchError):
    """The checkpoint cannot be trusted: unreadable, edited, damaged or inconsistent."""


class RankZeroError(RuntimeError):
    """Rank 0 failed in a step that only it runs; the other processes stop with its message."""


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


_TENSOR_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def decode_value(value):
    """The inverse of :func:`encode_value`. Malformed encodings raise ValueError."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return _decode_tensor(value["__tensor__"])
        if "__float__" in value:
            text = value["__float__"]
            if text not in ("inf", "-inf", "nan"):
                raise ValueError(f"bad non-finite float {text!r}")
            return float(text)
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def _decode_tensor(spec) -> torch.Tensor:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "values"}:
        raise ValueError("a tensor needs exactly dtype, shape and values")
    if spec["dtype"] not in _TENSOR_DTYPES:
        raise ValueError(f"unknown tensor dtype {spec['dtype']!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"bad tensor shape {shape!r}")
    values = spec["values"]
    if not isinstance(values, list) or len(values) != math.prod(shape):
        raise ValueError(f"a tensor of shape {shape} needs {math.prod(shape)} values")
    values = [decode_value(v) for v in values]
    if not all(isinstance(v, (int, float)) for v in values):
        raise ValueError("tensor values must be numbers")
    return torch.tensor(values, dtype=getattr(torch, spec["dtype"])).reshape(shape)


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


def _checksum(body: dict) -> str:
    """SHA-256 of a checkpoint's content (canonical JSON), stored beside it to detect edits and damage."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _load_json(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"the sweep checkpoint {path} is not UTF-8 text (byte {error.start}): it is damaged. "
                              "Start over with --overwrite (without --resume)") from None
    except OSError as error:
        raise CheckpointError(f"cannot read the sweep checkpoint {path}: {error}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"the sweep checkpoint {path} is not valid JSON ({error}): it is damaged. Start over "
                              "with --overwrite (without --resume)") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"the sweep checkpoint {path} is not a JSON object: it is damaged")
    return payload


def read_checkpoint(path: Path, fingerprint: dict) -> dict:
    """The checkpoint at ``path`` if it is intact (checksum) and matches ``fingerprint``; CheckpointMismatchError
    naming what differs, CheckpointError when it cannot be trusted. Check its state with
    :func:`validate_checkpoint`."""
    payload = _load_json(path)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointMismatchError(f"{path} is not a version-{CHECKPOINT_VERSION} fastbertology sweep checkpoint; "
                                      "start over with --overwrite (without --resume)")
    body = {k: v for k, v in payload.items() if k != "checksum"}
    if payload.get("checksum") != _checksum(body):
        raise CheckpointError(f"the sweep checkpoint {path} was modified or damaged (its checksum does not match its "
                              "content), so its results cannot be trusted. Start over with --overwrite (without "
                              "--resume)")
    fingerprint_found = payload.get("fingerprint")
    differences = _differences(fingerprint_found if isinstance(fingerprint_found, dict) else {},
                               _json_normal(fingerprint))
    if differences:
        raise CheckpointMismatchError(
            f"the checkpoint {path} belongs to a different sweep, so it cannot be resumed: " + "; ".join(differences)
            + ". Rerun with the same options, model, data and number of processes, or start over with --overwrite "
              "(without --resume)")
    return payload


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_like(value, template, where: str) -> None:
    """``value`` (decoded) has the structure of the metric state ``template``: the same keys, tensors of the same
    dtype and rank, numbers where numbers are; counts (integers) are never negative."""
    if isinstance(template, dict):
        if not isinstance(value, dict) or set(value) != set(template):
            raise ValueError(f"{where} must have the entries {sorted(template)}")
        for key in template:
            _check_like(value[key], template[key], f"{where}.{key}")
    elif isinstance(template, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.dtype != template.dtype or value.dim() != template.dim():
            raise ValueError(f"{where} must be a {template.dim()}-D {template.dtype} tensor")
        if not value.is_floating_point() and value.dtype != torch.bool and bool((value < 0).any()):
            raise ValueError(f"{where} holds negative counts")
    elif _is_int(template):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{where} must be a count (an integer >= 0), got {value!r}")
    elif isinstance(template, float):
        if not _is_number(value):
            raise ValueError(f"{where} must be a number, got {value!r}")
    elif type(value) is not type(template):
        raise ValueError(f"{where} must be a {type(template).__name__}")


def _check_rank(entry, rank: int, *, steps_done: int, shard_size: int, masks: int, template: dict) -> None:
    """One process's saved state: every field present, typed, in range and consistent with the others."""
    where = f"ranks[{rank}]"
    if not isinstance(entry, dict) or set(entry) != set(_RANK_FIELDS):
        raise ValueError(f"{where} must have exactly the fields {list(_RANK_FIELDS)}")
    if entry["steps_done"] != steps_done or not _is_int(entry["steps_done"]):
        raise ValueError(f"{where}.steps_done is {entry['steps_done']!r} but the checkpoint says {steps_done}")
    expected_batches = min(steps_done, shard_size)
    if not _is_int(entry["batches"]) or entry["batches"] != expected_batches:
        raise ValueError(f"{where}.batches is {entry['batches']!r}; after {steps_done} steps this process has "
                         f"evaluated {expected_batches} batches")
    for key in ("states", "loss_sums"):
        if not isinstance(entry[key], list) or len(entry[key]) != masks:
            raise ValueError(f"{where}.{key} must be a list of {masks} entries (one per mask)")
    decoded = decode_state(entry)
    for index, loss in enumerate(decoded.loss_sums):
        if not _is_number(loss):
            raise ValueError(f"{where}.loss_sums[{index}] must be a number, got {loss!r}")
    if not _is_number(decoded.baseline_loss_sum):
        raise ValueError(f"{where}.baseline_loss_sum must be a number")
    _check_like(decoded.baseline_state, template, f"{where}.baseline_state")
    for index, state in enumerate(decoded.states):
        _check_like(state, template, f"{where}.states[{index}]")


def validate_checkpoint(payload: dict, path: Path, *, steps: int, shard_sizes: list[int], masks: int, task) -> None:
    """CheckpointError unless every field of ``payload`` has the right type, is in range and agrees with the
    others and with this sweep: ``steps`` steps, one rank entry per process (``shard_sizes``: batches per
    process), ``masks`` masks, metric states shaped like ``task.metric_state()``."""
    try:
        if payload.get("steps") != steps or not _is_int(payload.get("steps")):
            raise ValueError(f"steps is {payload.get('steps')!r}, but this sweep has {steps} steps")
        steps_done = payload.get("steps_done")
        if not _is_int(steps_done) or not 0 <= steps_done <= steps:
            raise ValueError(f"steps_done must be an integer from 0 to {steps}, got {steps_done!r}")
        ranks = payload.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != len(shard_sizes):
            raise ValueError(f"ranks must be a list of {len(shard_sizes)} process states")
        template = decode_value(encode_value(task.metric_state()))
        for rank, (entry, shard_size) in enumerate(zip(ranks, shard_sizes)):
            _check_rank(entry, rank, steps_done=steps_done, shard_size=shard_size, masks=masks, template=template)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"the sweep checkpoint {path} is inconsistent ({error}), so it cannot be resumed. Start "
                              "over with --overwrite (without --resume)") from None


def write_checkpoint(path: Path, fingerprint: dict, steps: int, rank_states: list[dict]) -> None:
    body = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": _json_normal(fingerprint),
            "steps": steps, "steps_done": min(s["steps_done"] for s in rank_states), "ranks": rank_states}
    body = json.loads(json.dumps(body, allow_nan=False))  # the checksum covers what a reader will see
    text = json.dumps({**body, "checksum": _checksum(body)}, allow_nan=False, separators=(",", ":"))
    write_bytes_atomic(path, (text + "\n").encode())


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
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


def _default_output_dir(args) -> Path:
    from datetime import datetime

    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    return Path(args.output_dir)


def check_output(args) -> Path:
    """The sweep's output directory, checked and not created. Without ``--resume``: a directory holding a
    checkpoint needs ``--overwrite`` (or ``--resume``), any other non-empty one ``--overwrite``. With
    ``--resume``: a directory with a checkpoint is resumed; an empty or missing one starts from the beginning; a
    non-empty one without a checkpoint (other results) is refused unless ``--overwrite``, since the sweep's
    outputs and summary.json would replace files there."""
    path = _default_output_dir(args)
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


def _prepare_output(args) -> Path:
    """:func:`check_output`, then create the directory."""
    path = check_output(args)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_masks(args, model, masks):
    """``(kind, masks [M, L, H])``: the built-in masks of ``--kind``, or ``masks`` (read from ``--masks`` by
    :func:`fastbertology.cli.check_inputs`) checked against the model."""
    from .sweeps import sweep_masks

    if masks is None:
        return sweep_masks(model, args.kind or "heads")
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
    inputs = cli.check_inputs(args)  # every option and path, before any work
    _on_main(lambda: check_output(args))
    run = cli.setup(args, model_path=inputs.model_path)
    kind, masks = _on_main(lambda: _load_masks(args, run.model, inputs.masks))
    output = _on_main(lambda: _prepare_output(args))
    agreement = distributed.check_agreement(run.model, run.batches)
    masks_per_pass = args.masks_per_pass or masks.shape[2]
    fingerprint = _fingerprint(args, run, masks, kind, agreement, masks_per_pass)
    total_batches = len(run.batches)
    steps = steps_for(total_batches, distributed.world_size())
    batches = distributed.shard(run.batches)
    checkpoint_path = output / CHECKPOINT

    resume = None
    if args.resume:
        shard_sizes = [len(range(r, total_batches, distributed.world_size())) for r in range(distributed.world_size())]

        def load():
            if not checkpoint_path.exists():
                return None
            payload = read_checkpoint(checkpoint_path, fingerprint)
            validate_checkpoint(payload, checkpoint_path, steps=steps, shard_sizes=shard_sizes, masks=len(masks),
                                task=run.task)
            return payload
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

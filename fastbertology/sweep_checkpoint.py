"""The sweep's checkpoint: lossless JSON for metric states, a fingerprint of everything that determines the
results, a SHA-256 of the content, and the checks that refuse a checkpoint from another sweep or one that was
edited or damaged.

``sweep_checkpoint.json`` holds the accumulated state of every process (per-mask metric states and loss sums),
written atomically every ``--checkpoint-every`` batches, with the fingerprint (options, masks, a hash of every
byte of the model, data hash, number of processes). :func:`read_checkpoint` refuses a checkpoint from a different
setup naming the differences (:class:`CheckpointMismatchError`) and one whose checksum does not match
(:class:`CheckpointError`); :func:`validate_checkpoint` checks the type, range and consistency of every field.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from .outputs import write_bytes_atomic
from .sweeps import SweepState

CHECKPOINT = "sweep_checkpoint.json"
CHECKPOINT_FORMAT = "fastbertology-sweep-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a checksum of the content; model fingerprints over every byte
_RANK_FIELDS = ("steps_done", "batches", "states", "loss_sums", "baseline_state", "baseline_loss_sum")


class CheckpointMismatchError(ValueError):
    """The checkpoint in the output directory belongs to a different sweep."""


class CheckpointError(CheckpointMismatchError):
    """The checkpoint cannot be trusted: unreadable, edited, damaged or inconsistent."""


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


def decode_state(payload: dict) -> SweepState:
    return SweepState(steps_done=payload["steps_done"], states=decode_value(payload["states"]),
                      loss_sums=decode_value(payload["loss_sums"]),
                      baseline_state=decode_value(payload["baseline_state"]),
                      baseline_loss_sum=decode_value(payload["baseline_loss_sum"]), batches=payload["batches"])


def json_normal(value):
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
                               json_normal(fingerprint))
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
    body = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": json_normal(fingerprint),
            "steps": steps, "steps_done": min(s["steps_done"] for s in rank_states), "ranks": rank_states}
    body = json.loads(json.dumps(body, allow_nan=False))  # the checksum covers what a reader will see
    text = json.dumps({**body, "checksum": _checksum(body)}, allow_nan=False, separators=(",", ":"))
    write_bytes_atomic(path, (text + "\n").encode())

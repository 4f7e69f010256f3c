"""The checkpoint of a streamed importance run (``stream_checkpoint.json`` in ``--output-dir``): the accumulated
sums (lossless, :func:`fastbertology.streamed_importance.encode_totals`), the corpus position after the last
batch they include, a fingerprint of everything that determines the results (options, every byte of the model,
the data file's size and the SHA-256 of its first and last MiB), and a SHA-256 of the content. Written
atomically; :func:`read_stream_checkpoint` refuses one from another run (naming what differs) and one that was
edited or damaged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .outputs import write_bytes_atomic
from .sweep_checkpoint import CheckpointError, CheckpointMismatchError, json_normal

STREAM_CHECKPOINT = "stream_checkpoint.json"
STREAM_FORMAT = "fastbertology-stream-checkpoint"
STREAM_VERSION = 1
_EDGE = 1 << 20


def data_identity(path) -> dict:
    """The corpus file's size and the SHA-256 of its first and last MiB: a file that was replaced or appended to
    since the checkpoint is noticed without reading all of it."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE))
        handle.seek(max(size - _EDGE, 0))
        digest.update(handle.read(_EDGE))
    return {"size": size, "edges_sha256": digest.hexdigest()}


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def write_stream_checkpoint(path: Path, fingerprint: dict, totals: dict, position: dict) -> None:
    """Write the checkpoint atomically (``totals``: encoded; ``position``: a stream position dict)."""
    body = {"format": STREAM_FORMAT, "version": STREAM_VERSION, "fingerprint": json_normal(fingerprint),
            "totals": totals, "position": position}
    body = json.loads(json.dumps(body, allow_nan=False))
    text = json.dumps({**body, "checksum": _checksum(body)}, allow_nan=False, separators=(",", ":"))
    write_bytes_atomic(path, (text + "\n").encode())


def read_stream_checkpoint(path: Path, fingerprint: dict) -> dict:
    """The checkpoint at ``path`` (``totals`` and ``position``) if intact and made by the same run; otherwise
    :class:`CheckpointError` (damaged, edited) or :class:`CheckpointMismatchError` (naming what differs)."""
    again = "Start over with --overwrite (without --resume)"
    try:
        payload = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the stream checkpoint {path} ({error}): it is damaged. {again}") from None
    if not isinstance(payload, dict) or payload.get("format") != STREAM_FORMAT or \
            payload.get("version") != STREAM_VERSION:
        raise CheckpointMismatchError(f"{path} is not a version-{STREAM_VERSION} fastbertology stream checkpoint. "
                                      f"{again}")
    body = {k: v for k, v in payload.items() if k != "checksum"}
    if payload.get("checksum") != _checksum(body):
        raise CheckpointError(f"the stream checkpoint {path} was modified or damaged (its checksum does not match its "
                              f"content), so its results cannot be trusted. {again}")
    found, expected = payload.get("fingerprint") or {}, json_normal(fingerprint)
    differences = [f"{key}: checkpoint {found.get(key)!r}, now {expected.get(key)!r}"
                   for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key)]
    if differences:
        raise CheckpointMismatchError(f"the checkpoint {path} belongs to a different run, so it cannot be resumed: "
                                      + "; ".join(differences) + ". Rerun with the same options, model and data, or "
                                      f"{again[0].lower()}{again[1:]}")
    if not isinstance(payload.get("totals"), dict) or not isinstance(payload.get("position"), dict):
        raise CheckpointError(f"the stream checkpoint {path} has no totals or position. {again}")
    return payload


def stop_after_checkpoints() -> int:
    """Test hook: exit abruptly (as if killed) after writing this many checkpoints (0: never)."""
    return int(os.environ.get("FASTBERTOLOGY_STREAM_STOP_AFTER_CHECKPOINTS", "0") or 0)

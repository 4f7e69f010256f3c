"""Padding-free execution's plan: how a right-padded batch ``[B, N]`` maps to the packed stream of its ``T`` real
tokens (:class:`PackedBatch`), made from the attention mask (:func:`plan_packing`) — on the host, before the batch
moves to the GPU, where batches are built by :mod:`fastbertology.batching` (:func:`move_with_plan`), so that no
model call reads the mask back from the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True)
class PackedBatch:
    """How one call's right-padded batch ``[B, N]`` maps to the packed stream of its ``T`` real tokens."""

    index: torch.Tensor  # [T] long: the flat position b * N + n of every real token, in order
    batch: int  # B
    seq: int  # N
    packing: kernels.Packing  # the sequences (one per example, some possibly empty) of the stream
    # [1, T] float32, 1 = a token of the batch, 0 = filler (a CUDA-graph bucket's extra sequences, see
    # fastbertology.buckets); None: every packed token is the batch's
    query_weights: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.packing.total

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, N, ...]`` (or ``[1, N, ...]``, the same for every example) -> ``[1, T, ...]`` (the real tokens)."""
        if hidden.shape[0] == 1 and self.batch != 1:
            hidden = hidden.expand(self.batch, *hidden.shape[1:])
        flat = hidden.reshape(self.batch * self.seq, *hidden.shape[2:])
        return flat.index_select(0, self.index.to(flat.device)).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[B, N, ...]`` with zeros at the padding positions (differentiable)."""
        flat = packed.new_zeros(self.batch * self.seq, *packed.shape[2:])
        return flat.index_copy(0, self.index.to(flat.device), packed[0]).view(self.batch, self.seq, *packed.shape[2:])

    def fits(self, value) -> bool:
        """Whether ``value`` is a per-position tensor ``[B or 1, N, ...]`` of this batch."""
        return (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == self.seq
                and value.shape[0] in (1, self.batch))


_PLAN = "_fastbertology_packing"  # attribute of a device mask: its plan, made on the host before the move
_LENGTHS = "_fastbertology_lengths"  # attribute of a device mask: its rows' lengths if right-padded, else None


def plan_packing(attention_mask: torch.Tensor) -> PackedBatch | None:
    """A :class:`PackedBatch` for a right-padded 2-D ``attention_mask [B, N]`` (1 = token) that has padding in it;
    None when there is no padding, no token at all, or the padding is not on the right (left padding or holes:
    positions that stock heads may read, e.g. BERT's pooler reads position 0).

    A mask moved by :func:`move_with_plan` carries its plan, made from the host copy: no host-device sync. Any other
    mask on a device is read back once (a sync)."""
    planned = getattr(attention_mask, _PLAN, None)
    if planned is not None and planned[0] == attention_mask._version:  # (not changed in place since)
        return planned[1]
    return _plan(attention_mask.detach().to("cpu", torch.bool), attention_mask.device)


def move_with_plan(attention_mask: torch.Tensor, device) -> torch.Tensor:
    """``attention_mask`` on ``device`` (a host tensor, as batches are built), carrying its packing plan made here
    on the host; the plan's index and offsets are copied without blocking the host (pinned memory on CUDA)."""
    moved = attention_mask.to(device)
    if attention_mask.dim() == 2 and attention_mask.device.type == "cpu":
        keep = attention_mask.detach().to(torch.bool)
        setattr(moved, _PLAN, (moved._version, _plan(keep, moved.device)))
        setattr(moved, _LENGTHS, (moved._version, _right_padded_lengths(keep)))
    return moved


def attach_plan(attention_mask: torch.Tensor, plan: PackedBatch) -> None:
    """Make ``plan`` the padding-free plan of ``attention_mask`` as it is now (a CUDA-graph bucket's static mask,
    refilled for every batch: see :mod:`fastbertology.step_graphs`)."""
    setattr(attention_mask, _PLAN, (attention_mask._version, plan))


def planned_on_host(attention_mask: torch.Tensor) -> bool:
    """Whether ``attention_mask`` is right-padded and carries the padding-free plan made for it on the host (moved by
    :func:`move_with_plan`, or a CUDA-graph bucket's static mask given its plan by :func:`attach_plan`), so that
    :func:`plan_packing` answers without reading the device: its plan, or None when there is no padding."""
    planned = getattr(attention_mask, _PLAN, None)
    if planned is None or planned[0] != attention_mask._version:
        return False
    return planned[1] is not None or known_lengths(attention_mask) is not None


def known_lengths(attention_mask: torch.Tensor) -> tuple[int, ...] | None:
    """The lengths of the rows of a right-padded mask moved by :func:`move_with_plan` (known on the host, no
    sync); None for a mask that is not right-padded, was changed in place since, or did not come that way."""
    known = getattr(attention_mask, _LENGTHS, None)
    if known is None or known[0] != attention_mask._version:
        return None
    return known[1]


def _right_padded_lengths(keep: torch.Tensor) -> tuple[int, ...] | None:
    """The row lengths of a host bool mask ``keep [B, N]`` whose tokens all come first in their rows, else None."""
    lengths = keep.sum(1)
    if not torch.equal(keep, torch.arange(keep.shape[1])[None, :] < lengths[:, None]):
        return None
    return tuple(int(n) for n in lengths)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, without a blocking copy where the device is a GPU."""
    if device.type == "cpu":
        return tensor
    if torch.cuda.is_available():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _plan(keep: torch.Tensor, device: torch.device) -> PackedBatch | None:
    """The plan of a host bool mask ``keep [B, N]``, its tensors on ``device``."""
    batch, seq = keep.shape
    lengths = keep.sum(1)
    total = int(lengths.sum())
    if total == batch * seq or total == 0:
        return None
    if not torch.equal(keep, torch.arange(seq)[None, :] < lengths[:, None]):
        return None
    index = _to_device(keep.flatten().nonzero().squeeze(1), device)
    packing = kernels.Packing.from_lengths(lengths.tolist())
    return PackedBatch(index, batch, seq, packing._replace(cu_seqlens=_to_device(packing.cu_seqlens, device)))

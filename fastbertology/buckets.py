"""Buckets of batches for CUDA-graph replay of an analysis step (:mod:`fastbertology.step_graphs`).

A captured graph replays fixed shapes and fixed launches. A right-padded batch ``[B, N]`` of ``T`` real tokens is
therefore widened to ``[B, N_b]`` (``N_b``: ``N`` rounded up to a multiple of :data:`LENGTH_STEP`) and packed into
``T_b >= T`` tokens (``T`` rounded up to one of :data:`TOKEN_BUCKETS` steps of ``B * N_b``): the ``T_b - T``
extra tokens are *filler*, taken from padding positions and packed as sequences of their own (at most ``N_b``
tokens each), so that every batch of a bucket ``(B, N_b, T_b)`` has the same shapes, the same number of packed
sequences (``2B``, the unused ones empty) and the same launch grid (planned for sequences of ``N_b``).

The batch's own results are unchanged: attention never crosses sequences, so no real token sees the filler; the
filler's outputs land on padding positions, which no task reads; and the statistics count real tokens only (the
plan's ``query_weights`` are 0 on the filler). Everything here runs on the host, from lengths known when the batch
was built: no device read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LENGTH_STEP = 32  # padded lengths are rounded up to a multiple of this
TOKEN_BUCKETS = 16  # packed token counts are rounded up to a multiple of B * N_b / TOKEN_BUCKETS (at least 64)
MIN_TOKEN_STEP = 64


@dataclass(frozen=True)
class Bucket:
    """The shapes one captured graph serves: ``batch`` B examples padded to ``seq`` N_b, ``tokens`` T_b packed."""

    batch: int
    seq: int
    tokens: int


@dataclass(frozen=True)
class BucketPlan:
    """One batch in its bucket: the packed stream of its real tokens followed by the filler.

    lengths:       ``2B`` sequence lengths: the B examples', the filler sequences', then empty ones.
    index:         ``[T_b]`` long: the flat position ``b * N_b + n`` of every packed token (real ones first).
    cu_seqlens:    ``[2B + 1]`` int32 offsets of the sequences in the stream.
    query_weights: ``[1, T_b]`` float32: 1 for a real token, 0 for filler.
    All on the host.
    """

    bucket: Bucket
    real_tokens: int
    lengths: tuple[int, ...]
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    query_weights: torch.Tensor


def bucket_length(seq: int, limit: int | None = None) -> int:
    """``seq`` rounded up to a multiple of :data:`LENGTH_STEP`, but not past ``limit`` (the positions the model
    has); ``seq`` itself when it is already past the limit's step."""
    rounded = -(-seq // LENGTH_STEP) * LENGTH_STEP
    if limit is not None:
        rounded = min(rounded, max(int(limit), seq))
    return rounded


def bucket_tokens(tokens: int, batch: int, seq: int) -> int:
    """``tokens`` rounded up to a multiple of ``max(64, B * N_b / 16)``, at most ``B * N_b``."""
    capacity = batch * seq
    step = max(MIN_TOKEN_STEP, -(-capacity // TOKEN_BUCKETS))
    return min(-(-tokens // step) * step, capacity)


def plan_bucket(lengths: tuple[int, ...], *, limit: int | None = None) -> BucketPlan:
    """The bucket plan of a right-padded batch whose rows have ``lengths`` real tokens (``B`` ints, at least one
    positive); ``limit``: the longest sequence the model takes (see :func:`bucket_length`)."""
    batch = len(lengths)
    real = sum(lengths)
    if batch == 0 or real == 0:
        raise ValueError("a bucket needs at least one real token")
    seq = bucket_length(max(lengths), limit)
    tokens = bucket_tokens(real, batch, seq)
    keep = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]  # [B, N_b]
    filler = tokens - real
    flat = keep.flatten()
    index = torch.cat([flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)[:filler]])
    chunks = [seq] * (filler // seq) + ([filler % seq] if filler % seq else [])
    sequence_lengths = tuple(lengths) + tuple(chunks) + (0,) * (batch - len(chunks))
    offsets = torch.tensor([0, *sequence_lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
    weights = torch.zeros(1, tokens, dtype=torch.float32)
    weights[0, :real] = 1.0
    return BucketPlan(Bucket(batch, seq, tokens), real, sequence_lengths, index, offsets, weights)

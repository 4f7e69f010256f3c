"""Attention hooks: functions that see every attention application of a patched model and may replace its output.

A hook is called as ``hook(call)`` with an :class:`AttentionCall` after the kernels have run (and after the
statistics recorders); it returns None (output unchanged) or a tensor of the shape of ``call.out``, which replaces
the output (the next hook sees the replacement). Hooks run in the order they were added. The analyses use them to
read queries, keys and log-sum-exps (:mod:`fastbertology.head_types`) and to replace masked heads' outputs
(:mod:`fastbertology.ablation`). Register one with :func:`attention_hook` (a context manager that removes it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .kernels import ScoreModifiers


@dataclass(frozen=True)
class AttentionCall:
    """One attention application of a patched model, as the kernels saw it.

    row:              its row in ``[L, H]`` tables; ``part``: ``"layers"``, ``"encoder"``, ``"decoder"`` or
                      ``"cross"`` (:func:`fastbertology.architectures.row_parts`); ``cross``: cross-attention.
    query:            ``[B, H, N_q, D]`` after every transformation the model applies (rotary embeddings...);
                      packed calls: ``[1, H, T, D]``.
    key:              ``[B, H_kv, N_k, D]`` (query head h reads key head ``h // (H / H_kv)``); packed:
                      ``[1, H_kv, T, D]``.
    out:              ``[B, H, N_q, D]`` (packed ``[1, H, T, D]``): each head's output (its context vector, before the
                      output projection), already multiplied by the head mask.
    lse:              ``[B, H, N_q]`` (packed ``[1, H, T]``) log-sum-exp of the scaled, masked scores (of the softmax
                      before the head mask).
    head_mask:        this row's head mask, ``[H]`` or ``[B, H]`` (packed: one row per sequence), or None.
    packed:           the :class:`~fastbertology.packing.PackedBatch` of a padding-free call (else None): its
                      ``index`` maps packed tokens to flat padded positions ``b * N + n``.
    key_padding_mask: bool ``[B, N_k]`` (True = a real token) of a padded call, or None (no padding).
    causal:           query i sees keys j <= i; ``scale``: the softmax scale; ``window``: a sliding window or None
                      (see :func:`fastbertology.kernels.attention`).
    modifiers:        the call's score modifiers (:class:`~fastbertology.kernels.ScoreModifiers`: soft-cap, sinks...;
                      all None for most models); ``lse`` includes the sink logit where there is one.
    """

    row: int
    part: str
    cross: bool
    query: torch.Tensor
    key: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    head_mask: torch.Tensor | None
    packed: Any
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float
    window: int | None
    modifiers: ScoreModifiers = ScoreModifiers()


def run_hooks(hooks: list[Callable[[AttentionCall], torch.Tensor | None]], call: AttentionCall) -> torch.Tensor:
    """``call.out`` after every hook of ``hooks`` (each sees the output the previous one left)."""
    for hook in list(hooks):
        result = hook(call)
        if result is not None:
            if result.shape != call.out.shape:
                raise RuntimeError(f"an attention hook returned shape {tuple(result.shape)} for an output of shape "
                                   f"{tuple(call.out.shape)}")
            call = replace(call, out=result)
    return call.out


@contextlib.contextmanager
def attention_hook(model: torch.nn.Module, hook: Callable[[AttentionCall], torch.Tensor | None]) -> Iterator[None]:
    """Call ``hook`` on every attention application of the patched ``model`` inside the block."""
    state = getattr(model, "_fastbertology_state", None)
    if state is None:
        raise RuntimeError("attention hooks need a patched model: call fastbertology.patch(model) first")
    state.attention_hooks.append(hook)
    try:
        yield
    finally:
        state.attention_hooks.remove(hook)

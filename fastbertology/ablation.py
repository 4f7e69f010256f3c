"""Ablation kinds: what a head's output becomes where its head mask is 0.

A head's output is its per-head context vector, the attention output before the output projection (``[B, N, H, D]``
as the attention function returns it). For a head mask m of a row (``[H]`` or per example ``[B, H]``) the output of
head h is

    out_h = m_h * (P_h V_h) + (1 - m_h) * r_h

with the replacement r of the ablation kind (``m = 1``: the head as it is; ``m = 0``: the head ablated that way;
values between interpolate):

* ``"zero"``: r = 0 (transformers 4.x's head mask; nothing is added: exactly the patch's own masking);
* ``"mean"``: r_h = the head's mean output over every real (non-padding) query token of the data, one ``[D]`` vector
  per (row, head), computed in one pass over the data first (:func:`head_output_means`; every model call of the task
  counts: a retrieval task's queries and positives alike; cross-attention rows count every decoder position);
* ``"resample"``: r_h at position n of example b = the same head's output, in the same model call of the unablated
  model, at position n of the *source* example ``s(b)`` of the same batch (:func:`resample_sources`: a fixed random
  cyclic permutation of the batch's rows, so every example takes another one's outputs, except in a batch of one,
  where the only example is its own source). Positions the source does not have (it is shorter: padding there) get
  0, i.e. are zero-ablated. Position n is the index in the right-padded ``[B, N]`` inputs (the n-th token of each).
  Taking the source within the batch lets the unablated pass that the sweep runs anyway (the baseline, and prefix
  reuse's capture) provide the outputs, so no second pass and no stored outputs of the whole data are needed; the
  result depends on the batching (batch size and order), as the sources do.

Both keep prefix reuse (:mod:`fastbertology.sweeps`): a row whose mask is all ones gets ``out + 0 * r = out`` exactly,
so the layers before a mask's first masked row compute what the unmasked model computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import architecture, attention_sites
from .attention_hooks import AttentionCall, attention_hook
from .patching import calls_so_far

ABLATION_KINDS = ("zero", "mean", "resample")


def check_ablation(kind: str) -> str:
    if kind not in ABLATION_KINDS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATION_KINDS)}; got {kind!r}")
    return kind


def _keep(call: AttentionCall) -> torch.Tensor:
    """The head mask broadcastable to ``call.out``: ``[1 or B, H, 1, 1]``, or ``[1, H, T, 1]`` for a packed call with
    one mask row per sequence (each token takes its sequence's)."""
    mask = call.head_mask
    if mask.dim() == 1:
        return mask[None, :, None, None]
    if call.packed is not None:
        lengths = torch.tensor(call.packed.packing.lengths, device=mask.device)
        return mask.repeat_interleave(lengths, dim=0, output_size=call.packed.total).t()[None, :, :, None]
    return mask[:, :, None, None]


def _blend(call: AttentionCall, replacement: torch.Tensor) -> torch.Tensor:
    """``out + (1 - mask) * replacement`` (``out`` already holds ``mask * P V``)."""
    return call.out + (1 - _keep(call)).to(call.out.dtype) * replacement.to(call.out.dtype)


def _query_weights(call: AttentionCall) -> torch.Tensor:
    """``[B, N]`` (packed ``[1, T]``) weights of the real query tokens of a call."""
    out = call.out
    if call.key_padding_mask is not None and not call.cross:  # self-attention: queries are the keys' positions
        return call.key_padding_mask.to(torch.float64)
    return torch.ones(out.shape[0], out.shape[2], dtype=torch.float64, device=out.device)


def head_output_means(model: nn.Module, batches: Iterable[dict], task, *, progress: bool = False,
                      sum_tensors: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
                      ) -> list[torch.Tensor]:
    """Per row, ``[H, D]`` float64: every head's mean output over the real query tokens of ``task.forward`` on
    ``batches`` (no head mask, no gradients). ``sum_tensors`` sums the per-process sums of data-parallel runs."""
    sums: dict[int, torch.Tensor] = {}
    tokens: dict[int, torch.Tensor] = {}

    def hook(call: AttentionCall):
        weights = _query_weights(call)
        total = torch.einsum("bhnd,bn->hd", call.out.detach().to(torch.float64), weights)
        sums[call.row] = sums[call.row] + total if call.row in sums else total
        tokens[call.row] = tokens[call.row] + weights.sum() if call.row in tokens else weights.sum()
        return None

    with torch.no_grad(), attention_hook(model, hook):
        for batch in tqdm(batches, desc="head output means", disable=not progress, unit="batch"):
            task.forward(model, batch)
    entry, device = architecture(model), next(model.parameters()).device
    projections = entry.projections_of(model.config)
    shapes = [(projections.heads(site.module, site.block), projections.head_dim(site.module, site.block))
              for site in attention_sites(model)]
    flat = [sums.get(row, torch.zeros(shape, dtype=torch.float64, device=device)) for row, shape in enumerate(shapes)]
    counts = torch.stack([tokens.get(row, torch.zeros((), dtype=torch.float64, device=device))
                          for row in range(len(shapes))])
    if sum_tensors is not None:  # (every process takes part, whatever its shard held)
        *flat, counts = sum_tensors([*flat, counts])
    if bool((counts == 0).any()):
        raise ValueError("mean ablation: no real token reached some attention rows (no batches, or only padding); "
                         "the heads' mean outputs are undefined")
    return [total / count for total, count in zip(flat, counts)]


def resample_sources(size: int, seed: int) -> torch.Tensor:
    """``[size]`` long: the source row of every row of a batch of ``size`` examples. A random order ``o`` (from
    ``seed``) is walked as one cycle: ``source[o[i]] = o[(i + 1) % size]``, so no row is its own source when
    ``size >= 2``. The same for every batch of that size."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    sources = torch.empty(size, dtype=torch.long)
    sources[order] = order.roll(-1)
    return sources


def _resampled(call: AttentionCall, sources: torch.Tensor) -> torch.Tensor:
    """The replacement of an unablated call: every example's outputs taken from its source example, position by
    position (zeros where the source has padding). Same layout as ``call.out``."""
    out = call.out.detach()
    sources = sources.to(out.device)
    if call.packed is not None:
        packed = call.packed
        lookup = torch.full((packed.batch * packed.seq,), -1, dtype=torch.long, device=out.device)
        lookup[packed.index] = torch.arange(packed.index.numel(), device=out.device)
        index = packed.index.to(out.device)
        source = lookup[sources[index // packed.seq] * packed.seq + index % packed.seq]  # [T], -1: source padding
        taken = out[:, :, source.clamp(min=0)]
        return taken * (source >= 0).to(out.dtype)[None, None, :, None]
    if len(sources) != out.shape[0]:
        raise RuntimeError(f"resample ablation: {out.shape[0]} examples in an attention call of a batch of "
                           f"{len(sources)}")
    taken = out[sources]
    if call.key_padding_mask is not None and not call.cross:
        taken = taken * call.key_padding_mask[sources].to(out.dtype)[:, None, :, None]
    return taken


class Ablation:
    """How a sweep ablates heads (see the module docstring). ``baseline(model)`` wraps the unmasked pass of each
    batch; ``masked(model)`` wraps each masked pass of that batch (k copies of it in one call)."""

    def __init__(self, kind: str = "zero", *, means: list[torch.Tensor] | None = None, seed: int = 0):
        self.kind = check_ablation(kind)
        self.means = means
        self.seed = seed
        self._captured: list[dict[int, torch.Tensor]] = []
        if kind == "mean" and means is None:
            raise ValueError("mean ablation needs the head output means (head_output_means)")

    @contextlib.contextmanager
    def baseline(self, model: nn.Module) -> Iterator[None]:
        if self.kind != "resample":
            yield
            return
        self._captured = []
        first = calls_so_far(model)

        def capture(call: AttentionCall):
            if call.head_mask is None:
                index = calls_so_far(model) - first - 1
                while len(self._captured) <= index:
                    self._captured.append({})
                batch = call.packed.batch if call.packed is not None else call.out.shape[0]
                self._captured[index][call.row] = _resampled(call, resample_sources(batch, self.seed))
            return None

        with attention_hook(model, capture):
            yield

    @contextlib.contextmanager
    def masked(self, model: nn.Module) -> Iterator[None]:
        if self.kind == "zero":
            yield
            return
        first = calls_so_far(model)

        def replace(call: AttentionCall):
            if call.head_mask is None:
                return None
            if self.kind == "mean":
                return _blend(call, self.means[call.row].to(call.out.device)[None, :, None, :])
            index = calls_so_far(model) - first - 1
            if index >= len(self._captured) or call.row not in self._captured[index]:
                raise RuntimeError("resample ablation: a masked pass ran a model call or row that the unmasked pass "
                                   "of the batch did not")
            replacement = self._captured[index][call.row]
            axis = 2 if call.packed is not None else 0
            copies, remainder = divmod(call.out.shape[axis], replacement.shape[axis])
            if remainder:
                raise RuntimeError(f"resample ablation: an attention call of {call.out.shape[axis]} rows/tokens is "
                                   f"not a number of copies of the unmasked call's {replacement.shape[axis]}")
            repeats = [1, 1, 1, 1]
            repeats[axis] = copies
            return _blend(call, replacement.repeat(*repeats))

        with attention_hook(model, replace):
            yield


def prepare_ablation(kind: str, model: nn.Module, batches: Iterable[dict], task, *, seed: int = 0,
                     progress: bool = False,
                     sum_tensors: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> Ablation:
    """The :class:`Ablation` of ``kind`` for a sweep over ``batches`` (the mean pass runs here for ``"mean"``)."""
    check_ablation(kind)
    means = head_output_means(model, batches, task, progress=progress, sum_tensors=sum_tensors) \
        if kind == "mean" else None
    return Ablation(kind, means=means, seed=seed)

"""Per-head attention statistics accumulated from the fused pass's row statistics (never from stored maps)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .kernels.common import row_statistics

# Per-call sums kept per layer before they are added up: one reduction per this many calls, not one per call
_PENDING_SUMS = 64


def head_sums(entropy: torch.Tensor, max_prob: torch.Tensor, query_mask: torch.Tensor | None):
    """One layer's row statistics ``[B, H, N]`` -> ``(sums [2, H] float64, tokens)``: the entropy and max-probability
    sums over the non-padding queries (``query_mask`` ``[B, N]``, bool or 0/1 floats, None = every query) and their
    count (a host int without a mask, else a 0-d float64 tensor: no host-device sync either way): :func:`block_sums`
    of one layer."""
    sums, tokens = block_sums([(entropy, max_prob)], query_mask)
    return sums[0], tokens


def block_sums(rows: list[tuple[torch.Tensor, torch.Tensor]], query_mask: torch.Tensor | None):
    """Several layers' row statistics of one model call, ``(entropy, max_prob)`` ``[B, H, N]`` each (one shape),
    -> ``(sums [n, 2, H] float64, tokens)``: the entropy and max-probability sums of each layer over the non-padding
    queries and their count (see :func:`head_sums`), in one reduction. Without a mask, one layer's is a single
    reduction of a view (the Triton backend returns both statistics as halves of one buffer)."""
    statistics = [row_statistics(entropy, max_prob) for entropy, max_prob in rows]  # [2, B, H, N] each
    stacked = statistics[0].unsqueeze(0) if len(statistics) == 1 else torch.stack(statistics)  # [n, 2, B, H, N]
    if query_mask is None:
        return stacked.sum(dim=(2, 4), dtype=torch.float64), stacked.shape[2] * stacked.shape[4]
    weights = query_mask.to(torch.float64)
    keep = weights[None, None, :, None, :] > 0  # padded queries never count, whatever their rows hold
    sums = torch.einsum("ksbhn,bn->ksh", torch.where(keep, stacked.double(), 0.0), weights)
    return sums, weights.sum()


class HeadStatistics:
    """Running sums, per layer and head, over the non-padding query tokens of every forward pass seen.

    entropy_sum[l]:  ``[H_l]`` sum over tokens of the attention entropy ``-sum_j p_j log p_j`` (nats).
    max_prob_sum[l]: ``[H_l]`` sum over tokens of the largest attention probability.
    tokens[l]:       number of non-padding query tokens seen by layer ``l`` (an int, or a 0-d tensor).

    The statistics describe each head's softmax distribution before any head mask is applied. Sums are kept
    in float64 on the model's device; :meth:`entropy` and :meth:`max_prob` return ``[L, H]`` per-token means on
    the CPU (NaN for heads a pruned layer no longer has; ValueError when every recorded query was padding).
    Padded queries never count, whatever values the attention backend left in their rows.

    Recording never synchronises and costs one reduction per model call (the patch hands a call's layers over as
    one block, :meth:`add_block`): the blocks and per-layer ``[2, H]`` sums are kept and added up once per
    ``_PENDING_SUMS`` calls (and when the sums are read).
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._pending: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # per layer: [2, H] float64 sums
        self._blocks: list[tuple[tuple[int, ...], torch.Tensor]] = []  # (rows, [n, 2, H] float64 sums)
        self.tokens: list = [None] * num_layers

    def add_block(self, rows: tuple[int, ...], sums: torch.Tensor, tokens) -> None:
        """Accumulate :func:`block_sums` of layers ``rows`` (``[n, 2, H]`` float64, their common token count)."""
        self._blocks.append((rows, sums))
        for row in rows:
            self.tokens[row] = tokens if self.tokens[row] is None else self.tokens[row] + tokens
        if len(self._blocks) >= _PENDING_SUMS:
            self._fold()

    def _fold(self) -> None:
        """Move the blocks into the per-layer sums (blocks of the same layers added up first)."""
        blocks, self._blocks = self._blocks, []
        groups: dict = {}
        for rows, sums in blocks:
            groups.setdefault((rows, tuple(sums.shape)), []).append(sums)
        for (rows, _), group in groups.items():
            total = group[0] if len(group) == 1 else torch.stack(group).sum(0)
            for index, row in enumerate(rows):
                self._pending[row].append(total[index])
        for pending in self._pending:
            if len(pending) > 1:
                pending[:] = [torch.stack(pending).sum(0)]

    def add(self, layer: int, entropy: torch.Tensor, max_prob: torch.Tensor, query_mask: torch.Tensor | None):
        """Accumulate one layer's row statistics ``[B, H, N]``; ``query_mask`` bool ``[B, N]`` (None = all)."""
        self.add_sums(layer, *head_sums(entropy, max_prob, query_mask))

    def add_sums(self, layer: int, sums: torch.Tensor, tokens) -> None:
        """Accumulate one layer's :func:`head_sums` (``[2, H]`` float64 and the token count)."""
        pending = self._pending[layer]
        pending.append(sums)
        if len(pending) >= _PENDING_SUMS:
            self._pending[layer] = [torch.stack(pending).sum(0)]
        self.tokens[layer] = tokens if self.tokens[layer] is None else self.tokens[layer] + tokens

    def _sums(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s ``[2, H]`` sums so far (None if it was never recorded)."""
        if self._blocks:
            self._fold()
        pending = self._pending[layer]
        if not pending:
            return None
        if len(pending) > 1:
            self._pending[layer] = [torch.stack(pending).sum(0)]
        return self._pending[layer][0]

    def _set_sums(self, layer: int, entropy_sum: torch.Tensor, max_prob_sum: torch.Tensor) -> None:
        self._pending[layer] = [torch.stack((entropy_sum, max_prob_sum))]

    @property
    def entropy_sum(self) -> list[torch.Tensor | None]:
        return [None if (sums := self._sums(layer)) is None else sums[0] for layer in range(self.num_layers)]

    @property
    def max_prob_sum(self) -> list[torch.Tensor | None]:
        return [None if (sums := self._sums(layer)) is None else sums[1] for layer in range(self.num_layers)]

    def _per_token(self, sums: list[torch.Tensor | None]) -> torch.Tensor:
        if any(t is not None for t in self.tokens) and all(t is None or t == 0 for t in self.tokens):
            raise ValueError("no non-padding query token was recorded (every example was all padding): there is no "
                             "attention statistic to average; check the batches' attention_mask")
        heads = max((s.numel() for s in sums if s is not None), default=0)
        table = torch.full((self.num_layers, heads), float("nan"), dtype=torch.float64)
        for layer, values in enumerate(sums):
            if values is not None and self.tokens[layer] > 0:
                table[layer, : values.numel()] = (values / self.tokens[layer]).cpu()
        return table

    def entropy(self) -> torch.Tensor:
        """``[L, H]`` mean attention entropy per non-padding query token."""
        return self._per_token(self.entropy_sum)

    def max_prob(self) -> torch.Tensor:
        """``[L, H]`` mean largest attention probability per non-padding query token."""
        return self._per_token(self.max_prob_sum)

    def reduce(self, sum_tensors: Callable[[list[torch.Tensor]], list[torch.Tensor]], heads: list[int]) -> None:
        """Replace the sums by ``sum_tensors`` of them (e.g. summed over data-parallel processes, each calling
        this with the same arguments); ``heads[l]`` is layer l's head count, for layers this object never saw."""
        self._fold()
        device = next((pending[0].device for pending in self._pending if pending), torch.device("cpu"))
        (seen,) = sum_tensors([torch.tensor([float(t is not None) for t in self.tokens], dtype=torch.float64,
                                            device=device)])
        layers = [layer for layer in range(self.num_layers) if seen[layer] > 0]
        tensors = []
        entropy_sums, max_prob_sums = self.entropy_sum, self.max_prob_sum
        for layer in layers:
            zeros = torch.zeros(heads[layer], dtype=torch.float64, device=device)
            for sums in (entropy_sums, max_prob_sums):
                tensors.append(sums[layer] if sums[layer] is not None else zeros)
            tokens = self.tokens[layer]
            tensors.append(torch.as_tensor(tokens, dtype=torch.float64, device=device) if tokens is not None
                           else zeros.new_zeros(()))
        reduced = sum_tensors(tensors) if tensors else []
        for position, layer in enumerate(layers):
            entropy_sum, max_prob_sum, self.tokens[layer] = reduced[3 * position:3 * position + 3]
            self._set_sums(layer, entropy_sum, max_prob_sum)

    def token_count(self) -> int:
        """Non-padding query tokens seen (by the first layer that saw any)."""
        counts = [t for t in self.tokens if t is not None]
        return int(counts[0]) if counts else 0


@contextlib.contextmanager
def record(model: torch.nn.Module) -> Iterator[HeadStatistics]:
    """Accumulate per-head statistics over every forward pass of a patched ``model`` inside the block.

    >>> with fastbertology.record(model) as stats:
    ...     model(**batch)
    >>> stats.entropy()   # [L, H]
    """
    state = getattr(model, "_fastbertology_state", None)
    if state is None:
        raise RuntimeError("record() needs a patched model: call fastbertology.patch(model) first")
    stats = HeadStatistics(state.num_layers)
    state.recorders.append(stats)
    try:
        yield stats
    finally:
        state.recorders.remove(stats)

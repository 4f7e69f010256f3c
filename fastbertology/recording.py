"""Per-head attention statistics accumulated from the fused pass's row statistics (never from stored maps)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class HeadStatistics:
    """Running sums, per layer and head, over the non-padding query tokens of every forward pass seen.

    entropy_sum[l]:  ``[H_l]`` sum over tokens of the attention entropy ``-sum_j p_j log p_j`` (nats).
    max_prob_sum[l]: ``[H_l]`` sum over tokens of the largest attention probability.
    tokens[l]:       number of non-padding query tokens seen by layer ``l``.

    The statistics describe each head's softmax distribution before any head mask is applied. Sums are kept
    in float64 on the model's device; :meth:`entropy` and :meth:`max_prob` return ``[L, H]`` per-token means on
    the CPU (NaN for heads a pruned layer no longer has; ValueError when every recorded query was padding).
    Padded queries never count, whatever values the attention backend left in their rows.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.entropy_sum: list[torch.Tensor | None] = [None] * num_layers
        self.max_prob_sum: list[torch.Tensor | None] = [None] * num_layers
        self.tokens: list[torch.Tensor | None] = [None] * num_layers

    def add(self, layer: int, entropy: torch.Tensor, max_prob: torch.Tensor, query_mask: torch.Tensor | None):
        """Accumulate one layer's row statistics ``[B, H, N]``; ``query_mask`` bool ``[B, N]`` (None = all)."""
        if query_mask is None:
            weights = torch.ones(entropy.shape[0], entropy.shape[2], dtype=torch.float64, device=entropy.device)
        else:
            weights = query_mask.to(torch.float64)
        keep = weights[:, None, :] > 0  # padded queries: whatever the backend left there (NaN...) never counts
        entropy_sum = torch.einsum("bhn,bn->h", torch.where(keep, entropy.double(), 0.0), weights)
        max_prob_sum = torch.einsum("bhn,bn->h", torch.where(keep, max_prob.double(), 0.0), weights)
        tokens = weights.sum()
        if self.tokens[layer] is None:
            self.entropy_sum[layer], self.max_prob_sum[layer], self.tokens[layer] = entropy_sum, max_prob_sum, tokens
        else:
            self.entropy_sum[layer] += entropy_sum
            self.max_prob_sum[layer] += max_prob_sum
            self.tokens[layer] += tokens

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
        device = next((t.device for t in self.tokens if t is not None), torch.device("cpu"))
        (seen,) = sum_tensors([torch.tensor([float(t is not None) for t in self.tokens], dtype=torch.float64,
                                            device=device)])
        layers = [layer for layer in range(self.num_layers) if seen[layer] > 0]
        tensors = []
        for layer in layers:
            zeros = torch.zeros(heads[layer], dtype=torch.float64, device=device)
            for sums in (self.entropy_sum, self.max_prob_sum):
                tensors.append(sums[layer] if sums[layer] is not None else zeros)
            tensors.append(self.tokens[layer] if self.tokens[layer] is not None else zeros.new_zeros(()))
        reduced = sum_tensors(tensors) if tensors else []
        for position, layer in enumerate(layers):
            sums = reduced[3 * position:3 * position + 3]
            self.entropy_sum[layer], self.max_prob_sum[layer], self.tokens[layer] = sums

    def token_count(self) -> int:
        """Non-padding query tokens seen (by the first layer that saw any)."""
        counts = [t for t in self.tokens if t is not None]
        return int(counts[0].item()) if counts else 0


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

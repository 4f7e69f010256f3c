"""What chosen heads look at: their attention probabilities on a few examples, for the report.

The maps come from the patched model's ``output_attentions=True`` output — the kernels' probabilities times the
head mask, ``[B, H, N, N]`` per layer (such calls run padded; no head mask here, so they are the plain softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .architectures import architecture, row_attentions
from .importance import require_patched

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Pattern:
    """One example's attention maps. ``row``: its position in the batch; ``length``: its tokens; ``input_ids``:
    its first ``shown`` token ids; ``maps``: ``{(layer, head): [shown, shown]}`` probabilities (query rows, key
    columns) over its first ``shown`` tokens."""

    row: int
    length: int
    shown: int
    input_ids: list[int]
    maps: dict[tuple[int, int], torch.Tensor]


def extreme_heads(importance: torch.Tensor) -> list[tuple[str, int, int]]:
    """``[("most important", layer, head), ("least important", layer, head)]`` of an ``[L, H]`` table (first
    occurrence on ties)."""
    heads = importance.shape[1]
    most, least = int(torch.argmax(importance)), int(torch.argmin(importance))
    return [("most important", most // heads, most % heads), ("least important", least // heads, least % heads)]


def choose_rows(attention_mask: torch.Tensor, *, count: int = 3, max_tokens: int = 32) -> list[int]:
    """Up to ``count`` rows of a batch (``attention_mask [B, N]``) to show: those of at most ``max_tokens`` tokens
    in batch order, else (all longer) the shortest."""
    lengths = attention_mask.sum(1).tolist()
    short = [row for row, n in enumerate(lengths) if n <= max_tokens]
    if short:
        return short[:count]
    return sorted(range(len(lengths)), key=lambda row: (lengths[row], row))[:count]


@torch.no_grad()
def attention_patterns(model, batch: dict, heads: Sequence[tuple[int, int]], rows: Sequence[int], *,
                       max_tokens: int = 32) -> list[Pattern]:
    """The attention maps of ``heads`` (``(layer, head)`` pairs) for the examples at ``rows`` of ``batch`` (right-
    padded ``input_ids`` / ``attention_mask`` ``[B, N]``, optional ``token_type_ids``), each over its first
    ``max_tokens`` tokens (for a bidirectional model, rows of a longer example then do not sum to 1: the keys past
    the window are not shown). A causal language model runs on those tokens only (its first tokens never see the
    later ones): the maps of a long sequence cost ``max_tokens^2``, not ``N^2``, per head."""
    require_patched(model)
    index = torch.as_tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)
    inputs = {key: batch[key].index_select(0, index) for key in MODEL_INPUTS if key in batch}
    width = max(int(inputs["attention_mask"].sum(1).max()), 1)
    if architecture(model).causal_lm:
        width = min(width, max_tokens)
    inputs = {key: value[:, :width] for key, value in inputs.items()}
    attentions = row_attentions(model, model(**inputs, output_attentions=True))  # rows x [B, H, N_q, N_k]
    patterns = []
    for i, row in enumerate(rows):
        length = int(inputs["attention_mask"][i].sum())
        shown = min(length, max_tokens)
        maps = {(layer, head): attentions[layer][i, head, :shown, :shown].float().cpu() for layer, head in heads}
        patterns.append(Pattern(row=int(row), length=length, shown=shown,
                                input_ids=inputs["input_ids"][i, :shown].tolist(), maps=maps))
    return patterns

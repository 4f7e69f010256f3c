"""The eager way to score head types: stock attention maps (``output_attentions=True``), means taken from them.

What TransformerLens's ``head_detector`` does: run eager attention, keep every ``[B, H, N, N]`` map, and read the
scores off them (:mod:`fastbertology.head_types` has the definitions). Independent of fastbertology's patch: the
model is the stock transformers model with ``attn_implementation="eager"``. Needs right-padded batches (the real
tokens of an example at positions ``0 .. n - 1``), as the benchmark's workloads are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..head_types import HEAD_TYPES, induction_sequences, special_token_ids, text_calls


def _add(sums: dict, counts: dict, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
    """``values [B, H, Q]`` weighted by ``weights [B, Q]`` (0/1), summed into ``sums[name]`` ``[H]``."""
    weights = weights.to(torch.float64)
    total = torch.einsum("bhq,bq->h", values.double(), weights)
    sums[name] = sums.get(name, 0) + total
    counts[name] = counts.get(name, 0) + float(weights.sum())


def _data_scores(maps: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, sums: dict,
                 counts: dict) -> None:
    """Accumulate the data scores of one layer's maps ``[B, H, N, N]`` (right-padded inputs ``[B, N]``)."""
    real = attention_mask.bool()
    _add(sums, counts, "previous_token", torch.diagonal(maps, offset=-1, dim1=-2, dim2=-1), real[:, 1:])
    _add(sums, counts, "first_token", maps[..., 0], real)
    seq = input_ids.shape[1]
    earlier = torch.ones(seq, seq, dtype=torch.bool, device=maps.device).tril(-1)  # key j < query i
    same = (input_ids[:, :, None] == input_ids[:, None, :]) & earlier & real[:, None, :] & real[:, :, None]
    _add(sums, counts, "duplicate_token", (maps * same[:, None].to(maps.dtype)).sum(-1), same.any(-1))


def reference_head_types(model, batches: Sequence[dict], *, induction_period: int = 32, induction_count: int = 16,
                         seed: int = 0, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{score: [L, H] float64 on the CPU}`` from the eager maps of ``model`` (unpatched) on ``batches`` and on the
    induction sequences of :func:`fastbertology.head_types.induction_sequences` (same seed)."""
    model.set_attn_implementation("eager")
    layers = []
    sums: list[dict] = []
    counts: list[dict] = []

    def run(inputs, score_maps):
        maps = model(**inputs, output_attentions=True, use_cache=False).attentions
        while len(sums) < len(maps):
            sums.append({})
            counts.append({})
        for layer, layer_maps in enumerate(maps):
            score_maps(layer, layer_maps.to(torch.float64), inputs)
        layers[:] = range(len(maps))

    with torch.no_grad():
        for batch in batches:
            for inputs in text_calls(batch):
                mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
                run(inputs, lambda layer, maps, inputs, mask=mask: _data_scores(maps, inputs["input_ids"], mask,
                                                                                 sums[layer], counts[layer]))
        device = next(model.parameters()).device
        sequences = induction_sequences(model.config.vocab_size, count=induction_count, period=induction_period,
                                        seed=seed, exclude=special_token_ids(model.config)).to(device)
        for start in range(0, induction_count, batch_size):
            input_ids = sequences[start:start + batch_size]
            second = torch.zeros(input_ids.shape[0], induction_period + 1, dtype=torch.bool, device=device)
            second[:, 1:] = True  # diagonal -(P-1) holds queries P-1 .. 2P-1; the second copy starts at P

            def induction(layer, maps, inputs, second=second):
                _add(sums[layer], counts[layer], "induction",
                     torch.diagonal(maps, offset=-(induction_period - 1), dim1=-2, dim2=-1), second)
            run({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, induction)
    return {name: torch.stack([(sums[layer][name] / counts[layer][name]).cpu() for layer in layers])
            for name in HEAD_TYPES}

"""Head-type scores: previous-token, first-token (attention sink), duplicate-token and induction heads, per head.

Each score is a mean, over query tokens i, of attention probabilities ``p(i -> j)`` of the head's softmax (the
distribution before any head mask: the scores describe what a head looks at, masked or not), computed from the
queries, keys and log-sum-exps of the fused pass (:mod:`fastbertology.token_pairs`): ``O(T * H * D)`` work and memory,
no attention map. A *sequence* is the real (non-padding) tokens of one example, in order; i and j are tokens of one
sequence; ``p(i -> j) = 0`` when the model does not let i see j (causal, sliding window).

* ``previous_token``: ``p(i -> i - 1)``, over every token i of the data but the first of its sequence;
* ``first_token``: ``p(i -> first token of i's sequence)`` (attention-sink mass), over every token of the data;
* ``duplicate_token``: ``sum_j p(i -> j)`` over the earlier tokens j < i with the same token id as i, over the tokens
  i of the data that have one;
* ``induction``: on sequences made here (:func:`induction_sequences`: a block of P random token ids repeated twice,
  ``2 P`` tokens, fixed seed), ``p(i -> i - P + 1)`` (the token after the previous occurrence of i's token), over
  the positions ``P .. 2P - 1`` of the second copy.

Rows scored: the self-attention of decoder-only and encoder-only models and of BART's encoder (the stacks fed by
``input_ids``); BART's decoder self-attention and cross-attention rows are NaN. The data pass calls the model on
each batch's ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (and, for retrieval batches, the
``pair_``-prefixed second texts), without a head mask and without gradients (the model must be in eval mode, as
every analysis); the base model runs (no task head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import architecture, heads_per_layer
from .attention_hooks import AttentionCall, attention_hook
from .importance import require_patched
from .token_pairs import TokenPairs, induction_pairs, pair_probabilities, sequence_pairs

HEAD_TYPES = ("previous_token", "first_token", "duplicate_token", "induction")
DATA_TYPES = HEAD_TYPES[:3]
SCORED_PARTS = ("layers", "encoder")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SPECIAL_TOKEN_ATTRIBUTES = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                            "decoder_start_token_id", "mask_token_id", "unk_token_id")


@dataclass
class HeadTypeScores:
    """Result of :func:`head_type_scores`: ``[L, H]`` float64 tables on the CPU (NaN for rows not scored and for a
    score no query token had), and the number of query tokens each mean is over (per score, the first scored row's
    count: every scored row sees the same tokens)."""

    previous_token: torch.Tensor
    first_token: torch.Tensor
    duplicate_token: torch.Tensor
    induction: torch.Tensor
    queries: dict[str, int]
    induction_period: int
    induction_sequences: int
    seed: int

    def tables(self) -> dict[str, torch.Tensor]:
        """``{score name: [L, H]}`` in :data:`HEAD_TYPES` order (what ``head_scores.json`` holds)."""
        return {name: getattr(self, name) for name in HEAD_TYPES}


def induction_sequences(vocab_size: int, *, count: int = 16, period: int = 32, seed: int = 0,
                        exclude: Iterable[int] = ()) -> torch.Tensor:
    """``[count, 2 * period]`` long: per sequence, a block of ``period`` distinct token ids drawn uniformly without
    replacement from ``0 .. vocab_size - 1`` minus ``exclude`` (special tokens), then the same block again. Fixed by
    ``seed`` (a CPU generator of its own)."""
    excluded = set(int(i) for i in exclude)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in excluded], dtype=torch.long)
    if allowed.numel() < period:
        raise ValueError(f"induction sequences need {period} distinct token ids but the vocabulary has "
                         f"{allowed.numel()} (special tokens excluded); lower the induction period")
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.stack([allowed[torch.randperm(allowed.numel(), generator=generator)[:period]]
                          for _ in range(count)])
    return torch.cat([blocks, blocks], dim=1)


def special_token_ids(config) -> list[int]:
    """The special token ids a config names (pad, bos, eos, sep, cls, ...)."""
    found = []
    for name in SPECIAL_TOKEN_ATTRIBUTES:
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return sorted(set(found))


class _Accumulator:
    """The attention hook: per row and score, the sum over pairs of ``p(i -> j)`` ``[H]`` and the query count."""

    def __init__(self, rows: int):
        self.sums: dict[str, list[torch.Tensor | None]] = {name: [None] * rows for name in HEAD_TYPES}
        self.counts: dict[str, list[int]] = {name: [0] * rows for name in HEAD_TYPES}
        self.pairs: dict[str, TokenPairs] = {}  # the pairs of the model call running now

    def __call__(self, call: AttentionCall):
        if call.cross or call.part not in SCORED_PARTS:
            return None
        for name, pairs in self.pairs.items():
            total = pair_probabilities(call, pairs).sum(0)  # [H]
            sums = self.sums[name]
            sums[call.row] = total if sums[call.row] is None else sums[call.row] + total
            self.counts[name][call.row] += pairs.queries
        return None

    def run(self, model, inputs: dict, pairs: dict[str, TokenPairs]) -> None:
        """One call of the base model (no task head: it is not needed, and a classification head may refuse the
        induction sequences) on ``inputs`` with the hook reading ``pairs``."""
        self.pairs = pairs
        try:
            model.base_model(**inputs, use_cache=False)
        finally:
            self.pairs = {}

    def table(self, name: str, heads: int) -> torch.Tensor:
        rows = len(self.counts[name])
        table = torch.full((rows, heads), float("nan"), dtype=torch.float64)
        for row, (total, count) in enumerate(zip(self.sums[name], self.counts[name])):
            if total is not None and count > 0:
                table[row, :total.numel()] = (total / count).cpu()
        return table

    def reduce(self, sum_tensors: Callable[[list[torch.Tensor]], list[torch.Tensor]], heads: list[int],
               names: Iterable[str], device) -> None:
        """Replace the sums and counts of ``names`` by ``sum_tensors`` of them (data-parallel processes)."""
        tensors = []
        for name in names:
            for row, total in enumerate(self.sums[name]):
                tensors.append(total if total is not None else torch.zeros(heads[row], dtype=torch.float64,
                                                                           device=device))
            tensors.append(torch.tensor(self.counts[name], dtype=torch.float64, device=device))
        reduced = iter(sum_tensors(tensors))
        for name in names:
            self.sums[name] = [next(reduced) for _ in self.sums[name]]
            self.counts[name] = [int(c) for c in next(reduced).tolist()]


def text_calls(batch: dict) -> list[dict]:
    """The model inputs of one batch: its texts, and for retrieval batches the ``pair_`` texts too."""
    calls = []
    for prefix in ("", "pair_"):
        if prefix + "input_ids" in batch:
            calls.append({key: batch[prefix + key] for key in TEXT_INPUTS if prefix + key in batch})
    if not calls:
        raise ValueError(f"head-type scores need token ids: a batch has no input_ids (keys: {sorted(batch)})")
    return calls


def check_head_type_options(model: nn.Module, *, induction_period: int, induction_count: int = 1,
                            batch_size: int = 1) -> None:
    """ValueError when head-type scores cannot be computed for ``model`` with these options (image and audio models,
    induction sequences longer than the model's positions, non-positive counts)."""
    entry = architecture(model)
    if entry.inputs != "text":
        raise ValueError(f"head-type scores need token ids; a {entry.name} model takes {entry.inputs} inputs (no "
                         "token ids, so no previous, duplicate or induction tokens)")
    if induction_period < 1 or induction_count < 1 or batch_size < 1:
        raise ValueError(f"induction_period, induction_count and batch_size must be positive; got {induction_period}, "
                         f"{induction_count}, {batch_size}")
    longest = entry.usable_positions(model.config)
    if longest is not None and 2 * induction_period > longest:
        raise ValueError(f"induction sequences of 2 x {induction_period} tokens are longer than this model's "
                         f"{longest} positions; choose an induction period (--induction-period) of at most "
                         f"{longest // 2}")


def head_type_scores(model: nn.Module, batches: Iterable[dict], *, induction_period: int = 32,
                     induction_count: int = 16, seed: int = 0, batch_size: int = 32, progress: bool = False,
                     sum_tensors: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
                     ) -> HeadTypeScores:
    """Head-type scores (see the module docstring) of a patched ``model`` over ``batches``.

    batches:          batch dicts with right-padded ``input_ids`` / ``attention_mask`` ``[B, N]`` (optional
                      ``token_type_ids``; retrieval batches: also ``pair_input_ids`` ...), on the model's device.
    induction_period: P, the length of the repeated block (sequences of 2P tokens; the model must take them).
    induction_count:  how many induction sequences, run ``batch_size`` at a time.
    seed:             the seed of the induction sequences.
    sum_tensors:      sums a list of tensors over data-parallel processes (each process passing its shard of the
                      batches; the induction sequences are the same everywhere and are not summed).
    """
    require_patched(model)
    check_head_type_options(model, induction_period=induction_period, induction_count=induction_count,
                            batch_size=batch_size)
    counts = heads_per_layer(model)
    device = next(model.parameters()).device
    accumulator = _Accumulator(len(counts))
    with torch.no_grad(), attention_hook(model, accumulator):
        for batch in tqdm(batches, desc="head types", disable=not progress, unit="batch"):
            for inputs in text_calls(batch):
                pairs = sequence_pairs(inputs["input_ids"], inputs.get("attention_mask"))
                accumulator.run(model, inputs, {name: pairs[name] for name in DATA_TYPES})
        if sum_tensors is not None:
            accumulator.reduce(sum_tensors, counts, DATA_TYPES, device)
        sequences = induction_sequences(model.config.get_text_config().vocab_size, count=induction_count,
                                        period=induction_period, seed=seed,
                                        exclude=special_token_ids(model.config)).to(device)
        for start in range(0, induction_count, batch_size):
            input_ids = sequences[start:start + batch_size]
            accumulator.run(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
                            {"induction": induction_pairs(len(input_ids), induction_period)})
    heads = max(counts, default=0)
    return HeadTypeScores(
        **{name: accumulator.table(name, heads) for name in HEAD_TYPES},
        queries={name: max(accumulator.counts[name], default=0) for name in HEAD_TYPES},
        induction_period=induction_period, induction_sequences=induction_count, seed=seed)

"""Batching helpers: fixed-order padded batches and length-bucketed batches trimmed to their longest example.

Examples are a dict of tensors whose first dimension is the example index ``n`` and which contains a right-padded
``attention_mask`` ``[n, S]`` (1 = token, 0 = padding; every row's tokens come first). Every 2-D tensor with
second dimension ``S`` (``input_ids``, ``attention_mask``, ``token_type_ids``, token-level ``labels``) is a
per-token tensor; everything else (e.g. sequence ``labels`` ``[n]``) is per example.

Length bucketing sorts the examples by length (within windows of ``window`` consecutive examples) and cuts every
batch at its longest example, so that little attention compute is spent on padding. What stays the same and what
does not (for :func:`fastbertology.importance.analyze_heads` on models whose outputs at real tokens do not depend
on padding, e.g. BERT and GPT-2 with right padding):

* unchanged up to floating-point summation order: entropy and max-probability tables (per-token sums), the token
  and example counts, sum-style metrics (accuracy; perplexity from summed token NLL), and ``"per_example"``
  importance (a sum over examples of each example's own ``|dL(x)/dmask|``);
* changed: ``"per_batch"`` importance (``|dL_batch/dmask|`` of a batch mean depends on which examples share a
  batch), the mean batch loss, and anything order-dependent. Use ``importance="per_example"`` with bucketing when
  results must not depend on the batching.
"""

from __future__ import annotations

import torch


def example_lengths(examples: dict) -> torch.Tensor:
    """``[n]`` int64 number of tokens per example (sum of the right-padded ``attention_mask`` ``[n, S]``)."""
    mask = examples["attention_mask"]
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask.bool(), positions[None, :] < lengths[:, None]):
        raise ValueError("attention_mask must be right-padded (1s first, then 0s) for length bucketing")
    return lengths.long()


def length_bucketed_order(lengths: torch.Tensor, *, window: int | None = None,
                          descending: bool = True) -> torch.Tensor:
    """A permutation ``[n]`` of the examples: consecutive windows of ``window`` examples (default: all of them),
    each sorted by length (stable, so equal lengths keep their order). ``lengths``: ``[n]`` ints."""
    lengths = lengths.detach().cpu().long()
    n = lengths.numel()
    window = n if window is None else int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    pieces = []
    for start in range(0, n, window):
        chunk = lengths[start:start + window]
        order = torch.sort(-chunk if descending else chunk, stable=True).indices
        pieces.append(order + start)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def collate(examples: dict, indices: torch.Tensor, *, trim: bool = True) -> dict:
    """The batch of ``examples`` at ``indices`` ``[B]``; with ``trim``, per-token tensors ``[B, S]`` are cut to
    ``[B, S_b]`` where ``S_b`` is the longest example in the batch."""
    seq = examples["attention_mask"].shape[1]
    device = examples["attention_mask"].device
    index = indices.to(device)
    width = seq
    if trim:
        width = max(int(examples["attention_mask"].index_select(0, index).sum(1).max()), 1)
    batch = {}
    for name, tensor in examples.items():
        rows = tensor.index_select(0, index.to(tensor.device))
        if tensor.dim() == 2 and tensor.shape[1] == seq:
            rows = rows[:, :width].contiguous()
        batch[name] = rows
    return batch


def padded_batches(examples: dict, batch_size: int) -> list[dict]:
    """Batches in example order, every one padded to the full length ``S`` (what the baselines get)."""
    n = examples["attention_mask"].shape[0]
    return [collate(examples, torch.arange(start, min(start + batch_size, n)), trim=False)
            for start in range(0, n, batch_size)]


def bucketed_batches(examples: dict, batch_size: int, *, window: int | None = None,
                     descending: bool = True) -> list[dict]:
    """Length-bucketed batches (see the module docstring): order by :func:`length_bucketed_order`, cut into
    batches of ``batch_size``, each trimmed to its longest example. The union of the batches is the data set."""
    order = length_bucketed_order(example_lengths(examples), window=window, descending=descending)
    return [collate(examples, order[start:start + batch_size], trim=True) for start in range(0, len(order), batch_size)]

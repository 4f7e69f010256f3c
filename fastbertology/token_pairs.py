"""Attention probabilities of chosen (query, key) token pairs, from q, k and the log-sum-exp: no attention map.

For a pair (i, j) of one head, ``p(i -> j) = exp(scale * q_i . k_j - lse_i)``: the probability of the head's softmax
(before any head mask) that the full map would hold at row i, column j — zero where j is not visible to i (causal,
sliding window; padding never appears in a pair). The work and memory are ``O(P * H * D)`` for P pairs, computed in
chunks. The pairs of each head-type score (:mod:`fastbertology.head_types`) are built here from the token ids.

Pairs are given in *padded coordinates*: example ``b`` of the model call, positions ``n`` of its ``[B, N]`` inputs;
for a padding-free call they are mapped to the packed stream through the patch's packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_hooks import AttentionCall
from .kernels.modifiers import capped

# Elements of the gathered query rows per chunk of pairs (16M float32 = 64 MiB)
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TokenPairs:
    """(query, key) token pairs of one model call on ``[B, N]`` inputs.

    batch, query, key: ``[P]`` long: the example, the query position and the key position of every pair.
    queries:           the number of distinct query tokens the pairs belong to (what a mean per query divides by).
    """

    batch: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    queries: int

    def __len__(self) -> int:
        return int(self.batch.numel())


def _real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The real tokens of ``[B, N]`` inputs in (example, position) order: ``(example [T], position [T], ids [T])``."""
    batch, seq = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    flat = keep.flatten().nonzero().squeeze(1)
    return flat // seq, flat % seq, input_ids.flatten()[flat]


def _group_starts(new_group: torch.Tensor) -> torch.Tensor:
    """For every element of a sequence cut into runs (``new_group [T]`` bool, True at each run's first element),
    the index of its run's first element."""
    index = torch.arange(new_group.numel(), device=new_group.device)
    return torch.cummax(torch.where(new_group, index, torch.zeros_like(index)), 0).values


def sequence_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, TokenPairs]:
    """The pairs of the data scores for ``input_ids [B, N]`` with ``attention_mask [B, N]`` (1 = real token; None:
    all real). A sequence is the real tokens of one example, in position order; "previous" and "first" are meant
    within it.

    previous_token:  (i, the real token before i), for every real token i but the first of its sequence.
    first_token:     (i, the first real token of its sequence), for every real token i (the first one included).
    duplicate_token: (i, j) for every earlier real token j of the sequence with the same id as i; ``queries``
                     counts the tokens i that have one.
    """
    example, position, ids = _real_tokens(input_ids, attention_mask)
    count = example.numel()
    new_example = torch.ones(count, dtype=torch.bool, device=example.device)
    new_example[1:] = example[1:] != example[:-1]
    first = _group_starts(new_example)
    later = (~new_example).nonzero().squeeze(1)
    pairs = {
        "previous_token": TokenPairs(example[later], position[later], position[later - 1], int(later.numel())),
        "first_token": TokenPairs(example, position, position[first], count),
    }
    # Sort by (example, id, position): tokens of one example with one id become runs, each in position order.
    order = torch.argsort(ids, stable=True)
    order = order[torch.argsort(example[order], stable=True)]
    sorted_example, sorted_ids = example[order], ids[order]
    new_run = torch.ones(count, dtype=torch.bool, device=example.device)
    new_run[1:] = (sorted_example[1:] != sorted_example[:-1]) | (sorted_ids[1:] != sorted_ids[:-1])
    starts = _group_starts(new_run)
    earlier = torch.arange(count, device=example.device) - starts  # earlier tokens with the same id
    query = torch.repeat_interleave(torch.arange(count, device=example.device), earlier)  # sorted index per pair
    offsets = torch.arange(query.numel(), device=example.device) - torch.repeat_interleave(
        torch.cumsum(earlier, 0) - earlier, earlier)
    key = starts[query] + offsets
    pairs["duplicate_token"] = TokenPairs(sorted_example[query], position[order[query]], position[order[key]],
                                          int((earlier > 0).sum()))
    return pairs


def induction_pairs(batch: int, period: int, device=None) -> TokenPairs:
    """The induction pairs of ``batch`` sequences of ``2 * period`` tokens (a block repeated twice): (i, i - period
    + 1) for every position i of the second copy."""
    query = torch.arange(period, 2 * period, device=device).repeat(batch)
    example = torch.arange(batch, device=device).repeat_interleave(period)
    return TokenPairs(example, query, query - period + 1, batch * period)


def _packed_lookup(packed) -> torch.Tensor:
    """``[B * N]`` long: the packed token of every flat padded position ``b * N + n`` (-1 at padding)."""
    lookup = torch.full((packed.batch * packed.seq,), -1, dtype=torch.long, device=packed.index.device)
    lookup[packed.index] = torch.arange(packed.index.numel(), device=packed.index.device)
    return lookup


def _visible(call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: whether key position ``key`` is visible to query position ``query`` (same sequence)."""
    visible = torch.ones_like(query, dtype=torch.bool)
    if call.causal:
        visible &= key <= query
    if call.window is not None:
        visible &= (query - key < call.window) & (key - query < (1 if call.causal else call.window))
    return visible


def pair_probabilities(call: AttentionCall, pairs: TokenPairs) -> torch.Tensor:
    """``[P, H]`` float64: ``p(i -> j)`` of every head for every pair of ``pairs`` in the attention application
    ``call`` (self-attention; the pairs' coordinates are those of the call's ``[B, N]`` inputs)."""
    query, key, lse = call.query, call.key, call.lse
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    if heads == 0 or len(pairs) == 0:
        return torch.zeros(len(pairs), heads, dtype=torch.float64, device=query.device)
    device = query.device
    example, query_pos, key_pos = (t.to(device) for t in (pairs.batch, pairs.query, pairs.key))
    if call.packed is not None:
        lookup = _packed_lookup(call.packed)
        rows = lookup[example * call.packed.seq + query_pos]
        columns = lookup[example * call.packed.seq + key_pos]
        if bool((rows < 0).any() or (columns < 0).any()):
            raise RuntimeError("a token pair points at padding of a padding-free call; the pairs do not belong to "
                               "this batch")
        queries, keys, lses = query[0].transpose(0, 1), key[0].transpose(0, 1), lse[0].t()  # [T, H(_kv), ...]
        select = (rows, columns, rows)
    else:
        if query.shape[0] <= int(example.max()) or query.shape[2] <= int(max(query_pos.max(), key_pos.max())):
            raise RuntimeError(f"token pairs for a larger batch than the attention call's {tuple(query.shape[:3])}")
        queries, keys, lses = query.transpose(1, 2), key.transpose(1, 2), lse.transpose(1, 2)  # [B, N, H(_kv), ...]
        select = ((example, query_pos), (example, key_pos), (example, query_pos))
    accumulate = torch.promote_types(query.dtype, torch.float32)
    group = heads // kv_heads
    chunk = max(1, CHUNK_ELEMENTS // (heads * head_dim))
    parts = []
    for start in range(0, len(pairs), chunk):
        piece = slice(start, start + chunk)
        q_rows = queries[_index(select[0], piece)].to(accumulate)  # [p, H, D]
        k_rows = keys[_index(select[1], piece)].to(accumulate)  # [p, H_kv, D]
        scores = torch.einsum("pkgd,pkd->pkg", q_rows.view(-1, kv_heads, group, head_dim), k_rows)
        scores = _modified(call, call.scale * scores.reshape(-1, heads), key_pos[piece] - query_pos[piece])
        log_p = scores - lses[_index(select[2], piece)].to(accumulate)
        visible = _visible(call, query_pos[piece], key_pos[piece])
        parts.append(torch.where(visible[:, None], log_p.exp(), 0.0).double())
    return torch.cat(parts)


def _modified(call: AttentionCall, scores: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Scaled scores ``[p, H]`` after the call's score modifiers (cap, then the bias of distance ``j - i`` ``[p]``),
    as the kernels compute them (:mod:`fastbertology.kernels.modifiers`)."""
    modifiers = call.modifiers
    scores = capped(scores, modifiers.softcap)
    if modifiers.relative_bias is not None:
        table = modifiers.relative_bias.to(scores.dtype)  # [H, 2M - 1]
        scores = scores + table[:, distance + modifiers.bias_span - 1].t()
    if modifiers.alibi_slopes is not None:
        scores = scores + modifiers.alibi_slopes.to(scores.dtype)[None, :] * distance[:, None].to(scores.dtype)
    return scores


def _index(selection, piece: slice):
    """One chunk of an index: a tensor, or a tuple of tensors (advanced indexing over the leading dimensions)."""
    if isinstance(selection, tuple):
        return tuple(t[piece] for t in selection)
    return selection[piece]

"""Batching: examples -> right-padded batches of tensors, and the checks of those batches against the model.

The one batching module of the package:

* :func:`make_batches` — tokenize :class:`~fastbertology.data.Example` objects and group them, in data order,
  into batches padded to their longest sequence (what the commands and the analyses use);
* :func:`padded_batches` / :func:`collate` — batches of already tokenized examples held as one dict of tensors
  ``[n, S]`` (the benchmark's synthetic workloads);
* :func:`check_token_ids` — token ids and token type ids within the model's tables;
* :func:`move_batch` — a batch on a device.

Length bucketing (sorting examples by length so that batches carry less padding) was dropped: with
:func:`fastbertology.patch`'s padding-free execution the layers run on the real tokens only, so padding costs
nothing to save, and bucketing changed ``per_batch`` importance (a batch's mean gradient depends on which
examples share it).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .data.examples import DataError, where
from .packing import move_with_plan

if TYPE_CHECKING:
    from .data.examples import Example

__all__ = ["PAIR_MODES", "check_token_ids", "collate", "make_batches", "move_batch", "padded_batches"]

# A tokenizer's model_max_length above this is transformers' "no limit" sentinel (int(1e30)), not a real limit.
_NO_LIMIT = 1_000_000

PAIR_MODES = ("joint", "separate")


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id; else its EOS id (GPT-2 has no pad token); else 0 (no tokenizer)."""
    if tokenizer is None:
        return 0
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _length_limit(tokenizer, max_seq_length: int, max_positions: int | None) -> int:
    limit = int(max_seq_length)
    if max_positions is not None:
        limit = min(limit, int(max_positions))
    model_max = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if isinstance(model_max, int) and 0 < model_max < _NO_LIMIT:
        limit = min(limit, model_max)
    if limit < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    return limit


def _check_room(tokenizer, limit: int, *, pairs: bool) -> None:
    """ValueError when ``limit`` leaves no room for text next to the special tokens the tokenizer adds (a
    tokenizer asked to truncate below that silently returns the whole sequence)."""
    special = tokenizer.num_special_tokens_to_add(pair=pairs)
    needed = special + (2 if pairs else 1)
    if limit < needed:
        what = "pair of texts" if pairs else "text"
        raise ValueError(f"max_seq_length {limit} is too small: the tokenizer adds {special} special tokens to each "
                         f"{what}, so at least {needed} tokens are needed to keep any text; raise --max-seq-length")


# A text longer than this many characters per token of the length limit is tokenized from a prefix (cut before a
# whitespace) when that gives the same tokens: tokenizing a whole 50 MB cell to keep its first 128 tokens took 13.8 GB
# and two minutes. The prefix must give _MARGIN_TOKENS more tokens than the limit (its last word may split otherwise).
_CHARS_PER_TOKEN = 32
_MARGIN_TOKENS = 16
_SPACE = re.compile(r"\s")


def _prefix(text: str, chars: int) -> str | None:
    """``text`` cut before its first whitespace at or after ``chars`` characters; None when it is not longer than
    that or has no whitespace there."""
    if len(text) <= chars:
        return None
    found = _SPACE.search(text, chars)
    return None if found is None else text[:found.start()]


def _tokens(tokenizer, text: str) -> int:
    """The number of tokens of ``text`` (no special tokens), counted piece by piece (pieces of about 64 KiB cut
    before a whitespace: a tokenizer's tokens never span one), so that a text of megabytes is never held whole as
    tokens."""
    total, start = 0, 0
    while start < len(text):
        found = _SPACE.search(text, start + 65536)
        end = len(text) if found is None else found.start()
        total += len(tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"])
        start = end
    return total


def _longer_prefix(tokenizer, text: str, cut: str, count: int, needed: int) -> tuple[str | None, int]:
    """A prefix of ``text`` longer than ``cut`` (of ``count`` tokens) with at least ``needed`` tokens, and its token
    count; ``(None, 0)`` when only the whole text has them. Each try grows the prefix by the tokens still missing,
    at the rate seen so far, plus a fifth."""
    while count < needed:
        chars = min(max(len(cut) + 1, int(len(cut) * needed / max(count, 1) * 1.2)), len(text) - 1)
        longer = _prefix(text, chars)
        if longer is None or len(longer) <= len(cut):
            return None, 0
        cut, count = longer, len(tokenizer(longer, add_special_tokens=False, verbose=False)["input_ids"])
    return cut, count


def _shortened(texts: list[str], pairs: list[str] | None, tokenizer, limit: int):
    """``(texts, pairs)`` with each text far longer than ``limit`` tokens replaced by a prefix that tokenizes to the
    text's first tokens and is truncated exactly as the text would be (else the text is kept whole): the prefix
    gives more than ``limit`` + ``_MARGIN_TOKENS`` tokens and the tokenizer truncates on the right. In a pair,
    longest-first truncation compares the two sides' lengths: one cut side must stay the longer one; where both are
    cut and the room left by the special tokens is odd (the longer side gets the odd token), the prefixes must
    compare as the whole texts do (a prefix is lengthened until it does so, or the whole text is kept). The
    tokenizer's own truncation of a pair of long texts takes time and memory quadratic in their lengths."""
    if getattr(tokenizer, "truncation_side", "right") != "right":
        return texts, pairs
    chars = (limit + _MARGIN_TOKENS) * _CHARS_PER_TOKEN
    text_cuts = [_prefix(text, chars) for text in texts]
    pair_cuts = [None] * len(texts) if pairs is None else [_prefix(text, chars) for text in pairs]
    rows = [i for i in range(len(texts)) if text_cuts[i] is not None or pair_cuts[i] is not None]
    if not rows:
        return texts, pairs

    def counts(strings: list[str]) -> list[int]:
        if not strings:
            return []
        return [len(ids) for ids in tokenizer(strings, add_special_tokens=False, verbose=False)["input_ids"]]

    first = counts([texts[i] if text_cuts[i] is None else text_cuts[i] for i in rows])
    second = [0] * len(rows) if pairs is None else counts([pairs[i] if pair_cuts[i] is None else pair_cuts[i]
                                                           for i in rows])
    odd = pairs is not None and (limit - tokenizer.num_special_tokens_to_add(pair=True)) % 2 == 1
    texts, pairs = list(texts), None if pairs is None else list(pairs)
    for j, i in enumerate(rows):
        if (text_cuts[i] is not None and first[j] <= limit + _MARGIN_TOKENS) or \
                (pair_cuts[i] is not None and second[j] <= limit + _MARGIN_TOKENS):
            continue
        if text_cuts[i] is not None and pair_cuts[i] is not None and odd:
            if _tokens(tokenizer, texts[i]) > _tokens(tokenizer, pairs[i]):  # the first is longer: keep it so
                if first[j] <= second[j]:
                    text_cuts[i], first[j] = _longer_prefix(tokenizer, texts[i], text_cuts[i], first[j], second[j] + 1)
            elif first[j] > second[j]:  # the second is longer, or they are equal: the second's prefix must not lose
                pair_cuts[i], second[j] = _longer_prefix(tokenizer, pairs[i], pair_cuts[i], second[j], first[j])
        elif pairs is not None and text_cuts[i] is not None and pair_cuts[i] is None and first[j] <= second[j]:
            # the one cut side must stay the longer one
            text_cuts[i], first[j] = _longer_prefix(tokenizer, texts[i], text_cuts[i], first[j], second[j] + 1)
        elif pairs is not None and pair_cuts[i] is not None and text_cuts[i] is None and first[j] > second[j]:
            pair_cuts[i], second[j] = _longer_prefix(tokenizer, pairs[i], pair_cuts[i], second[j], first[j])
        if text_cuts[i] is not None:
            texts[i] = text_cuts[i]
        if pair_cuts[i] is not None:
            pairs[i] = pair_cuts[i]
    return texts, pairs


def _encode(texts: list[str], pairs: list[str] | None, tokenizer, limit: int, wants_types: bool):
    """Tokenize with special tokens; sequences over ``limit`` are re-tokenized with truncation (longest first).
    Returns ``(ids, type_ids or None, truncated count)``; every sequence then has at most ``limit`` tokens. Texts
    far over the limit are tokenized from a prefix that gives the same tokens (:func:`_shortened`)."""
    if not texts:
        return [], [], 0
    _check_room(tokenizer, limit, pairs=pairs is not None)
    texts, pairs = _shortened(texts, pairs, tokenizer, limit)
    encoded = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, verbose=False)
    ids = [list(x) for x in encoded["input_ids"]]
    types = [list(x) for x in encoded["token_type_ids"]] if wants_types and "token_type_ids" in encoded else None
    long = [i for i, x in enumerate(ids) if len(x) > limit]
    if long:
        again = tokenizer([texts[i] for i in long], None if pairs is None else [pairs[i] for i in long],
                          add_special_tokens=True, truncation=True, max_length=limit, verbose=False)
        for j, i in enumerate(long):
            ids[i] = list(again["input_ids"][j])
            if types is not None:
                types[i] = list(again["token_type_ids"][j])
            if len(ids[i]) > limit:  # the tokenizer declined to truncate: never report a truncation that did not happen
                raise ValueError(f"the tokenizer did not truncate a sequence of {len(ids[i])} tokens to max_seq_length "
                                 f"{limit}; raise --max-seq-length")
    return ids, types, len(long)


def _encode_examples(examples: Sequence[Example], tokenizer, limit: int, *, pair_mode: str, side: str):
    """Token ids (and type ids) for every example, in order. ``side``: "both" (joint pairs), "text" or "pair"."""
    wants_types = tokenizer is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    ids: list[list[int] | None] = [None] * len(examples)
    types: list[list[int] | None] = [None] * len(examples)
    truncated = 0
    # pre-tokenized rows (text side only)
    groups: dict[bool, list[int]] = {False: [], True: []}
    for index, example in enumerate(examples):
        if side != "pair" and example.input_ids is not None:
            row = list(example.input_ids)
            if len(row) > limit:
                row, truncated = row[:limit], truncated + 1
            ids[index], types[index] = row, [0] * len(row)
            continue
        text = example.text_pair if side == "pair" else example.text
        if text is None:
            what = "text_pair" if side == "pair" else "text (or input_ids)"
            raise ValueError(f"example {index} has no {what}" + (" (pair_mode='separate' needs both texts)"
                                                                  if pair_mode == "separate" else ""))
        groups[side == "both" and example.text_pair is not None].append(index)
    if (groups[False] or groups[True]) and tokenizer is None:
        raise ValueError("examples with text need a tokenizer (only pre-tokenized input_ids work without one)")
    for with_pair, indices in groups.items():
        if not indices:
            continue
        texts = [examples[i].text_pair if side == "pair" else examples[i].text for i in indices]
        pairs = [examples[i].text_pair for i in indices] if with_pair else None
        got_ids, got_types, count = _encode(texts, pairs, tokenizer, limit, wants_types)
        truncated += count
        for j, i in enumerate(indices):
            ids[i] = got_ids[j]
            types[i] = got_types[j] if got_types is not None else [0] * len(got_ids[j])
    return ids, (types if wants_types else None), truncated


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ints to ``[B, N]`` (N = longest row) with ``value``."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = 1
    return out


def make_batches(examples: Sequence[Example], tokenizer=None, *, max_seq_length: int, batch_size: int,
                 pair_mode: str = "joint", max_positions: int | None = None,
                 pad_token_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``examples`` and group them, in data order, into right-padded batches.

    Each batch is a dict of ``torch.long`` tensors (``labels`` float32 for regression data):

    * ``input_ids [B, N]``, ``attention_mask [B, N]`` (1 = token, 0 = padding), N = longest sequence in the batch;
    * ``token_type_ids [B, N]`` when the tokenizer produces them (0 for pre-tokenized rows and for padding);
    * ``labels [B]`` when the examples have labels (all or none must);
    * ``pair_mode="separate"`` (retrieval: ``text`` and ``text_pair`` embedded on their own) also gives
      ``pair_input_ids [B, M]``, ``pair_attention_mask [B, M]`` (and ``pair_token_type_ids``) for the second
      texts, and ``example_index [B]``, each example's position in ``examples`` (for fixed retrieval groups).
      ``pair_mode="joint"`` (default) encodes ``text`` + ``text_pair`` as one sequence pair, like GLUE.

    Texts are encoded with the tokenizer's special tokens; pre-tokenized ``input_ids`` are used as given and
    padded with ``pad_token_id`` (default: the tokenizer's pad id, else its EOS id, else 0 without a tokenizer).
    Sequences longer than ``max_seq_length`` — or ``max_positions`` (the model's position limit) or the
    tokenizer's ``model_max_length``, whichever is smallest — are truncated (pairs longest-first), and a single
    ``warnings.warn`` says how many; a limit that leaves no room for text next to the tokenizer's special tokens
    raises ValueError (the tokenizer would silently not truncate). Returns a list, so the batches can be iterated
    several times.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
    examples = list(examples)
    if not examples:
        return []
    limit = _length_limit(tokenizer, max_seq_length, max_positions)
    pad = _pad_id(tokenizer) if pad_token_id is None else int(pad_token_id)

    labelled = [example.label is not None for example in examples]
    if any(labelled) and not all(labelled):
        raise ValueError(f"example {labelled.index(False)} has no label but others do: all or none must have labels")
    label_dtype = torch.float32 if any(isinstance(e.label, float) for e in examples) else torch.long

    sides = {"": "both"} if pair_mode == "joint" else {"": "text", "pair_": "pair"}
    encoded = {}
    truncated, sequences = 0, 0
    for prefix, side in sides.items():
        ids, types, count = _encode_examples(examples, tokenizer, limit, pair_mode=pair_mode, side=side)
        encoded[prefix] = (ids, types)
        truncated += count
        sequences += len(ids)
    if truncated:
        warnings.warn(f"{truncated} of {sequences} sequences were longer than {limit} tokens and were truncated",
                      stacklevel=2)

    batches = []
    for start in range(0, len(examples), batch_size):
        stop = min(start + batch_size, len(examples))
        batch: dict[str, torch.Tensor] = {}
        for prefix, (ids, types) in encoded.items():
            rows = ids[start:stop]
            batch[prefix + "input_ids"] = _pad(rows, pad)
            batch[prefix + "attention_mask"] = _mask(rows)
            if types is not None:
                batch[prefix + "token_type_ids"] = _pad(types[start:stop], 0)
        if labelled[0]:
            batch["labels"] = torch.tensor([e.label for e in examples[start:stop]], dtype=label_dtype)
        if pair_mode == "separate":
            batch["example_index"] = torch.arange(start, stop, dtype=torch.long)
        batches.append(batch)
    return batches


def move_batch(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` with every tensor moved to ``device``; attention masks carry their padding-free plan,
    made here from the host copy (:func:`fastbertology.packing.move_with_plan`: no model call reads them back);
    ``example_index`` (bookkeeping that no model reads) stays where it is, so that checks of it need no sync."""
    return {key: (move_with_plan(value, device) if key.endswith("attention_mask") else value.to(device))
            if isinstance(value, torch.Tensor) and key not in _HOST_KEYS else value for key, value in batch.items()}


_HOST_KEYS = frozenset({"example_index"})  # batch entries that stay on the host in move_batch


def check_token_ids(batches: Sequence[dict], examples: Sequence[Example], *, vocab_size: int | None,
                    type_vocab_size: int | None = None) -> None:
    """:class:`DataError` naming the example (file and line) whose token ids (``input_ids``, ``pair_input_ids``) are
    not below the model's vocabulary size ``vocab_size``, or whose token type ids are not below
    ``type_vocab_size``: the embedding lookup would fail or read the wrong rows. Only non-padding positions
    count. ``batches`` in data order, as :func:`make_batches` returns them for ``examples``."""
    start = 0
    for batch in batches:
        rows = len(batch["input_ids"])
        for prefix in ("", "pair_"):
            if prefix + "input_ids" not in batch:
                continue
            real = batch[prefix + "attention_mask"].bool()
            for key, limit in ((prefix + "input_ids", vocab_size), (prefix + "token_type_ids", type_vocab_size)):
                if limit is None or key not in batch:
                    continue
                values = batch[key]
                bad = ((values < 0) | (values >= limit)) & real
                if bool(bad.any()):
                    row = int(bad.any(dim=1).nonzero()[0])
                    example = examples[start + row]
                    value = int(values[row][bad[row]][0])
                    what = "token id" if key.endswith("input_ids") else "token type id"
                    size = "vocabulary" if key.endswith("input_ids") else "token type vocabulary"
                    raise DataError(where(examples), example.line,
                                    f"example {start + row} has {what} {value}, but the model's {size} has {limit} "
                                    f"entries (ids 0 to {limit - 1}); the ids come from another tokenizer or model")
        start += rows


# ----------------------------------------------------------------------------------------------------------------
# Pre-tokenized examples held as one dict of tensors
# ----------------------------------------------------------------------------------------------------------------
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
    """Batches in example order, every one padded to the full length ``S``. ``examples``: a dict of tensors whose
    first dimension is the example index ``n``, with a right-padded ``attention_mask [n, S]``; every 2-D tensor
    with second dimension ``S`` is per token (cut with the batch), everything else per example."""
    n = examples["attention_mask"].shape[0]
    return [collate(examples, torch.arange(start, min(start + batch_size, n)), trim=False)
            for start in range(0, n, batch_size)]

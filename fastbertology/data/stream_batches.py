"""A streamed corpus cut into language-modelling blocks and batches, with a position to resume from after every
batch: :func:`open_tokens`, :func:`stream_batches`, :class:`StreamPosition`.

The blocks are those of the in-memory reader (:func:`~fastbertology.data.readers.read_text_blocks`): the token
stream cut into consecutive blocks of ``block`` tokens, the last shorter one kept when it has at least 2 tokens
(one next-token prediction), the first ``max_blocks`` only when that is given (``--data-subset``); ``batch_size``
consecutive blocks make a batch, the last batch maybe fewer. Memory: one window of the source, the tokens read
past the last full block, and one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .document_stream import JsonlDocuments, ParquetDocuments
from .text_stream import TextPosition, TextTokenStream

STREAM_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class StreamPosition:
    """Where a streamed corpus stands after a batch: ``source`` (the token source's position, a dict), ``carry``
    (token ids read past the last block already batched), ``blocks`` (blocks batched so far), ``done`` (nothing
    left to read)."""

    source: dict | None = None
    carry: list[int] = field(default_factory=list)
    blocks: int = 0
    done: bool = False

    def to_dict(self) -> dict:
        return {"source": self.source, "carry": list(self.carry), "blocks": self.blocks, "done": self.done}

    @classmethod
    def from_dict(cls, value: dict) -> StreamPosition:
        if not isinstance(value, dict) or set(value) != {"source", "carry", "blocks", "done"}:
            raise ValueError("a stream position needs exactly source, carry, blocks and done")
        carry, blocks = value["carry"], value["blocks"]
        if not isinstance(carry, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                  for i in carry):
            raise ValueError("a stream position's carry must be a list of token ids")
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0 or not isinstance(value["done"], bool):
            raise ValueError("a stream position's blocks must be a count and done a boolean")
        if value["source"] is not None and not isinstance(value["source"], dict):
            raise ValueError("a stream position's source must be an object")
        return cls(value["source"], carry, blocks, value["done"])


def open_tokens(path, tokenizer, *, text_field: str = "text", start: dict | None = None):
    """The token source for ``path`` by its suffix (``.txt``: :class:`TextTokenStream`; ``.jsonl``:
    :class:`JsonlDocuments`; ``.parquet``: :class:`ParquetDocuments`), from ``start`` (a position dict it
    yielded) or the beginning. Iterating it yields ``(ids, position dict)``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        stream = TextTokenStream(path, tokenizer, start=None if start is None else TextPosition.from_dict(start))
        return _Dicts(stream)
    if suffix == ".jsonl":
        return JsonlDocuments(path, tokenizer, text_field=text_field, start=start)
    if suffix == ".parquet":
        return ParquetDocuments(path, tokenizer, text_field=text_field, start=start)
    raise ValueError(f"--data {path}: a streamed corpus must be {', '.join(STREAM_SUFFIXES)}, not "
                     f"{suffix or '(no suffix)'!r}")


class _Dicts:
    """A :class:`TextTokenStream` whose positions are dicts."""

    def __init__(self, stream: TextTokenStream):
        self.stream, self.size = stream, stream.size

    def __iter__(self):
        for ids, position in self.stream:
            yield ids, position.to_dict()


def fraction_read(source, position: dict | None) -> float:
    """How much of the source ``position`` has read, in [0, 1] (bytes of a text or JSONL file, rows of Parquet)."""
    if position is None or not source.size:
        return 0.0
    if position.get("done"):
        return 1.0
    done = source.rows_done(position) if isinstance(source, ParquetDocuments) else position["byte"]
    return min(done / source.size, 1.0)


def stream_batches(source, collate: Callable[[list[list[int]]], dict], *, block: int, batch_size: int,
                   max_blocks: int | None = None,
                   start: StreamPosition | None = None) -> Iterator[tuple[dict, StreamPosition]]:
    """Batches of consecutive blocks of ``block`` tokens from ``source`` (opened at ``start.source``), each with
    the :class:`StreamPosition` after it. ``collate(blocks)`` turns a list of blocks (lists of ids) into a batch.
    """
    if block < 2:
        raise ValueError(f"the block length must be at least 2 for language modelling, got {block}")
    start = start or StreamPosition()
    if start.done:
        return
    limit = max_blocks if max_blocks and max_blocks > 0 else None
    state = {"carry": list(start.carry), "blocks": start.blocks, "pending": []}

    def cut(position, final: bool):
        """Blocks from the carried ids; a batch each time ``batch_size`` blocks are ready."""
        carry, offset = state["carry"], 0
        while limit is None or state["blocks"] < limit:
            size = len(carry) - offset
            if size < block and not (final and size >= 2):
                break
            state["pending"].append(carry[offset:offset + block])
            offset, state["blocks"] = offset + min(size, block), state["blocks"] + 1
            finished = limit is not None and state["blocks"] >= limit
            if len(state["pending"]) == batch_size or finished:
                batch, state["pending"] = state["pending"], []
                yield collate(batch), StreamPosition(position, carry[offset:], state["blocks"],
                                                     finished or (final and len(carry) - offset < 2))
        state["carry"] = carry[offset:]

    position = start.source
    for ids, position in source:
        state["carry"] += ids
        yield from cut(position, final=False)
        if limit is not None and state["blocks"] >= limit:
            return
    yield from cut(position, final=True)
    if state["pending"]:
        yield collate(state["pending"]), StreamPosition(position, [], state["blocks"], True)

"""A large UTF-8 text file as one token stream, read and tokenized in windows: :class:`TextTokenStream`.

The in-memory reader (:func:`~fastbertology.data.readers.read_text_blocks`) tokenizes the whole file at once. A
tokenizer's output near a cut in the text can differ from its output on the whole text (a word cut in two, a
prefix space that SentencePiece adds at the start of a text, digits grouped from the left), so windows are not
tokenized independently and joined: consecutive windows **overlap**, and the stream switches from one window's
tokens to the next one's at a *sync point*, a token boundary inside the overlap where both tokenizations agree on
:data:`SYNC_TOKENS` tokens before and after it (same ids at the same character offsets). Far from a window's
edges a tokenizer's output depends only on the nearby text, so the tokens between two sync points are the ones
the whole file gives: the stream equals ``tokenizer(whole text)`` (``tests/test_streaming.py`` checks it on
GPT-2-style byte-level BPE and SentencePiece-style tokenizers with windows of a few characters). Where no sync
point is found (a single "word" longer than the overlap), the window and the overlap double until one is.

Memory: one window of text (``window_chars``) and its tokens, whatever the file's size. Resuming: every piece of
ids comes with the :class:`TextPosition` just after it; a stream built with ``start=`` that position yields
exactly the ids that followed it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .examples import DataError

SYNC_TOKENS = 8  # tokens that must agree on each side of a sync point
WINDOW_CHARS = 1 << 18  # characters per window (about 64k tokens of English text)
OVERLAP_CHARS = 1 << 14  # characters shared by consecutive windows


@dataclass(frozen=True)
class TextPosition:
    """Where a :class:`TextTokenStream` stands: the window starting at byte ``byte`` of the file (``chars``
    characters long, overlapping the next one by ``overlap`` characters), whose tokens from character ``skip`` of
    the window on have not been yielded yet. ``done``: the whole file has been yielded."""

    byte: int = 0
    skip: int = 0
    chars: int = WINDOW_CHARS
    overlap: int = OVERLAP_CHARS
    done: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> TextPosition:
        fields = {"byte", "skip", "chars", "overlap", "done"}
        if not isinstance(value, dict) or set(value) != fields:
            raise ValueError(f"a text position needs exactly the fields {sorted(fields)}")
        if not all(isinstance(value[k], int) and not isinstance(value[k], bool) and value[k] >= 0
                   for k in fields - {"done"}) or not isinstance(value["done"], bool):
            raise ValueError("a text position's byte, skip, chars and overlap are counts and done is a boolean")
        if value["chars"] < 1 or not 0 < 4 * value["overlap"] <= value["chars"]:
            raise ValueError("a text position's overlap must be positive and at most a quarter of its window")
        return cls(**value)


@dataclass
class _Window:
    """A window of the text: its first byte, its text, whether it reaches the end of the file, and its tokens as
    ``(id, start, end)`` with character offsets into ``text``."""

    byte: int
    text: str
    at_end: bool
    tokens: list[tuple[int, int, int]]


class TextTokenStream:
    """The token ids of a UTF-8 text file (a byte-order mark dropped, line breaks kept), as ``tokenizer`` gives
    them for the whole text with ``add_special_tokens=False``, in pieces: iterating yields ``(ids, position)``,
    ``ids`` a list of ints and ``position`` the :class:`TextPosition` after them. ``start``: resume there.

    ``tokenizer`` must be a fast (Rust) tokenizer: the windows are joined by character offsets. Bytes that are not
    UTF-8 raise :class:`DataError` naming the byte offset.
    """

    def __init__(self, path, tokenizer, *, start: TextPosition | None = None, window_chars: int = WINDOW_CHARS,
                 overlap_chars: int = OVERLAP_CHARS):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"streaming {path} needs a fast tokenizer (tokenizer.json), which reports each token's "
                             f"character offsets; {type(tokenizer).__name__} does not. Save the model's tokenizer "
                             "with a recent transformers to get tokenizer.json")
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.start = start or TextPosition(chars=window_chars, overlap=overlap_chars)
        TextPosition.from_dict(self.start.to_dict())  # checked
        self.size = self.path.stat().st_size

    # ------------------------------------------------------------------------------------------------------
    def _read(self, handle, byte: int, chars: int) -> tuple[str, bool]:
        """``chars`` characters of the file from byte ``byte`` (fewer at the end), and whether they reach the end."""
        handle.seek(byte)
        decoder = codecs.getincrementaldecoder("utf-8")()
        parts, have, read = [], 0, 0
        try:
            while have < chars:
                raw = handle.read(max(chars - have, 1 << 12))
                text = decoder.decode(raw, final=not raw)
                parts.append(text)
                have, read = have + len(text), read + len(raw)
                if not raw:
                    break
        except UnicodeDecodeError as error:
            offset = byte + read + error.start
            raise DataError(self.path, None, f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at byte offset "
                                             f"{offset}); save the file as UTF-8") from None
        text = "".join(parts)
        if len(text) > chars:
            return text[:chars], False
        return text, len(text) < chars or handle.read(1) == b""

    def _window(self, handle, byte: int, chars: int) -> _Window:
        if byte == 0:  # a byte-order mark is dropped, as read_text drops it
            handle.seek(0)
            if handle.read(3) == codecs.BOM_UTF8:
                byte = 3
        text, at_end = self._read(handle, byte, chars)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        tokens = [(int(i), int(s), int(e)) for i, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])]
        return _Window(byte, text, at_end, tokens)

    @staticmethod
    def _sync(current: _Window, following: _Window, shift: int, overlap: int) -> tuple[int, int] | None:
        """``(i, j)``: token ``i`` of ``current`` and token ``j`` of ``following`` start the same token at the same
        place (``shift``: characters of ``current`` before ``following`` starts), with :data:`SYNC_TOKENS` equal
        tokens on each side; the first such place at least a quarter of the overlap into ``following``. None when
        the two tokenizations never agree there."""
        ours = [(i, s - shift, e - shift) for i, s, e in current.tokens]
        index = {token: k for k, token in enumerate(following.tokens)}
        for i, token in enumerate(ours):
            if token[1] < overlap // 4:
                continue
            j = index.get(token)
            if j is None or i < SYNC_TOKENS or j < SYNC_TOKENS or ours[i - 1][2] > token[1]:
                continue
            if ours[i - SYNC_TOKENS:i + SYNC_TOKENS] == following.tokens[j - SYNC_TOKENS:j + SYNC_TOKENS]:
                return i, j
        return None

    def __iter__(self) -> Iterator[tuple[list[int], TextPosition]]:
        position = self.start
        if position.done:
            return
        chars, overlap, skip = position.chars, position.overlap, position.skip
        with open(self.path, "rb") as handle:
            current = self._window(handle, position.byte, chars)
            while True:
                first = next((k for k, token in enumerate(current.tokens) if token[1] >= skip), len(current.tokens))
                if current.at_end:
                    yield [t[0] for t in current.tokens[first:]], TextPosition(0, 0, chars, overlap, True)
                    return
                shift = len(current.text) - overlap  # where the following window starts, in characters
                byte = current.byte + len(current.text[:shift].encode("utf-8"))
                following = self._window(handle, byte, chars)
                found = self._sync(current, following, shift, overlap)
                if found is None:  # no agreement in the overlap: a longer window and overlap from the same place
                    chars, overlap = 2 * chars, 2 * overlap
                    current = self._window(handle, current.byte, chars)
                    continue
                i, j = found
                skip = following.tokens[j][1]
                yield [t[0] for t in current.tokens[first:i]], TextPosition(byte, skip, chars, overlap)
                current = following

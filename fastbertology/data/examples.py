"""Examples and where they came from: :class:`Example`, :class:`ExampleList` (examples plus the label table and
the source), :class:`DataError` (malformed input, naming file and line), and reading a file as UTF-8 text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataError", "Example", "ExampleList", "read_text", "subset", "where"]


class DataError(ValueError):
    """Malformed input data. ``path`` and ``line`` (1-based, or None) say where; both are in the message."""

    def __init__(self, path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {message}")


@dataclass
class Example:
    """One example. ``text`` / ``text_pair``: raw strings (``text`` may be None when ``input_ids`` is given);
    ``label``: class id (int), regression target (float) or None; ``input_ids``: pre-tokenized ids, used as
    given (no special tokens added); ``line``: where it starts in its file (1-based; None when not from a file),
    for error messages only. ``corrupted_text`` / ``corrupted_text_pair``: the corrupted version of the texts, for
    activation patching (:mod:`fastbertology.activation_patching`); None elsewhere."""

    text: str | None
    text_pair: str | None = None
    label: int | float | None = None
    input_ids: list[int] | None = None
    line: int | None = field(default=None, compare=False, repr=False)
    corrupted_text: str | None = None
    corrupted_text_pair: str | None = None


class ExampleList(list):
    """A ``list`` of :class:`Example` plus metadata.

    label_names: id -> name when the labels were strings (ids are positions in this list), else None.
    source:      where the examples came from (a path or a description), for messages.
    task:        the GLUE task name for :func:`read_glue` results, else None.

    Slicing keeps the metadata; everything else is plain ``list`` behaviour.
    """

    def __init__(self, examples: Iterable[Example] = (), *, label_names: list[str] | None = None,
                 source: str | None = None, task: str | None = None):
        super().__init__(examples)
        self.label_names = None if label_names is None else list(label_names)
        self.source = source
        self.task = task

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(index, slice):
            return ExampleList(item, label_names=self.label_names, source=self.source, task=self.task)
        return item

    def __repr__(self) -> str:
        return (f"ExampleList({len(self)} examples, label_names={self.label_names!r}, source={self.source!r}, "
                f"task={self.task!r})")


def subset(examples: Sequence[Example], data_subset: int | None) -> Sequence[Example]:
    """The first ``data_subset`` examples (run_bertology's ``--data_subset``); None or ``<= 0`` keeps all."""
    if data_subset is None or data_subset <= 0:
        return examples
    return examples[:data_subset]


def read_text(path) -> str:
    """The whole file as text (UTF-8, a byte-order mark dropped). Bytes that are not UTF-8 raise
    :class:`DataError` naming the line and column; a missing file raises FileNotFoundError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a data file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        before = error.object[:error.start]
        line = before.count(b"\n") + 1
        column = error.start - (before.rfind(b"\n") + 1) + 1
        raise DataError(path, line, f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at column {column}); "
                                    "save the file as UTF-8") from None


def where(examples) -> str:
    """Where ``examples`` came from (their ``source``), for messages."""
    return getattr(examples, "source", None) or "the data"

"""Corpora of documents, streamed: one text field of every row of a JSONL or Parquet file, as one token stream.

Each document is tokenized on its own (``add_special_tokens=False``) and the documents are joined in file order,
with the tokenizer's end-of-sequence token after each one when it has one (GPT-2's ``<|endoftext|>``, Llama's
``</s>``...): the convention of causal-LM pre-training data. :func:`document_ids` is the same in memory.

* :class:`JsonlDocuments` reads one line at a time (position: the byte offset and number of the next line);
* :class:`ParquetDocuments` reads one column in record batches of a row group (position: row group and row), with
  pyarrow (``pip install 'fastbertology[parquet]'``), the format of Hugging Face datasets.

Iterating yields ``(ids, position)`` per document, ``position`` the dict to pass as ``start=`` to resume after it.
Problems raise :class:`~fastbertology.data.examples.DataError` naming the file, the line or row, and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from .examples import DataError
from .readers import _json_line

PARQUET_MISSING = ("reading Parquet needs pyarrow, which is not installed: pip install 'fastbertology[parquet]' "
                   "(or pip install pyarrow)")
PARQUET_BATCH_ROWS = 1024


def _separator(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def document_ids(texts: Iterable[str], tokenizer) -> list[int]:
    """The token stream of ``texts`` in memory: each tokenized alone, joined with the EOS token after each."""
    separator = _separator(tokenizer)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + separator
    return ids


def _check_text(path, where: str, value, field: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise DataError(path, None, f"{where}: the text field {field!r} is {kind} (--text-field names the field "
                                    "that holds each document's text)")
    return value


class JsonlDocuments:
    """The documents of a JSON-lines file: field ``text_field`` of every line (an object); blank lines skipped."""

    def __init__(self, path, tokenizer, *, text_field: str = "text", start: dict | None = None):
        self.path, self.tokenizer, self.field = Path(path), tokenizer, text_field
        self.start = {"byte": 0, "line": 1} if start is None else dict(start)
        if set(self.start) != {"byte", "line"} or not all(isinstance(v, int) and v >= 0 for v in self.start.values()):
            raise ValueError("a JSONL position needs the counts byte and line")
        self.size = self.path.stat().st_size

    def __iter__(self) -> Iterator[tuple[list[int], dict]]:
        separator = _separator(self.tokenizer)
        byte, line = self.start["byte"], self.start["line"]
        with open(self.path, "rb") as handle:
            handle.seek(byte)
            for raw in iter(handle.readline, b""):
                byte += len(raw)
                number, line = line, line + 1
                try:
                    content = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(self.path, number, f"not UTF-8 text (byte 0x{raw[error.start]:02x}); save the "
                                                       "file as UTF-8") from None
                if not content.strip():
                    continue
                row = _json_line(self.path, number, content)
                if not isinstance(row, dict):
                    raise DataError(self.path, number, f"expected a JSON object, got {type(row).__name__}")
                text = _check_text(self.path, f"line {number}", row.get(self.field), self.field)
                ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                yield ids + separator, {"byte": byte, "line": line}


class ParquetDocuments:
    """The documents of a Parquet file: column ``text_field`` (strings), row group by row group, in record
    batches of :data:`PARQUET_BATCH_ROWS` rows."""

    def __init__(self, path, tokenizer, *, text_field: str = "text", start: dict | None = None):
        try:  # lazy: pyarrow is optional (the parquet extra) and only Parquet corpora need it
            import pyarrow.parquet as parquet
        except ImportError:
            raise ValueError(PARQUET_MISSING) from None
        self.path, self.tokenizer, self.field = Path(path), tokenizer, text_field
        try:
            self.file = parquet.ParquetFile(self.path)
        except Exception as error:  # noqa: BLE001 - ArrowInvalid and OSError: not a readable Parquet file
            raise DataError(self.path, None, f"not a readable Parquet file ({error})") from None
        names = self.file.schema_arrow.names
        if text_field not in names:
            raise DataError(self.path, None, f"no column {text_field!r} (columns: {', '.join(names)}); --text-field "
                                             "names the column that holds each document's text")
        self.start = {"row_group": 0, "row": 0} if start is None else dict(start)
        if (set(self.start) != {"row_group", "row"}
                or not all(isinstance(v, int) and v >= 0 for v in self.start.values())):
            raise ValueError("a Parquet position needs the counts row_group and row")
        self.size = self.file.metadata.num_rows
        self.rows_before = [0]
        for group in range(self.file.num_row_groups):
            self.rows_before.append(self.rows_before[-1] + self.file.metadata.row_group(group).num_rows)

    def __iter__(self) -> Iterator[tuple[list[int], dict]]:
        separator = _separator(self.tokenizer)
        first_group, skip = self.start["row_group"], self.start["row"]
        for group in range(first_group, self.file.num_row_groups):
            row = 0
            for batch in self.file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group],
                                                columns=[self.field]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if group == first_group and row <= skip:
                        continue
                    where = f"row {self.rows_before[group] + row} (row group {group})"
                    text = _check_text(self.path, where, value, self.field)
                    ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                    yield ids + separator, {"row_group": group, "row": row}

    def rows_done(self, position: dict) -> int:
        """Rows read up to ``position`` (for progress)."""
        return self.rows_before[position["row_group"]] + position["row"]

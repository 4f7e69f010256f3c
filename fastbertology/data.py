"""Data layer: read examples from files, tokenize them into padded batches, build the demo pairs.

File reading lives here (and in the CLI) only; the analyses consume the batches this module produces.

Readers return an :class:`ExampleList` (a ``list`` of :class:`Example` that also carries ``label_names``, the
label id -> name table when labels were strings, and ``source``):

* :func:`read_glue` — a GLUE task directory as run_bertology reads it (dev split, the GLUE processors' columns).
* :func:`read_csv` / :func:`read_jsonl` — ``text`` (and optional ``text_pair``) and ``label`` columns / keys;
  JSONL rows may instead carry pre-tokenized ``input_ids``.
* :func:`read_text_blocks` — a plain text file tokenized as a whole and cut into blocks (GPT-2 / GPT language
  modelling).
* :func:`load_examples` — picks one of the above from ``task=`` or the file suffix.
* :func:`demo_pairs` — (query, positive) pairs from the Python documentation that ships with Python.

Malformed input raises :class:`DataError` (a ``ValueError``) whose message names the file and the line (bytes
that are not UTF-8 included). Against a model: :func:`check_class_labels` (labels are class ids it has),
:func:`align_label_names` (label names follow its ``id2label``), :func:`check_token_ids` (ids its embeddings have).

:func:`make_batches` turns examples into batches in data order: dicts of tensors ``input_ids [B, N]``,
``attention_mask [B, N]``, ``token_type_ids [B, N]`` (when the tokenizer produces them) and ``labels [B]``
(when the examples have labels), right-padded to the longest sequence of the batch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "DataError", "Example", "ExampleList", "GlueTaskSpec", "GLUE_TASKS", "read_glue", "read_csv", "read_jsonl",
    "read_text_blocks", "load_examples", "subset", "make_batches", "move_batch", "demo_pairs", "PAIR_MODES",
    "read_text", "check_class_labels", "align_label_names", "check_token_ids",
]

# A tokenizer's model_max_length above this is transformers' "no limit" sentinel (int(1e30)), not a real limit.
_NO_LIMIT = 1_000_000


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
    for error messages only."""

    text: str | None
    text_pair: str | None = None
    label: int | float | None = None
    input_ids: list[int] | None = None
    line: int | None = field(default=None, compare=False, repr=False)


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


# ----------------------------------------------------------------------------------------------------------------
# GLUE
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlueTaskSpec:
    """Column layout of a GLUE task's dev TSV, as transformers' GLUE processors read it.

    Columns are 0-based; negative counts from the end (``-1``: last column). ``label_names`` is the processor's
    label list (a label's id is its position); None for the regression task STS-B (float labels). The metric of
    each task is :data:`fastbertology.tasks.GLUE_METRICS` (tasks stay independent of data loading).
    """

    dev_file: str
    text_col: int
    pair_col: int | None
    label_col: int
    header: bool
    label_names: tuple[str, ...] | None


GLUE_TASKS: dict[str, GlueTaskSpec] = {
    "cola": GlueTaskSpec("dev.tsv", 3, None, 1, False, ("0", "1")),
    "sst-2": GlueTaskSpec("dev.tsv", 0, None, 1, True, ("0", "1")),
    "mrpc": GlueTaskSpec("dev.tsv", 3, 4, 0, True, ("0", "1")),
    "sts-b": GlueTaskSpec("dev.tsv", 7, 8, -1, True, None),
    "qqp": GlueTaskSpec("dev.tsv", 3, 4, 5, True, ("0", "1")),
    "mnli": GlueTaskSpec("dev_matched.tsv", 8, 9, -1, True, ("contradiction", "entailment", "neutral")),
    "mnli-mm": GlueTaskSpec("dev_mismatched.tsv", 8, 9, -1, True, ("contradiction", "entailment", "neutral")),
    "qnli": GlueTaskSpec("dev.tsv", 1, 2, -1, True, ("entailment", "not_entailment")),
    "rte": GlueTaskSpec("dev.tsv", 1, 2, -1, True, ("entailment", "not_entailment")),
    "wnli": GlueTaskSpec("dev.tsv", 1, 2, -1, True, ("0", "1")),
}


def glue_spec(task: str) -> GlueTaskSpec:
    """The :class:`GlueTaskSpec` of ``task`` (case-insensitive); ValueError listing the known tasks otherwise."""
    spec = GLUE_TASKS.get(str(task).lower())
    if spec is None:
        raise ValueError(f"unknown GLUE task {task!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return spec


def read_glue(data_dir, *, task: str, data_subset: int | None = None) -> ExampleList:
    """Read the dev split of GLUE task ``task`` from ``data_dir`` (run_bertology's ``--data_dir``/``--task_name``).

    Reads ``dev.tsv`` (MNLI: ``dev_matched.tsv``; ``mnli-mm``: ``dev_mismatched.tsv``) as the GLUE processors do:
    tab-separated, no quoting, the header line skipped where the task has one (CoLA has none). Labels become
    ids by position in the task's label list (``label_names``); STS-B labels are floats. Every row must have
    enough columns and a known label, else :class:`DataError` with the line. Returns an :class:`ExampleList`.
    """
    name = str(task).lower()
    spec = glue_spec(name)
    path = Path(data_dir) / spec.dev_file
    if not path.is_file():
        raise FileNotFoundError(f"GLUE task {name!r}: {path} not found (expected the task's dev file in {data_dir})")
    needed = max(c if c >= 0 else -c - 1 for c in (spec.text_col, spec.pair_col or 0, spec.label_col)) + 1
    label_ids = None if spec.label_names is None else {label: i for i, label in enumerate(spec.label_names)}
    examples = ExampleList(label_names=None if spec.label_names is None else list(spec.label_names), source=str(path),
                           task=name)
    rows = list(enumerate(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quotechar=None),
                          start=1))
    if not rows:
        raise DataError(path, 1, "empty file")
    if spec.header:
        rows = rows[1:]
    for line, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) < needed:
            raise DataError(path, line, f"{name} rows need at least {needed} tab-separated columns, found {len(row)}")
        raw_label = row[spec.label_col].strip()
        if label_ids is None:
            try:
                label: int | float = float(raw_label)
            except ValueError:
                raise DataError(path, line, f"{name} label must be a number, got {raw_label!r}") from None
            if not math.isfinite(label):
                raise DataError(path, line, f"{name} label must be finite, got {raw_label!r}")
        else:
            if raw_label not in label_ids:
                raise DataError(path, line,
                                f"unknown {name} label {raw_label!r}; expected one of {list(spec.label_names)}")
            label = label_ids[raw_label]
        text_pair = None if spec.pair_col is None else row[spec.pair_col]
        examples.append(Example(text=row[spec.text_col], text_pair=text_pair, label=label, line=line))
    if not examples:
        raise DataError(path, len(rows) + (1 if spec.header else 0), "no examples in the file")
    return subset(examples, data_subset)


# ----------------------------------------------------------------------------------------------------------------
# CSV / JSONL
# ----------------------------------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d+")


def _finish_labels(path, raw: list[tuple[int, object]], *, label_names: list[str] | None, from_text: bool):
    """Turn raw labels ``[(line, value)]`` into ids / floats; return ``(labels, label_names)``.

    from_text (CSV): values are strings; all integer-looking -> ints, else all numeric -> floats (regression),
    else names mapped to ids in sorted order. JSON: ints stay ints, ints mixed with floats -> floats, strings
    -> names; strings mixed with numbers -> DataError. ``label_names`` given: names are looked up in it and ids
    must be in range.
    """
    values = [value for _, value in raw]
    if from_text:
        if label_names is not None:
            kind = "name"
        elif all(_INT.fullmatch(v) for v in values):
            return [int(v) for v in values], None
        else:
            try:
                floats = [float(v) for v in values]
            except ValueError:
                kind = "name"
            else:
                for (line, _), value in zip(raw, floats):
                    if not math.isfinite(value):
                        raise DataError(path, line, f"label must be finite, got {value}")
                return floats, None
    else:
        first_line, first = raw[0]
        kind = "name" if isinstance(first, str) else "number"
        for line, value in raw:
            this = "name" if isinstance(value, str) else "number"
            if this != kind:
                raise DataError(path, line, f"label {value!r} mixes {this}s with the {kind} labels used since line "
                                            f"{first_line}")
        if kind == "number":
            if all(isinstance(v, int) for v in values):
                if label_names is not None:
                    for line, value in raw:
                        if not 0 <= value < len(label_names):
                            raise DataError(path, line, f"label id {value} is out of range for {len(label_names)} "
                                                        f"label names")
                return list(values), label_names
            for line, value in raw:
                if not math.isfinite(value):
                    raise DataError(path, line, f"label must be finite, got {value}")
            return [float(v) for v in values], None
    # names
    names = sorted(set(values)) if label_names is None else list(label_names)
    ids = {name: i for i, name in enumerate(names)}
    labels = []
    for line, value in raw:
        if value not in ids:
            raise DataError(path, line, f"unknown label {value!r}; known labels: {names}")
        labels.append(ids[value])
    return labels, names


def _check_text(path, line: int, value, key: str, *, required: bool) -> str | None:
    """``value`` as a text: None or "" is missing (DataError when required), anything else must be a string."""
    if value is None or value == "":
        if required:
            raise DataError(path, line, f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise DataError(path, line, f"{key!r} must be a string, got {type(value).__name__}")
    return value


def read_csv(path, *, delimiter: str = ",", require_label: bool = True, require_pair: bool = False,
             label_names: Sequence[str] | None = None, data_subset: int | None = None) -> ExampleList:
    """Read a CSV (or, with ``delimiter="\\t"``, TSV) file with a header naming ``text``, optional
    ``text_pair`` and ``label`` columns (other columns are ignored; standard CSV quoting).

    require_label: every row needs a non-empty ``label`` (classification / regression data).
    require_pair:  every row needs a non-empty ``text_pair`` (retrieval pairs).
    label_names:   fixed label names (id = position); otherwise labels that are all integers stay ints, all
                   numbers become floats, anything else is mapped to ids in sorted order (``label_names`` of the
                   result reports the mapping).
    Raises :class:`DataError` (file and line) for an empty file, a missing column or value, or a row with a
    different number of columns than the header.
    """
    path = Path(path)
    rows = []  # (first physical line of the record, cells): quoted cells may span lines
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(path, reader.line_num, f"unreadable CSV: {error}") from None
    rows = [(line, row) for line, row in rows if row and any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(path, 1, "empty file (expected a header with a 'text' column)")
    header_line, header = rows[0]
    columns = {name.strip(): i for i, name in enumerate(header)}
    if "text" not in columns:
        raise DataError(path, header_line, f"the header has no 'text' column (columns: {header})")
    if require_label and "label" not in columns:
        raise DataError(path, header_line, f"the header has no 'label' column (columns: {header})")
    if require_pair and "text_pair" not in columns:
        raise DataError(path, header_line, f"the header has no 'text_pair' column (columns: {header})")
    if len(rows) == 1:
        raise DataError(path, header_line + 1, "no examples after the header")
    examples, raw_labels = [], []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(path, line, f"expected {len(header)} columns as in the header, found {len(row)}")
        text = _check_text(path, line, row[columns["text"]], "text", required=True)
        pair = None
        if "text_pair" in columns:
            pair = row[columns["text_pair"]] or None
        if require_pair and pair is None:
            raise DataError(path, line, "missing 'text_pair'")
        label = None
        if "label" in columns:
            cell = row[columns["label"]].strip()
            if cell:
                raw_labels.append((line, cell))
                label = cell
            elif require_label:
                raise DataError(path, line, "missing 'label'")
        examples.append((line, Example(text=text, text_pair=pair, label=label, line=line)))
    return _attach_labels(path, examples, raw_labels, label_names=label_names, from_text=True,
                          data_subset=data_subset)


def _attach_labels(path, examples, raw_labels, *, label_names, from_text: bool, data_subset):
    labelled = [example for _, example in examples if example.label is not None]
    if labelled and len(labelled) != len(examples):
        line = next(line for line, example in examples if example.label is None)
        raise DataError(path, line, "missing 'label' (other rows have one)")
    names = None
    if raw_labels:
        labels, names = _finish_labels(path, raw_labels, label_names=None if label_names is None else list(label_names),
                                       from_text=from_text)
        for example, label in zip(labelled, labels):
            example.label = label
    result = ExampleList((example for _, example in examples), label_names=names, source=str(path))
    return subset(result, data_subset)


def read_jsonl(path, *, require_label: bool = True, require_pair: bool = False,
               label_names: Sequence[str] | None = None, data_subset: int | None = None) -> ExampleList:
    """Read a JSON-lines file: one object per line with ``text`` (optional ``text_pair``) and ``label``, or
    pre-tokenized ``input_ids`` (a non-empty list of ints, used as given: no special tokens are added) instead
    of ``text``. Blank lines are skipped.

    Labels: ints stay ids, numbers with a fraction make the data a regression set (floats), strings are mapped to
    ids in sorted order (reported as ``label_names``) unless ``label_names`` is given. ``require_label`` /
    ``require_pair`` as in :func:`read_csv`. Raises :class:`DataError` (file and line) for bad JSON, a row that is
    not an object, a missing or mistyped key, non-integer ``input_ids``, labels of mixed kinds, an empty file.
    """
    path = Path(path)
    examples, raw_labels = [], []
    with io.StringIO(read_text(path)) as handle:
        for line, content in enumerate(handle, start=1):
            if not content.strip():
                continue
            try:
                row = json.loads(content)
            except json.JSONDecodeError as error:
                raise DataError(path, line, f"invalid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, line, f"expected a JSON object, got {type(row).__name__}")
            input_ids = row.get("input_ids")
            if input_ids is not None:
                if (not isinstance(input_ids, list) or not input_ids
                        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2 ** 63
                                   for i in input_ids)):
                    raise DataError(path, line, "'input_ids' must be a non-empty list of non-negative integers "
                                                "(token ids below 2**63)")
            text = _check_text(path, line, row.get("text"), "text", required=input_ids is None)
            pair = _check_text(path, line, row.get("text_pair"), "text_pair", required=require_pair)
            label = row.get("label")
            if label is None:
                if require_label:
                    raise DataError(path, line, "missing 'label'")
            elif isinstance(label, bool) or not isinstance(label, (int, float, str)):
                raise DataError(path, line, f"'label' must be an int, a float or a string, got {label!r}")
            else:
                raw_labels.append((line, label))
            examples.append((line, Example(text=text, text_pair=pair, label=label, input_ids=input_ids, line=line)))
    if not examples:
        raise DataError(path, 1, "empty file (no JSON lines)")
    return _attach_labels(path, examples, raw_labels, label_names=label_names, from_text=False,
                          data_subset=data_subset)


# ----------------------------------------------------------------------------------------------------------------
# Labels against the model's classes
# ----------------------------------------------------------------------------------------------------------------

def _where(examples) -> str:
    return getattr(examples, "source", None) or "the data"


def check_class_labels(examples: Sequence[Example], num_classes: int) -> None:
    """Check that every label is a class id of a classifier with ``num_classes`` classes, in place.

    Floats with no fractional part (``1.0``) become ints; a fractional label (``0.5``: regression data) or an id
    outside ``0 .. num_classes - 1`` (``-1``, or a class the checkpoint does not have) raises :class:`DataError`
    naming the file, the first line, the offending labels and the number of classes.
    """
    source = _where(examples)
    fractional = [e for e in examples if isinstance(e.label, float) and not float(e.label).is_integer()]
    if fractional:
        first = fractional[0]
        raise DataError(source, first.line,
                        f"label {first.label!r} is not a class id ({len(fractional)} of {len(examples)} labels have a "
                        "fractional part): a classifier needs integer class ids or label names. Regression targets "
                        "are read for the GLUE STS-B layout (--task sts-b)")
    for example in examples:
        if isinstance(example.label, float):
            example.label = int(example.label)
    outside = [e for e in examples if e.label is not None and not 0 <= e.label < num_classes]
    if outside:
        labels = sorted({e.label for e in outside})
        raise DataError(source, outside[0].line,
                        f"label(s) {labels} ({len(outside)} example(s)) are outside the model's {num_classes} classes "
                        f"(ids 0 to {num_classes - 1}); use a checkpoint trained for these labels, or fix the labels")


_DEFAULT_LABEL_NAME = re.compile(r"LABEL_\d+")


def align_label_names(examples: Sequence[Example], id2label: dict | None) -> dict | None:
    """Map label *names* to the checkpoint's class ids, in place, when the checkpoint names its classes.

    Readers number name labels in sorted order (or, for GLUE, in the task's processor order), which need not be
    the order the checkpoint was trained with (MNLI checkpoints disagree). When ``examples.label_names`` holds
    names (not integer strings) and ``id2label`` has names other than transformers' ``LABEL_i`` defaults, every
    name is looked up in ``id2label`` (case-insensitively) and the label ids are rewritten; a name the checkpoint
    does not have raises :class:`DataError`. Returns the mapping used (name -> id), or None when nothing was done.
    """
    names = getattr(examples, "label_names", None)
    if not names or all(_INT.fullmatch(str(name)) for name in names) or not id2label:
        return None
    checkpoint = {int(i): str(name) for i, name in id2label.items()}
    if all(_DEFAULT_LABEL_NAME.fullmatch(name) for name in checkpoint.values()):
        return None
    by_name = {name.lower(): i for i, name in checkpoint.items()}
    unknown = [name for name in names if str(name).lower() not in by_name]
    if unknown:
        raise DataError(_where(examples), None,
                        f"label name(s) {unknown} are not among the checkpoint's classes "
                        f"{[checkpoint[i] for i in sorted(checkpoint)]}; use the checkpoint's label names (or their "
                        "integer ids)")
    mapping = {str(name): by_name[str(name).lower()] for name in names}
    for example in examples:
        if example.label is not None:
            example.label = mapping[str(names[example.label])]
    return mapping


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
                    raise DataError(_where(examples), example.line,
                                    f"example {start + row} has {what} {value}, but the model's {size} has {limit} "
                                    f"entries (ids 0 to {limit - 1}); the ids come from another tokenizer or model")
        start += rows


# ----------------------------------------------------------------------------------------------------------------
# Plain text for language modelling
# ----------------------------------------------------------------------------------------------------------------

def read_text_blocks(path, tokenizer, *, max_seq_length: int, data_subset: int | None = None) -> ExampleList:
    """Tokenize the whole text file (no special tokens) and cut it into consecutive blocks of ``max_seq_length``
    tokens, as pre-tokenized examples (``Example(text=None, input_ids=block)``) for GPT-2 / GPT language
    modelling. The last, shorter block is kept when it has at least 2 tokens (one next-token prediction).
    Raises :class:`DataError` for an empty file or a text of fewer than 2 tokens.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 for language modelling, got {max_seq_length}")
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataError(path, 1, "empty file")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(path, 1, f"the text has {len(ids)} token(s); language modelling needs at least 2")
    blocks = [ids[start:start + max_seq_length] for start in range(0, len(ids), max_seq_length)]
    if len(blocks[-1]) < 2:
        blocks.pop()
    examples = ExampleList((Example(text=None, input_ids=list(block)) for block in blocks), source=str(path))
    return subset(examples, data_subset)


def load_examples(path, *, task: str | None = None, tokenizer=None, max_seq_length: int | None = None,
                  require_label: bool = True, require_pair: bool = False,
                  label_names: Sequence[str] | None = None, data_subset: int | None = None) -> ExampleList:
    """Read examples with the reader that fits: ``task`` given -> :func:`read_glue` on the directory ``path``;
    otherwise by suffix: ``.csv`` -> :func:`read_csv`, ``.tsv`` -> :func:`read_csv` with tabs, ``.jsonl`` /
    ``.json`` -> :func:`read_jsonl`, ``.txt`` -> :func:`read_text_blocks` (needs ``tokenizer`` and
    ``max_seq_length``)."""
    path = Path(path)
    if task is not None:
        return read_glue(path, task=task, data_subset=data_subset)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: name the GLUE task (one of {', '.join(GLUE_TASKS)}) or give a file")
    suffix = path.suffix.lower()
    options = dict(require_label=require_label, require_pair=require_pair, label_names=label_names,
                   data_subset=data_subset)
    if suffix == ".csv":
        return read_csv(path, **options)
    if suffix == ".tsv":
        return read_csv(path, delimiter="\t", **options)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, **options)
    if suffix == ".txt":
        if tokenizer is None or max_seq_length is None:
            raise ValueError("a .txt file is read as language-modelling blocks: give tokenizer and max_seq_length")
        return read_text_blocks(path, tokenizer, max_seq_length=max_seq_length, data_subset=data_subset)
    raise ValueError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv, .jsonl, .txt or a GLUE task directory")


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------

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


def _encode(texts: list[str], pairs: list[str] | None, tokenizer, limit: int, wants_types: bool):
    """Tokenize with special tokens; sequences over ``limit`` are re-tokenized with truncation (longest first).
    Returns ``(ids, type_ids or None, truncated count)``; every sequence then has at most ``limit`` tokens."""
    if not texts:
        return [], [], 0
    _check_room(tokenizer, limit, pairs=pairs is not None)
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
    """A copy of ``batch`` with every tensor moved to ``device``."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Demo data: (query, positive) pairs from the Python documentation shipped with Python
# ----------------------------------------------------------------------------------------------------------------

# A sentence ends at . ! ? after a lowercase letter, digit, quote or parenthesis and before a capital, quote or
# "(" — good enough for the reference manual's prose (it avoids "e.g. x", "i.e. y" and "3.12").
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"”][.!?])\s+(?=[A-Z\"“(])")
_UNDERLINE = re.compile(r"\s*([*=\-^~])\1{2,}\s*")
_MIN_POSITIVE_CHARS = 40
_NOT_PROSE = ("* ", "Note:", "Changed in", "New in", "Added in", "Deprecated", "See also", "Warning:")


def _documentation_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions strip pydoc_data from the standard library
        raise RuntimeError(
            "demo_pairs needs the Python documentation topics (pydoc_data.topics), which this Python installation "
            "lacks (some distributions strip it; e.g. install the full standard library package). Use your own "
            "pairs file instead (read_csv / read_jsonl with text and text_pair)."
        ) from error
    if not isinstance(topics, dict) or not topics:
        raise RuntimeError("pydoc_data.topics.topics is not the expected dict of documentation topics")
    return topics


def _prose_paragraphs(document: str) -> list[str]:
    """Paragraphs of running prose (one indentation level, no grammar, code, bullets, notes or headings), each
    joined into one line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", document):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or len({len(line) - len(line.lstrip()) for line in lines}) != 1:
            continue
        if any(_UNDERLINE.fullmatch(line) for line in lines):
            continue
        text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines))
        if "::=" in text or ">>>" in text or text.startswith(_NOT_PROSE):
            continue
        paragraphs.append(text)
    return paragraphs


def _all_demo_pairs(*, min_query_chars: int, max_query_chars: int, max_positive_chars: int
                    ) -> list[tuple[str, str, str]]:
    """Every ``(topic, query, positive)``: topics in sorted order, paragraphs in document order, duplicates (the
    same sentence under several topics) dropped at their later occurrences."""
    topics = _documentation_topics()
    seen: set[str] = set()
    pairs = []
    for topic in sorted(topics):
        for paragraph in _prose_paragraphs(topics[topic]):
            sentences = _SENTENCE_END.split(paragraph)
            if len(sentences) < 2 or not min_query_chars <= len(sentences[0]) <= max_query_chars:
                continue
            query, positive = sentences[0], sentences[1]
            for sentence in sentences[2:]:  # following sentences while they fit
                if len(positive) + 1 + len(sentence) > max_positive_chars:
                    break
                positive = f"{positive} {sentence}"
            if not _MIN_POSITIVE_CHARS <= len(positive) <= max_positive_chars:
                continue
            if query in seen or positive in seen:
                continue
            seen.update((query, positive))
            pairs.append((topic, query, positive))
    return pairs



def demo_pairs(n: int = 256, *, min_query_chars: int = 40, max_query_chars: int = 150,
               max_positive_chars: int = 180) -> ExampleList:
    """``n`` (query, positive) retrieval pairs made from the Python reference documentation that ships with Python
    (``pydoc_data.topics.topics``: 79 topics such as "assignment" or "string-methods"; real text, not ours).

    Pairing (inverse-cloze style): a prose paragraph is split into sentences; the query is its first sentence
    (``min_query_chars`` to ``max_query_chars`` characters), the positive is the sentences that follow, as many as
    fit in ``max_positive_chars`` (at least one, at least 40 characters): with the MiniLM tokenizer about 25 + 30
    tokens per pair, so a pass over the pairs is cheap on a CPU. Grammar, code, bullets and notes are skipped;
    text repeated under several topics is used once. Pretrained all-MiniLM-L6-v2 ranks the own positive first
    among 32 for about two thirds of the queries (0.66 for the default 256 pairs; chance: 1/32 = 0.031), and
    masking half of its heads costs about 0.1 of that.

    Selection and order, deterministic (no randomness): each topic's pairs are spread evenly over a list (pair i
    of a topic with k pairs sorts at (i + 0.5) / k, ties by topic name) and the first ``n`` are taken, so every
    topic contributes; these are then ordered by the positive's length (ties: the spread order), so that a
    retrieval group / batch of consecutive pairs has similar lengths and little padding. The documentation, and
    so the pairs, differ slightly between Python versions (Python 3.10-3.13 give 326-369 pairs with the
    defaults).

    Returns an :class:`ExampleList` of ``Example(text=query, text_pair=positive)``. Raises RuntimeError when
    ``pydoc_data`` is missing, ValueError when fewer than ``n`` pairs exist.
    """
    pairs = _all_demo_pairs(min_query_chars=min_query_chars, max_query_chars=max_query_chars,
                            max_positive_chars=max_positive_chars)
    counts: dict[str, int] = {}
    for topic, _, _ in pairs:
        counts[topic] = counts.get(topic, 0) + 1
    position: dict[str, int] = {}
    keyed = []
    for topic, query, positive in pairs:
        i = position.get(topic, 0)
        position[topic] = i + 1
        keyed.append(((i + 0.5) / counts[topic], topic, i, query, positive))
    keyed.sort(key=lambda item: item[:3])
    if n < 1 or n > len(keyed):
        raise ValueError(f"demo_pairs: n must be between 1 and {len(keyed)} (pairs available in this Python's "
                         f"documentation with these options), got {n}")
    chosen = sorted(keyed[:n], key=lambda item: (len(item[4]), item[:3]))
    return ExampleList((Example(text=query, text_pair=positive) for _, _, _, query, positive in chosen),
                       source="pydoc_data.topics (Python documentation): first sentence -> following sentences")

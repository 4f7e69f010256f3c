"""File readers: each returns an :class:`~fastbertology.data.examples.ExampleList`.

* :func:`read_glue` — a GLUE task directory as run_bertology reads it (dev split, the GLUE processors' columns).
* :func:`read_csv` / :func:`read_jsonl` — ``text`` (and optional ``text_pair``) and ``label`` columns / keys;
  JSONL rows may instead carry pre-tokenized ``input_ids``. Optional ``corrupted_text`` / ``corrupted_text_pair``
  (activation patching) are kept on the examples.
* :func:`read_text_blocks` — a plain text file for GPT-2 / GPT language modelling: the whole file is one token
  stream (line breaks are tokens too), cut into consecutive blocks of ``max_seq_length`` tokens.
* :func:`load_examples` — picks one of the above from ``task=`` or the file suffix.

Malformed input raises :class:`~fastbertology.data.examples.DataError` naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .examples import DataError, Example, ExampleList, read_text, subset
from .labels import labels_from_raw

# Optional columns / keys of activation-patching data (the corrupted version of text and text_pair)
CORRUPTED_KEYS = ("corrupted_text", "corrupted_text_pair")
# The CSV / TSV columns the reader reads (a header naming one of them twice is refused: which one counts is ambiguous)
READ_COLUMNS = ("text", "text_pair", "label", *CORRUPTED_KEYS)

__all__ = ["CORRUPTED_KEYS", "GLUE_TASKS", "GlueTaskSpec", "glue_spec", "load_examples", "read_csv", "read_glue",
           "read_jsonl", "read_text_blocks"]


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
        raise DataError(path, 1, "empty file; a GLUE task file has its header and one example per line: restore it "
                                 "from the task's download")
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
    label_names:   fixed label names (id = position); otherwise labels are read as
                   :func:`~fastbertology.data.labels.labels_from_raw` says, the same in every format: all integers
                   are class ids, all numbers regression targets, names ids in sorted order (``label_names`` of the
                   result reports the mapping).
    Optional ``corrupted_text`` / ``corrupted_text_pair`` columns (activation patching) are kept on the examples.
    Raises :class:`DataError` (file and line) for an empty file, a missing column or value, a column read here
    named twice in the header, or a row with a different number of columns than the header.
    """
    path = Path(path)
    rows = []  # (first physical line of the record, cells): quoted cells may span lines
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = 1
    # A cell may be as long as the file (a long document: the tokenizer truncates it), not only the csv module's
    # default 131,072 characters; the limit is the process's, so it is restored.
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(path, reader.line_num, f"unreadable CSV: {error}") from None
    finally:
        csv.field_size_limit(limit)
    rows = [(line, row) for line, row in rows if row and any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(path, 1, "empty file (expected a header with a 'text' column); write the header, e.g. "
                                 "text,label, then one example per line")
    header_line, header = rows[0]
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        name = name.strip()
        if name in columns and name in READ_COLUMNS:
            raise DataError(path, header_line, f"the header has two {name!r} columns (columns {columns[name] + 1} and "
                                               f"{i + 1}): which one holds the data is ambiguous; rename or remove one")
        columns.setdefault(name, i)
    if "text" not in columns:
        raise DataError(path, header_line, f"the header has no 'text' column (columns: {header})")
    if require_label and "label" not in columns:
        raise DataError(path, header_line, f"the header has no 'label' column (columns: {header})")
    if require_pair and "text_pair" not in columns:
        raise DataError(path, header_line, f"the header has no 'text_pair' column (columns: {header})")
    if len(rows) == 1:
        raise DataError(path, header_line + 1, "no examples after the header; add one example per line below it")
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
        corrupted = {key: row[columns[key]] or None for key in CORRUPTED_KEYS if key in columns}
        label = None
        if "label" in columns:
            cell = row[columns["label"]].strip()
            if cell:
                raw_labels.append((line, cell))
                label = cell
            elif require_label:
                raise DataError(path, line, "missing 'label'")
        examples.append((line, Example(text=text, text_pair=pair, label=label, line=line, **corrupted)))
    return _attach_labels(path, examples, raw_labels, label_names=label_names,
                          data_subset=data_subset)


def _attach_labels(path, examples, raw_labels, *, label_names, data_subset):
    labelled = [example for _, example in examples if example.label is not None]
    if labelled and len(labelled) != len(examples):
        line = next(line for line, example in examples if example.label is None)
        raise DataError(path, line, "missing 'label' (other rows have one)")
    names = None
    if raw_labels:
        fixed = None if label_names is None else list(label_names)
        try:
            labels, names = labels_from_raw(path, raw_labels, label_names=fixed)
        except DataError:
            raise
        except (ValueError, OverflowError) as error:  # e.g. an integer label of more than 4300 digits
            raise DataError(path, None, f"the labels cannot be read ({str(error).split(';')[0]})") from None
        for example, label in zip(labelled, labels):
            example.label = label
    result = ExampleList((example for _, example in examples), label_names=names, source=str(path))
    return subset(result, data_subset)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (JSON numbers are finite; write null for a missing value)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    return value


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different (JSON does not say which of two equal keys counts; Python's json
    keeps the last one, other readers the first)."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise ValueError(f"the key {key!r} appears twice in one object (which value counts is ambiguous: keep one)")
        row[key] = value
    return row


def _json_line(path, line: int, content: str):
    """One JSON line, strictly: no NaN / Infinity, no number beyond float64, no key twice in an object, valid
    Unicode; DataError otherwise."""
    try:
        row = json.loads(content, parse_constant=_no_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\\ud800") is not text
    except json.JSONDecodeError as error:
        raise DataError(path, line, f"invalid JSON: {error.msg} (column {error.colno})") from None
    except UnicodeEncodeError:
        raise DataError(path, line, "invalid Unicode in a string (a lone surrogate such as \\ud800)") from None
    except RecursionError:
        raise DataError(path, line, "invalid JSON: nested too deeply") from None
    except ValueError as error:  # the hooks above; integers of more than 4300 digits
        raise DataError(path, line, f"invalid JSON: {str(error).split(';')[0]}") from None
    return row


def read_jsonl(path, *, require_label: bool = True, require_pair: bool = False,
               label_names: Sequence[str] | None = None, data_subset: int | None = None) -> ExampleList:
    """Read a JSON-lines file: one object per line with ``text`` (optional ``text_pair``) and ``label``, or
    pre-tokenized ``input_ids`` (a non-empty list of ints, used as given: no special tokens are added) instead
    of ``text``. Blank lines are skipped.

    Labels: as in :func:`read_csv`: a string that spells a number is that number (``"1"`` is class id 1, as ``1``
    is and as a CSV ``1`` is), numbers with a fraction make the data a regression set (floats), other strings are
    names mapped to ids in sorted order (reported as ``label_names``) unless ``label_names`` is given.
    ``require_label`` / ``require_pair`` as in :func:`read_csv`. Raises :class:`DataError` (file and line) for bad
    JSON, a row that is not an object, a key twice in one object, a missing or mistyped key, non-integer
    ``input_ids``, labels of mixed kinds (names and numbers), an empty file.
    """
    path = Path(path)
    examples, raw_labels = [], []
    with io.StringIO(read_text(path)) as handle:
        for line, content in enumerate(handle, start=1):
            if not content.strip():
                continue
            row = _json_line(path, line, content)
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
                if require_label and not raw_labels:  # no row so far has one: perhaps data for another task
                    raise DataError(path, line, "missing 'label': classification and regression data need one in "
                                                "every row (language modelling reads a .txt file; activation "
                                                "patching of a language model takes --task lm)")
                if require_label:
                    raise DataError(path, line, "missing 'label'")
            elif isinstance(label, bool) or not isinstance(label, (int, float, str)):
                raise DataError(path, line, f"'label' must be an int, a float or a string, got {label!r}")
            else:
                raw_labels.append((line, label))
            corrupted = {key: _check_text(path, line, row.get(key), key, required=False) for key in CORRUPTED_KEYS}
            examples.append((line, Example(text=text, text_pair=pair, label=label, input_ids=input_ids, line=line,
                                           **corrupted)))
    if not examples:
        raise DataError(path, 1, "empty file (no JSON lines); write one JSON object per line, e.g. "
                                 '{"text": "...", "label": 1}')
    return _attach_labels(path, examples, raw_labels, label_names=label_names,
                          data_subset=data_subset)


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
        raise DataError(path, 1, "empty file; language modelling reads plain text: give a file with some text")
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

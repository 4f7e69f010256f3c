"""Property-based tests (hypothesis) of everything that reads a file a user hands over: the data readers
(CSV / TSV / JSONL), head-mask files and run directories. Generated malformed input must end in the project's own
error (DataError / ValueError naming the file), never a traceback of another kind; well-formed input must read
back exactly what was written (no silent wrong result)."""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from report_runs import TABLES, patterns, summary, write_run

from fastbertology.data import DataError
from fastbertology.data.readers import read_csv, read_jsonl
from fastbertology.mask_files import read_mask_file, read_pruning_mask, read_sweep_masks
from fastbertology.report import build_html, read_run

# No example database: what one run found must not change what the next run tests (no state left on the machine).
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Text with what breaks parsers: quotes, separators, line breaks of every kind, NUL, RTL marks, emoji.
NASTY = st.text(alphabet=st.sampled_from(list("ab ,;\t\"'\\\n\r\x00\u200f\u2028\U0001f600{}[]:0123456789.-eE")) |
                st.characters(codec="utf-8"), max_size=30)


@pytest.fixture(scope="module", autouse=True)
def _root():
    """One temporary directory for every generated file of this module, removed at its end."""
    with tempfile.TemporaryDirectory(prefix="fb-properties-") as root:
        ROOT[:] = [Path(root)]
        yield


ROOT: list[Path] = []


def _fresh(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT[0]))


def _file(suffix: str, content) -> Path:
    path = _fresh("file-") / f"data{suffix}"
    (path.write_bytes if isinstance(content, bytes) else lambda c: path.write_text(c, encoding="utf-8"))(content)
    return path


def _read_or_refuse(reader, path, **options):
    """The examples, or None when refused with a DataError that names the file."""
    try:
        return reader(path, **options)
    except DataError as error:
        assert str(path) in str(error) and error.reason
        return None


# -------------------------------------------------------------------------------------------------- data files
@SETTINGS
@given(rows=st.lists(st.lists(NASTY, max_size=5), max_size=6), delimiter=st.sampled_from([",", "\t"]),
       header=st.lists(st.sampled_from(["text", "text_pair", "label", "other", " text ", ""]), max_size=4))
@example(rows=[["a", "9" * 5000]], delimiter=",", header=["text", "label"])  # beyond Python's int() digits
@example(rows=[["a", "1e999"], ["b", "nan"]], delimiter="\t", header=["text", "label"])
def test_csv_and_tsv_of_any_content_read_or_refuse(rows, delimiter, header):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(rows)
    for text in (buffer.getvalue(), buffer.getvalue()[: len(buffer.getvalue()) // 2]):  # whole, and cut
        path = _file(".tsv" if delimiter == "\t" else ".csv", text)
        for require_label in (True, False):
            _read_or_refuse(read_csv, path, delimiter=delimiter, require_label=require_label)


@SETTINGS
@given(content=st.binary(max_size=200))
def test_csv_and_jsonl_of_any_bytes_read_or_refuse(content):
    _read_or_refuse(read_csv, _file(".csv", content))
    _read_or_refuse(read_jsonl, _file(".jsonl", content))


@SETTINGS
@given(examples=st.lists(st.tuples(NASTY.filter(lambda t: t.strip() and t == t.strip()), st.integers(0, 5)),
                         min_size=1, max_size=8), delimiter=st.sampled_from([",", "\t"]))
def test_well_formed_csv_reads_back_exactly(examples, delimiter):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(["text", "label"])
    writer.writerows(examples)
    read = read_csv(_file(".csv", buffer.getvalue()), delimiter=delimiter)
    assert [(e.text, e.label) for e in read] == [(text, label) for text, label in examples]


JSON_SCALARS = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | NASTY
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.sampled_from(["text", "text_pair", "label", "input_ids", "x"]), inner,
                                           max_size=4), max_leaves=12)
RAW_LINES = st.sampled_from(['{"text": "a", "label": NaN}', '{"text": "a", "label": Infinity}', "{", "]", "",
                             '{"text": "a", "label": 1e999}', '{"text": "a", "label": ' + "9" * 5000 + "}",
                             '{"text": "\\ud800", "label": 1}', '{"input_ids": [1, -1], "label": 0}',
                             '{"text": "a", "label": 1}', '{"text": "b", "label": 0.5}', '{"text": "c", "label": "x"}'])


@SETTINGS
@given(lines=st.lists(JSON_VALUES.map(json.dumps) | RAW_LINES, min_size=1, max_size=6))
@example(lines=['{"text": "a", "label": ' + "9" * 5000 + "}"])
@example(lines=['{"text": "a", "label": NaN}', '{"text": "b", "label": 1}'])
def test_jsonl_of_any_lines_reads_or_refuses(lines):
    path = _file(".jsonl", "\n".join(lines))
    for require_label in (True, False):
        read = _read_or_refuse(read_jsonl, path, require_label=require_label)
        for item in read or []:  # what was read is usable: finite labels, texts or ids
            assert item.text is not None or item.input_ids
            assert item.label is None or (not isinstance(item.label, float) or math.isfinite(item.label))


@SETTINGS
@given(examples=st.lists(st.fixed_dictionaries({"text": NASTY.filter(bool), "label": st.integers(0, 5)},
                                               optional={"text_pair": NASTY.filter(bool)}), min_size=1, max_size=8))
def test_well_formed_jsonl_reads_back_exactly(examples):
    read = read_jsonl(_file(".jsonl", "\n".join(json.dumps(e) for e in examples)))
    assert [(e.text, e.text_pair, e.label) for e in read] == [(e["text"], e.get("text_pair"), e["label"])
                                                              for e in examples]


# -------------------------------------------------------------------------------------------------- mask files
DESCRIPTORS = ["<f4", "<f8", ">f8", "<f2", "|b1", "<i8", "|u1", "|O", "<U3", "<c8", "[('a', '<f4')]", "<M8[s]",
               "'<f4'", "garbage"]


@st.composite
def npy_bytes(draw):
    """A .npy file, valid or damaged: a header with any descriptor, order and shape, then any number of bytes."""
    descr = draw(st.sampled_from(DESCRIPTORS))
    shape = draw(st.lists(st.integers(-2, 10**12) | st.integers(0, 4), max_size=3).map(tuple))
    header = (f"{{'descr': {descr if descr.startswith(('[', chr(39))) else repr(descr)}, 'fortran_order': "
              f"{draw(st.sampled_from(['False', 'True', '1']))}, 'shape': {shape!r}, }}")
    header += " " * ((64 - (len(header) + 11) % 64) % 64) + "\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"]))
    length = len(header).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    data = draw(st.binary(max_size=96))
    return draw(st.sampled_from([b"\x93NUMPY", b"\x93NUMPX"])) + version + length + header.encode("latin1") + data


@SETTINGS
@given(content=npy_bytes() | st.binary(max_size=64))
def test_mask_files_of_any_bytes_read_or_refuse(content):
    path = _file(".npy", content)
    for reader, option in ((read_pruning_mask, "--head-mask"), (read_sweep_masks, "--masks")):
        try:
            mask = reader(path)
        except ValueError as error:
            assert f"{option} {path}" in str(error)
            continue
        assert mask.dtype == np.float32 and np.isfinite(mask).all() and mask.ndim in (2, 3)


ARRAYS = arrays(dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int64, np.uint16, np.bool_]),
                shape=array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


@SETTINGS
@given(array=ARRAYS, fortran=st.booleans())
def test_saved_masks_read_back_exactly(array, fortran):
    path = _file(".npy", b"")
    np.save(path, np.asfortranarray(array) if fortran else array)
    try:
        mask = read_mask_file(path, option="--masks")
    except ValueError as error:
        with np.errstate(over="ignore"):
            assert "NaN or infinite" in str(error) and not np.isfinite(array.astype(np.float32)).all()
        return
    np.testing.assert_array_equal(mask, array.astype(np.float32))


# ------------------------------------------------------------------------------------------------ run directories
def _paths(document, path=()):
    if isinstance(document, dict):
        for key, value in document.items():
            yield (*path, key)
            yield from _paths(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield (*path, index)
            yield from _paths(value, (*path, index))


@st.composite
def mutated(draw, document):
    """``document`` with a few of its values replaced by any JSON, or removed."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(document))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return document


TABLE_VARIANTS = st.sampled_from([np.array(0.5), np.zeros((0, 3)), np.ones((4, 4)), np.ones(3), np.array([["a"]]),
                                  np.full((2, 3), np.nan), np.ones((2, 3), dtype=np.int64), np.ones((1, 2, 3)),
                                  np.ones((2, 3), dtype=np.complex64), np.ones((2, 3), dtype=bool)])


@settings(SETTINGS, max_examples=80)
@given(summary_payload=mutated(summary()), patterns_payload=mutated(patterns()),
       tables=st.dictionaries(st.sampled_from(sorted(TABLES)), TABLE_VARIANTS, max_size=2))
def test_run_directories_of_any_structure_show_or_refuse(summary_payload, patterns_payload, tables):
    directory = write_run(_fresh("run-") / "run", summary_payload=summary_payload,
                          patterns_payload=patterns_payload, tables={**TABLES, **tables})
    try:
        run = read_run(directory)
    except ValueError as error:
        assert str(directory) in str(error)
        return
    html = build_html(run)
    assert html.count("<script>") == 1 and "</html>" in html


@SETTINGS
@given(content=st.binary(max_size=100) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_summary_json_of_any_content_shows_or_refuses(content):
    directory = _fresh("run-")
    (directory / "summary.json").write_bytes(content)
    try:
        run = read_run(directory)
    except ValueError as error:
        assert "summary.json" in str(error)
        return
    build_html(run)


def test_the_unchanged_run_is_shown():
    """The property tests' starting point is a valid run (else they would only test refusals)."""
    directory = write_run(_fresh("run-") / "run")
    assert "Ablation sweep" in build_html(read_run(directory))



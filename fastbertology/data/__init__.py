"""Data: examples read from files, their labels, and the demo's pairs. One concern per module:

* :mod:`~fastbertology.data.examples` — :class:`Example`, :class:`ExampleList` (examples plus their label table and
  source), :class:`DataError` (malformed input: the message names the file and the line), UTF-8 reading;
* :mod:`~fastbertology.data.readers` — GLUE directories, CSV/TSV, JSONL, plain text for language modelling, and
  :func:`load_examples`, which picks the reader;
* :mod:`~fastbertology.data.labels` — label values -> class ids or regression targets, and the checks of labels
  against a classifier's classes (:func:`check_class_labels`, :func:`align_label_names`);
* :mod:`~fastbertology.data.demo` — (query, positive) pairs from the Python documentation (:func:`demo_pairs`);
* streamed corpora (``importance --stream``): :mod:`~fastbertology.data.text_stream` (a large ``.txt`` tokenized in
  overlapping windows), :mod:`~fastbertology.data.document_stream` (JSONL and Parquet documents),
  :mod:`~fastbertology.data.stream_batches` (blocks and batches with a position to resume from).

Turning examples into batches of tensors is :mod:`fastbertology.batching` (``make_batches``), the one batching
module; the analyses consume its batches and never read files.
"""

from __future__ import annotations

from .demo import demo_pairs
from .examples import DataError, Example, ExampleList, read_text, subset
from .labels import align_label_names, check_class_labels, describe_labels
from .readers import (
                      GLUE_TASKS,
                      GlueTaskSpec,
                      glue_spec,
                      load_examples,
                      read_csv,
                      read_glue,
                      read_jsonl,
                      read_text_blocks,
)

__all__ = [
    "GLUE_TASKS", "DataError", "Example", "ExampleList", "GlueTaskSpec", "align_label_names", "check_class_labels",
    "demo_pairs", "describe_labels", "glue_spec", "load_examples", "read_csv", "read_glue", "read_jsonl", "read_text",
    "read_text_blocks", "subset",
]

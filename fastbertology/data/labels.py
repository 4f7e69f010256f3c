"""Labels: turning the label column of a file into class ids or regression targets (the id -> name table is
kept on the :class:`~fastbertology.data.examples.ExampleList`), and checking labels against a classifier's classes.

* :func:`labels_from_raw` — raw label values of a file -> ids / floats and the label names (readers use it);
* :func:`check_class_labels` — every label is a class id of the checkpoint;
* :func:`align_label_names` — label names follow the checkpoint's ``id2label`` when it names its classes;
* :func:`describe_labels` — the mapping in words, for the run's summary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .examples import DataError, Example, where

__all__ = ["align_label_names", "check_class_labels", "describe_labels", "labels_from_raw"]

_INT = re.compile(r"[+-]?\d+")


def labels_from_raw(path, raw: list[tuple[int, object]], *, label_names: list[str] | None):
    """Turn raw labels ``[(line, value)]`` into ids / floats; return ``(labels, label_names)``.

    A label means the same in every format: a JSON number, a JSON string and a CSV / TSV cell that spell the same
    number are the same label (``1``, ``"1"`` and a CSV ``1`` are class id 1; ``"0.5"`` and ``0.5`` the regression
    target 0.5). Every other string is a label *name*. All integers -> class ids (ints); numbers with a fraction
    among them -> regression targets (floats, which must be finite); all names -> ids in sorted order of the names
    (``label_names``; :func:`align_label_names` later follows the checkpoint's ``id2label`` instead). Names mixed
    with numbers -> :class:`DataError`. ``label_names`` given: a value that is one of them gets its position,
    any other integer must be an id in range.
    """
    read = [(line, *_label_value(value)) for line, value in raw]
    for line, kind, value in read:
        if kind == "name" and not value:
            raise DataError(path, line, "empty 'label' (a label must be a class id, a number or a name)")
    if label_names is not None:
        return _labels_from_given_names(path, read, list(label_names)), list(label_names)
    first_line, first_kind, _ = read[0]
    kinds = {kind for _, kind, _ in read}
    if "name" in kinds and len(kinds) > 1:
        line, kind, value = next(item for item in read if (item[1] == "name") != (first_kind == "name"))
        this, since = ("names", "numbers") if kind == "name" else ("numbers", "names")
        raise DataError(path, line, f"label {value!r} mixes {this} with the {since} used since line {first_line}; "
                                    "use class ids (integers) or label names throughout, not both")
    if kinds == {"int"}:
        return [value for _, _, value in read], None
    if "name" not in kinds:
        for line, _, value in read:
            if not math.isfinite(value):
                raise DataError(path, line, f"label must be finite, got {value}")
        return [float(value) for _, _, value in read], None
    names = sorted({value for _, _, value in read})
    ids = {name: i for i, name in enumerate(names)}
    return [ids[value] for _, _, value in read], names


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _label_value(value) -> tuple[str, object]:
    """``("int", id)``, ``("float", x)`` or ``("name", text)`` for one raw label: a JSON number, or a string (a
    CSV cell or a JSON string) that spells an integer or a decimal number, counts as that number. Surrounding
    whitespace never counts (CSV cells are read stripped, JSON strings are stripped here)."""
    if isinstance(value, int):
        return "int", value
    if isinstance(value, float):
        return "float", value
    text = value.strip()
    if _INT.fullmatch(text):
        return "int", int(text)
    if _NUMBER.fullmatch(text):
        return "float", float(text)
    return "name", text


def _labels_from_given_names(path, read, names: list[str]) -> list[int]:
    """Ids for ``(line, kind, value)`` labels against fixed ``names``: a name's position, or an integer id."""
    positions = {name: i for i, name in enumerate(names)}
    labels = []
    for line, kind, value in read:
        spelled = str(value) if kind != "name" else value
        if spelled in positions:
            labels.append(positions[spelled])
        elif kind == "int":
            if not 0 <= value < len(names):
                raise DataError(path, line, f"label id {value} is out of range for {len(names)} label names")
            labels.append(value)
        else:
            raise DataError(path, line, f"unknown label {value!r}; known labels: {names}")
    return labels


def check_class_labels(examples: Sequence[Example], num_classes: int) -> None:
    """Check that every label is a class id of a classifier with ``num_classes`` classes, in place.

    Floats with no fractional part (``1.0``) become ints; a fractional label (``0.5``: regression data) or an id
    outside ``0 .. num_classes - 1`` (``-1``, or a class the checkpoint does not have) raises :class:`DataError`
    naming the file, the first line, the offending labels and the number of classes.
    """
    source = where(examples)
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
    """Map label *names* to the checkpoint's class ids, in place.

    Readers number name labels in sorted order (or, for GLUE, in the task's processor order), which need not be
    the order the checkpoint was trained with (MNLI checkpoints disagree). When every name of
    ``examples.label_names`` is a name of ``id2label`` (case-insensitively; transformers' default ``LABEL_i``
    names included), the label ids are rewritten to the checkpoint's. When ``id2label`` has names of its own (not
    only ``LABEL_i`` defaults) and some data name is not among them, or names two of its classes (``id2label``
    naming two classes alike, case-insensitively), :class:`DataError`. Integer-string names
    (GLUE's ``"0"``, ``"1"``) are ids already. Returns the mapping used (name -> id), or None when nothing was done.
    """
    names = getattr(examples, "label_names", None)
    if not names or all(_INT.fullmatch(str(name)) for name in names) or not id2label:
        return None
    checkpoint = {int(i): str(name) for i, name in id2label.items()}
    by_name = {name.lower(): i for i, name in checkpoint.items()}
    unknown = [name for name in names if str(name).lower() not in by_name]
    if unknown and all(_DEFAULT_LABEL_NAME.fullmatch(name) for name in checkpoint.values()):
        return None  # the checkpoint does not name its classes: names keep their sorted order
    if unknown:
        raise DataError(where(examples), None,
                        f"label name(s) {unknown} are not among the checkpoint's classes "
                        f"{[checkpoint[i] for i in sorted(checkpoint)]}; use the checkpoint's label names (or their "
                        "integer ids)")
    for name in names:
        classes = sorted(i for i, known in checkpoint.items() if known.lower() == str(name).lower())
        if len(classes) > 1:
            raise DataError(where(examples), None,
                            f"label name {str(name)!r} names {len(classes)} of the checkpoint's classes (ids "
                            f"{classes} in its id2label {[checkpoint[i] for i in sorted(checkpoint)]}), so which one "
                            "it means is ambiguous; write the labels as integer class ids")
    mapping = {str(name): by_name[str(name).lower()] for name in names}
    for example in examples:
        if example.label is not None:
            example.label = mapping[str(names[example.label])]
    return mapping


def describe_labels(examples: Sequence[Example], aligned: dict | None = None) -> dict:
    """The label -> class-id mapping a run used, for its summary and its printed set-up: ``{"ids": {label: id},
    "order": how the ids were chosen}``. ``aligned``: what :func:`align_label_names` returned. Integer labels (from
    any format) are the class ids themselves; the mapping lists those that occur."""
    names = getattr(examples, "label_names", None)
    if not names:
        ids = sorted({int(e.label) for e in examples if e.label is not None})
        return {"ids": {str(i): i for i in ids}, "order": "integer labels are the class ids"}
    if aligned:
        return {"ids": {str(name): int(i) for name, i in aligned.items()}, "order": "the checkpoint's id2label"}
    task = getattr(examples, "task", None)
    order = f"the GLUE {task} label list" if task else "label names in sorted order"
    return {"ids": {str(name): i for i, name in enumerate(names)}, "order": order}

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


def labels_from_raw(path, raw: list[tuple[int, object]], *, label_names: list[str] | None, from_text: bool):
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
        raise DataError(where(examples), None,
                        f"label name(s) {unknown} are not among the checkpoint's classes "
                        f"{[checkpoint[i] for i in sorted(checkpoint)]}; use the checkpoint's label names (or their "
                        "integer ids)")
    mapping = {str(name): by_name[str(name).lower()] for name in names}
    for example in examples:
        if example.label is not None:
            example.label = mapping[str(names[example.label])]
    return mapping


def describe_labels(examples: Sequence[Example], aligned: dict | None = None) -> dict | None:
    """The label-name -> class-id mapping a run used, for its summary: ``{"ids": {name: id}, "order": how the ids
    were chosen}``. ``aligned``: what :func:`align_label_names` returned. None when the labels were numbers (class
    ids or regression targets, used as given)."""
    names = getattr(examples, "label_names", None)
    if not names:
        return None
    if aligned:
        return {"ids": {str(name): int(i) for name, i in aligned.items()}, "order": "the checkpoint's id2label"}
    task = getattr(examples, "task", None)
    order = f"the GLUE {task} label list" if task else "label names in sorted order"
    return {"ids": {str(name): i for i, name in enumerate(names)}, "order": order}

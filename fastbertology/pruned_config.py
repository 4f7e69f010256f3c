"""Reading ``config.pruned_heads``: which heads of each row a pruned checkpoint lacks.

``config.pruned_heads`` is ``{row: [original head indices]}``; saved as JSON, its row keys are strings
(``{"0": [1, 3]}``). Anything else (a list, a head count instead of a list, negative or fractional indices, keys
that are not integers, repeated heads) is a :class:`ValueError` that names the field and says what it must be,
instead of a traceback from deep inside the loader.
"""

from __future__ import annotations

from collections.abc import Mapping

FIELD_SHAPE = 'an object {"layer": [head, ...]} of non-negative integers (e.g. {"0": [1, 3]})'


def _index(value, what: str) -> int:
    """A non-negative integer (JSON keys: a string of digits), else ValueError ``what`` (with ``{}`` for the
    value)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(what.format(repr(value)) + " is not a non-negative integer")


def read_pruned_heads(recorded) -> dict[int, list[int]]:
    """``config.pruned_heads`` -> ``{int row: sorted original heads}`` (rows without heads left out, ``{}`` for
    None). ValueError ``"pruned_heads must be ...: ..."`` for any other structure or value."""
    if recorded is None:
        return {}
    try:
        if not isinstance(recorded, Mapping):
            raise ValueError(f"it is of type {type(recorded).__name__}")
        result: dict[int, list[int]] = {}
        for key, heads in recorded.items():
            row = _index(key, "layer {}")
            if row in result:
                raise ValueError(f"layer {row} is given twice")
            if not isinstance(heads, (list, tuple)):
                raise ValueError(f"the heads of layer {key!r} are {heads!r}, not a list")
            indices = [_index(head, f"head {{}} of layer {row}") for head in heads]
            if len(set(indices)) != len(indices):
                raise ValueError(f"layer {row} lists a head twice: {indices}")
            if indices:
                result[row] = sorted(indices)
    except ValueError as error:
        raise ValueError(f"pruned_heads must be {FIELD_SHAPE}; {error}") from None
    return result


def kept_heads(config, row: int, total: int) -> list[int]:
    """The original indices of the current heads of ``row`` of a model with ``total`` heads per row
    (``config.pruned_heads`` lists the removed ones; row keys may be ints or, from JSON, strings)."""
    pruned = getattr(config, "pruned_heads", None) or {}
    gone = set(pruned.get(row, pruned.get(str(row), [])))
    return [head for head in range(total) if head not in gone]

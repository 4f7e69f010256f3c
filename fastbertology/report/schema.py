"""What a run directory must hold for the report, checked field by field: a run directory can come from someone
else (a shared folder, an archive) or from an older or damaged run, so nothing in it is trusted.

* ``summary.json``: every section the report reads (``importance``, ``masking``, ``pruning``, ``sweep``,
  ``patterns``, ``head_types``, ``gates``, ``patching``, ``setup.warnings``, timings) has its keys, with numbers
  where numbers are computed with; free text (setup, options,
  environment) may be anything, since the page shows it as text.
* the ``.npy`` tables: real numbers, ``[layers, heads]`` (sweeps of layers or masks: one value per layer / mask),
  not empty, all of one ``[layers, heads]`` shape, and equal to the copy summary.json holds, so that tables from
  one run beside the summary of another (an interrupted ``--overwrite`` of an older version) are refused.
* ``head_scores.json``: one ``[layers, heads]`` table per head type, of one shape (and of the other tables').
* ``attention_patterns.json``: heads, examples, tokens and maps of matching sizes.

Every problem is a :class:`RunFilesError` naming the file and the field (``summary.json: masking.heads_remaining
must be an integer >= 0, got '4'``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FIX = "the file was not written by fastbertology (or was edited or damaged); rerun the command that wrote it"

# summary.json copy of each table: file -> the (section, key) places it may be copied to (the first section the
# summary has is the one that counts: head_mask.npy is the masking's or the gates')
TABLE_COPIES = {
    "head_importance.npy": (("importance", "importance"),),
    "attn_entropy.npy": (("importance", "entropy"),),
    "attn_max_prob.npy": (("importance", "max_prob"),),
    "head_mask.npy": (("masking", "head_mask"), ("gates", "head_mask")),
    "sweep_delta.npy": (("sweep", "delta"),),
    "sweep_scores.npy": (("sweep", "scores"),),
    "head_gates.npy": (("gates", "gates"),),
    "patching_scores.npy": (("patching", "scores"),),
    "attribution_scores.npy": (("patching", "attribution"),),
}
SWEEP_KINDS = ("heads", "layers", "masks")
GATE_MODES = ("target", "penalty")
PATCHING_DIRECTIONS = ("noising", "denoising")


class RunFilesError(ValueError):
    """A run directory's file that does not have the structure fastbertology writes."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """One JSON object of a file, handing out its fields checked; ``where`` is its path (``masking.curve[0]``)."""

    def __init__(self, payload, file: Path, where: str = ""):
        self.file, self.where = file, where
        if not isinstance(payload, dict):
            self.fail("", f"must be a JSON object, got {_show(payload)}")
        self.payload = payload

    def name(self, key) -> str:
        return f"{self.where}.{key}" if self.where else str(key)

    def fail(self, key, problem: str):
        field = self.name(key) if key != "" else (self.where or "the top level")
        raise RunFilesError(f"{self.file}: {field} {problem}; {FIX}")

    def get(self, key, required: bool):
        if key not in self.payload or (self.payload[key] is None and required):
            if required:
                self.fail(key, "is missing")
            return None
        return self.payload[key]

    def section(self, key) -> Fields | None:
        """A nested object; None when absent, null or empty (the report skips it)."""
        value = self.payload.get(key)
        if value is None or value == {}:
            return None
        return Fields(value, self.file, self.name(key))

    def number(self, key, *, required: bool = True, null: bool = False, minimum: float | None = None):
        """A finite number (JSON's NaN is written as null: allowed where ``null``)."""
        if key in self.payload and self.payload[key] is None:
            if null or not required:
                return None
            self.fail(key, "is null; it must be a number")
        value = self.get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"must be a finite number{' or null' if null else ''}, got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be at least {minimum}, got {_show(value)}")
        return value

    def integer(self, key, *, required: bool = True, minimum: int = 0):
        """An integer from ``minimum`` to 2**53 (the integers a JSON number holds exactly)."""
        value = self.get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 2 ** 53:
            self.fail(key, f"must be an integer from {minimum} to 2**53, got {_show(value)}")
        return value

    def boolean(self, key):
        value = self.get(key, True)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_show(value)}")
        return value

    def text(self, key, *, required: bool = True, choices: tuple[str, ...] | None = None):
        value = self.get(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_show(value)}")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {_show(value)}")
        return value

    def items(self, key, *, required: bool = True, nonempty: bool = False) -> list:
        value = self.get(key, required)
        if value is None:
            return []
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(key, f"must be a{' non-empty' if nonempty else ''} list, got {_show(value)}")
        return value

    def objects(self, key, **options) -> list[Fields]:
        return [Fields(item, self.file, f"{self.name(key)}[{index}]")
                for index, item in enumerate(self.items(key, **options))]


# --------------------------------------------------------------------------------------------------- summary.json
def check_summary(summary: dict, file: Path) -> None:
    """RunFilesError unless ``summary`` has every field the report reads, with the right types."""
    top = Fields(summary, file)
    for key in ("setup", "options", "versions"):
        top.section(key)  # free-form, but objects
    top.number("seconds_total", required=False, minimum=0)
    for key in ("patterns", "importance", "masking", "pruning", "sweep"):
        section = top.section(key)
        if section is not None:
            section.number("seconds", required=False, minimum=0)
    importance = top.section("importance")
    if importance is not None:
        importance.number("metric", null=True)
    masking = top.section("masking")
    if masking is not None:
        for key in ("amount", "threshold"):
            masking.number(key)
        for key in ("original_score", "final_score"):
            masking.number(key, null=True)
        masking.number("threshold_score", required=False, null=True)
        masking.integer("heads_remaining")
        masking.integer("heads_total")
        for point in masking.objects("curve", nonempty=True):
            point.integer("heads_remaining")
            point.number("score", null=True)
    pruning = top.section("pruning")
    if pruning is not None:
        pruning.integer("parameters_before", minimum=1)
        pruning.integer("parameters_after")
        for key in ("masked_score", "pruned_score"):
            pruning.number(key, null=True)
        for key in ("masked_seconds", "pruned_seconds"):
            pruning.number(key, minimum=0)
        pruning.integer("heads_pruned")
        pruning.integer("heads_total", required=False)
        pruning.get("model_dir", True)
    sweep = top.section("sweep")
    if sweep is not None:
        sweep.text("kind", choices=SWEEP_KINDS)
        sweep.get("metric", True)
        sweep.boolean("higher_is_better")
        sweep.number("baseline_score", null=True)
        sweep.integer("masks")
        sweep.text("ablation", required=False)
        for entry in sweep.objects("most_harmful", required=False):
            entry.number("delta", null=True)
    _check_warnings(top)
    _check_head_types(top.section("head_types"))
    _check_gates(top.section("gates"))
    _check_patching(top.section("patching"))


def _check_warnings(top: Fields) -> None:
    """``setup.warnings``: a list of strings (shown as text)."""
    setup = top.section("setup")
    if setup is None:
        return
    for index, warning in enumerate(setup.items("warnings", required=False)):
        if not isinstance(warning, str):
            setup.fail(f"warnings[{index}]", f"must be a string, got {_show(warning)}")


def _check_head_types(head_types: Fields | None) -> None:
    if head_types is None:
        return
    head_types.number("seconds", required=False, minimum=0)
    head_types.integer("induction_period", minimum=1)
    head_types.integer("induction_sequences", minimum=1)


def _check_gates(gates: Fields | None) -> None:
    if gates is None:
        return
    mode = gates.text("mode", choices=GATE_MODES)
    if mode == "target":
        gates.integer("target_heads", minimum=1)
    else:
        gates.number("l0_penalty", minimum=0)
    gates.get("per_kv_group", False)
    gates.integer("steps", minimum=1)
    for key in ("seconds", "evaluation_seconds"):
        gates.number(key, required=False, minimum=0)
    gates.text("metric")
    for key in ("original_score", "masked_score", "importance_masked_score"):
        gates.number(key, null=True)
    gates.integer("heads_kept")
    gates.integer("heads_total", minimum=1)
    gates.integer("heads_in_common")
    for point in gates.objects("curve", required=False):
        point.integer("step")
        point.number("l0", null=True)


def _check_patching(patching: Fields | None) -> None:
    if patching is None:
        return
    patching.text("direction", choices=PATCHING_DIRECTIONS)
    patching.text("score")
    patching.text("metric")
    for key in ("clean_loss", "corrupted_loss", "clean_metric", "corrupted_metric"):
        patching.number(key, null=True)
    patching.number("rank_correlation", required=False, null=True)
    patching.number("seconds", required=False, minimum=0)


# ---------------------------------------------------------------------------------------------- head_scores.json
def check_head_scores(payload: dict, file: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``head_scores.json``: one ``[layers, heads]`` table of numbers (null: NaN) per score in ``names``, all of
    one shape -> ``{score: [L, H] float64}``."""
    top = Fields(payload, file)
    scores, shape = {}, None
    for name in names:
        array = number_array(top.get(name, True))
        if array is None or array.ndim != 2 or array.size == 0 or np.isinf(array).any():
            top.fail(name, "must be a non-empty [layers][heads] table of numbers (null: not scored)")
        if shape is not None and array.shape != shape:
            top.fail(name, f"has shape {array.shape}, but the other scores have {shape}")
        scores[name], shape = array, array.shape
    return scores


# ------------------------------------------------------------------------------------------------------- tables
def number_array(value) -> np.ndarray | None:
    """Nested JSON lists of numbers (null: NaN) as a float64 array; None unless ``value`` is a rectangular table
    of numbers (strings such as "0.5" and booleans are not numbers)."""
    try:
        cells = np.array(value, dtype=object)
    except (ValueError, TypeError, RecursionError):
        return None
    if cells.ndim == 0 or not all(cell is None or (isinstance(cell, (int, float)) and not isinstance(cell, bool))
                                  for cell in cells.flat):
        return None
    try:
        return np.array([np.nan if cell is None else float(cell) for cell in cells.flat],
                        dtype=np.float64).reshape(cells.shape)
    except OverflowError:  # an integer beyond float64
        return None


def check_table(name: str, array: np.ndarray, file: Path) -> None:
    """A table the report draws: real numbers, not empty; ``[layers, heads]`` (sweeps: also one row)."""
    if array.size == 0:
        raise RunFilesError(f"{file} holds no values (shape {array.shape}); {FIX}")
    flat_ok = name.startswith("sweep_")
    if array.ndim != 2 and not (flat_ok and array.ndim == 1):
        shape = "[layers, heads] (or one value per layer / mask)" if flat_ok else "[layers, heads]"
        raise RunFilesError(f"{file} holds a {array.ndim}-d array of shape {array.shape}; the report needs {shape}"
                            f"; {FIX}")


def check_tables(tables: dict[str, np.ndarray], files: dict[str, str], summary: dict, directory: Path) -> None:
    """All ``[layers, heads]`` tables have one shape, and each equals its copy in summary.json (both present or
    both absent), so that the files of two runs are never shown as one."""
    summary_file = directory / "summary.json"
    sweep, delta = summary.get("sweep"), tables.get("sweep_delta")
    if isinstance(sweep, dict) and delta is not None and (delta.ndim == 2) != (sweep.get("kind") == "heads"):
        raise RunFilesError(f"{directory / files['sweep_delta']} has shape {delta.shape}, which does not fit "
                            f"{summary_file}'s sweep.kind {sweep.get('kind')!r}; {FIX}")
    for name, file in files.items():
        places = TABLE_COPIES[file]
        section, key = next(((section, key) for section, key in places if isinstance(summary.get(section), dict)),
                            places[0])
        part = summary.get(section)
        copy = part.get(key) if isinstance(part, dict) else None
        path = directory / file
        if name not in tables:
            if copy is not None:
                raise RunFilesError(f"{path} is missing, but {summary_file} holds {section}.{key}: the run is "
                                    "incomplete; rerun the command that wrote it")
            continue
        if copy is None:
            raise RunFilesError(f"{path} does not belong to {summary_file}, which holds no {section}.{key}: the "
                                "files come from different runs; rerun the command that wrote them")
        expected = number_array(copy)
        if expected is None:
            raise RunFilesError(f"{summary_file}: {section}.{key} must be a table of numbers; {FIX}")
        found = tables[name].astype(np.float64)
        if expected.shape != found.shape:
            raise RunFilesError(f"{path} has shape {found.shape} but {summary_file}'s {section}.{key} has shape "
                                f"{expected.shape}: the files come from different runs; rerun the command that "
                                "wrote them")
        if not np.array_equal(expected, found, equal_nan=True):
            raise RunFilesError(f"{path} does not hold the values of {summary_file}'s {section}.{key}: the files "
                                "come from different runs (or were edited); rerun the command that wrote them")
    head_tables = {name: array for name, array in tables.items() if array.ndim == 2 and not name.startswith("sweep")}
    if len({array.shape for array in head_tables.values()}) > 1:
        listing = ", ".join(f"{files[name]} {array.shape}" for name, array in head_tables.items())
        raise RunFilesError(f"{directory}: the [layers, heads] tables have different shapes ({listing}): the files "
                            f"come from different runs; rerun the command that wrote them")


# ---------------------------------------------------------------------------------------- attention_patterns.json
def check_patterns(patterns: dict, file: Path) -> None:
    """Heads and examples of matching sizes: each example has ``shown`` tokens and one ``[shown, shown]`` map of
    numbers (null: NaN) per head."""
    top = Fields(patterns, file)
    heads = top.objects("heads")
    for head in heads:
        head.integer("layer")
        head.integer("head")
        head.get("role", True)
        head.number("importance", null=True)
    for example in top.objects("examples"):
        shown = example.integer("shown", minimum=1)
        length = example.integer("length", minimum=1)
        if shown > length:
            example.fail("shown", f"({shown}) must not exceed length ({length})")
        tokens = example.items("tokens")
        if len(tokens) != shown or not all(token is None or isinstance(token, (str, int, float)) for token in tokens):
            example.fail("tokens", f"must be a list of {shown} tokens (strings, one per token shown)")
        maps = example.items("maps")
        if len(maps) != len(heads):
            example.fail("maps", f"must hold one map per head ({len(heads)}), got {len(maps)}")
        for index, values in enumerate(maps):
            array = number_array(values)
            if array is None or array.shape != (shown, shown) or np.isinf(array).any():
                example.fail(f"maps[{index}]", f"must be a [{shown}, {shown}] table of numbers (null: NaN)")

"""Activation patching and attribution patching of attention heads, between clean and corrupted inputs.

A head's *output* here is its per-head context vector before the output projection: the slice ``[..., h, :]`` of
the output projection's input ``[B, N, H * D]`` viewed as ``[B, N, H, D]``. It is read and replaced by a forward
pre-hook on every row's output projection (the registry's ``Projections.output``), which works for every family
without touching the kernels, and for padded (``[B, N, H*D]``) and padding-free (``[1, T, H*D]``) calls alike.

Every batch holds a clean input and a corrupted one of the same token lengths (:func:`pair_batches`). With the
*base* run the one the model runs and the *source* run the one the head output comes from:

* ``direction="denoising"``: base = corrupted, source = clean (how much of the clean behaviour one head restores);
* ``direction="noising"``: base = clean, source = corrupted (how much one head's corruption breaks).

For every head (l, h): run the base input with head (l, h)'s output replaced, at every position, by the source
run's. The task always scores against the *clean* batch's targets (the clean labels; for language modelling the
clean tokens). Its value ``v`` (the mean batch loss, or the task metric) gives the score

    score(l, h) = (v_patched(l, h) - v_base) / (v_source - v_base)

the share of the base-to-source gap this one head carries (1: all of it, 0: none). Heads are batched: k heads per
forward pass on k copies of the batch, copy j patching head j (per-example replacement, as the sweeps batch masks),
and the layer applications below a pass's first patched row are not recomputed: they return what they returned in
the unpatched base run (the sweeps' prefix reuse, :mod:`fastbertology.sweeps`).

**Attribution patching** (Nanda 2023; Syed et al. 2023) estimates the same change to first order in one forward and
one backward pass of the base input: ``delta(l, h) = sum over positions and d of (a_source - a_base)[l, h] *
dL/da[l, h]`` (L: the mean batch loss, a: the head outputs, the gradient taken in the base run), and its share
``delta / (L_source - L_base)``.

Pure functions of their inputs (no file IO).
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import architecture, attention_sites, heads_per_layer, row_applications
from .data.examples import DataError, Example, ExampleList, where
from .importance import frozen_parameters, require_patched
from .patching import current_application
from .sweeps import _capture_layer_outputs, _run_from_layer
from .tasks import MODEL_INPUT_KEYS, TaskProtocol

__all__ = ["DIRECTIONS", "SCORES", "PatchingResult", "corrupted_examples", "pair_batches", "model_inputs",
           "head_output_hook", "activation_patching", "rank_correlation"]

DIRECTIONS = ("denoising", "noising")
SCORES = ("loss", "metric")
CORRUPTED = "corrupted_"


# --------------------------------------------------------------------------------------------------------------
# Data: corrupted examples and paired batches
# --------------------------------------------------------------------------------------------------------------
def corrupted_examples(examples: Sequence[Example]) -> ExampleList:
    """The corrupted version of every example (``corrupted_text`` / ``corrupted_text_pair``, the clean label).
    :class:`DataError` naming the example when one has no ``corrupted_text``, or has a ``text_pair`` but no
    ``corrupted_text_pair`` (or the reverse), or is pre-tokenized (``input_ids``)."""
    corrupted = []
    for index, example in enumerate(examples):
        line, source = example.line, where(examples)
        if example.text is None:
            raise DataError(source, line, f"example {index} is pre-tokenized (input_ids); activation patching reads "
                                          "text and corrupted_text")
        if not example.corrupted_text:
            raise DataError(source, line, f"example {index} has no 'corrupted_text'; activation patching needs the "
                                          "corrupted version of every example (a corrupted_text column or key)")
        if (example.text_pair is None) != (example.corrupted_text_pair is None):
            has, lacks = ("text_pair", "corrupted_text_pair") if example.text_pair is not None else \
                ("corrupted_text_pair", "text_pair")
            raise DataError(source, line, f"example {index} has a '{has}' but no '{lacks}'; give both or neither")
        corrupted.append(Example(text=example.corrupted_text, text_pair=example.corrupted_text_pair,
                                 label=example.label, line=line))
    return ExampleList(corrupted, label_names=getattr(examples, "label_names", None), source=where(examples))


def pair_batches(clean: Sequence[dict], corrupted: Sequence[dict], *, examples: Sequence[Example] | None = None,
                 corrupted_name: str = "corrupted_text") -> list[dict]:
    """Clean batches and the corrupted batches of the same examples (same batch size, same order) -> batches with
    the corrupted model inputs added as ``corrupted_input_ids``, ``corrupted_attention_mask``,
    ``corrupted_token_type_ids``. Every example must have the same token length in both (DataError naming it,
    with its line when ``examples`` are given)."""
    if len(clean) != len(corrupted):
        raise ValueError(f"{len(clean)} clean batches but {len(corrupted)} corrupted ones")
    paired, start = [], 0
    for clean_batch, corrupted_batch in zip(clean, corrupted):
        lengths = clean_batch["attention_mask"].sum(-1)
        other = corrupted_batch["attention_mask"].sum(-1)
        if lengths.shape != other.shape or not torch.equal(lengths, other.to(lengths.device)):
            row = 0 if lengths.shape != other.shape else int((lengths != other.to(lengths.device)).nonzero()[0])
            index = start + row
            line = examples[index].line if examples is not None else None
            raise DataError(where(examples) if examples is not None else "the data", line,
                            f"example {index}: the text has {int(lengths[row])} tokens but the {corrupted_name} has "
                            f"{int(other[row])}; activation patching compares the same positions, so both must "
                            "tokenize to the same length (change the corrupted text)")
        batch = dict(clean_batch)
        for key in MODEL_INPUT_KEYS:
            if key in corrupted_batch:
                batch[CORRUPTED + key] = corrupted_batch[key].to(clean_batch[key].device)
        paired.append(batch)
        start += len(lengths)
    return paired


def model_inputs(batch: dict, *, corrupted: bool) -> dict:
    """The batch the model runs: the clean inputs, or the corrupted ones in their place (labels are kept; the
    ``corrupted_*`` entries are dropped)."""
    if corrupted and CORRUPTED + "input_ids" not in batch:
        raise ValueError("the batch has no corrupted inputs (corrupted_input_ids): pair it with pair_batches")
    inputs = {key: value for key, value in batch.items() if not key.startswith(CORRUPTED)}
    if corrupted:
        for key in MODEL_INPUT_KEYS:
            if CORRUPTED + key in batch:
                inputs[key] = batch[CORRUPTED + key]
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Hooks on the output projections
# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def head_output_hook(model: nn.Module, function: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """Inside the block, every output projection's input ``x`` (``[B, N, H*D]`` or packed ``[1, T, H*D]``) goes
    through ``function(row, x)``, which may return a replacement of the same shape (or None to keep ``x``). Hooks
    removed in ``finally``."""
    output = architecture(model).projections_of(model.config).output
    rows: dict[int, tuple[nn.Module, dict[int, int]]] = {}
    for site in attention_sites(model):
        module = operator.attrgetter(output)(site.block)
        rows.setdefault(id(module), (module, {}))[1][site.application] = site.row

    def make_hook(applications: dict[int, int]):
        def hook(module, args):
            row = next(iter(applications.values())) if len(applications) == 1 else \
                applications[current_application(model)]
            replaced = function(row, args[0])
            return None if replaced is None else (replaced, *args[1:])
        return hook

    handles = [module.register_forward_pre_hook(make_hook(applications)) for module, applications in rows.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Capture:
    """Records every row's output-projection input of one model call (detached); refuses a second call."""

    def __init__(self):
        self.outputs: dict[int, torch.Tensor] = {}

    def __call__(self, row, x):
        if row in self.outputs:
            raise ValueError("activation patching needs a task that runs the model once per batch (retrieval runs it "
                             "for queries and passages); use classification, regression or language modelling")
        self.outputs[row] = x.detach()
        return None


class _Replace:
    """Copy j of a k-fold replicated batch gets head ``assignment[j] = (row, head)`` from ``source``."""

    def __init__(self, source: dict[int, torch.Tensor], assignment: list[tuple[int, int]], heads: int):
        self.source, self.assignment, self.heads = source, assignment, heads

    def __call__(self, row, x):
        copies = [(j, head) for j, (r, head) in enumerate(self.assignment) if r == row]
        if not copies:
            return None
        k = len(self.assignment)
        patched = x.clone().reshape(k, -1, self.heads, x.shape[-1] // self.heads)  # [k, positions, H, D]
        source = self.source[row].reshape(-1, self.heads, x.shape[-1] // self.heads)  # [positions, H, D]
        for j, head in copies:
            patched[j, :, head] = source[:, head].to(x.dtype)
        return patched.reshape(x.shape)


class _Differentiate:
    """Adds a zero leaf (requires grad) to every row's head outputs, whose gradient is dL/d(head output)."""

    def __init__(self):
        self.leaves: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def __call__(self, row, x):
        if row in self.leaves:
            raise ValueError("activation patching needs a task that runs the model once per batch")
        leaf = torch.zeros_like(x, requires_grad=True)
        self.leaves[row] = leaf
        self.outputs[row] = x.detach()
        return x + leaf


# --------------------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """Activation (and attribution) patching of every head. Tables are float64 ``[L, H]`` on the CPU.

    scores:      share of the base-to-source gap recovered by patching the head (NaN when there is no gap).
    values:      the patched run's loss or metric (``score`` says which).
    base_value, source_value: the unpatched base and source runs' value.
    clean / corrupted ``loss`` and ``metric``: the two unpatched runs.
    attribution: the first-order estimate of ``scores`` (``attribution_delta`` / (L_source - L_base)), or None.
    attribution_delta: ``sum (a_source - a_base) . dL/da`` per head (the estimated change of the mean batch loss).
    """

    scores: torch.Tensor
    values: torch.Tensor
    base_value: float
    source_value: float
    direction: str
    score: str
    metric_name: str
    higher_is_better: bool
    clean_loss: float
    corrupted_loss: float
    clean_metric: float
    corrupted_metric: float
    attribution: torch.Tensor | None = None
    attribution_delta: torch.Tensor | None = None
    batches: int = 0
    heads_per_pass: int = 0
    seconds: float = 0.0
    attribution_seconds: float = 0.0


def _share(values, base: float, source: float):
    gap = source - base
    if gap == 0:
        return torch.full_like(values, float("nan"))
    return (values - base) / gap


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two tables (average ranks for ties; NaN entries dropped pairwise)."""
    x, y = a.flatten().double(), b.flatten().double()
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")

    def ranks(v):
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for value in torch.unique(v):  # ties: their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.pow(2).sum() * ry.pow(2).sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")


class _Totals:
    """Per-head metric states and loss sums, and the clean / corrupted runs'."""

    def __init__(self, task, count: int):
        self.task = task
        self.states = [task.metric_state() for _ in range(count)]
        self.losses = [0.0] * count
        self.runs = {name: [task.metric_state(), 0.0] for name in ("clean", "corrupted")}

    def add(self, index, result, batch):
        if isinstance(index, str):
            self.task.update_metric(self.runs[index][0], result, batch)
            self.runs[index][1] += float(result.loss.detach())
        else:
            self.task.update_metric(self.states[index], result, batch)
            self.losses[index] += float(result.loss.detach())


def _attribution_batch(model, task, batch, base_inputs, source: dict[int, torch.Tensor], delta: torch.Tensor,
                       heads: int):
    """One forward + backward of the base input: adds ``sum (a_source - a_base) . dL/da`` per head to ``delta``
    ``[L, H]``; returns the base run's result."""
    differentiate = _Differentiate()
    with torch.enable_grad(), head_output_hook(model, differentiate):
        result = task.result(task.forward(model, base_inputs), batch)
        rows = sorted(differentiate.leaves)
        gradients = torch.autograd.grad(result.loss, [differentiate.leaves[row] for row in rows], allow_unused=True)
    for row, gradient in zip(rows, gradients):
        if gradient is None:
            continue
        base = differentiate.outputs[row]
        dim = base.shape[-1] // heads
        change = (source[row] - base).reshape(-1, heads, dim).double()  # [positions, H, D]
        delta[row] += (change * gradient.reshape(-1, heads, dim).double()).sum((0, 2)).cpu()
    return result


def activation_patching(model: nn.Module, batches: Sequence[dict], task: TaskProtocol, *,
                        direction: str = "denoising", score: str = "loss", attribution: bool = False,
                        heads_per_pass: int | None = None, reuse_prefix: bool = True,
                        progress: bool = False) -> PatchingResult:
    """Activation patching of every head of a patched ``model`` over paired ``batches`` (:func:`pair_batches`);
    with ``attribution``, attribution patching too (see the module docstring).

    direction:      ``"denoising"`` (corrupted run, clean head output) or ``"noising"`` (the reverse).
    score:          ``"loss"`` (mean batch loss) or ``"metric"`` (the task metric) for :attr:`PatchingResult.scores`.
    heads_per_pass: k heads patched together on k copies of a batch (default: the heads per layer).
    reuse_prefix:   replay the base run's layer outputs below each pass's first patched row (same results).
    """
    require_patched(model)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    counts = heads_per_layer(model)
    if len(set(counts)) != 1:
        raise ValueError(f"layers have different head counts {counts} (pruned model): patch the unpruned model")
    layers, heads = len(counts), counts[0]
    k = heads_per_pass or heads
    if k < 1:
        raise ValueError(f"heads_per_pass must be positive, got {heads_per_pass}")
    started = time.perf_counter()
    all_heads = [(row, head) for row in range(layers) for head in range(heads)]
    applications = row_applications(model)
    passes = [all_heads[first:first + k] for first in range(0, len(all_heads), k)]
    starts = [min(applications[row] for row, _ in assignment) for assignment in passes]
    needed = set(range(max(starts))) if reuse_prefix else set()
    totals = _Totals(task, len(all_heads))
    delta = torch.zeros(layers, heads, dtype=torch.float64)
    base_name, source_name = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    attribution_seconds = 0.0
    with frozen_parameters(model), torch.no_grad():
        for batch in tqdm(batches, desc=f"patching ({len(all_heads)} heads)", disable=not progress, unit="batch"):
            base_inputs = model_inputs(batch, corrupted=base_name == "corrupted")
            source_inputs = model_inputs(batch, corrupted=source_name == "corrupted")
            capture = _Capture()
            with head_output_hook(model, capture):
                totals.add(source_name, task.result(task.forward(model, source_inputs), batch), batch)
            begun = time.perf_counter()
            with _capture_layer_outputs(model, needed) if needed else contextlib.nullcontext() as prefix:
                if attribution:
                    base_result = _attribution_batch(model, task, batch, base_inputs, capture.outputs, delta, heads)
                else:
                    base_result = task.result(task.forward(model, base_inputs), batch)
            attribution_seconds += (time.perf_counter() - begun) if attribution else 0.0
            totals.add(base_name, base_result, batch)
            for index, (assignment, start) in enumerate(zip(passes, starts)):
                copies = len(assignment)
                replicated = task.replicate(base_inputs, copies) if copies > 1 else base_inputs
                reuse = _run_from_layer(model, start, prefix, copies) if needed and start > 0 else \
                    contextlib.nullcontext()
                with reuse, head_output_hook(model, _Replace(capture.outputs, assignment, heads)):
                    output = task.forward(model, replicated)
                outputs = task.split(output, copies) if copies > 1 else [output]
                for offset, copy_output in enumerate(outputs):
                    totals.add(index * k + offset, task.result(copy_output, batch), batch)
    count = max(len(batches), 1)
    losses = torch.tensor(totals.losses, dtype=torch.float64).view(layers, heads) / count
    metrics = torch.tensor([task.compute_metric(state) for state in totals.states],
                           dtype=torch.float64).view(layers, heads)
    run_loss = {name: totals.runs[name][1] / count for name in totals.runs}
    run_metric = {name: float(task.compute_metric(totals.runs[name][0])) for name in totals.runs}
    values = losses if score == "loss" else metrics
    base_value = (run_loss if score == "loss" else run_metric)[base_name]
    source_value = (run_loss if score == "loss" else run_metric)[source_name]
    result = PatchingResult(
        scores=_share(values, base_value, source_value), values=values, base_value=base_value,
        source_value=source_value, direction=direction, score=score,
        metric_name=str(getattr(task, "metric_name", "metric")),
        higher_is_better=bool(getattr(task, "higher_is_better", True)),
        clean_loss=run_loss["clean"], corrupted_loss=run_loss["corrupted"], clean_metric=run_metric["clean"],
        corrupted_metric=run_metric["corrupted"], batches=len(batches), heads_per_pass=k,
        seconds=time.perf_counter() - started, attribution_seconds=attribution_seconds)
    if attribution:
        result.attribution_delta = delta / count
        result.attribution = _share(result.attribution_delta, 0.0, run_loss[source_name] - run_loss[base_name])
    return result

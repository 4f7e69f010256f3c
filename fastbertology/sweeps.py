"""Ablation sweeps: the task metric under many head masks, with batched masks and prefix reuse.

Evaluating M head masks naively costs M full passes over the data. Two things make it much cheaper:

* **Batched masks** (per-example head masks). Each batch of B examples is replicated k times and copy j is run
  under mask j through one ``[k*B, L, H]`` head mask; the output is split back into k per-copy outputs, and each
  copy's losses and metric are computed on the *original* batch (so task-specific structure such as retrieval
  groups is untouched). How a task's batch is replicated and its output split is the task's own business
  (``task.replicate`` and ``task.split``, see :mod:`fastbertology.tasks`).
* **Prefix reuse**. A mask whose first non-one row belongs to layer application ``l`` (its *start*; rows and
  applications as in :mod:`fastbertology.architectures`: for most families row l is layer l, BART's cross-attention
  rows belong to their decoder layers, ALBERT applies one layer module repeatedly) leaves the applications
  ``< l`` exactly as in the unmasked model. Per batch, one unmasked pass (which also gives the baseline score)
  records what every application below the largest start returns (forward hooks; a padding-free stack's packed
  stream as it is); then each pass of k masks with start ``l`` runs only the applications ``l..``: those before
  ``l`` return their recorded output, repeated k times (an instance ``forward`` that asks the patch which
  application runs, so that a shared module replays some applications and runs others). Everything is restored in
  ``finally``. Works for every family of the registry, for encoder-decoder models (a pass that starts in the
  decoder replays the whole encoder, whose output the cross-attention reads), and for tasks that run the model
  several times per batch (retrieval embeds queries and positives: the recorded outputs are replayed in call order).

The work is organised batch-major: for every batch (a *step*) the baseline and all masks are evaluated, so each
batch's prefix is computed once. After every step the accumulated state (:class:`SweepState`: per-mask metric
states and loss sums) is handed to an ``on_step`` callback, which can checkpoint it; passing such a state back as
``resume=`` continues after the last finished step and ends with exactly the results of an uninterrupted run.
Data-parallel runs pass each process its shard of the batches, the common number of ``steps`` and a ``reduce``
callable that merges the per-process states (see :mod:`fastbertology.distributed`).

**Ablation kinds** (``ablation=``): a masked head's output is zeroed (``"zero"``, the head mask itself), replaced by
its mean over the data (``"mean"``) or by its output on another example of the batch (``"resample"``); see
:mod:`fastbertology.ablation`. Batching and prefix reuse work alike for all three.

Everything here is a pure function of its inputs (no file IO).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .ablation import Ablation, check_ablation, prepare_ablation
from .architectures import heads_per_layer, row_applications, transformer_layers
from .importance import examples_in, require_patched
from .patching import calls_so_far, current_application, current_packing
from .tasks import TaskProtocol

__all__ = [
    "SweepResult", "SweepState", "MaskPass", "ablation_sweep", "evaluate_masks", "single_head_masks", "layer_masks",
    "first_masked_layer", "plan_passes", "replicate_batch", "split_output",
    "naive_sweep", "benchmark_sweep", "SWEEP_KINDS",
]

SWEEP_KINDS = ("heads", "layers")


# --------------------------------------------------------------------------------------------------------------
# Replicating a batch k times and splitting the output: the task's own replicate / split
# --------------------------------------------------------------------------------------------------------------
def replicate_batch(task: TaskProtocol, batch: dict, k: int) -> dict:
    """``batch`` of B examples -> a batch of k*B rows for ``task.forward`` (copy j = rows ``j*B .. (j+1)*B-1``).

    Give it a per-example head mask ``[k*B, L, H]`` whose rows ``j*B ..`` hold mask j, split the output with
    :func:`split_output`, and call ``task.result(output_j, batch)`` with the *original* batch."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    return _task_method(task, "replicate")(batch, k)


def split_output(task: TaskProtocol, output: Any, k: int) -> list:
    """Output of ``task.forward`` on :func:`replicate_batch`'s batch -> k outputs, one per copy."""
    return _task_method(task, "split")(output, k)


def _task_method(task, name: str):
    method = getattr(task, name, None)
    if method is None:
        raise TypeError(f"batched mask evaluation needs task.{name}(...): derive {type(task).__name__} from "
                        "fastbertology.tasks.Task (or define replicate(batch, k) and split(output, k))")
    return method


# --------------------------------------------------------------------------------------------------------------
# Masks and the pass plan
# --------------------------------------------------------------------------------------------------------------
def single_head_masks(num_layers: int, num_heads: int, *, dtype=torch.float32) -> torch.Tensor:
    """``[L*H, L, H]``: mask ``l*H + h`` is all ones except head ``h`` of layer ``l``."""
    masks = torch.ones(num_layers * num_heads, num_layers, num_heads, dtype=dtype)
    masks.view(num_layers * num_heads, -1)[torch.arange(num_layers * num_heads),
                                           torch.arange(num_layers * num_heads)] = 0
    return masks


def layer_masks(num_layers: int, num_heads: int, *, dtype=torch.float32) -> torch.Tensor:
    """``[L, L, H]``: mask ``l`` zeroes every head of layer ``l``."""
    masks = torch.ones(num_layers, num_layers, num_heads, dtype=dtype)
    masks[torch.arange(num_layers), torch.arange(num_layers)] = 0
    return masks


def first_masked_layer(masks: torch.Tensor, applications: Sequence[int] | None = None) -> torch.Tensor:
    """``masks [M, R, H]`` -> ``[M]`` long: the first layer application with a row other than 1 (the number of
    applications for an all-ones mask). ``applications[r]``: the layer application of row r
    (:func:`fastbertology.architectures.row_applications`; default: row r is application r)."""
    rows = masks.shape[1]
    order = torch.arange(rows) if applications is None else torch.as_tensor(list(applications), dtype=torch.long)
    count = int(order.max()) + 1 if rows else 0
    differs = (masks != 1).any(-1).cpu()  # [M, R]
    first = torch.where(differs, order, count)
    return first.min(-1).values if rows else torch.zeros(len(masks), dtype=torch.long)


@dataclass(frozen=True)
class MaskPass:
    """One forward pass: the masks ``indices`` (at most ``masks_per_pass``) run together from layer ``start``."""

    start: int
    indices: tuple[int, ...]


def plan_passes(masks: torch.Tensor, masks_per_pass: int, *, reuse_prefix: bool,
                applications: Sequence[int] | None = None) -> tuple[list[MaskPass], list[int]]:
    """Group masks ``[M, R, H]`` into passes. Returns ``(passes, unmasked)``.

    With prefix reuse, masks are grouped by start application (:func:`first_masked_layer`, with ``applications``
    the layer application of every row), in mask order within one, and cut into passes of at most
    ``masks_per_pass``; all-ones masks need no pass (their result is the baseline) and are listed in ``unmasked``.
    Without it, consecutive masks form passes that start at layer 0.
    """
    if masks_per_pass < 1:
        raise ValueError(f"masks_per_pass must be positive, got {masks_per_pass}")
    count = masks.shape[0]
    if not reuse_prefix:
        chunks = range(0, count, masks_per_pass)
        return [MaskPass(0, tuple(range(i, min(i + masks_per_pass, count)))) for i in chunks], []
    starts = first_masked_layer(masks, applications).tolist()
    total = max(applications) + 1 if applications is not None and len(applications) else masks.shape[1]
    passes = []
    for layer in range(total):
        members = [m for m in range(count) if starts[m] == layer]
        chunks = range(0, len(members), masks_per_pass)
        passes += [MaskPass(layer, tuple(members[i:i + masks_per_pass])) for i in chunks]
    return passes, [m for m in range(count) if starts[m] == total]


# --------------------------------------------------------------------------------------------------------------
# Prefix reuse: capture what the layer applications return, then replay it
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _LayerOutput:
    """What one layer application returned in one model call: its hidden states (``[B, N, D]``, or the packed
    stream ``[1, T, D]`` of a padding-free stack, taken before the patch unpacks them) and the rest of its output."""

    hidden: torch.Tensor
    packed: bool
    kind: type
    rest: tuple = ()

    def replicated(self, k: int):
        """The output for k copies of the batch, in the layer's own output format."""
        hidden = _replicate_hidden(self.hidden, self.packed, k)
        return hidden if issubclass(self.kind, torch.Tensor) else self.kind([hidden, *self.rest])


def _unique_layers(model) -> dict[int, tuple[torch.nn.Module, list[int]]]:
    """``id(layer module) -> (module, its applications)`` over all stacks."""
    layers: dict[int, tuple[torch.nn.Module, list[int]]] = {}
    for application, layer in enumerate(transformer_layers(model)):
        layers.setdefault(id(layer), (layer, []))[1].append(application)
    return layers


@contextlib.contextmanager
def _capture_layer_outputs(model, applications: set[int]):
    """Record, per call of the model, what every layer application in ``applications`` returns. Yields
    ``captured``: one ``{application: _LayerOutput}`` per model call, in call order."""
    captured: list[dict[int, _LayerOutput]] = []
    first_call = calls_so_far(model)
    handles = []

    def hook(module, args, output):
        application = current_application(model)
        if application not in applications:
            return
        call = calls_so_far(model) - first_call - 1
        while len(captured) <= call:
            captured.append({})
        if isinstance(output, torch.Tensor):
            hidden, kind, rest = output, torch.Tensor, ()
        else:
            hidden, kind, rest = output[0], type(output), tuple(output[1:])
        captured[call][application] = _LayerOutput(hidden.detach(), current_packing(model) is not None, kind, rest)

    try:
        for layer, layer_applications in _unique_layers(model).values():
            if applications.intersection(layer_applications):
                # prepend: before the patch's hook that unpacks a padding-free stack's last output
                handles.append(layer.register_forward_hook(hook, prepend=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _replaying_forward(model, original, start: int, replay: list[dict[int, object]], first_call: int):
    """A layer forward that returns the captured output (replicated) for applications ``< start`` and runs
    ``original`` for the others (a shared module has both)."""
    def forward(*args, **kwargs):
        application = current_application(model)
        if application is None or application >= start:
            return original(*args, **kwargs)
        call = calls_so_far(model) - first_call - 1
        if call >= len(replay):
            raise RuntimeError("prefix reuse: the model ran more often than during the capture pass")
        return replay[call][application]
    return forward


@contextlib.contextmanager
def _run_from_layer(model, start: int, captured: list[dict[int, _LayerOutput]], k: int):
    """Inside the block, calls of ``model`` on k copies of the captured batch skip the layer applications
    ``< start``: each returns what it returned during the capture pass, replicated k times. Restored in
    ``finally``."""
    replay = [{application: output.replicated(k) for application, output in call.items() if application < start}
              for call in captured]
    first_call = calls_so_far(model)
    replaced = []
    try:
        for layer, applications in _unique_layers(model).values():
            if min(applications) >= start:
                continue
            previous = vars(layer).get("forward")
            replaced.append((layer, previous))
            layer.forward = _replaying_forward(model, previous or layer.forward, start, replay, first_call)
        yield
        if calls_so_far(model) - first_call != len(captured):
            raise RuntimeError("prefix reuse: the model ran less often than during the capture pass")
    finally:
        for layer, previous in replaced:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def _replicate_hidden(hidden: torch.Tensor, packed: bool, k: int) -> torch.Tensor:
    """Hidden states of one call for k copies of its batch: ``[B, N, D]`` -> ``[k*B, N, D]``; a packed stream
    ``[1, T, D]`` -> ``[1, k*T, D]`` (the replicated batch packs to k copies of the stream, copy-major)."""
    if packed:
        return hidden.repeat(1, k, 1)
    return hidden.repeat(k, *([1] * (hidden.dim() - 1)))


# --------------------------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SweepState:
    """What one process has accumulated (everything a checkpoint needs).

    steps_done:        steps (batch positions) finished.
    states:            M metric states (``task.metric_state()`` dicts), one per mask.
    loss_sums:         M sums of the task's batch losses, one per mask.
    baseline_state:    metric state of the unmasked model.
    baseline_loss_sum: sum of its batch losses.
    batches:           batches evaluated by this process.
    """

    steps_done: int
    states: list[dict]
    loss_sums: list[float]
    baseline_state: dict
    baseline_loss_sum: float = 0.0
    batches: int = 0

    @classmethod
    def empty(cls, task, count: int) -> SweepState:
        return cls(0, [task.metric_state() for _ in range(count)], [0.0] * count, task.metric_state())


@dataclass
class SweepResult:
    """Scores of the task under each of M masks. Tensors are float64 on the CPU.

    kind:     ``"heads"`` (mask ``l*H + h`` zeroes head (l, h)), ``"layers"`` (mask l zeroes layer l) or ``"masks"``.
    masks:    ``[M, L, H]`` the masks evaluated.
    scores:   ``[M]`` the task metric under each mask; ``losses`` ``[M]`` the mean batch loss.
    delta:    ``[M]`` ``scores - baseline_score`` (negative = the metric went down without those heads).
    metrics:  M dicts of every metric the task tracks (``task.compute_metrics``), when the task has them.
    ablation: what a masked head's output became (:mod:`fastbertology.ablation`): ``"zero"``, ``"mean"`` or
              ``"resample"``.
    """

    kind: str
    masks: torch.Tensor
    scores: torch.Tensor
    losses: torch.Tensor
    baseline_score: float
    baseline_loss: float
    higher_is_better: bool
    metric_name: str
    metrics: list[dict] = field(default_factory=list)
    baseline_metrics: dict = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0
    ablation: str = "zero"

    @property
    def delta(self) -> torch.Tensor:
        return self.scores - self.baseline_score

    def table(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` (default: :attr:`delta`) ``[M]`` shaped by kind: heads ``[L, H]``, layers ``[L]``,
        masks ``[M]``."""
        values = self.delta if values is None else values
        if self.kind == "heads":
            return values.view(self.masks.shape[1], self.masks.shape[2])
        return values


def _check_masks(model, masks: torch.Tensor) -> torch.Tensor:
    counts = heads_per_layer(model)
    if len(set(counts)) != 1:
        raise ValueError(f"layers have different head counts {counts} (pruned model): sweep the unpruned model")
    expected = (len(counts), counts[0])
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(masks)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != expected or masks.shape[0] == 0:
        raise ValueError(f"masks must have shape [M, layers, heads] = [M, {expected[0]}, {expected[1]}] with M >= 1 "
                         f"for this model; got {tuple(masks.shape)}")
    if masks.dtype == torch.bool or not masks.is_floating_point():
        masks = masks.to(torch.float32)
    if not bool(torch.isfinite(masks).all()):
        raise ValueError("masks contain NaN or infinite values")
    return masks


def _per_example_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``masks [k, L, H]`` -> ``[k*B, L, H]`` with rows ``j*B .. (j+1)*B-1`` = mask j."""
    k = masks.shape[0]
    return masks[:, None].expand(k, size, *masks.shape[1:]).reshape(k * size, *masks.shape[1:])


def _accumulate(task, state: SweepState, index, output, batch):
    result = task.result(output, batch)
    if index is None:
        task.update_metric(state.baseline_state, result, batch)
        state.baseline_loss_sum += float(result.loss.detach())
    else:
        task.update_metric(state.states[index], result, batch)
        state.loss_sums[index] += float(result.loss.detach())


def _evaluate_batch(model, task, batch, masks, passes, state: SweepState, *, reuse_prefix: bool,
                    ablation: Ablation):
    size = examples_in(task, batch)
    if reuse_prefix:
        needed = set(range(max((p.start for p in passes), default=0)))
        with _capture_layer_outputs(model, needed) as captured, ablation.baseline(model):
            output = task.forward(model, batch)
        _accumulate(task, state, None, output, batch)
    else:
        with ablation.baseline(model):
            output = task.forward(model, batch)
        _accumulate(task, state, None, output, batch)
    for mask_pass in passes:
        k = len(mask_pass.indices)
        head_mask = _per_example_masks(masks[list(mask_pass.indices)], size)  # [k*B, R, H]
        replicated = replicate_batch(task, batch, k) if k > 1 else batch
        with ablation.masked(model):
            if reuse_prefix and mask_pass.start > 0:
                with _run_from_layer(model, mask_pass.start, captured, k):
                    output = task.forward(model, replicated, head_mask=head_mask)
            else:
                output = task.forward(model, replicated, head_mask=head_mask)
        outputs = split_output(task, output, k) if k > 1 else [output]
        for index, copy_output in zip(mask_pass.indices, outputs):
            _accumulate(task, state, index, copy_output, batch)


def evaluate_masks(model: nn.Module, batches: Sequence[dict], task: TaskProtocol, masks: torch.Tensor, *,
                   masks_per_pass: int | None = None, reuse_prefix: bool = True, progress: bool = False,
                   resume: SweepState | None = None,
                   on_step: Callable[[SweepState], None] | None = None, steps: int | None = None,
                   reduce: Callable[[SweepState], SweepState] | None = None, kind: str = "masks",
                   ablation: str = "zero", seed: int = 0,
                   sum_tensors: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> SweepResult:
    """The task metric of a patched ``model`` over ``batches`` under each of the head masks ``masks [M, L, H]``.

    masks_per_pass: k, masks evaluated together in one forward pass of k*B rows (default: the number of heads H).
    reuse_prefix:   compute the layers before a mask's first non-one layer once per batch (see the module doc).
    resume:         a :class:`SweepState` from ``on_step`` of an interrupted run with the same arguments.
    on_step:        called with the (live) state after every step, e.g. to checkpoint it (copy what you keep).
    steps:          number of steps to run (default ``len(batches)``); steps past the end of ``batches`` evaluate
                    nothing but still call ``on_step`` (data-parallel processes whose shard is one batch shorter).
    reduce:         applied to the final state before the scores are computed (merges data-parallel processes).
    ablation:       what a masked head's output becomes: ``"zero"`` (the head mask as in transformers 4.x),
                    ``"mean"`` or ``"resample"`` (:mod:`fastbertology.ablation`; ``seed`` fixes the resample
                    sources). ``"mean"`` first runs one pass over ``batches`` for the means (again on resume);
                    ``sum_tensors`` sums them over data-parallel processes.

    Results equal evaluating one ``[L, H]`` mask at a time (up to floating-point rounding of the batched pass).
    """
    require_patched(model)
    started = time.perf_counter()
    masks = _check_masks(model, masks)
    check_ablation(ablation)
    device = next(model.parameters()).device
    masks_device = masks.to(device)
    masks_per_pass = masks_per_pass or masks.shape[2]
    passes, unmasked = plan_passes(masks, masks_per_pass, reuse_prefix=reuse_prefix,
                                   applications=row_applications(model))
    steps = len(batches) if steps is None else steps
    if steps < len(batches):
        raise ValueError(f"steps ({steps}) must be at least the number of batches ({len(batches)})")
    state = resume if resume is not None else SweepState.empty(task, len(masks))
    if len(state.states) != len(masks) or state.steps_done > steps:
        raise ValueError(f"the resume state ({len(state.states)} masks, {state.steps_done} steps done) does not fit "
                         f"this sweep ({len(masks)} masks, {steps} steps)")
    ablator = prepare_ablation(ablation, model, batches, task, seed=seed, progress=progress, sum_tensors=sum_tensors)
    bar = tqdm(total=steps, initial=state.steps_done, desc=f"sweep ({len(masks)} masks, {len(passes)} passes/batch)",
               unit="batch", disable=not progress)
    try:
        with torch.no_grad():
            for step in range(state.steps_done, steps):
                if step < len(batches):
                    _evaluate_batch(model, task, batches[step], masks_device, passes, state, reuse_prefix=reuse_prefix,
                                    ablation=ablator)
                    state.batches += 1
                state.steps_done = step + 1
                bar.update(1)
                if on_step is not None:
                    on_step(state)
    finally:
        bar.close()
    if reduce is not None:
        state = reduce(state)
    final_states = list(state.states)
    final_losses = list(state.loss_sums)
    for index in unmasked:  # all-ones masks: the baseline, exactly
        final_states[index] = copy.deepcopy(state.baseline_state)
        final_losses[index] = state.baseline_loss_sum
    _check_finite_losses(state.baseline_loss_sum, final_losses)
    batches_seen = max(state.batches, 1)
    has_all = hasattr(task, "compute_metrics")
    metrics = [task.compute_metrics(s) for s in final_states] if has_all else []
    return SweepResult(
        kind=kind, masks=masks.cpu(),
        scores=torch.tensor([task.compute_metric(s) for s in final_states], dtype=torch.float64),
        losses=torch.tensor([loss / batches_seen for loss in final_losses], dtype=torch.float64),
        baseline_score=float(task.compute_metric(state.baseline_state)),
        baseline_loss=state.baseline_loss_sum / batches_seen,
        higher_is_better=bool(getattr(task, "higher_is_better", True)),
        metric_name=str(getattr(task, "metric_name", "metric")),
        metrics=metrics, baseline_metrics=task.compute_metrics(state.baseline_state) if has_all else {},
        batches=state.batches, seconds=time.perf_counter() - started, ablation=ablation,
    )


def _check_finite_losses(baseline: float, losses: list[float]) -> None:
    """ValueError when the unmasked model's loss or some masks' losses are NaN or infinite (their scores, computed
    from non-finite outputs, would look like real numbers)."""
    bad = [index for index, loss in enumerate(losses) if not math.isfinite(loss)]
    if math.isfinite(baseline) and not bad:
        return
    if math.isfinite(baseline):  # the model is fine unmasked: the masks overflow it
        raise ValueError(f"the loss of {len(bad)} mask(s) (e.g. mask {bad[0]}) is NaN or infinite while the unmasked "
                         "model's is finite: mask values far outside 0..1 (e.g. 1e30) overflow the model's "
                         "activations; use masks of 0 (masked) and 1 (kept), or values in between to interpolate "
                         "(or, with a 16-bit dtype, try --dtype float32)")
    raise ValueError("the loss of the unmasked model is NaN or infinite: the model computes non-finite values on this "
                     "data (weights with NaN or inf, or an overflow in a 16-bit dtype: try --dtype float32)")


def sweep_masks(model: nn.Module, kind: str | torch.Tensor) -> tuple[str, torch.Tensor]:
    """``kind`` ``"heads"`` / ``"layers"`` / a ``[M, L, H]`` tensor -> ``(kind name, masks)``."""
    if isinstance(kind, str):
        counts = heads_per_layer(model)
        if kind not in SWEEP_KINDS:
            raise ValueError(f"kind must be one of {SWEEP_KINDS} or a [M, L, H] tensor of masks, got {kind!r}")
        if len(set(counts)) != 1:
            raise ValueError(f"layers have different head counts {counts} (pruned model): sweep the unpruned model")
        make = single_head_masks if kind == "heads" else layer_masks
        return kind, make(len(counts), counts[0])
    return "masks", _check_masks(model, kind)


def ablation_sweep(model: nn.Module, batches: Sequence[dict], task: TaskProtocol, *,
                   kind: str | torch.Tensor = "heads", masks_per_pass: int | None = None,
                   reuse_prefix: bool = True, progress: bool = False, **options) -> SweepResult:
    """Score change when masking every single head (``kind="heads"``: L*H masks, result ``.table()`` ``[L, H]``),
    every layer (``"layers"``: L masks, ``[L]``) or each of the given masks (a ``[M, L, H]`` tensor, ``[M]``).

    ``options`` are those of :func:`evaluate_masks` (``resume``, ``on_step``, ``steps``, ``reduce``).
    """
    kind, masks = sweep_masks(model, kind)
    return evaluate_masks(model, batches, task, masks, masks_per_pass=masks_per_pass, reuse_prefix=reuse_prefix,
                          progress=progress, kind=kind, **options)


# --------------------------------------------------------------------------------------------------------------
# Reference loop and benchmark
# --------------------------------------------------------------------------------------------------------------
def naive_sweep(model: nn.Module, batches: Sequence[dict], task: TaskProtocol,
                masks: torch.Tensor) -> tuple[torch.Tensor, float, list[dict]]:
    """The reference: one full pass over the data per mask with an ``[L, H]`` mask. Returns ``(scores [M],
    baseline score, metric states)``."""
    require_patched(model)
    masks = _check_masks(model, masks).to(next(model.parameters()).device)
    states = []
    with torch.no_grad():
        baseline = task.metric_state()
        for batch in batches:
            task.update_metric(baseline, task.evaluate(model, batch), batch)
        for mask in masks:
            state = task.metric_state()
            for batch in batches:
                task.update_metric(state, task.evaluate(model, batch, head_mask=mask), batch)
            states.append(state)
    scores = torch.tensor([task.compute_metric(s) for s in states], dtype=torch.float64)
    return scores, float(task.compute_metric(baseline)), states


def benchmark_sweep(model: nn.Module, batches: Sequence[dict], task: TaskProtocol, *,
                    kind: str | torch.Tensor = "heads", masks_per_pass: int | None = None,
                    repeats: int = 1) -> dict:
    """Time the naive loop (one full pass per mask, plus the baseline) against the batched sweep with and without
    prefix reuse, on the same model and data. Returns seconds (best of ``repeats``), ratios and the largest score
    difference to the naive loop."""
    kind, masks = sweep_masks(model, kind)

    def best(function):
        times, value = [], None
        for _ in range(repeats):
            if next(model.parameters()).is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            value = function()
            if next(model.parameters()).is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return min(times), value

    naive_seconds, (naive_scores, _, _) = best(lambda: naive_sweep(model, batches, task, masks))
    batched_seconds, batched = best(lambda: evaluate_masks(model, batches, task, masks, masks_per_pass=masks_per_pass,
                                                           reuse_prefix=False))
    prefix_seconds, prefix = best(lambda: evaluate_masks(model, batches, task, masks, masks_per_pass=masks_per_pass,
                                                         reuse_prefix=True))
    difference = max(float((batched.scores - naive_scores).abs().max()),
                     float((prefix.scores - naive_scores).abs().max()))
    return {
        "kind": kind, "masks": len(masks), "batches": len(batches), "masks_per_pass": masks_per_pass or masks.shape[2],
        "naive_seconds": naive_seconds, "batched_seconds": batched_seconds, "prefix_batched_seconds": prefix_seconds,
        "speedup_batched": naive_seconds / batched_seconds, "speedup_prefix_batched": naive_seconds / prefix_seconds,
        "cost_ratio_prefix_batched": prefix_seconds / naive_seconds, "max_score_difference": difference,
    }


def steps_for(total_batches: int, world_size: int) -> int:
    """Steps every process runs when ``total_batches`` are sharded over ``world_size`` processes."""
    return math.ceil(total_batches / max(world_size, 1))

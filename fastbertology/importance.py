"""Head importance, attention entropy, max probability and the task metric, in one pass over the data.

Importance follows run_bertology (Michel et al. 2019): the gradient of the loss with respect to a head mask of
ones, ``|dL/dmask|``, accumulated over batches and divided by the number of non-padding tokens; optionally each
layer is divided by its L2 norm and the whole table min-max scaled to [0, 1].

Two ways to take the absolute value:

* ``"per_batch"`` (run_bertology): ``|dL_batch/dmask|`` per batch, where ``L_batch`` is the task's batch loss
  (its mean over the batch). run_bertology never zeroed ``head_mask.grad`` and so summed the absolute value of
  the *cumulative* gradient — a bug we do not reproduce: we sum per-batch absolute gradients.
* ``"per_example"`` (Michel et al.'s estimator ``E_x |dL(x)/dmask|``): one mask per example (``[B, L, H]``) so
  that every example's gradient is taken on its own before the absolute value; independent of batching.

No weight gradients are computed: parameters are frozen for the duration of the pass (and restored after).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import heads_per_layer
from .checkpointing import checkpointed_layers
from .graph_passes import evaluation_runner, importance_runner
from .head_mask import checked_head_masks, pass_head_mask
from .patching import is_patched
from .recording import record
from .step_graphs import GraphUse, graph_refusal
from .tasks import TaskProtocol, count_examples

IMPORTANCE_MODES = ("per_batch", "per_example")


@dataclass
class HeadAnalysis:
    """Result of :func:`analyze_heads`. Tables are ``[L, H]`` float64 on the CPU."""

    importance: torch.Tensor  # normalised as requested
    raw_importance: torch.Tensor  # accumulated |gradient| / tokens, before any normalisation
    entropy: torch.Tensor  # mean attention entropy per non-padding query token (nats)
    max_prob: torch.Tensor  # mean largest attention probability per non-padding query token
    metric: float  # the task metric over the whole data, with the head mask applied
    loss: float  # mean of the task's batch losses
    tokens: int  # non-padding tokens seen by the first layer
    examples: int
    cuda_graphs: dict | None = None  # how the steps ran (fastbertology.step_graphs.GraphUse.as_dict())


def require_patched(model: nn.Module) -> None:
    """Analyses need the patch: unpatched transformers 5 models silently ignore ``head_mask``."""
    if not is_patched(model):
        raise RuntimeError(
            "this model is not patched: transformers 5 silently ignores head_mask. "
            "Call fastbertology.patch(model) first"
        )


def examples_in(task: TaskProtocol, batch: dict) -> int:
    """Number of examples in ``batch``: the rows of ``input_ids`` (or ``pixel_values``, ``input_features``), else
    what ``task.batch_size`` says."""
    size = count_examples(batch)
    return task.batch_size(batch) if size is None else size


def full_head_mask(model: nn.Module, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``[L, H]`` mask of ones on the model's device (every layer must have the same number of heads)."""
    counts = heads_per_layer(model)
    if len(set(counts)) != 1:
        raise ValueError(f"layers have different head counts {counts} (pruned model): analyse the unpruned model")
    device = next(model.parameters()).device
    return torch.ones(len(counts), counts[0], dtype=dtype, device=device)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on every parameter inside the block (only mask gradients are needed)."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def normalize_importance(raw: torch.Tensor, *, by_layer: bool = True, global_minmax: bool = True) -> torch.Tensor:
    """run_bertology's normalisation of a ``[L, H]`` table: per-layer L2 (``x / (||x_l||_2 + 1e-20)``), then
    global min-max to [0, 1]. A table with NaN or infinite entries raises ValueError (:func:`check_finite_table`):
    min-max would turn it into zeros, which read as "no head matters"."""
    check_finite_table(raw, "head importance")
    importance = raw.clone()
    if by_layer:
        importance = importance / (importance.pow(2).sum(-1, keepdim=True).sqrt() + 1e-20)
    if global_minmax:
        low, high = importance.min(), importance.max()
        importance = (importance - low) / (high - low) if high > low else torch.zeros_like(importance)
    return importance


def check_finite_table(table: torch.Tensor, what: str) -> None:
    """ValueError naming how many entries of an ``[L, H]`` table ``what`` are NaN or infinite, and the first."""
    finite = torch.isfinite(table)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().tolist()
    layer, head = bad[0][0], bad[0][-1]
    raise ValueError(
        f"{what} is NaN or infinite for {len(bad)} of {table.numel()} heads (e.g. layer {layer}, head {head}: "
        f"{float(table[tuple(bad[0])])}): the model's loss or gradients were not finite (weights with NaN or inf, or "
        "an overflow in a 16-bit dtype: try --dtype float32). A table that is not finite cannot be normalised")


def analyze_heads(model: nn.Module, batches: Iterable[dict], task: TaskProtocol, *,
                  head_mask: torch.Tensor | None = None, importance: str = "per_batch",
                  normalize_by_layer: bool = True, normalize_global: bool = True, progress: bool = False,
                  reduce: Callable[[dict], dict] | None = None, cuda_graphs: str = "auto",
                  checkpoint_layers: bool = False) -> HeadAnalysis:
    """Importance, entropy, max probability and the metric of ``task`` over ``batches``, in one pass.

    model:     a patched model (:func:`fastbertology.patch`), in eval mode.
    batches:   iterable of batch dicts as produced by :mod:`fastbertology.data` (tensors on the model's device).
    task:      an object with ``evaluate(model, batch, head_mask=...) -> TaskResult`` (``.loss`` scalar batch loss,
               ``.example_losses`` ``[B]``) and ``metric_state()`` / ``update_metric(state, result, batch)`` /
               ``compute_metric(state) -> float`` (see :mod:`fastbertology.tasks`).
    head_mask: ``[L, H]`` (or ``[H]``, every layer) floating-point mask on the model's device to analyse the model
               under (default: ones). Importance is the gradient at it. Anything else (an integer or bool mask, a
               per-example ``[B, L, H]`` mask) raises ValueError before the pass.
    importance: ``"per_batch"`` or ``"per_example"`` (see the module docstring).
    reduce:    optional ``reduce(totals) -> totals``, applied to the accumulated sums before they are finalised
               (data-parallel runs sum them over processes: :func:`fastbertology.distributed.analysis_reducer`).
               ``totals``: ``raw_importance`` ``[L, H]`` float64 sum of |gradient| (not yet divided by tokens),
               ``metric_state``, ``loss_sum``, ``batches``, ``examples`` and ``statistics`` (the
               :class:`~fastbertology.recording.HeadStatistics`, whose per-layer sums it may replace).
    cuda_graphs: ``"auto"`` (replay each step as a CUDA graph where :mod:`fastbertology.step_graphs` allows: CUDA,
               the Triton backend, a task that declares its step capturable; the same numbers) or ``"off"``.
               ``HeadAnalysis.cuda_graphs`` says what ran, and why graphs did not.
    checkpoint_layers: keep only each layer's input for the backward and recompute the layer there
               (:mod:`fastbertology.checkpointing`); the results are the same, the memory is that of one layer's
               activations instead of all of them (see :mod:`fastbertology.memory_plan`). Steps run eagerly.
    """
    require_patched(model)
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {importance!r}")
    base_mask = full_head_mask(model)
    if head_mask is not None:
        base_mask = pass_head_mask(head_mask, heads_per_layer=heads_per_layer(model), device=base_mask.device)
    refusal = graph_refusal(model, task, cuda_graphs, base_mask.device)
    use = GraphUse(cuda_graphs, enabled=refusal is None, reason=refusal)
    if use.enabled and checkpoint_layers:
        use.turn_off("per-layer activation checkpointing (the memory plan) runs eagerly")
    through_runner = use.enabled  # its sums hold the results, even if graphs are turned off during the pass

    def gradient_step(mask_source: torch.Tensor, batch: dict):
        return importance_gradient(model, task, mask_source, batch, importance)

    if through_runner:
        runner, sums = importance_runner(model, task, importance, base_mask, use, gradient_step)
        run_step = runner.run
    else:
        raw = torch.zeros(base_mask.shape, dtype=torch.float64, device=base_mask.device)
        metric_state = task.metric_state()

        def run_step(batch):
            result, magnitude = gradient_step(base_mask, batch)
            raw.add_(magnitude)
            task.update_metric(metric_state, result, batch)
            return result.loss.detach()

    batches_seen, examples = 0, 0
    losses = []  # the batch losses (0-d, on the device): read once, after the pass
    recording = contextlib.nullcontext(None) if through_runner else record(model)
    with frozen_parameters(model), recording as stats, checked_head_masks(base_mask), \
            checkpointed_layers(model, checkpoint_layers):
        for batch in tqdm(batches, desc="importance", disable=not progress, unit="batch"):
            losses.append(run_step(batch))
            batches_seen += 1
            examples += examples_in(task, batch)
    if through_runner:
        raw, metric_state, stats = sums.raw.clone(), sums.metric_state_copy(), sums.head_statistics()
    loss_sum = loss_total(losses)
    if reduce is not None:
        totals = reduce({"raw_importance": raw, "metric_state": metric_state, "loss_sum": loss_sum,
                         "batches": batches_seen, "examples": examples, "statistics": stats})
        raw, metric_state, loss_sum, batches_seen, examples = (
            totals[key] for key in ("raw_importance", "metric_state", "loss_sum", "batches", "examples"))
    tokens = stats.token_count()
    raw = (raw / max(tokens, 1)).cpu()
    return HeadAnalysis(
        importance=normalize_importance(raw, by_layer=normalize_by_layer, global_minmax=normalize_global),
        raw_importance=raw,
        entropy=stats.entropy(),
        max_prob=stats.max_prob(),
        metric=task.compute_metric(metric_state),
        loss=loss_sum / max(batches_seen, 1),
        tokens=tokens,
        examples=examples,
        cuda_graphs=use.as_dict(),
    )


def importance_gradient(model: nn.Module, task: TaskProtocol, base_mask: torch.Tensor, batch: dict, mode: str):
    """One batch's task result under a copy of ``base_mask`` ``[L, H]`` that requires grad (``[B, L, H]`` for
    ``mode="per_example"``), and ``|dL/dmask|`` ``[L, H]`` float64 (summed over the examples per example)."""
    if mode == "per_example":
        mask = base_mask.expand(examples_in(task, batch), *base_mask.shape).clone().requires_grad_(True)
    else:
        mask = base_mask.clone().requires_grad_(True)
    result = task.evaluate(model, batch, head_mask=mask)
    objective = result.example_losses.sum() if mode == "per_example" else result.loss
    (gradient,) = torch.autograd.grad(objective, mask)
    magnitude = gradient.abs().double()
    return result, magnitude.sum(0) if mode == "per_example" else magnitude


def loss_total(losses: list[torch.Tensor]) -> float:
    """The sum of a pass's batch losses (0-d tensors on the device, read back in one copy); ValueError naming the
    first batch whose loss is NaN or infinite (the metric and the gradients after it would be meaningless: accuracy
    from NaN logits looks like chance). Checked after the pass, so that no step waits for the device."""
    if not losses:
        return 0.0
    values = torch.stack(losses).double().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        index = int(bad[0, 0])
        raise ValueError(f"the loss of batch {index} is {float(values[index])}: the model computes non-finite values "
                         "on this data (weights with NaN or inf, or an overflow in a 16-bit dtype: try --dtype "
                         "float32)")
    return float(values.sum())


def evaluate_metric(model: nn.Module, batches: Iterable[dict], task: TaskProtocol, *,
                    head_mask: torch.Tensor | None = None, progress: bool = False, desc: str = "evaluate",
                    cuda_graphs: str = "auto", graph_report: dict | None = None) -> float:
    """The task metric over ``batches`` with ``head_mask`` (``[L, H]``, default none), without gradients. A batch
    loss that is NaN or infinite raises ValueError (a metric from NaN outputs would look like chance).
    ``cuda_graphs`` as for :func:`analyze_heads`; ``graph_report``, a dict, receives what ran (``GraphUse``)."""
    require_patched(model)
    device = head_mask.device if head_mask is not None else next(model.parameters()).device
    refusal = graph_refusal(model, task, cuda_graphs, device)
    use = GraphUse(cuda_graphs, enabled=refusal is None, reason=refusal)
    if use.enabled and head_mask is not None and head_mask.dim() != 2:
        use.turn_off("a per-example head mask runs eagerly")
    through_runner = use.enabled
    if through_runner:
        runner, sums = evaluation_runner(model, task, head_mask, use)
        run_step = runner.run
    else:
        state = task.metric_state()

        def run_step(batch):
            result = task.evaluate(model, batch, head_mask=head_mask)
            task.update_metric(state, result, batch)
            return result.loss.detach()

    checked = checked_head_masks(head_mask) if head_mask is not None else contextlib.nullcontext()
    losses = []
    with torch.no_grad(), checked:
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            losses.append(run_step(batch))
    if graph_report is not None:
        graph_report.update(use.as_dict())
    loss_total(losses)
    return task.compute_metric(sums.metric_state_copy() if through_runner else state)

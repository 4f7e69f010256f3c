"""The task protocol (:class:`TaskProtocol`), the base class (:class:`Task`), what a task returns for a batch
(:class:`TaskResult`) and the helpers every task shares; see :mod:`fastbertology.tasks`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "input_features")
EXAMPLE_KEYS = ("input_ids", "pixel_values", "input_features")  # one row per example: text, images, audio


def count_examples(batch: dict) -> int | None:
    """Number of examples in ``batch``: the rows of ``input_ids``, ``pixel_values`` (images) or ``input_features``
    (audio, ``[B, n_mels, frames]``), whichever it has; None when it has none of them."""
    for key in EXAMPLE_KEYS:
        if key in batch:
            return len(batch[key])
    return None


@dataclass
class TaskResult:
    """What :meth:`Task.evaluate` returns for one batch of B examples.

    loss:           scalar tensor, differentiable; each task documents how it reduces ``example_losses``.
    example_losses: ``[B]`` per-example losses (differentiable).
    logits:         classification ``[B, C]`` / regression ``[B]`` / language modelling ``[B, N, V]`` (or ``[K, V]``
                    at the K predicted positions, see :class:`PredictedLogits`), or None.
    token_losses:   language modelling: ``[B, N-1]`` NLL of token t+1 given tokens <= t (0 where not counted).
    token_mask:     language modelling: ``[B, N-1]`` bool, the predicted tokens that count.
    ranks:          retrieval: ``[B]`` rank (1 = best) of each query's own positive among its group's positives.
    group_sizes:    retrieval: ``[B]`` size of each example's group (its number of candidates).
    embeddings, pair_embeddings: retrieval: ``[B, D]`` L2-normalised query / positive embeddings.
    """

    loss: torch.Tensor
    example_losses: torch.Tensor
    logits: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    group_sizes: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    pair_embeddings: torch.Tensor | None = None


def _model_inputs(batch: dict, prefix: str = "") -> dict:
    """The :data:`MODEL_INPUT_KEYS` entries (``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``,
    ``input_features``: those present) of ``batch``, without ``prefix``."""
    return {key: batch[prefix + key] for key in MODEL_INPUT_KEYS if prefix + key in batch}


def _mask_kwargs(head_mask) -> dict:
    """``head_mask`` for the patched model, and ``use_cache=False``: the analyses never need a generation cache,
    and a call that builds one cannot run padding-free."""
    return {"use_cache": False} if head_mask is None else {"head_mask": head_mask, "use_cache": False}


@runtime_checkable
class TaskProtocol(Protocol):
    """What the analyses (importance, masking, sweeps, data-parallel runs) need from a task."""

    metric_name: str
    higher_is_better: bool

    def forward(self, model: torch.nn.Module, batch: dict, *, head_mask: torch.Tensor | None = None) -> Any: ...

    def result(self, output: Any, batch: dict) -> TaskResult: ...

    def evaluate(self, model: torch.nn.Module, batch: dict, *,
                 head_mask: torch.Tensor | None = None) -> TaskResult: ...

    def metric_state(self) -> dict: ...

    def update_metric(self, state: dict, result: TaskResult, batch: dict) -> None: ...

    def compute_metric(self, state: dict) -> float: ...

    def merge_metric_states(self, states: list[dict]) -> dict: ...

    def batch_size(self, batch: dict) -> int: ...

    def replicate(self, batch: dict, k: int) -> dict: ...

    def split(self, output: Any, k: int) -> list: ...


def sum_metric_states(states: list[dict]) -> dict:
    """Entry-wise sums of metric states (numbers, or tensors of one shape) accumulated on disjoint data."""
    if not states:
        raise ValueError("no metric states to merge")
    merged = {}
    for key in states[0]:
        values = [state[key] for state in states]
        if any(isinstance(v, torch.Tensor) for v in values):  # a state that saw no batch may still hold a number
            values = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
            if all(v.dim() == 0 for v in values):
                values = [v.cpu() for v in values]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"metric state entry {key!r} has different shapes {sorted(shapes)} in different "
                                 "states; give the task a merge_metric_states(states) method that can combine them")
            total = values[0].clone()
            for value in values[1:]:
                total += value.to(total.device)
            merged[key] = total
        elif isinstance(values[0], (int, float)):
            merged[key] = sum(values[1:], values[0])
        else:
            raise ValueError(f"metric state entry {key!r} ({type(values[0]).__name__}) is not a number or tensor; "
                             "give the task a merge_metric_states(states) method that can combine it")
    return merged


class Task:
    """Base class; see the module docstring for the protocol. Subclasses set ``name``, ``metric_name``,
    ``higher_is_better`` and implement :meth:`forward`, :meth:`result`, :meth:`metric_state`,
    :meth:`update_metric` and :meth:`compute_metrics`."""

    name = "task"
    metric_name = "metric"
    higher_is_better = True
    # None when a step (forward, loss, metric update) can be captured as a CUDA graph: shapes fixed by the batch's
    # shapes, no host reads, and update_metric changing device tensors in place after the first batch; else why
    # not (fastbertology.step_graphs runs such steps eagerly and says so)
    cuda_graph_refusal: str | None = "its step is not declared capturable (cuda_graph_refusal = None)"

    def forward(self, model, batch: dict, *, head_mask: torch.Tensor | None = None):
        """Run ``model`` on ``batch`` (``head_mask`` ``[L, H]`` or ``[B, L, H]`` given to the patched model)."""
        raise NotImplementedError

    def result(self, output, batch: dict) -> TaskResult:
        """Losses (and what the metric needs) from the model output of :meth:`forward`."""
        raise NotImplementedError

    def evaluate(self, model, batch: dict, *, head_mask: torch.Tensor | None = None) -> TaskResult:
        """:meth:`forward` then :meth:`result`."""
        return self.result(self.forward(model, batch, head_mask=head_mask), batch)

    def metric_state(self) -> dict:
        raise NotImplementedError

    def update_metric(self, state: dict, result: TaskResult, batch: dict) -> None:
        raise NotImplementedError

    def compute_metrics(self, state: dict) -> dict[str, float]:
        raise NotImplementedError

    def compute_metric(self, state: dict) -> float:
        """The task's main metric (``metric_name``) over everything accumulated in ``state``."""
        return float(self.compute_metrics(state)[self.metric_name])

    def merge_metric_states(self, states: list[dict]) -> dict:
        """Metric states accumulated on disjoint data (in order) -> one, as if accumulated on all of it. Default:
        entry-wise sums (:func:`sum_metric_states`)."""
        return sum_metric_states(states)

    def batch_size(self, batch: dict) -> int:
        """Number of examples in ``batch`` (rows of ``input_ids``, of ``pixel_values`` for image models, of
        ``input_features`` for audio models)."""
        size = count_examples(batch)
        if size is None:
            raise ValueError(f"the batch has none of {', '.join(EXAMPLE_KEYS)} (keys: {', '.join(sorted(batch))}): "
                             "give the task a batch_size(batch) method that counts its examples")
        return size

    def replicate(self, batch: dict, k: int) -> dict:
        """``batch`` of B examples -> k*B rows for :meth:`forward` (copy j = rows ``j*B .. (j+1)*B - 1``): every
        tensor whose first dimension is B is tiled k times along it; other entries unchanged."""
        size = self.batch_size(batch)
        replicated = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size:
                value = value.repeat(k, *([1] * (value.dim() - 1)))  # [B, ...] -> [k*B, ...]
            replicated[key] = value
        return replicated

    def split(self, output, k: int) -> list:
        """Output of :meth:`forward` on :meth:`replicate`'s batch -> k outputs, one per copy, each of which
        :meth:`result` accepts with the original batch. Default: ``output.logits`` (or a tensor) split in k."""
        logits = output.logits if hasattr(output, "logits") else output
        if logits.shape[0] % k:
            raise ValueError(f"output batch {logits.shape[0]} is not a multiple of the {k} copies")
        return list(logits.chunk(k, dim=0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(metric={self.metric_name!r})"


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to float32 for losses; float32 / float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor

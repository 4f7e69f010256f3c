"""The importance and evaluation steps as :class:`~fastbertology.step_graphs.StepRunner` bodies, with the
accumulators they update in place, cached on the patched model across passes (iterative masking runs many passes
over the same batches: their graphs are captured once).

A runner is kept per (step kind, task, importance mode, mask shape and dtype) and dropped when the model's
parameters are no longer the tensors its graphs read (pruning, ``.to()``). A pass resets its accumulators to zero
and copies its head mask into the runner's static mask; the results it returns are copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .architectures import architecture
from .recording import HeadStatistics, record
from .step_graphs import CudaGraph, EmulatedGraph, GraphUse, StepRunner


class _Sums:
    """The accumulators of a pass: ``raw [L, H]`` float64 |mask gradient| sums, ``statistics [L, 2, H]`` float64
    entropy / max-probability sums, ``tokens [L]`` float64 query tokens per row, the task's metric state, and the
    static head mask the steps read."""

    def __init__(self, mask: torch.Tensor | None, layers: int, heads: int, task, device: torch.device):
        self.mask = None if mask is None else mask.detach().clone()
        self.raw = torch.zeros(layers, heads, dtype=torch.float64, device=device)
        self.statistics = torch.zeros(layers, 2, heads, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(layers, dtype=torch.float64, device=device)
        self.metric_state = task.metric_state()

    def reset(self, mask: torch.Tensor | None, task) -> None:
        if mask is not None:
            self.mask.copy_(mask)
        for tensor in (self.raw, self.statistics, self.tokens):
            tensor.zero_()
        fresh = task.metric_state()
        for key, value in self.metric_state.items():
            if isinstance(value, torch.Tensor) and isinstance(fresh.get(key), (torch.Tensor, int, float)):
                value.zero_()  # in place: the captured graphs add to these tensors
            else:
                self.metric_state[key] = fresh[key]

    def listed(self) -> dict:
        return {"raw": self.raw, "statistics": self.statistics, "tokens": self.tokens,
                **{f"metric.{key}": value for key, value in self.metric_state.items()}}

    def add_statistics(self, step: HeadStatistics) -> None:
        """Add one step's per-row statistics (a recorder that saw only that step) in place."""
        rows = [step._sums(row) for row in range(step.num_layers)]
        zeros = self.statistics[0].new_zeros(self.statistics.shape[1:])
        self.statistics.add_(torch.stack([zeros if sums is None else sums for sums in rows]))
        counts = [0 if count is None else count for count in step.tokens]
        if all(isinstance(count, torch.Tensor) for count in counts):
            self.tokens.add_(torch.stack(counts).to(self.tokens.dtype))
        else:  # an eager step without query weights: host counts
            for row, count in enumerate(counts):
                self.tokens[row] += count

    def head_statistics(self) -> HeadStatistics:
        """A recorder holding copies of the sums (what :func:`~fastbertology.importance.analyze_heads` reports)."""
        statistics = HeadStatistics(self.statistics.shape[0])
        sums, tokens = self.statistics.clone(), self.tokens.clone()
        for row in range(statistics.num_layers):
            statistics._set_sums(row, sums[row, 0], sums[row, 1])
            statistics.tokens[row] = tokens[row]
        return statistics

    def metric_state_copy(self) -> dict:
        return {key: value.clone() if isinstance(value, torch.Tensor) else value
                for key, value in self.metric_state.items()}


def _fingerprint(model: torch.nn.Module) -> tuple:
    return tuple(tensor.data_ptr() for tensor in (*model.parameters(), *model.buffers()))


def _cached(model, key: tuple, make: Callable[[], tuple[StepRunner, _Sums]], use: GraphUse):
    """The cached ``(runner, sums)`` for ``key`` (made when missing or stale); the runner reports to ``use``, which
    inherits the reason of a runner that turned graphs off in an earlier pass."""
    runners = model._fastbertology_state.step_runners
    fingerprint = _fingerprint(model)
    cached = runners.get(key)
    if cached is None or cached[0] != fingerprint:
        runners[key] = cached = (fingerprint, *make())
    runner, sums = cached[1], cached[2]
    if runner.use.reason is not None and runner.use.enabled is False and use.enabled:
        use.turn_off(runner.use.reason)
    runner.use = use
    return runner, sums


def _limit(model) -> int | None:
    return architecture(model).usable_positions(model.config)


def _graph_type(device: torch.device):
    """Real graphs on CUDA; on the CPU (reached only where a test lifts the refusal) the emulation."""
    return CudaGraph if device.type == "cuda" else EmulatedGraph


def importance_runner(model, task, mode: str, base_mask: torch.Tensor, use: GraphUse,
                      gradient_step: Callable) -> tuple[StepRunner, _Sums]:
    """A runner of the importance step (``mode`` ``"per_batch"`` or ``"per_example"``) and its reset sums. The
    step: ``gradient_step(static mask, batch) -> (result, |dL/dmask| [L, H])`` (the eager pass's own step,
    :func:`~fastbertology.importance.importance_gradient`), that magnitude added to ``raw``, the step's
    statistics and the metric."""
    layers, heads = base_mask.shape
    graph_type = _graph_type(base_mask.device)
    key = ("importance", id(task), mode, tuple(base_mask.shape), base_mask.dtype)

    def make():
        sums = _Sums(base_mask, layers, heads, task, base_mask.device)

        def body(batch: dict) -> torch.Tensor:
            with record(model) as step:
                result, magnitude = gradient_step(sums.mask, batch)
            sums.raw.add_(magnitude)
            sums.add_statistics(step)
            task.update_metric(sums.metric_state, result, batch)
            return result.loss.detach()

        return StepRunner(body, sums.listed, use, limit=_limit(model), graph_type=graph_type), sums

    runner, sums = _cached(model, key, make, use)
    sums.reset(base_mask, task)
    return runner, sums


def evaluation_runner(model, task, head_mask: torch.Tensor | None, use: GraphUse) -> tuple[StepRunner, _Sums]:
    """A runner of the evaluation step (the task's loss and metric under the static head mask, no gradient) and
    its reset sums (only the metric state is used)."""
    shape = None if head_mask is None else tuple(head_mask.shape)
    key = ("evaluate", id(task), shape, None if head_mask is None else head_mask.dtype)
    device = next(model.parameters()).device
    graph_type = _graph_type(device)

    def make():
        sums = _Sums(head_mask, 0, 0, task, device)

        def body(batch: dict) -> torch.Tensor:
            result = task.evaluate(model, batch, head_mask=sums.mask)
            task.update_metric(sums.metric_state, result, batch)
            return result.loss.detach()

        def listed():
            return {f"metric.{key}": value for key, value in sums.metric_state.items()}

        return StepRunner(body, listed, use, limit=_limit(model), graph_type=graph_type), sums

    runner, sums = _cached(model, key, make, use)
    sums.reset(head_mask, task)
    return runner, sums

"""Task layer: losses and metrics, independent of data loading.

A task runs a model on a batch (from :func:`fastbertology.data.make_batches`) and turns the output into a
differentiable loss and into the running state of a dataset-level metric. The analyses use exactly this
protocol (see :func:`fastbertology.importance.analyze_heads`)::

    result = task.evaluate(model, batch, head_mask=mask)   # TaskResult: .loss (scalar), .example_losses [B]
    state = task.metric_state()                            # once per pass over the data
    task.update_metric(state, result, batch)               # per batch (mutates state)
    task.compute_metric(state) -> float                    # the task's metric over everything seen
    task.compute_metrics(state) -> dict[str, float]        # every metric the task tracks
    task.higher_is_better, task.metric_name
    task.replicate(batch, k) / task.split(output, k)       # k copies of a batch in one pass (batched masks)
    task.merge_metric_states(states) -> dict               # states accumulated on disjoint data, combined

:class:`TaskProtocol` states it as a type; :class:`Task` is the base class with the shared parts.

``evaluate`` is ``task.result(task.forward(model, batch, head_mask=...), batch)``: ``forward`` only runs the model,
``result`` only computes losses from its output, so losses can be checked on crafted outputs.

Metric states hold sums (confusion counts, token NLL sums, hit counts...) so that accumulating batch by batch
gives the same value as computing the metric on all the data at once.

Tasks:

* :class:`ClassificationTask` — ``model(...).logits [B, C]``, mean cross-entropy; accuracy, F1 (MRPC), Matthews
  correlation (CoLA).
* :class:`RegressionTask` — ``logits [B, 1]``, mean squared error; Pearson correlation (STS-B).
* :class:`LanguageModelingTask` — causal LMs' (GPT-2, Llama, ...) next-token NLL over non-padding tokens;
  perplexity (lower is better).
* :class:`RetrievalTask` — sentence-embedding models (MiniLM): symmetric contrastive loss and accuracy@1 / MRR
  within fixed groups of examples, so results do not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .architectures import architecture

__all__ = [
    "TaskResult", "Task", "TaskProtocol", "sum_metric_states", "PredictedLogits", "ClassificationTask",
    "RegressionTask", "LanguageModelingTask", "RetrievalTask",
    "GLUE_METRICS", "glue_task", "make_task", "TASK_KINDS", "mean_pool", "embed", "retrieval_ranks",
    "confusion_metrics", "MODEL_INPUT_KEYS",
]

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")

# run_bertology's metric per GLUE task: F1 for MRPC, Matthews correlation for CoLA, Pearson for STS-B.
GLUE_METRICS = {
    "cola": "mcc", "sst-2": "accuracy", "mrpc": "f1", "sts-b": "pearson", "qqp": "accuracy", "mnli": "accuracy",
    "mnli-mm": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
}


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
    """``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values`` (those present) of ``batch``, without
    ``prefix``."""
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
        """Number of examples in ``batch`` (rows of ``input_ids``, or of ``pixel_values`` for image models)."""
        return len(batch["input_ids"] if "input_ids" in batch else batch["pixel_values"])

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


# ----------------------------------------------------------------------------------------------------------------
# Classification and regression (GLUE)
# ----------------------------------------------------------------------------------------------------------------

def confusion_metrics(confusion: torch.Tensor, *, positive_label: int = 1) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation from a confusion matrix ``[C, C]`` (rows: true, columns: predicted).

    f1:  binary F1 of class ``positive_label`` when C <= 2 (0 when it has no true or predicted examples), else
         the macro average of the per-class F1 scores.
    mcc: Matthews correlation coefficient (multi-class form, as scikit-learn); 0 when undefined.
    """
    cm = confusion.double()
    total = float(cm.sum())
    if total == 0:
        raise ValueError("no examples were accumulated: the metric is undefined")
    correct = float(cm.diagonal().sum())
    true_counts, predicted_counts = cm.sum(1), cm.sum(0)
    tp = cm.diagonal()
    per_class_f1 = torch.where(true_counts + predicted_counts > 0, 2 * tp / (true_counts + predicted_counts),
                               torch.zeros_like(tp))
    if cm.shape[0] <= 2:
        f1 = float(per_class_f1[positive_label]) if positive_label < cm.shape[0] else 0.0
    else:
        f1 = float(per_class_f1.mean())
    numerator = correct * total - float(true_counts @ predicted_counts)
    denominator = math.sqrt((total**2 - float(predicted_counts @ predicted_counts))
                            * (total**2 - float(true_counts @ true_counts)))
    mcc = numerator / denominator if denominator > 0 else 0.0
    return {"accuracy": correct / total, "f1": f1, "mcc": mcc, "examples": total}


def _grown_confusion(confusion: torch.Tensor, size: int) -> torch.Tensor:
    """A ``[C, C]`` confusion matrix padded with zeros to ``[size, size]`` (itself when ``size == C``)."""
    old = confusion.shape[0]
    if size == old:
        return confusion
    grown = torch.zeros(size, size, dtype=confusion.dtype)
    grown[:old, :old] = confusion
    return grown


class ClassificationTask(Task):
    """Sequence (or image) classification: ``model(input_ids, attention_mask, token_type_ids).logits [B, C]`` (or
    ``model(pixel_values).logits``) against ``batch["labels"] [B]`` (class ids).

    loss:           mean over the batch of the per-example cross-entropy (as transformers' and run_bertology's
                    loss); ``example_losses [B]`` the per-example cross-entropy. Computed in float32 or wider.
    metric:         ``"accuracy"``, ``"f1"`` (binary F1 of class ``positive_label``, run_bertology's MRPC metric;
                    macro F1 for more than two classes) or ``"mcc"`` (Matthews correlation, CoLA). The state is a
                    confusion matrix, so accumulation is exact. ``num_labels`` fixes its size (default: grows).
    """

    name = "classification"
    higher_is_better = True
    METRICS = ("accuracy", "f1", "mcc")

    def __init__(self, *, metric: str = "accuracy", num_labels: int | None = None, positive_label: int = 1):
        if metric not in self.METRICS:
            raise ValueError(f"classification metric must be one of {self.METRICS}, got {metric!r}")
        self.metric_name = metric
        self.num_labels = num_labels
        self.positive_label = positive_label

    def forward(self, model, batch, *, head_mask=None):
        return model(**_model_inputs(batch), **_mask_kwargs(head_mask))

    def result(self, output, batch):
        logits = output.logits if hasattr(output, "logits") else output
        if logits.dim() != 2:
            raise ValueError(f"classification logits must be [B, C], got shape {tuple(logits.shape)}")
        labels = batch["labels"]
        losses = F.cross_entropy(_at_least_float32(logits), labels.to(logits.device).long(), reduction="none")
        return TaskResult(loss=losses.mean(), example_losses=losses, logits=logits)

    def metric_state(self):
        size = self.num_labels or 2
        return {"confusion": torch.zeros(size, size, dtype=torch.long)}

    def update_metric(self, state, result, batch):
        predictions = result.logits.detach().argmax(-1).cpu()
        labels = batch["labels"].detach().long().cpu()
        size = max(state["confusion"].shape[0], result.logits.shape[-1], int(labels.max()) + 1)
        state["confusion"] = _grown_confusion(state["confusion"], size)
        state["confusion"] += torch.bincount(labels * size + predictions, minlength=size * size).view(size, size)

    def merge_metric_states(self, states):
        """Confusion matrices that may have grown to different sizes: padded to the largest, then added."""
        size = max(state["confusion"].shape[0] for state in states)
        padded = [{**state, "confusion": _grown_confusion(state["confusion"].cpu(), size)} for state in states]
        return sum_metric_states(padded)

    def compute_metrics(self, state):
        return confusion_metrics(state["confusion"], positive_label=self.positive_label)


def _combined_moments(a: dict, b: dict) -> dict:
    """Two regression states (count ``n``, means, second moments ``m2_x``, ``m2_y``, co-moment ``c_xy``, ``sse``)
    of disjoint data -> the state of their union (Chan et al.'s pairwise update; exact up to rounding, stable)."""
    n_a, n_b = a["n"], b["n"]
    if n_b == 0:
        return dict(a)
    if n_a == 0:
        return dict(b)
    n = n_a + n_b
    dx, dy = b["mean_x"] - a["mean_x"], b["mean_y"] - a["mean_y"]
    return {
        "n": n, "mean_x": a["mean_x"] + dx * n_b / n, "mean_y": a["mean_y"] + dy * n_b / n,
        "m2_x": a["m2_x"] + b["m2_x"] + dx * dx * n_a * n_b / n,
        "m2_y": a["m2_y"] + b["m2_y"] + dy * dy * n_a * n_b / n,
        "c_xy": a["c_xy"] + b["c_xy"] + dx * dy * n_a * n_b / n, "sse": a["sse"] + b["sse"],
    }


class RegressionTask(Task):
    """Regression (STS-B): ``model(...).logits [B, 1]`` (or ``[B]``) against float ``batch["labels"] [B]``.

    loss:   mean over the batch of the squared error (transformers' regression loss); ``example_losses [B]``.
    metric: ``"pearson"`` correlation of predictions and labels (also reported: ``"mse"``). The state keeps
            counts, means, co-moments (Chan et al.'s pairwise update, float64), so accumulation is exact up to
            rounding and numerically stable.
    """

    name = "regression"
    higher_is_better = True
    METRICS = ("pearson", "mse")

    def __init__(self, *, metric: str = "pearson"):
        if metric not in self.METRICS:
            raise ValueError(f"regression metric must be one of {self.METRICS}, got {metric!r}")
        self.metric_name = metric
        self.higher_is_better = metric == "pearson"

    def forward(self, model, batch, *, head_mask=None):
        return model(**_model_inputs(batch), **_mask_kwargs(head_mask))

    def result(self, output, batch):
        logits = output.logits if hasattr(output, "logits") else output
        if logits.dim() == 2 and logits.shape[-1] == 1:
            logits = logits.squeeze(-1)
        if logits.dim() != 1:
            raise ValueError(f"regression logits must be [B, 1] or [B], got shape {tuple(logits.shape)}")
        target = batch["labels"].to(device=logits.device, dtype=_at_least_float32(logits).dtype)
        losses = (_at_least_float32(logits) - target) ** 2
        return TaskResult(loss=losses.mean(), example_losses=losses, logits=logits)

    def metric_state(self):
        return {"n": 0, "mean_x": 0.0, "mean_y": 0.0, "m2_x": 0.0, "m2_y": 0.0, "c_xy": 0.0, "sse": 0.0}

    def update_metric(self, state, result, batch):
        x = result.logits.detach().double().cpu()
        y = batch["labels"].detach().double().cpu()
        if len(x) == 0:
            return
        mean_x, mean_y = float(x.mean()), float(y.mean())
        batch_state = {"n": len(x), "mean_x": mean_x, "mean_y": mean_y, "m2_x": float(((x - mean_x) ** 2).sum()),
                       "m2_y": float(((y - mean_y) ** 2).sum()), "c_xy": float(((x - mean_x) * (y - mean_y)).sum()),
                       "sse": float(((x - y) ** 2).sum())}
        state.update(_combined_moments(state, batch_state))

    def merge_metric_states(self, states):
        """Counts, means and co-moments combined with Chan et al.'s pairwise update (in order)."""
        merged = dict(states[0])
        for other in states[1:]:
            merged = _combined_moments(merged, other)
        return merged

    def compute_metrics(self, state):
        if state["n"] == 0:
            raise ValueError("no examples were accumulated: the metric is undefined")
        denominator = math.sqrt(state["m2_x"] * state["m2_y"])
        pearson = state["c_xy"] / denominator if denominator > 0 else 0.0
        return {"pearson": pearson, "mse": state["sse"] / state["n"], "examples": float(state["n"])}


# ----------------------------------------------------------------------------------------------------------------
# Language modelling (the registry's causal language models)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PredictedLogits:
    """Language-model logits at the predicted positions only: ``logits [K, V]`` for the K positions where
    ``positions [B, N]`` (bool) is True, in row-major order. What :class:`LanguageModelingTask` computes instead of
    ``[B, N, V]`` when it can: no vocabulary projection for padding or for positions that predict nothing."""

    logits: torch.Tensor
    positions: torch.Tensor

    def split(self, k: int) -> list[PredictedLogits]:
        """k outputs for k equal row blocks of ``positions``."""
        if self.positions.shape[0] % k:
            raise ValueError(f"output batch {self.positions.shape[0]} is not a multiple of the {k} copies")
        blocks = self.positions.chunk(k, dim=0)
        rows = self.logits.split([int(block.sum()) for block in blocks], dim=0)
        return [PredictedLogits(logits, block) for logits, block in zip(rows, blocks)]


def _output_projection(model) -> torch.nn.Linear | None:
    """The vocabulary projection of a causal LM whose logits are exactly ``projection(base model hidden states)``
    (the registry's ``causal_lm`` families), else None."""
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if not isinstance(projection, torch.nn.Linear) or base is model:
        return None
    try:
        causal_lm = architecture(model).causal_lm
    except ValueError:
        return None
    return projection if causal_lm else None


class LanguageModelingTask(Task):
    """Causal language modelling: ``model(input_ids, attention_mask).logits [B, N, V]``; token t+1 is predicted
    from tokens <= t. For the registry's causal LMs (``causal_lm``), :meth:`forward` runs the base model and applies
    the vocabulary projection only at the positions that predict a counted token (:class:`PredictedLogits`): the
    same numbers, without the projection (the largest layer of a small LM) for padding.

    Targets: ``batch["labels"] [B, N]`` if present (ignored positions -100), else ``input_ids`` with padding
    (``attention_mask == 0``) set to -100. The shift happens here; the model is not given labels.
    loss:           total NLL of the counted tokens of the batch / their number (transformers' LM loss).
    example_losses: ``[B]`` each example's mean NLL over its counted tokens (0 for an example with none).
    metric:         ``"perplexity"`` = exp(total token NLL / total counted tokens) over the whole data; lower is
                    better. Also reported: ``"nll"`` (mean per token) and ``"tokens"``.
    """

    name = "language_modeling"
    metric_name = "perplexity"
    higher_is_better = False

    def forward(self, model, batch, *, head_mask=None):
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
        projection = _output_projection(model)
        if projection is None:
            return model(**inputs, **_mask_kwargs(head_mask))
        hidden = model.base_model(**inputs, **_mask_kwargs(head_mask)).last_hidden_state  # [B, N, D]
        positions = self._predicting(self.targets(batch)).to(hidden.device)  # [B, N]
        return PredictedLogits(projection(hidden[positions]), positions)

    @staticmethod
    def _predicting(labels: torch.Tensor) -> torch.Tensor:
        """bool ``[B, N]``: position t predicts a counted token t+1 (the last position predicts nothing)."""
        return F.pad(labels[:, 1:], (0, 1), value=-100) != -100

    def split(self, output, k):
        if isinstance(output, PredictedLogits):
            return output.split(k)
        return super().split(output, k)

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B, N]`` target ids: ``batch["labels"]`` or ``input_ids`` with padding set to -100."""
        if "labels" in batch and batch["labels"].shape == batch["input_ids"].shape:
            return batch["labels"]
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        return labels

    def result(self, output, batch):
        if isinstance(output, PredictedLogits):
            return self._predicted_result(output, batch)
        logits = output.logits if hasattr(output, "logits") else output  # [B, N, V]
        batch_size, length, vocab = logits.shape
        labels = self.targets(batch).to(logits.device)  # [B, N]
        # Shift the labels, not the logits (no copy of the [B, N, V] logits): position t predicts token t+1.
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, N], the last position predicts nothing
        token_losses = F.cross_entropy(_at_least_float32(logits).reshape(-1, vocab), shifted.reshape(-1),
                                       ignore_index=-100, reduction="none")
        token_losses = token_losses.view(batch_size, length)[:, :-1]  # [B, N-1], 0 where ignored
        token_mask = shifted[:, :-1] != -100  # [B, N-1]
        counts = token_mask.sum(-1)  # [B]
        example_losses = token_losses.sum(-1) / counts.clamp(min=1)
        loss = token_losses.sum() / counts.sum().clamp(min=1)
        return TaskResult(loss=loss, example_losses=example_losses, logits=logits, token_losses=token_losses,
                          token_mask=token_mask)

    def _predicted_result(self, output: PredictedLogits, batch) -> TaskResult:
        """The same losses from logits at the predicted positions only."""
        labels = self.targets(batch).to(output.logits.device)  # [B, N]
        positions = output.positions
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, N], position t predicts token t+1
        losses = F.cross_entropy(_at_least_float32(output.logits), shifted[positions], reduction="none")  # [K]
        token_losses = losses.new_zeros(positions.shape).masked_scatter(positions, losses)[:, :-1]  # [B, N-1]
        token_mask = positions[:, :-1]
        counts = token_mask.sum(-1)
        return TaskResult(loss=losses.sum() / counts.sum().clamp(min=1),
                          example_losses=token_losses.sum(-1) / counts.clamp(min=1), logits=output.logits,
                          token_losses=token_losses, token_mask=token_mask)

    def metric_state(self):
        return {"nll": 0.0, "tokens": 0}

    def update_metric(self, state, result, batch):
        state["nll"] += float(result.token_losses.detach().double()[result.token_mask].sum())
        state["tokens"] += int(result.token_mask.sum())

    def compute_metrics(self, state):
        if state["tokens"] == 0:
            raise ValueError("no tokens were accumulated: perplexity is undefined")
        nll = state["nll"] / state["tokens"]
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": float(state["tokens"])}


# ----------------------------------------------------------------------------------------------------------------
# Retrieval with sentence embeddings (MiniLM)
# ----------------------------------------------------------------------------------------------------------------

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, N, D]`` over the non-padding tokens of ``attention_mask [B, N]`` -> ``[B, D]``
    (sentence-transformers' mean pooling)."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, N, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def embed(model, batch: dict, *, prefix: str = "", head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings ``[B, D]`` (float32 or wider) of the ``prefix`` inputs of
    ``batch`` (``""``: ``input_ids``...; ``"pair_"``: ``pair_input_ids``...). Runs the base model (a model with a
    head is reduced to ``model.base_model``); ``head_mask`` as for the patched model."""
    inputs = _model_inputs(batch, prefix)
    encoder = getattr(model, "base_model", model)
    output = encoder(**inputs, **_mask_kwargs(head_mask))
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # [B, N, D]
    pooled = mean_pool(_at_least_float32(hidden), inputs["attention_mask"].to(hidden.device))
    return F.normalize(pooled, dim=-1)


def retrieval_ranks(similarity: torch.Tensor) -> torch.Tensor:
    """``similarity [g, g]`` (row i: query i against every positive) -> ``[g]`` rank of the own positive (the
    diagonal), 1 = best. Ties count against the query: rank = 1 + #{j != i : s_ij >= s_ii}, so a model whose
    embeddings collapse to one point scores 0, not 1."""
    own = similarity.diagonal().unsqueeze(1)  # [g, 1]
    beaten = (similarity >= own).sum(1) - 1  # the diagonal itself always counts once
    return beaten + 1


class RetrievalTask(Task):
    """In-batch-negatives retrieval for sentence-embedding models such as all-MiniLM-L6-v2.

    Each example is a (query, positive) pair, batched with ``make_batches(..., pair_mode="separate")``: queries
    in ``input_ids``/``attention_mask``(/``token_type_ids``), positives in ``pair_input_ids``... Both are embedded
    by the base model with mean pooling over non-padding tokens and L2 normalisation (:func:`embed`).

    Fixed groups (batch-size independence): the examples are cut, in data order, into groups of ``group_size``
    (G, default 32): example k belongs to group ``k // G`` (from ``batch["example_index"]``; without it, from the
    position in the batch). Within a group, S = ``scale`` * cos(query_i, positive_j) ``[g, g]``;

    * loss: symmetric cross-entropy with the own positive as the target, as sentence-transformers'
      MultipleNegativesSymmetricRankingLoss with scale 20: ``example_losses[i] = (CE(S[i, :], i) + CE(S[:, i], i))
      / 2``; ``loss`` = mean of ``example_losses`` over the batch;
    * metric: ``"accuracy@1"`` (main) and ``"mrr"`` of each query's own positive among the group's positives
      (ties count against it, see :func:`retrieval_ranks`); also ``"chance@1"``, the score of random ranking
      (mean of 1/g), and ``"examples"``.

    Because a group's members are always the same examples, every example's loss and rank — hence the metric and
    the mean loss over the data — are the same for any batch size that is a multiple of G (use
    ``batch_size = k * G``). A batch must therefore start at a group boundary and hold whole groups (the last
    group of the data may be smaller); with ``example_index`` this is checked and a ValueError names the fix.
    ``group_size=None`` uses the whole batch as the group: the standard in-batch objective, which depends on the
    batch size and composition.

    With a per-example head mask ``[B, L, H]`` the query and the positive of example b share row b. Note that in
    this loss examples interact: example i's positive is a negative for the other queries of its group.
    """

    name = "retrieval"
    metric_name = "accuracy@1"
    higher_is_better = True

    def __init__(self, *, group_size: int | None = 32, scale: float = 20.0, symmetric: bool = True):
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be at least 2 (or None for the whole batch), got {group_size}")
        self.group_size = group_size
        self.scale = float(scale)
        self.symmetric = symmetric

    def __repr__(self) -> str:
        return f"RetrievalTask(group_size={self.group_size}, scale={self.scale}, symmetric={self.symmetric})"

    def forward(self, model, batch, *, head_mask=None):
        if "pair_input_ids" not in batch:
            raise ValueError("RetrievalTask needs query and positive inputs: make the batches with "
                             "make_batches(..., pair_mode='separate')")
        return embed(model, batch, head_mask=head_mask), embed(model, batch, prefix="pair_", head_mask=head_mask)

    def split(self, output, k):
        """``(queries [k*B, D], positives [k*B, D])`` -> k pairs ``([B, D], [B, D])``. (The replicated batch tiles
        ``example_index`` as is, so it is not a valid retrieval batch itself: results are computed per copy on the
        original batch, which keeps copy j's fixed groups exactly the original groups.)"""
        queries, positives = output
        if queries.shape[0] % k or positives.shape[0] != queries.shape[0]:
            raise ValueError(f"retrieval output of {queries.shape[0]} queries / {positives.shape[0]} positives "
                             f"cannot be split into {k} copies")
        return list(zip(queries.chunk(k, dim=0), positives.chunk(k, dim=0)))

    def groups(self, batch: dict, size: int) -> list[slice]:
        """Contiguous slices of the batch that form the fixed groups (see the class docstring)."""
        if self.group_size is None:
            return [slice(0, size)]
        g = self.group_size
        if "example_index" in batch:
            index = batch["example_index"].detach().cpu()
            first = int(index[0])
            if first % g or not torch.equal(index, torch.arange(first, first + size)):
                raise ValueError(
                    f"retrieval groups of {g} examples must not be split across batches: this batch starts at example "
                    f"{first}. Use a batch size that is a multiple of group_size ({g}) and keep the data order")
        return [slice(start, min(start + g, size)) for start in range(0, size, g)]

    def result(self, output, batch):
        queries, positives = output  # [B, D] each, L2-normalised
        size = len(queries)
        losses, ranks, group_sizes = [], [], []
        for group in self.groups(batch, size):
            q, p = queries[group], positives[group]  # [g, D]
            cosine = q @ p.T  # [g, g]
            logits = self.scale * cosine
            target = torch.arange(len(q), device=q.device)
            loss = F.cross_entropy(logits, target, reduction="none")
            if self.symmetric:
                loss = (loss + F.cross_entropy(logits.T, target, reduction="none")) / 2
            losses.append(loss)
            ranks.append(retrieval_ranks(cosine.detach()))
            group_sizes.append(torch.full((len(q),), len(q), device=q.device))
        example_losses = torch.cat(losses)
        return TaskResult(loss=example_losses.mean(), example_losses=example_losses, ranks=torch.cat(ranks),
                          group_sizes=torch.cat(group_sizes), embeddings=queries, pair_embeddings=positives)

    def metric_state(self):
        return {"hits": 0, "reciprocal_rank": 0.0, "chance": 0.0, "examples": 0}

    def update_metric(self, state, result, batch):
        ranks = result.ranks.detach().double().cpu()
        state["hits"] += int((ranks == 1).sum())
        state["reciprocal_rank"] += float((1.0 / ranks).sum())
        state["chance"] += float((1.0 / result.group_sizes.detach().double().cpu()).sum())
        state["examples"] += len(ranks)

    def compute_metrics(self, state):
        n = state["examples"]
        if n == 0:
            raise ValueError("no examples were accumulated: the metric is undefined")
        return {"accuracy@1": state["hits"] / n, "mrr": state["reciprocal_rank"] / n, "chance@1": state["chance"] / n,
                "examples": float(n)}


# ----------------------------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------------------------

TASK_KINDS = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "language_modeling": LanguageModelingTask,
    "retrieval": RetrievalTask,
}


def make_task(kind: str, **options) -> Task:
    """A task by kind (``"classification"``, ``"regression"``, ``"language_modeling"`` or ``"retrieval"``) with
    its keyword options."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    return TASK_KINDS[kind](**options)


def glue_task(name: str, *, num_labels: int | None = None) -> Task:
    """The task run_bertology uses for GLUE task ``name``: STS-B -> :class:`RegressionTask` (Pearson); others ->
    :class:`ClassificationTask` with F1 (MRPC), Matthews (CoLA) or accuracy."""
    key = str(name).lower()
    if key not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_METRICS)}")
    metric = GLUE_METRICS[key]
    if metric == "pearson":
        return RegressionTask(metric="pearson")
    return ClassificationTask(metric=metric, num_labels=num_labels)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to float32 for losses; float32 / float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor

"""Classification and regression (GLUE): :class:`ClassificationTask`, :class:`RegressionTask`, and
run_bertology's metric per GLUE task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Task, TaskResult, _at_least_float32, _mask_kwargs, _model_inputs, sum_metric_states

# run_bertology's metric per GLUE task: F1 for MRPC, Matthews correlation for CoLA, Pearson for STS-B.
GLUE_METRICS = {
    "cola": "mcc", "sst-2": "accuracy", "mrpc": "f1", "sts-b": "pearson", "qqp": "accuracy", "mnli": "accuracy",
    "mnli-mm": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
}


def _batch_labels(batch: dict, what: str) -> torch.Tensor:
    """``batch["labels"]`` ``[B]``; ValueError naming the key when the batch has none (a KeyError said only
    'labels')."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"the batch has no 'labels' ([B] {what}), which this task's loss and metric need: add them "
                         f"to every batch (fastbertology.batching.make_batches does for labelled examples)")
    return labels


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
    """Sequence (image, audio) classification: ``model(input_ids, attention_mask, token_type_ids).logits [B, C]`` (or
    ``model(pixel_values).logits``, ``model(input_features).logits``) against ``batch["labels"] [B]`` (class ids).

    loss:           mean over the batch of the per-example cross-entropy (as transformers' and run_bertology's
                    loss); ``example_losses [B]`` the per-example cross-entropy. Computed in float32 or wider.
    metric:         ``"accuracy"``, ``"f1"`` (binary F1 of class ``positive_label``, run_bertology's MRPC metric;
                    macro F1 for more than two classes) or ``"mcc"`` (Matthews correlation, CoLA). The state is a
                    confusion matrix, so accumulation is exact. ``num_labels`` fixes its size (default: grows).
    """

    name = "classification"
    higher_is_better = True
    METRICS = ("accuracy", "f1", "mcc")
    cuda_graph_refusal = None  # fixed shapes, device-side metric updated in place: steps replay as CUDA graphs

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
        labels = _batch_labels(batch, "class ids")
        losses = F.cross_entropy(_at_least_float32(logits), labels.to(logits.device).long(), reduction="none")
        return TaskResult(loss=losses.mean(), example_losses=losses, logits=logits)

    def metric_state(self):
        size = self.num_labels or 2
        return {"confusion": torch.zeros(size, size, dtype=torch.long)}

    def update_metric(self, state, result, batch):
        """Adds the batch to the confusion matrix, which lives on the logits' device: no host-device sync. The
        matrix has ``max(num_labels, C)`` classes for ``[B, C]`` logits (a label the logits have no class for
        fails the loss first)."""
        logits = result.logits.detach()
        confusion = state["confusion"]
        size = max(confusion.shape[0], logits.shape[-1])
        if confusion.device != logits.device or size != confusion.shape[0]:  # the first batch, or more classes
            state["confusion"] = confusion = _grown_confusion(confusion.cpu(), size).to(logits.device)
        predictions = logits.argmax(-1)
        labels = batch["labels"].detach().to(logits.device).long()
        cells = labels * size + predictions  # [B] flat cells of the [size, size] matrix
        confusion.view(-1).index_add_(0, cells, torch.ones_like(cells))  # in place (a CUDA graph replays it)

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
    return _union_moments(a, b)


def _union_moments(a: dict, b: dict) -> dict:
    """:func:`_combined_moments` without its checks for empty states (the counts may be device tensors: no sync;
    ``a["n"] + b["n"]`` must be positive)."""
    n_a, n_b = a["n"], b["n"]
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
    cuda_graph_refusal = None  # as classification

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
        target = _batch_labels(batch, "float targets").to(device=logits.device, dtype=_at_least_float32(logits).dtype)
        losses = (_at_least_float32(logits) - target) ** 2
        return TaskResult(loss=losses.mean(), example_losses=losses, logits=logits)

    def metric_state(self):
        return {"n": 0, "mean_x": 0.0, "mean_y": 0.0, "m2_x": 0.0, "m2_y": 0.0, "c_xy": 0.0, "sse": 0.0}

    def update_metric(self, state, result, batch):
        """Chan et al.'s update with the batch's moments. The state's entries are float64 0-d tensors on the
        logits' device after the first batch, updated in place from then on: no host-device sync (and a CUDA graph
        replays the update)."""
        x = result.logits.detach().double()
        y = batch["labels"].detach().to(x.device).double()
        if len(x) == 0:
            return
        mean_x, mean_y = x.mean(), y.mean()
        dx, dy = x - mean_x, y - mean_y
        batch_state = {"n": torch.full((), float(len(x)), dtype=torch.float64, device=x.device),
                       "mean_x": mean_x, "mean_y": mean_y, "m2_x": dx.square().sum(),
                       "m2_y": dy.square().sum(), "c_xy": (dx * dy).sum(), "sse": (x - y).square().sum()}
        for key, value in _union_moments(state, batch_state).items():
            current = state[key]
            if isinstance(current, torch.Tensor) and current.device == x.device and current.dtype == value.dtype:
                current.copy_(value)
            else:
                state[key] = value

    def merge_metric_states(self, states):
        """Counts, means and co-moments combined with Chan et al.'s pairwise update (in order)."""
        merged = dict(states[0])
        for other in states[1:]:
            merged = _combined_moments(merged, other)
        return merged

    def compute_metrics(self, state):
        state = {key: float(value) for key, value in state.items()}  # read once, at the end
        if state["n"] == 0:
            raise ValueError("no examples were accumulated: the metric is undefined")
        denominator = math.sqrt(state["m2_x"] * state["m2_y"])
        pearson = state["c_xy"] / denominator if denominator > 0 else 0.0
        return {"pearson": pearson, "mse": state["sse"] / state["n"], "examples": float(state["n"])}

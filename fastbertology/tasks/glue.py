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

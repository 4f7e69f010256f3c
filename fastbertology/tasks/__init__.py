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
* :class:`LanguageModelingTask` — causal LMs' (GPT-2, Llama, ...) next-token NLL over non-padding tokens, and an
  encoder-decoder's decoder text given its input (Whisper: the sequence-to-sequence loss); perplexity (lower is
  better).
* :class:`RetrievalTask` — sentence-embedding models (MiniLM): symmetric contrastive loss and accuracy@1 / MRR
  within fixed groups of examples, so results do not depend on the batch size.
"""

from __future__ import annotations

from .base import EXAMPLE_KEYS, MODEL_INPUT_KEYS, Task, TaskProtocol, TaskResult, count_examples, sum_metric_states
from .glue import GLUE_METRICS, ClassificationTask, RegressionTask, confusion_metrics
from .language_modeling import LanguageModelingTask, PredictedLogits
from .retrieval import RetrievalTask, embed, mean_pool, retrieval_ranks

__all__ = [
    "TaskResult", "Task", "TaskProtocol", "sum_metric_states", "PredictedLogits", "ClassificationTask",
    "RegressionTask", "LanguageModelingTask", "RetrievalTask",
    "GLUE_METRICS", "glue_task", "make_task", "TASK_KINDS", "mean_pool", "embed", "retrieval_ranks",
    "confusion_metrics", "MODEL_INPUT_KEYS", "EXAMPLE_KEYS", "count_examples",
]


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

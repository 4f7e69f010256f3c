"""Which task a run scores: the objective from ``--task`` and the data file, the checks of the task's options, the
kind of model head it needs, and the :mod:`fastbertology.tasks` object that computes its loss and metric.

Objectives: ``classification`` (a GLUE task name, or a .csv/.tsv/.jsonl file with labels), ``regression`` (STS-B),
``lm`` (a .txt file, or ``--task lm``: next-token prediction, perplexity) and ``retrieval`` (``(text, text_pair)``
pairs embedded with a sentence-embedding model: the right pair among a group of candidates).
"""

from __future__ import annotations

from .data import GLUE_TASKS
from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask, RetrievalTask, Task, glue_task

OBJECTIVES = ("classification", "regression", "lm", "retrieval")

# The model head each objective needs (the ``kind`` of fastbertology.loading.load_model).
MODEL_KINDS = {"classification": "classification", "regression": "classification", "lm": "causal-lm",
               "retrieval": "encoder"}


def objective_for(task: str | None, data) -> str:
    """classification | regression | lm | retrieval, from the task name (a GLUE task, ``retrieval``, ``lm``) or,
    without one, from the data file's suffix (``.txt``: language modelling; anything else: classification)."""
    name = (task or "").lower()
    if name in GLUE_TASKS:
        return "regression" if GLUE_TASKS[name].label_names is None else "classification"
    if name in ("retrieval", "lm"):
        return name
    if name:
        raise ValueError(f"unknown --task {task!r}; choose a GLUE task ({', '.join(GLUE_TASKS)}), 'retrieval' or "
                         "'lm'")
    return "lm" if str(data).lower().endswith(".txt") else "classification"


def check_task_options(objective: str, *, metric: str | None, max_seq_length: int, batch_size: int,
                       group_size: int) -> None:
    """``--metric`` only where it means something and one the task has; a language-modelling block holds at least
    one next-token prediction; retrieval batches hold whole candidate groups. ValueError naming the option."""
    if metric is not None:
        allowed = {"classification": ClassificationTask.METRICS, "regression": RegressionTask.METRICS}.get(objective)
        if allowed is None:
            raise ValueError(f"--metric does not apply to {objective} (it reports "
                             f"{'perplexity' if objective == 'lm' else 'accuracy@1 and mrr'}); leave it out")
        if metric not in allowed:
            raise ValueError(f"--metric {metric!r} is not a {objective} metric; choose one of {', '.join(allowed)}")
    if objective == "lm" and max_seq_length < 2:
        raise ValueError(f"--max-seq-length must be at least 2 for language modelling (one next-token prediction), "
                         f"got {max_seq_length}")
    if objective == "retrieval" and batch_size % group_size:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of --group-size {group_size}: retrieval "
                         "groups are never split across batches")


def make_task(objective: str, *, task_name: str | None, metric: str | None, group_size: int,
              num_labels: int | None) -> Task:
    """The task object for ``objective``: a GLUE task's own metric unless ``metric`` is given; ``num_labels``: the
    classifier's number of classes."""
    if objective == "lm":
        return LanguageModelingTask()
    if objective == "retrieval":
        return RetrievalTask(group_size=group_size)
    if objective == "regression":
        return RegressionTask(metric=metric or "pearson")
    if task_name and not metric:
        return glue_task(task_name, num_labels=num_labels)
    return ClassificationTask(metric=metric or "accuracy", num_labels=num_labels)

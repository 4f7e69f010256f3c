"""Tasks whose numbers would mean nothing: refused, or run with a warning that is printed and recorded.

Refused (ValueError, before any work):

* retrieval with fewer than 2 pairs: the only candidate of the query is its own positive, so accuracy@1 is 1 and
  the loss and every head's importance are exactly 0;
* a classifier with fewer than 2 classes (a checkpoint with one output, or a random head rebuilt for data whose
  labels are all 0): every prediction is right and the loss is exactly 0 for the same reason;
* a resample-ablation sweep whose batches all hold one example (:func:`resample_warnings`): an example of a batch of
  one is its own source, so every mask would change nothing and every delta be exactly 0.

Warned about (the run goes on; the warning is printed and kept in ``summary.json`` under ``setup.warnings``):

* a last retrieval group of 1 pair (pairs = k x group size + 1): that query is always right and adds nothing to the
  loss or the importance, but counts in accuracy@1 (and in chance@1);
* classification data whose labels are all one class: the metric only says how often the model predicts that class
  (F1 and Matthews are degenerate) and the importance describes that class alone;
* regression targets that are all equal, under the Pearson metric: the correlation is undefined (reported as 0);
* an importance table of exact zeros (any task): the loss does not depend on any head
  (:func:`zero_importance_warning`);
* a resample-ablation sweep with some batches of one example (e.g. the last): their example is not ablated, which
  pulls every delta towards 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["resample_warnings", "task_warnings", "zero_importance_warning"]


def task_warnings(objective: str, examples: Sequence, *, num_labels: int | None, group_size: int | None,
                  label_names: Sequence[str] | None = None, metric: str | None = None) -> list[str]:
    """Refuse a degenerate task (ValueError with the reason and the fix); return the warnings for one that is
    partly degenerate (see the module docstring). ``examples``: the run's examples (with ``.label`` for
    classification and regression); ``num_labels``: the classifier's classes; ``group_size``: the retrieval
    groups' size; ``metric``: the task's main metric."""
    if objective == "retrieval":
        return _retrieval_warnings(len(examples), group_size)
    if objective == "classification":
        return _classification_warnings(examples, num_labels, label_names)
    if objective == "regression" and metric == "pearson":
        targets = {float(example.label) for example in examples if example.label is not None}
        if len(targets) == 1:
            return [f"every one of the {len(examples)} regression targets is {targets.pop()}: Pearson correlation is "
                    "undefined for constant targets and is reported as 0 (the importance still follows the squared "
                    "error). Use data with varying targets, or --metric mse"]
    return []


def _retrieval_warnings(pairs: int, group_size: int | None) -> list[str]:
    if pairs < 2:
        raise ValueError(f"retrieval needs at least 2 (text, text_pair) pairs; the data has {pairs}: a query whose "
                         "only candidate is its own pair is always right, so accuracy@1 would be 1 and the loss and "
                         "every head's importance exactly 0. Give more pairs")
    if group_size is not None and pairs > group_size and pairs % group_size == 1:
        return [f"the last retrieval group holds 1 pair ({pairs} pairs = {pairs // group_size} x --group-size "
                f"{group_size} + 1): its query has no other candidate, so it is always right and adds nothing to the "
                "loss or the importance, yet counts in accuracy@1 (and chance@1). Drop that pair or change "
                "--group-size"]
    return []


def _classification_warnings(examples: Sequence, num_labels: int | None, label_names) -> list[str]:
    if num_labels is not None and num_labels < 2:
        raise ValueError(f"the classifier has {num_labels} class (a checkpoint with one output, or a random head "
                         "built for labels that are all 0): every prediction is that class, so the metric would be "
                         "perfect and the loss and every head's importance exactly 0. Use a classifier with at least "
                         "2 classes and data with every class (a model with one output is a regression model: the "
                         "GLUE STS-B layout, --task sts-b)")
    labels = {int(example.label) for example in examples if example.label is not None}
    if len(labels) != 1:
        return []
    (label,) = labels
    name = f" ({label_names[label]!s})" if label_names and 0 <= label < len(label_names) else ""
    return [f"every one of the {len(examples)} examples has class {label}{name}: the metric only says how often "
            "the model predicts that class (F1 and Matthews correlation are degenerate: 0 or undefined), and the "
            "importance describes that class alone. Analyse data with examples of every class"]


def zero_importance_warning(raw_importance: torch.Tensor) -> str | None:
    """A warning when every entry of the raw importance table ``[L, H]`` is exactly 0, else None."""
    if raw_importance.numel() and bool((raw_importance == 0).all()):
        return ("every head's importance is exactly 0: the loss does not depend on any head on this data (a "
                "degenerate task, e.g. one class or one candidate), so the table ranks nothing")
    return None


def resample_warnings(batch_sizes: Sequence[int]) -> list[str]:
    """Refuse a resample ablation (:mod:`fastbertology.ablation`) over batches that all hold one example (ValueError
    with the fix); warn when some do. ``batch_sizes``: the examples of each batch of the sweep (every process's)."""
    single = sum(1 for size in batch_sizes if size == 1)
    if single and single == len(batch_sizes):
        raise ValueError("resample ablation takes a masked head's output from another example of the same batch, but "
                         "every batch holds one example (its own source): no mask would change anything and every "
                         "delta would be exactly 0. Use --batch-size 2 or more (and data of at least 2 examples), or "
                         "--ablation zero / mean")
    if single:
        return [f"{single} of the {len(batch_sizes)} batches {'holds' if single == 1 else 'hold'} one example, which "
                "resample ablation cannot ablate (it is its own source): those examples score the same under every "
                "mask, pulling every delta towards 0. Choose a --batch-size that leaves no batch of one (or use "
                "--data-subset)"]
    return []

"""Setting a run up, with no argparse: options -> checked inputs -> model, tokenizer, batches and task, patched.

Both command modules (:mod:`fastbertology.commands`, :mod:`fastbertology.sweep_command`) build a
:class:`RunOptions` from their parsed options and call, in this order:

* :func:`check_options` — numbers, dtype, device, backend, task and metric, the data path; nothing is loaded;
* :func:`resolve_model` — the model's local directory, its config, complete safetensors files and tokenizer files;
* :func:`setup` — load the model for the task's head, read and batch the data, check the data against the model
  (labels against its classes, token ids against its vocabulary, lengths against its positions), build the task,
  patch the model. Returns a :class:`Run`.

Errors are ValueErrors whose messages name the command-line option, the problem and the fix (docs/bad-input.md).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import patch
from .batching import check_token_ids, make_batches, move_batch
from .data import align_label_names, check_class_labels, describe_labels, load_examples, read_glue
from .degenerate import task_warnings
from .kernels import resolve_backend, triton_available
from .loading import (
    LoadingReport,
    check_model_dir,
    load_model,
    parse_dtype,
    resolve_device,
    resolve_model_path,
    usable_positions,
)
from .patching import heads_per_layer
from .task_selection import MODEL_KINDS, check_task_options, make_task, objective_for


@dataclass
class RunOptions:
    """What a run analyses and how; the command line's common options (``--batch-size`` is ``batch_size``...).

    model_label: how the model is named in titles and the report (default: from its path).
    data_label:  how the data is named (default: the file or directory name).
    """

    model: str | None = None
    data: str | None = None
    task: str | None = None
    metric: str | None = None
    max_seq_length: int = 128
    batch_size: int = 32
    data_subset: int | None = None
    group_size: int = 32
    device: str = "auto"
    dtype: str = "float32"
    backend: str = "auto"
    seed: int = 42
    allow_random_head: bool = False
    model_label: str | None = None
    data_label: str | None = None

    @classmethod
    def pick(cls, values: Mapping, **overrides) -> RunOptions:
        """The options among ``values`` (e.g. ``vars(namespace)``) that a run takes; others are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in names})


@dataclass
class Run:
    """A run, set up: the patched model on ``device``, its tokenizer, the task, the batches (dicts of tensors on
    ``device``, from :func:`fastbertology.batching.make_batches`), the number of examples, and ``description``
    (what the summary and the report say about the setup)."""

    model: torch.nn.Module
    tokenizer: object
    task: object
    batches: list
    examples: int
    device: torch.device
    description: dict = field(default_factory=dict)
    checkpoint_layers: bool = False  # per-layer activation checkpointing in the analysis passes (the memory plan)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_numbers(options: RunOptions) -> None:
    _require(options.batch_size >= 1, f"--batch-size must be at least 1, got {options.batch_size}")
    _require(options.max_seq_length >= 1, f"--max-seq-length must be at least 1, got {options.max_seq_length}")
    _require(options.data_subset is None or options.data_subset >= 0,
             f"--data-subset must be a number of examples (0 = all), got {options.data_subset}")
    _require(options.group_size >= 2, f"--group-size must be at least 2, got {options.group_size}")
    _require(0 <= options.seed < 2 ** 63, f"--seed must be between 0 and 2**63 - 1, got {options.seed}")


def _check_backend(backend: str, device: torch.device) -> None:
    """``--backend triton`` needs triton, and on a CPU device the Triton interpreter."""
    if backend != "triton":
        return
    if not triton_available():
        raise ValueError("--backend triton needs the triton package, which is not installed: pip install triton "
                         "(or use --backend torch / auto)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton runs on CUDA devices; on the CPU use --backend torch, or set "
                         "TRITON_INTERPRET=1 to run the kernels under the (slow) Triton interpreter")


ROW_FILES = (".csv", ".tsv", ".jsonl", ".json")


def _check_data_path(data: str | None, task: str | None, objective: str, *, rows: bool = False) -> None:
    if data is None:
        return
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {data} does not exist ({path.resolve()})")
    if task and objective in ("classification", "regression"):
        _require(path.is_dir(), f"--data {data} must be a GLUE task directory (with the dev split) for --task "
                                f"{task}; for a .csv/.tsv/.jsonl file leave --task out")
        return
    _require(path.is_file(), f"--data {data} must be a data file (.csv, .tsv, .jsonl or .txt); for a GLUE task "
                             "directory give --task")
    suffix = path.suffix.lower()
    allowed = (".txt",) if objective == "lm" and not rows else ROW_FILES
    _require(suffix in allowed, f"--data {data}: unknown data format {suffix or '(no suffix)'!r} for {objective}; "
                                f"use {', '.join(allowed)}")


def check_options(options: RunOptions, *, rows: bool = False) -> str:
    """Check every option of ``options`` before any work (``~`` in ``data`` is expanded, in place); return the
    objective (classification, regression, lm, retrieval). ``rows``: the data must be a file of rows (.csv, .tsv,
    .jsonl), for language modelling too (one example per row: activation patching's paired texts)."""
    if options.data is not None:
        options.data = os.path.expanduser(str(options.data))
    _check_numbers(options)
    parse_dtype(options.dtype)
    _check_backend(options.backend, resolve_device(options.device))
    objective = objective_for(options.task, options.data)
    check_task_options(objective, metric=options.metric, max_seq_length=options.max_seq_length,
                       batch_size=options.batch_size, group_size=options.group_size)
    _check_data_path(options.data, options.task, objective, rows=rows)
    return objective


def resolve_model(model: str | os.PathLike) -> str:
    """The model's local directory, checked without building the model (config, complete safetensors files,
    tokenizer files)."""
    path = resolve_model_path(model)
    check_model_dir(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Setting up model, data and task
# --------------------------------------------------------------------------------------------------------------
def _read_examples(options: RunOptions, objective: str):
    """The labelled / paired examples of ``data`` (language-modelling text is read once the tokenizer is loaded)."""
    if objective in ("classification", "regression") and options.task:
        return read_glue(options.data, task=options.task, data_subset=options.data_subset)
    if objective == "lm":
        return None
    return load_examples(options.data, require_label=objective != "retrieval", require_pair=objective == "retrieval",
                         data_subset=options.data_subset)


def _classes_in(examples) -> int:
    """Number of classes the labels need: the label names, else the largest id + 1."""
    if getattr(examples, "label_names", None):
        return len(examples.label_names)
    return max(int(e.label) for e in examples) + 1


def _load_for_objective(options: RunOptions, objective: str, model_path: str, examples, device, dtype):
    """Load the model and tokenizer for ``objective`` and check the labels against the model's classes.

    A classifier keeps the checkpoint's classes: label names are mapped to its ``id2label`` when it names them,
    and every label must be one of its class ids. Only a head that is random anyway (``--allow-random-head``) is
    rebuilt with the number of classes the data needs. Returns ``(model, tokenizer, loading report, labels)``
    where ``labels`` describes the label -> class-id mapping (None but for classifiers).
    """
    report = LoadingReport(model_path)

    def load(num_labels=None):
        return load_model(model_path, kind=MODEL_KINDS[objective], device=device, dtype=dtype, num_labels=num_labels,
                          allow_random_head=options.allow_random_head, report=report)

    model, tokenizer = load()
    labels = None
    if objective == "classification":
        aligned = None if report.random_head else align_label_names(examples, model.config.id2label)
        check_class_labels(examples, max(_classes_in(examples), 1) if report.random_head else model.config.num_labels)
        labels = describe_labels(examples, aligned)
        if report.random_head and model.config.num_labels != _classes_in(examples):
            model, tokenizer = load(num_labels=_classes_in(examples))
    elif objective == "regression" and model.config.num_labels != 1:
        if not report.random_head:
            raise ValueError(f"--task {options.task} is a regression task, but the checkpoint {model_path} is a "
                             f"classifier with {model.config.num_labels} classes; use a checkpoint with one "
                             "regression output")
        model, tokenizer = load(num_labels=1)
    return model, tokenizer, report, labels


def _class_names(model, objective: str) -> list[str] | None:
    """The classifier's class names by id (from ``id2label``), for messages; None for other objectives."""
    id2label = getattr(model.config, "id2label", None) if objective == "classification" else None
    return [str(id2label.get(i, i)) for i in range(model.config.num_labels)] if id2label else None


def _check_heads(model, path) -> None:
    """Every analysis takes ``[layers, heads]`` head masks: a pruned model with unequal head counts, or with no
    head left, is refused before any work."""
    counts = heads_per_layer(model)
    if len(set(counts)) > 1:
        raise ValueError(f"the model {path} has different head counts {counts} in its layers (it was pruned); a head "
                         "mask needs equal counts: analyse the unpruned model")
    if not any(counts):
        raise ValueError(f"the model {path} has no attention heads left (all were pruned): there is nothing to analyse")


def model_label(model: str | None, model_dir: str) -> str:
    """A short name for titles: a hub model's name (``org/name`` from its cache directory), else the directory's
    name, with its parent's when the name alone says little (``model``, ``pruned_model``)."""
    for part in Path(model_dir).parts:
        if part.startswith("models--"):  # the Hugging Face cache: models--org--name/snapshots/<hash>
            return part[len("models--"):].replace("--", "/")
    path = Path(model or model_dir)
    if path.name in ("model", "pruned_model", "") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _data_description(options: RunOptions, objective: str, examples, max_length: int) -> str:
    """What the examples are, in words (for the summary and the report)."""
    name = options.data_label or (Path(options.data).name if options.data else "the given examples")
    if objective == "lm":
        return (f"{name}: the whole file tokenized as one stream (line breaks are tokens too) and cut into "
                f"{len(examples)} consecutive blocks of up to {max_length} tokens; each block is one example, and "
                "perplexity is exp of the mean next-token loss over every predicted token")
    if objective == "retrieval":
        group = min(options.group_size, len(examples))  # fewer pairs than --group-size: one group of them all
        return (f"{name}: {len(examples)} (text, text_pair) pairs; each text must find its own pair among the "
                f"{group} pairs of its group (in-batch candidates)")
    return f"{name}: {len(examples)} labelled examples"


def setup(options: RunOptions, *, examples=None, model_path: str | None = None) -> Run:
    """Load the model, read and batch the data, build the task, patch the model (see the module docstring).

    ``examples``: use these instead of reading ``options.data`` (the demo's pairs). ``model_path``: the directory
    :func:`resolve_model` returned (default: ``options.model``). transformers' "Loading weights" bar follows the
    process-wide setting (:func:`fastbertology.console.library_output`).
    """
    torch.manual_seed(options.seed)
    device, dtype = resolve_device(options.device), parse_dtype(options.dtype)
    objective = objective_for(options.task, options.data)
    model_path = model_path or options.model
    if examples is None:
        examples = _read_examples(options, objective)
    if examples is not None and len(examples) == 0:
        raise ValueError("the data has no examples")
    model, tokenizer, report, labels = _load_for_objective(options, objective, model_path, examples, device, dtype)
    _check_heads(model, report.path)
    max_positions = usable_positions(model.config)
    max_length = min(options.max_seq_length, max_positions) if max_positions else options.max_seq_length
    if objective == "lm":
        examples = load_examples(options.data, tokenizer=tokenizer, max_seq_length=max_length, require_label=False,
                                 data_subset=options.data_subset)
    task = make_task(objective, task_name=options.task, metric=options.metric, group_size=options.group_size,
                     num_labels=model.config.num_labels)
    warnings = task_warnings(objective, examples, num_labels=model.config.num_labels, group_size=options.group_size,
                             label_names=_class_names(model, objective), metric=getattr(task, "metric_name", None))
    batches = make_batches(examples, tokenizer, max_seq_length=options.max_seq_length, batch_size=options.batch_size,
                           pair_mode="separate" if objective == "retrieval" else "joint", max_positions=max_positions)
    check_token_ids(batches, examples, vocab_size=model.get_input_embeddings().num_embeddings,
                    type_vocab_size=getattr(model.config, "type_vocab_size", None))
    batches = [move_batch(batch, device) for batch in batches]
    handle = patch(model, backend=options.backend)
    description = {
        "model": str(options.model or model_path), "model_dir": report.path,
        "model_label": options.model_label or model_label(options.model, report.path),
        "model_type": model.config.model_type, "objective": objective, "task_name": options.task or objective,
        "task": repr(task), "metric": getattr(task, "metric_name", "metric"),
        "data": _data_description(options, objective, examples, max_length), "labels": labels,
        "examples": len(examples), "batches": len(batches), "batch_size": options.batch_size,
        "max_seq_length": options.max_seq_length, "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "backend": options.backend,
        "attention": f"{resolve_backend(handle.backend, device)} backend, padding-free (layers run on the real "
                     "tokens only)", "random_head": report.random_head, "warnings": warnings,
    }
    return Run(model, tokenizer, task, batches, len(examples), device, description)

"""Command line: ``fastbertology {demo,importance,mask,prune,sweep,bench}`` (also ``python -m fastbertology``).

argparse and file IO only; the work is done by the library modules. Options follow run_bertology.py.

Bad input never gives a traceback or a silent wrong result: every option and path is checked before the model
is loaded (:func:`check_inputs`), the model and the data are checked against each other before any pass over
the data (:func:`setup`), and :func:`main` turns every known kind of error into one line on stderr and exit
code 2 (see docs/bad-input.md). The network is never used (:func:`fastbertology.loading.set_offline`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .outputs import (OutputDirectoryError, apply_umask, check_output_dir, make_temporary_dir, prepare_output_dir,
                      write_json, write_npy)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "FASTBERTOLOGY_TRACEBACK"  # set to 1 to get the traceback of an error instead of one line


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------
def _add_common(parser, *, data_required=True):
    parser.add_argument("--model", required=data_required,
                        help="local model directory (or the name of a hub model already in the local cache; "
                             "nothing is ever downloaded)")
    parser.add_argument("--data", required=data_required,
                        help="GLUE task directory (with --task), .csv/.tsv/.jsonl with text[,text_pair],label, "
                             "or .txt for language modelling")
    parser.add_argument("--task", default=None,
                        help="GLUE task name (mrpc, sst-2, cola, mnli, qnli, qqp, rte, sts-b, wnli) for a GLUE "
                             "directory; 'retrieval' for (text, text_pair) pairs with a sentence-embedding model; "
                             "'lm' for language modelling (default for .txt)")
    parser.add_argument("--metric", default=None,
                        help="classification metric: accuracy, f1 or mcc (default: the GLUE task's, else accuracy)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-subset", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--group-size", type=int, default=32, help="retrieval: examples per fixed candidate group")
    parser.add_argument("--importance", choices=["per_batch", "per_example"], default="per_batch",
                        help="per_batch: |dL/dmask| per batch (run_bertology); per_example: Michel et al.'s "
                             "per-example absolute gradient (independent of batching)")
    parser.add_argument("--dont-normalize-importance-by-layer", action="store_true")
    parser.add_argument("--dont-normalize-global-importance", action="store_true")
    parser.add_argument("--output-dir", default=None, help="where results go (default: runs/<command>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                        help="attention backend: auto = Triton on CUDA, PyTorch on CPU")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--allow-random-head", action="store_true",
                        help="analyse a checkpoint whose task head (classifier) is missing, so initialised at random "
                             "(refused by default; recorded in summary.json)")


def _add_masking(parser):
    parser.add_argument("--masking-threshold", type=float, default=0.9,
                        help="stop masking when the score falls below this fraction of the original")
    parser.add_argument("--masking-amount", type=float, default=0.1, help="fraction of heads masked per step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbertology", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastbertology {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="importance, entropy, masking and pruning of pretrained MiniLM on "
                                            "Python's documentation (offline, CPU, ~2 min)")
    _add_common(demo, data_required=False)
    _add_masking(demo)
    demo.add_argument("--pairs", type=int, default=128, help="number of (query, passage) pairs")
    demo.set_defaults(handler=run_demo, batch_size=64, group_size=32, max_seq_length=128, task="retrieval",
                      importance="per_example")

    importance = commands.add_parser("importance", help="head importance, attention entropy and max probability")
    _add_common(importance)
    importance.set_defaults(handler=run_importance)

    mask = commands.add_parser("mask", help="importance, then iterative masking of the least important heads")
    _add_common(mask)
    _add_masking(mask)
    mask.set_defaults(handler=run_mask)

    prune = commands.add_parser("prune", help="iterative masking (or --head-mask), then physical pruning")
    _add_common(prune)
    _add_masking(prune)
    prune.add_argument("--head-mask", default=None, help="a head_mask.npy [L, H] (0 = prune) instead of masking")
    prune.set_defaults(handler=run_prune)

    from .sweep_command import add_sweep_arguments, run_sweep

    sweep = commands.add_parser("sweep", help="ablation sweep: the score change when each head (or layer, or given "
                                              "mask) is masked; resumable, data-parallel under torchrun")
    _add_common(sweep)
    add_sweep_arguments(sweep)
    sweep.set_defaults(handler=run_sweep)

    commands.add_parser("bench", help="benchmark against the reference loop and stock SDPA "
                                      "(options: fastbertology bench --help)")
    return parser


# --------------------------------------------------------------------------------------------------------------
# Checking options and paths before any work
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What :func:`check_inputs` found: the model's local directory and the mask files' arrays, already read."""

    model_path: str | None = None
    head_mask: np.ndarray | None = None  # prune --head-mask: [L, H] float32 of 0 / 1
    masks: np.ndarray | None = None  # sweep --masks: [M, L, H] float32


def _expand(path):
    return None if path is None else os.path.expanduser(str(path))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_numbers(args) -> None:
    """Ranges of the numeric options, each error naming the option and what it takes."""
    _require(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
    _require(args.max_seq_length >= 1, f"--max-seq-length must be at least 1, got {args.max_seq_length}")
    _require(args.data_subset is None or args.data_subset >= 0,
             f"--data-subset must be a number of examples (0 = all), got {args.data_subset}")
    _require(args.group_size >= 2, f"--group-size must be at least 2, got {args.group_size}")
    _require(0 <= args.seed < 2 ** 63, f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if hasattr(args, "masking_threshold"):
        _require(0 < args.masking_threshold <= 1, "--masking-threshold must be in (0, 1] (a fraction of the "
                                                  f"original score), got {args.masking_threshold}")
        _require(0 < args.masking_amount < 1, "--masking-amount must be in (0, 1) (the fraction of heads masked "
                                              f"per step), got {args.masking_amount}")
    if hasattr(args, "pairs"):
        _require(args.pairs >= 1, f"--pairs must be at least 1, got {args.pairs}")


def _check_task_options(args, objective: str) -> None:
    """--metric only where it means something; retrieval batches must hold whole groups."""
    from .tasks import ClassificationTask, RegressionTask

    if args.metric is not None:
        allowed = {"classification": ClassificationTask.METRICS, "regression": RegressionTask.METRICS}.get(objective)
        if allowed is None:
            raise ValueError(f"--metric does not apply to {objective} (it reports "
                             f"{'perplexity' if objective == 'lm' else 'accuracy@1 and mrr'}); leave it out")
        _require(args.metric in allowed, f"--metric {args.metric!r} is not a {objective} metric; choose one of "
                                         f"{', '.join(allowed)}")
    if objective == "lm":
        _require(args.max_seq_length >= 2, f"--max-seq-length must be at least 2 for language modelling (one "
                                            f"next-token prediction), got {args.max_seq_length}")
    if objective == "retrieval":
        _require(args.batch_size % args.group_size == 0,
                 f"--batch-size {args.batch_size} must be a multiple of --group-size {args.group_size}: retrieval "
                 "groups are never split across batches")


def _check_backend(args, device: torch.device) -> None:
    """``--backend triton`` needs triton, and on a CPU device the Triton interpreter."""
    from .kernels import triton_available

    if args.backend != "triton":
        return
    if not triton_available():
        raise ValueError("--backend triton needs the triton package, which is not installed: pip install triton "
                         "(or use --backend torch / auto)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton runs on CUDA devices; on the CPU use --backend torch, or set "
                         "TRITON_INTERPRET=1 to run the kernels under the (slow) Triton interpreter")


def _check_data_path(args, objective: str) -> None:
    if args.data is None:
        return
    path = Path(args.data)
    if not path.exists():
        raise ValueError(f"--data {args.data} does not exist ({path.resolve()})")
    if args.task and objective in ("classification", "regression"):
        _require(path.is_dir(), f"--data {args.data} must be a GLUE task directory (with the dev split) for --task "
                                f"{args.task}; for a .csv/.tsv/.jsonl file leave --task out")
    else:
        _require(path.is_file(), f"--data {args.data} must be a data file (.csv, .tsv, .jsonl or .txt); for a GLUE "
                                 "task directory give --task")
        suffix = path.suffix.lower()
        allowed = (".txt",) if objective == "lm" else (".csv", ".tsv", ".jsonl", ".json")
        _require(suffix in allowed, f"--data {args.data}: unknown data format {suffix or '(no suffix)'!r} for "
                                    f"{objective}; use {', '.join(allowed)}")


_NPY_MAGIC = b"\x93NUMPY"


def read_mask_file(path, *, option: str) -> np.ndarray:
    """A head-mask ``.npy`` file as float32, checked: a real ``.npy`` (not pickled), numbers or booleans, finite.
    Errors name ``option``, the file, the problem and the fix."""
    where = f"{option} {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist or is not a file")
    with open(path, "rb") as handle:
        start = handle.read(len(_NPY_MAGIC))
    if start != _NPY_MAGIC:
        raise ValueError(f"{where} is not a .npy file (it does not start with the NumPy header); save the mask with "
                         "numpy.save('mask.npy', array)")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        reason = "holds Python objects (pickled data), which are never loaded" if "pickle" in str(error) else str(error)
        raise ValueError(f"{where} {reason}; save a numeric array with numpy.save") from None
    except (OSError, EOFError) as error:
        raise ValueError(f"{where} cannot be read ({error}); the file is truncated or corrupt") from None
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)
            or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{where} has dtype {array.dtype}; a head mask holds real numbers or booleans "
                         "(e.g. float32 1 = keep, 0 = mask)")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{where} contains NaN or infinite values; a head mask must be finite")
    return array


def _check_head_mask_file(args) -> np.ndarray | None:
    """prune ``--head-mask``: an ``[L, H]`` array of 0 (prune) and 1 (keep) (its shape is checked against the model
    once it is loaded)."""
    if not getattr(args, "head_mask", None):
        return None
    mask = read_mask_file(args.head_mask, option="--head-mask")
    _require(mask.ndim == 2, f"--head-mask {args.head_mask} has shape {mask.shape}; pruning takes one [layers, heads] "
                             "mask")
    _require(bool(np.isin(mask, (0.0, 1.0)).all()),
             f"--head-mask {args.head_mask}: a mask for pruning holds only 0 (prune) and 1 (keep); found values "
             f"{sorted(set(np.unique(mask).tolist()) - {0.0, 1.0})[:5]}")
    return mask


def _check_sweep_options(args) -> np.ndarray | None:
    """The sweep's own options; returns its ``--masks`` array ``[M, L, H]`` when given."""
    _require(args.checkpoint_every >= 1, f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    _require(args.masks_per_pass is None or args.masks_per_pass >= 1,
             f"--masks-per-pass must be positive, got {args.masks_per_pass}")
    _require(not (args.masks and args.kind),
             "--kind and --masks exclude each other: sweep the built-in masks or your own")
    _require(not args.resume or args.output_dir,
             "--resume needs --output-dir: the directory of the interrupted sweep")
    if not args.masks:
        return None
    masks = read_mask_file(args.masks, option="--masks")
    if masks.ndim == 2:
        masks = masks[None]
    _require(masks.ndim == 3 and masks.shape[0] >= 1,
             f"--masks {args.masks} has shape {masks.shape}; give masks [M, layers, heads] (or one [layers, heads])")
    return masks


def check_inputs(args, *, model_path=None) -> Inputs:
    """Check every option and path of ``args`` before any work (nothing is loaded or written): numbers and their
    ranges, dtype, device, backend, task and metric, the model directory (config, complete safetensors files,
    tokenizer files), the data path, mask files, the output directory. ``~`` is expanded in every path.
    Raises ValueError (or OutputDirectoryError) naming the option, the problem and the fix."""
    from .loading import check_model_dir, parse_dtype, resolve_device, resolve_model_path

    for name in ("data", "output_dir", "head_mask", "masks"):
        if getattr(args, name, None) is not None:
            setattr(args, name, _expand(getattr(args, name)))
    _check_numbers(args)
    parse_dtype(args.dtype)
    _check_backend(args, resolve_device(args.device))
    objective = _objective(args)
    _check_task_options(args, objective)
    _check_data_path(args, objective)
    inputs = Inputs(head_mask=_check_head_mask_file(args))
    if args.command == "sweep":
        inputs.masks = _check_sweep_options(args)
    inputs.model_path = resolve_model_path(model_path or args.model)
    check_model_dir(inputs.model_path)
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Setting up model, data and task
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    task: object
    batches: list
    examples: int
    device: torch.device
    description: dict


def _objective(args) -> str:
    """classification | regression | lm | retrieval, from --task and the data file's suffix."""
    from .data import GLUE_TASKS

    task = (args.task or "").lower()
    if task in GLUE_TASKS:
        return "regression" if GLUE_TASKS[task].label_names is None else "classification"
    if task in ("retrieval", "lm"):
        return task
    if task:
        raise ValueError(f"unknown --task {args.task!r}; choose a GLUE task ({', '.join(GLUE_TASKS)}), "
                         "'retrieval' or 'lm'")
    return "lm" if str(args.data).lower().endswith(".txt") else "classification"


def _read_examples(args, objective: str):
    """The labelled / paired examples of --data (language-modelling text is read once the tokenizer is loaded)."""
    from .data import load_examples, read_glue

    if objective in ("classification", "regression") and args.task:
        return read_glue(args.data, task=args.task, data_subset=args.data_subset)
    if objective == "lm":
        return None
    return load_examples(args.data, require_label=objective != "retrieval", require_pair=objective == "retrieval",
                         data_subset=args.data_subset)


def _classes_in(examples) -> int:
    """Number of classes the labels need: the label names, else the largest id + 1."""
    if getattr(examples, "label_names", None):
        return len(examples.label_names)
    return max(int(e.label) for e in examples) + 1


def _load_for_objective(args, objective: str, model_path: str, examples, device, dtype):
    """Load the model and tokenizer for ``objective`` and check the labels against the model's classes.

    A classifier keeps the checkpoint's classes: label names are mapped to its ``id2label`` when it names them,
    and every label must be one of its class ids. Only a head that is random anyway (``--allow-random-head``) is
    rebuilt with the number of classes the data needs. Returns ``(model, tokenizer, loading report)``.
    """
    from .data import align_label_names, check_class_labels
    from .loading import LoadingReport, load_model

    kind = {"classification": "classification", "regression": "classification", "lm": "causal-lm",
            "retrieval": "encoder"}[objective]
    report = LoadingReport(model_path)

    def load(num_labels=None):
        return load_model(model_path, kind=kind, device=device, dtype=dtype, num_labels=num_labels,
                          allow_random_head=args.allow_random_head, report=report)

    model, tokenizer = load()
    if objective == "classification":
        if not report.random_head:
            align_label_names(examples, model.config.id2label)
        check_class_labels(examples, max(_classes_in(examples), 1) if report.random_head else model.config.num_labels)
        if report.random_head and model.config.num_labels != _classes_in(examples):
            model, tokenizer = load(num_labels=_classes_in(examples))
    elif objective == "regression" and model.config.num_labels != 1:
        if not report.random_head:
            raise ValueError(f"--task {args.task} is a regression task, but the checkpoint {model_path} is a "
                             f"classifier with {model.config.num_labels} classes; use a checkpoint with one "
                             "regression output")
        model, tokenizer = load(num_labels=1)
    return model, tokenizer, report


def _check_heads(model, path) -> None:
    """Every analysis takes ``[layers, heads]`` head masks: a pruned model with unequal head counts, or with no
    head left, is refused before any work."""
    from .patching import heads_per_layer

    counts = heads_per_layer(model)
    if len(set(counts)) > 1:
        raise ValueError(f"the model {path} has different head counts {counts} in its layers (it was pruned); a head "
                         "mask needs equal counts: analyse the unpruned model")
    if not any(counts):
        raise ValueError(f"the model {path} has no attention heads left (all were pruned): there is nothing to analyse")


def _make_task(args, objective: str, model):
    from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask, RetrievalTask, glue_task

    if objective == "lm":
        return LanguageModelingTask()
    if objective == "retrieval":
        return RetrievalTask(group_size=args.group_size)
    if objective == "regression":
        return RegressionTask(metric=args.metric or "pearson")
    num_labels = model.config.num_labels
    if args.task and not args.metric:
        return glue_task(args.task, num_labels=num_labels)
    return ClassificationTask(metric=args.metric or "accuracy", num_labels=num_labels)


def setup(args, *, examples=None, model_path=None) -> Setup:
    """Load the model, read and batch the data, build the task, patch the model. File IO happens here.

    Before anything runs, the data is checked against the model: labels against its classes, token ids against
    its vocabulary and token types, sequence lengths against its positions (longer ones are truncated)."""
    from . import patch
    from .data import check_token_ids, load_examples, make_batches, move_batch
    from .distributed import is_main
    from .loading import parse_dtype, resolve_device, usable_positions

    torch.manual_seed(args.seed)
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    objective = _objective(args)
    model_path = model_path or args.model
    if examples is None:
        examples = _read_examples(args, objective)
    if examples is not None and len(examples) == 0:
        raise ValueError("the data has no examples")
    model, tokenizer, report = _load_for_objective(args, objective, model_path, examples, device, dtype)
    _check_heads(model, report.path)
    max_positions = usable_positions(model.config)
    if objective == "lm":
        examples = load_examples(args.data, tokenizer=tokenizer, max_seq_length=min(args.max_seq_length, max_positions),
                                 require_label=False, data_subset=args.data_subset)
    task = _make_task(args, objective, model)
    batches = make_batches(examples, tokenizer, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                           pair_mode="separate" if objective == "retrieval" else "joint", max_positions=max_positions)
    check_token_ids(batches, examples, vocab_size=model.get_input_embeddings().num_embeddings,
                    type_vocab_size=getattr(model.config, "type_vocab_size", None))
    batches = [move_batch(batch, device) for batch in batches]
    patch(model, backend=args.backend)
    description = {
        "model": str(args.model or model_path), "model_dir": report.path, "model_type": model.config.model_type,
        "objective": objective, "task": repr(task), "metric": getattr(task, "metric_name", "metric"),
        "examples": len(examples), "batches": len(batches), "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "device": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "backend": args.backend,
        "random_head": report.random_head,
    }
    if report.random_head and is_main():
        print(f"fastbertology: warning: the task head of {report.path} is not in the checkpoint "
              f"({', '.join(report.random_head)}): it was initialised at random (--allow-random-head)",
              file=sys.stderr, flush=True)
    return Setup(model, tokenizer, task, batches, len(examples), device, description)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    import transformers

    info = {"fastbertology": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------
def format_table(table, *, title: str, digits: int = 3) -> str:
    """An ``[L, H]`` table as text: one row per layer, one column per head (run_bertology's print_2d_tensor)."""
    values = table.tolist()
    width = max(6, digits + 4)
    lines = [title, "layer " + "".join(f"{h:>{width}d}" for h in range(len(values[0])))]
    for layer, row in enumerate(values):
        cells = "".join(f"{v:>{width}.{digits}f}" if v == v else f"{'-':>{width}}" for v in row)
        lines.append(f"{layer:>5d} " + cells)
    return "\n".join(lines)


def _say(args, text=""):
    from .distributed import is_main

    if is_main():  # under torchrun only rank 0 talks
        print(text, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------
def _output_dir(args, *, create: bool = True) -> Path | None:
    """The command's output directory (rank 0 only; None elsewhere). ``create=False`` only checks it, so that a
    run that fails while loading leaves no empty directory behind."""
    from .distributed import is_main

    if not is_main():  # under torchrun only rank 0 writes
        return None
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.command}-{datetime.now():%Y%m%d-%H%M%S}")
    prepare = prepare_output_dir if create else check_output_dir
    return prepare(args.output_dir, overwrite=args.overwrite)


def _analysis_options(args) -> dict:
    return dict(importance=args.importance, normalize_by_layer=not args.dont_normalize_importance_by_layer,
                normalize_global=not args.dont_normalize_global_importance)


def _importance_step(args, run, output: Path, summary: dict):
    from .importance import analyze_heads
    from .plots import heatmap

    from .distributed import analysis_reducer

    started = time.perf_counter()
    analysis = analyze_heads(run.model, run.batches, run.task, progress=not args.no_progress and output is not None,
                             reduce=analysis_reducer(run.model, run.task), **_analysis_options(args))
    seconds = time.perf_counter() - started
    if output is None:  # not rank 0
        return analysis
    write_npy(output / "head_importance.npy", analysis.importance.numpy())
    write_npy(output / "attn_entropy.npy", analysis.entropy.numpy())
    write_npy(output / "attn_max_prob.npy", analysis.max_prob.numpy())
    heatmap(output / "head_importance.png", analysis.importance, title="head importance",
            colorbar_label="importance (normalised)")
    heatmap(output / "attn_entropy.png", analysis.entropy, title="attention entropy", colorbar_label="nats",
            cmap="magma")
    summary["importance"] = {"metric": analysis.metric, "loss": analysis.loss, "tokens": analysis.tokens,
                             "examples": analysis.examples, "seconds": seconds, "mode": args.importance}
    _say(args, format_table(analysis.importance, title="\nHead importance (normalised; rows = layers)"))
    _say(args, format_table(analysis.entropy, title="\nAttention entropy (nats per token)"))
    _say(args, format_table(analysis.max_prob, title="\nMax attention probability (mean per token)"))
    _say(args, f"\n{summary['setup']['metric']} = {analysis.metric:.4f} on {analysis.examples} examples "
               f"({seconds:.1f} s for importance + entropy + metric)")
    return analysis


def _masking_step(args, run, output: Path, summary: dict, initial=None):
    from .distributed import analysis_reducer
    from .masking import iterative_masking
    from .plots import masking_curve

    started = time.perf_counter()
    result = iterative_masking(run.model, run.batches, run.task, masking_amount=args.masking_amount,
                               masking_threshold=args.masking_threshold,
                               progress=not args.no_progress and output is not None, initial=initial,
                               reduce=analysis_reducer(run.model, run.task), **_analysis_options(args))
    seconds = time.perf_counter() - started
    if output is None:  # not rank 0
        return result
    write_npy(output / "head_mask.npy", result.head_mask.numpy())
    threshold_score = result.original_score * args.masking_threshold if result.higher_is_better else \
        result.original_score / args.masking_threshold
    masking_curve(output / "masking_curve.png", result.curve, metric_name=summary["setup"]["metric"],
                  threshold_score=threshold_score)
    summary["masking"] = {"original_score": result.original_score, "final_score": result.final_score,
                          "heads_remaining": int(result.head_mask.sum()), "heads_total": result.head_mask.numel(),
                          "curve": result.curve, "seconds": seconds, "threshold": args.masking_threshold,
                          "amount": args.masking_amount}
    _say(args, "\nIterative masking: heads remaining -> " + summary["setup"]["metric"])
    for point in result.curve:
        _say(args, f"  {point['heads_remaining']:>4d}  {point['score']:.4f}")
    _say(args, format_table(result.head_mask.double(), title="\nFinal head mask (1 = kept)", digits=0))
    return result


def _pruning_step(args, run, head_mask, output: Path, summary: dict):
    from .importance import evaluate_metric
    from .pruning import count_parameters, heads_to_prune_from_mask, prune_heads

    model, task, batches = run.model, run.task, run.batches
    mask = torch.as_tensor(head_mask, dtype=torch.float32).to(run.device)
    progress = not args.no_progress
    started = time.perf_counter()
    masked_score = evaluate_metric(model, batches, task, head_mask=mask, progress=progress, desc="masked model")
    masked_seconds = time.perf_counter() - started
    parameters_before = count_parameters(model)
    prune_heads(model, heads_to_prune_from_mask(mask.cpu()))
    parameters_after = count_parameters(model)
    started = time.perf_counter()
    pruned_score = evaluate_metric(model, batches, task, progress=progress, desc="pruned model")
    pruned_seconds = time.perf_counter() - started
    model_dir = output / "pruned_model"
    _save_model_atomic(model, run.tokenizer, model_dir)
    summary["pruning"] = {
        "masked_score": masked_score, "pruned_score": pruned_score, "parameters_before": parameters_before,
        "parameters_after": parameters_after, "masked_seconds": masked_seconds, "pruned_seconds": pruned_seconds,
        "heads_pruned": int((mask == 0).sum()), "model_dir": str(model_dir),
    }
    _say(args, f"\nPruning {int((mask == 0).sum())} heads: parameters {parameters_before:,} -> {parameters_after:,} "
               f"({100 * (1 - parameters_after / parameters_before):.1f}% fewer)")
    _say(args, f"  score with masked heads: {masked_score:.4f}   pruned model: {pruned_score:.4f}")
    _say(args, f"  evaluation time: masked {masked_seconds:.2f} s, pruned {pruned_seconds:.2f} s")


def _save_model_atomic(model, tokenizer, directory: Path):
    """save_pretrained into a temporary sibling directory, then rename it into place."""
    import shutil

    temporary = make_temporary_dir(directory)  # mode 0777 minus the umask, like every other output
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        apply_umask(temporary)  # safetensors writes its files 0600 whatever the umask
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _finish(args, output: Path, summary: dict, started: float):
    if output is None:  # not rank 0
        return
    summary["seconds_total"] = time.perf_counter() - started
    write_json(output / "summary.json", summary)
    _say(args, f"\nOutputs in {output}/ ({', '.join(sorted(p.name for p in output.iterdir()))})")
    _say(args, f"Total {summary['seconds_total']:.0f} s")


def _new_summary(args, run) -> dict:
    options = {k: v for k, v in vars(args).items() if k != "handler"}
    return {"command": args.command, "options": options, "setup": run.description, "versions": versions(),
            "date": datetime.now().isoformat(timespec="seconds")}


def _check_head_mask_shape(head_mask: np.ndarray, model, path) -> None:
    from .patching import heads_per_layer

    counts = heads_per_layer(model)
    expected = (len(counts), max(counts, default=0))
    if tuple(head_mask.shape) != expected or len(set(counts)) != 1:
        raise ValueError(f"--head-mask {path} has shape {tuple(head_mask.shape)} but this model has "
                         f"[layers, heads] = {list(expected)}" + ("" if len(set(counts)) == 1 else
                                                                 f" (head counts {counts}: already pruned)"))


def _run_command(args, steps, *, data_parallel: bool = False, examples=None, model_path=None) -> int:
    """Check every option and path, check the output directory, set up model, data and task, run
    ``steps(run, inputs, output, summary)``, write the summary. ``data_parallel``: under torchrun, each process
    takes its shard of the batches."""
    from .distributed import shard_checked

    started = time.perf_counter()
    inputs = check_inputs(args, model_path=model_path)  # fail fast, before the slow setup
    _output_dir(args, create=False)
    run = setup(args, examples=examples, model_path=inputs.model_path)
    if inputs.head_mask is not None:
        _check_head_mask_shape(inputs.head_mask, run.model, args.head_mask)
    if data_parallel:
        run.batches = shard_checked(run.model, run.batches)
    existed = args.output_dir is not None and Path(args.output_dir).exists()
    output = _output_dir(args)
    summary = _new_summary(args, run)
    try:
        steps(run, inputs, output, summary)
    except BaseException:
        if output is not None and not existed and output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # a run that failed before writing anything leaves no empty directory behind
        raise
    _finish(args, output, summary, started)
    return 0


def _importance_and_masking(args, run, output, summary):
    analysis = _importance_step(args, run, output, summary)
    return _masking_step(args, run, output, summary, initial=analysis)


def run_importance(args) -> int:
    return _run_command(args, lambda run, inputs, output, summary: _importance_step(args, run, output, summary),
                        data_parallel=True)


def run_mask(args) -> int:
    return _run_command(args,
                        lambda run, inputs, output, summary: _importance_and_masking(args, run, output, summary),
                        data_parallel=True)


def run_prune(args) -> int:
    def steps(run, inputs, output, summary):
        if inputs.head_mask is not None:
            head_mask = inputs.head_mask
            summary["head_mask_file"] = args.head_mask
        else:
            head_mask = _importance_and_masking(args, run, output, summary).head_mask
        _pruning_step(args, run, head_mask, output, summary)

    return _run_command(args, steps)


def run_demo(args) -> int:
    from .data import demo_pairs
    from .loading import minilm_path

    model_path = args.model or minilm_path()
    _say(args, f"fastbertology demo: pretrained MiniLM ({model_path})\nTask: given the first sentence of a paragraph "
               f"of Python's own documentation, find the sentences that follow it among {args.group_size} "
               f"candidates (chance = {1 / args.group_size:.3f})")

    def steps(run, inputs, output, summary):
        _say(args, f"{run.examples} pairs, {len(run.batches)} batches, device {run.description['device']}, "
                   f"backend {run.model._fastbertology_state.backend}\n")
        result = _importance_and_masking(args, run, output, summary)
        _pruning_step(args, run, result.head_mask, output, summary)

    return _run_command(args, steps, examples=demo_pairs(args.pairs), model_path=model_path)


def _known_errors() -> tuple[type, ...]:
    """Exception types that mean bad input or an unusable environment (reported as one line, exit code 2), not a
    bug in fastbertology (those keep their traceback)."""
    known: list[type] = [OutputDirectoryError, ValueError, RuntimeError, OSError, ImportError]
    try:
        from safetensors import SafetensorError

        known.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(known)


def error_line(command: str, error: BaseException) -> str:
    """``fastbertology <command>: error: <message>`` on one line (multi-line messages are joined)."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)) and error.filename and \
            str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return f"fastbertology {command}: error: {message}"


def main(argv=None) -> int:
    from . import distributed
    from .loading import set_offline

    set_offline()  # fastbertology never needs the network
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options: hand them over untouched
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if distributed.env_world_size() > 1 and args.command not in ("importance", "mask", "sweep"):
            raise ValueError("only importance, mask and sweep run data-parallel under torchrun; run this command "
                             "as a single process")
        with distributed.session(device=getattr(args, "device", None)):
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"fastbertology {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _known_errors() as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

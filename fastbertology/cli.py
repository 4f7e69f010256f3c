"""Command line: ``fastbertology {demo,importance,mask,prune,sweep,bench}`` (also ``python -m fastbertology``).

argparse and file IO only; the work is done by the library modules. Options follow run_bertology.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from . import __version__
from .outputs import OutputDirectoryError, check_output_dir, prepare_output_dir, write_json, write_npy


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------
def _add_common(parser, *, data_required=True):
    parser.add_argument("--model", required=data_required, help="local model directory (or a hub name when online)")
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
    return "lm" if str(args.data).endswith(".txt") else "classification"


def setup(args, *, examples=None, model_path=None) -> Setup:
    """Load the model, read and batch the data, build the task, patch the model. File IO happens here."""
    from . import patch
    from .data import load_examples, make_batches, move_batch, read_glue
    from .loading import load_model, parse_dtype, resolve_device
    from .tasks import ClassificationTask, LanguageModelingTask, RetrievalTask, glue_task

    torch.manual_seed(args.seed)
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    objective = _objective(args)
    model_path = model_path or args.model
    if examples is None:
        if not os.path.exists(args.data):
            raise ValueError(f"--data {args.data} does not exist")
        if objective in ("classification", "regression") and args.task:
            examples = read_glue(args.data, task=args.task, data_subset=args.data_subset)
        elif objective != "lm":
            examples = load_examples(args.data, require_label=objective != "retrieval",
                                     require_pair=objective == "retrieval", data_subset=args.data_subset)
    kind = {"classification": "classification", "regression": "classification", "lm": "causal-lm",
            "retrieval": "encoder"}[objective]
    num_labels = None
    if objective == "classification":
        num_labels = len(examples.label_names) if getattr(examples, "label_names", None) else \
            max(int(e.label) for e in examples) + 1
    elif objective == "regression":
        num_labels = 1
    model, tokenizer = load_model(model_path, kind=kind, device=device, dtype=dtype, num_labels=num_labels)
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if objective == "lm":
        examples = load_examples(args.data, tokenizer=tokenizer, max_seq_length=min(args.max_seq_length, max_positions),
                                 require_label=False, data_subset=args.data_subset)
        task = LanguageModelingTask()
    elif objective == "retrieval":
        task = RetrievalTask(group_size=args.group_size)
    elif args.task:
        task = glue_task(args.task, num_labels=num_labels)
    else:
        task = ClassificationTask(metric=args.metric or "accuracy", num_labels=num_labels)
    if args.metric and objective == "classification" and args.task:
        task = ClassificationTask(metric=args.metric, num_labels=num_labels)
    if len(examples) == 0:
        raise ValueError("the data has no examples")
    batches = make_batches(examples, tokenizer, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                           pair_mode="separate" if objective == "retrieval" else "joint", max_positions=max_positions)
    batches = [move_batch(batch, device) for batch in batches]
    patch(model, backend=args.backend)
    description = {
        "model": str(model_path), "model_type": model.config.model_type, "objective": objective,
        "task": repr(task), "metric": getattr(task, "metric_name", "metric"), "examples": len(examples),
        "batches": len(batches), "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), "backend": args.backend,
    }
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

    temporary = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
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


def _run_command(args, steps, *, data_parallel: bool = False, examples=None, model_path=None) -> int:
    """Prepare the output directory, set up model, data and task, run ``steps(run, output, summary)``, write the
    summary. ``data_parallel``: under torchrun, each process takes its shard of the batches."""
    from .distributed import shard_checked

    started = time.perf_counter()
    _output_dir(args, create=False)  # fail fast, before the slow setup
    run = setup(args, examples=examples, model_path=model_path)
    if data_parallel:
        run.batches = shard_checked(run.model, run.batches)
    output = _output_dir(args)
    summary = _new_summary(args, run)
    steps(run, output, summary)
    _finish(args, output, summary, started)
    return 0


def _importance_and_masking(args, run, output, summary):
    analysis = _importance_step(args, run, output, summary)
    return _masking_step(args, run, output, summary, initial=analysis)


def run_importance(args) -> int:
    return _run_command(args, lambda run, output, summary: _importance_step(args, run, output, summary),
                        data_parallel=True)


def run_mask(args) -> int:
    return _run_command(args, lambda run, output, summary: _importance_and_masking(args, run, output, summary),
                        data_parallel=True)


def run_prune(args) -> int:
    import numpy as np

    def steps(run, output, summary):
        if args.head_mask:
            head_mask = np.load(args.head_mask, allow_pickle=False)
            summary["head_mask_file"] = args.head_mask
        else:
            head_mask = _importance_and_masking(args, run, output, summary).head_mask
        _pruning_step(args, run, head_mask, output, summary)

    return _run_command(args, steps)


def run_demo(args) -> int:
    from .data import demo_pairs
    from .loading import minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_path = args.model or minilm_path()
    _say(args, f"fastbertology demo: pretrained MiniLM ({model_path})\nTask: given the first sentence of a paragraph "
               f"of Python's own documentation, find the sentences that follow it among {args.group_size} "
               f"candidates (chance = {1 / args.group_size:.3f})")

    def steps(run, output, summary):
        _say(args, f"{run.examples} pairs, {len(run.batches)} batches, device {run.description['device']}, "
                   f"backend {run.model._fastbertology_state.backend}\n")
        result = _importance_and_masking(args, run, output, summary)
        _pruning_step(args, run, result.head_mask, output, summary)

    return _run_command(args, steps, examples=demo_pairs(args.pairs), model_path=model_path)


def main(argv=None) -> int:
    from . import distributed

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
    except (OutputDirectoryError, ValueError, RuntimeError, OSError) as error:
        print(f"fastbertology {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``fastbertology gates``: learn hard-concrete L0 head gates with frozen weights (:mod:`fastbertology.gates`).

Steps: the importance step of the other commands (``head_importance.npy``... and the unmasked metric), gate
learning, then the metric of the model under the learned deterministic mask and, for comparison, under the mask
that keeps the same number of heads ranked by importance (the top heads of the importance table, which is what the
report compares). Outputs (besides the importance step's): ``head_gates.npy`` ``[L, H]`` (open probabilities),
``head_mask.npy`` ``[L, H]`` (0/1, for ``prune --head-mask``), ``gates_curve.json``, ``gates_curve.png``,
``head_gates.png``, ``summary.json``, ``report.html``.
"""

from __future__ import annotations

import time

import torch

from . import plots
from .architectures import heads_per_layer, kv_heads_per_layer
from .commands import _run_command, importance_step
from .console import Console, format_table
from .gates import gate_mask, learn_gates
from .importance import evaluate_metric
from .outputs import write_json, write_npy
from .runs import subtitle


def check_gate_options(args) -> None:
    """The gate options before any work; ValueError naming the option."""
    if args.target_heads is not None and args.target_heads < 1:
        raise ValueError(f"--target-heads must be at least 1, got {args.target_heads}")
    if args.l0_penalty is not None and not args.l0_penalty >= 0:
        raise ValueError(f"--l0-penalty must be a non-negative number, got {args.l0_penalty}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    for name in ("learning_rate", "lagrangian_learning_rate"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _gate_count(run, args) -> int:
    """Gates of the model: heads, or key/value groups with ``--per-kv-group``."""
    counts = kv_heads_per_layer(run.model) if args.per_kv_group else heads_per_layer(run.model)
    return sum(counts)


def gates_step(args, console: Console, run, output, summary: dict, analysis) -> None:
    """Learn the gates; score the learned mask and the importance mask with as many heads; write the outputs."""
    if args.target_heads is not None and args.target_heads > _gate_count(run, args):
        what = "key/value groups" if args.per_kv_group else "heads"
        raise ValueError(f"--target-heads {args.target_heads} is more than the model's {_gate_count(run, args)} "
                         f"{what}")
    steps = args.epochs * len(run.batches) if args.epochs is not None else (args.steps or 300)
    result = learn_gates(run.model, run.batches, run.task, steps=steps, learning_rate=args.learning_rate,
                         l0_penalty=args.l0_penalty, target=args.target_heads,
                         lagrangian_learning_rate=args.lagrangian_learning_rate, per_kv_group=args.per_kv_group,
                         seed=args.seed, progress=console.progress)
    mask = result.head_mask
    kept = int(mask.sum())
    device = run.device
    started = time.perf_counter()
    gate_score = evaluate_metric(run.model, run.batches, run.task, head_mask=mask.to(device))
    importance_mask = gate_mask(analysis.importance, target=kept) if kept else torch.zeros_like(mask)
    importance_score = evaluate_metric(run.model, run.batches, run.task, head_mask=importance_mask.to(device))
    evaluation_seconds = time.perf_counter() - started
    metric = run.description["metric"]
    write_npy(output / "head_gates.npy", result.gates.numpy())
    write_npy(output / "head_mask.npy", mask.numpy())
    write_json(output / "gates_curve.json", {"curve": result.curve, "mode": result.mode, "target": result.target,
                                             "l0_penalty": result.l0_penalty})
    if plots.available():
        plots.heatmap(output / "head_gates.png", result.gates, title="Learned gate open probability P(z != 0)",
                      subtitle=subtitle(run.description), colorbar_label="probability")
        plots.gates_curve(output / "gates_curve.png", result.curve, target=result.target,
                          subtitle=subtitle(run.description))
    summary["gates"] = {
        "mode": result.mode, "target_heads": result.target, "l0_penalty": result.l0_penalty,
        "per_kv_group": result.per_kv_group, "steps": result.steps, "learning_rate": args.learning_rate,
        "seconds": result.seconds, "evaluation_seconds": evaluation_seconds,
        "gates": result.gates, "head_mask": mask, "log_alpha": result.log_alpha,
        "heads_kept": kept, "heads_total": mask.numel(), "metric": metric,
        "original_score": analysis.metric, "masked_score": gate_score, "curve": result.curve,
        "importance_mask": importance_mask, "importance_masked_score": importance_score,
        "heads_in_common": int((importance_mask * mask).sum()),
        "higher_is_better": bool(run.task.higher_is_better),
    }
    console.say(format_table(result.gates, title="\nLearned gates: open probability (rows = layers)"))
    console.say(format_table(mask.double(), title="\nGate mask (1 = kept)", digits=0))
    console.say(f"\n{metric}: all heads {analysis.metric:.4f}; gate mask ({kept} heads) {gate_score:.4f}; the "
                f"{kept} most important heads {importance_score:.4f} ({summary['gates']['heads_in_common']} heads in "
                f"common); {result.steps} steps in {result.seconds:.1f} s")


def run_gates(args, console: Console) -> int:
    check_gate_options(args)
    if args.epochs is not None and args.steps is not None:
        raise ValueError("--steps and --epochs exclude each other: give one")

    def steps(run, inputs, output, summary):
        analysis = importance_step(args, console, run, output, summary)
        gates_step(args, console, run, output, summary, analysis)

    return _run_command(args, console, steps)


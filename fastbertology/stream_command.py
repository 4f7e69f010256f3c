"""``fastbertology importance --stream``: language-modelling importance over a corpus read in pieces (a large
``.txt``, or the ``--text-field`` of a JSONL or Parquet file), checkpointed and resumable.

The corpus is never whole in memory (:mod:`fastbertology.data.stream_batches`); progress shows the share of the
file read, tokens per second and the time left. Every ``--checkpoint-every`` batches the accumulated sums and the
corpus position are written atomically to ``stream_checkpoint.json`` in ``--output-dir``
(:mod:`fastbertology.stream_checkpoint`); ``--resume`` continues from it, and the results are then the same bits
as those of a run that was never interrupted. The other outputs are those of ``importance`` (staged and moved into
place at the end, :mod:`fastbertology.run_directory`), the attention patterns taken from the corpus's first batch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import distributed, interrupts, patch
from .batching import make_batches, move_batch
from .commands import patterns_step, write_importance
from .console import Console, format_table
from .data import Example
from .data.stream_batches import STREAM_SUFFIXES, StreamPosition, fraction_read, open_tokens, stream_batches
from .distributed import model_fingerprint
from .kernels import resolve_backend
from .loading import parse_dtype, resolve_device, usable_positions
from .outputs import OutputDirectoryError, check_output_dir
from .run_directory import open_run_directory
from .run_setup import (
    Run,
    RunOptions,
    _check_backend,
    _check_heads,
    _check_numbers,
    _load_for_objective,
    device_name,
    model_label,
    resolve_model,
)
from .runs import default_output_dir, finish, new_summary
from .stream_checkpoint import (
    STREAM_CHECKPOINT,
    data_identity,
    read_stream_checkpoint,
    stop_after_checkpoints,
    write_stream_checkpoint,
)
from .streamed_importance import analyze_stream, decode_totals, encode_totals
from .task_selection import make_task

STOPPED_EXIT_CODE = 75


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_stream_options(args, options: RunOptions) -> str:
    """Every option of a streamed run, before any work; the model's local directory."""
    _require(not distributed.is_distributed(), "--stream runs as a single process; start it without torchrun")
    _require(options.task in (None, "lm"), f"--stream reads a language-modelling corpus: leave --task out or give "
                                           f"--task lm, not {options.task!r}")
    _require(options.metric is None, "--metric does not apply to language modelling (it reports perplexity)")
    _require(not args.head_types, "--head-types does not combine with --stream; run it on a sample without --stream")
    _require(args.checkpoint_every >= 1, f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    _require(not args.resume or args.output_dir, "--resume needs --output-dir: the directory of the interrupted run")
    _require(options.max_seq_length >= 2, "--max-seq-length must be at least 2 for language modelling (a block holds "
                                          f"at least one next-token prediction), got {options.max_seq_length}")
    options.data = os.path.expanduser(str(options.data))
    _check_numbers(options)
    parse_dtype(options.dtype)
    _check_backend(options.backend, resolve_device(options.device))
    path = Path(options.data)
    _require(path.is_file(), f"--data {options.data} does not exist or is not a file; --stream reads one "
                             f"{', '.join(STREAM_SUFFIXES)} file")
    _require(path.suffix.lower() in STREAM_SUFFIXES, f"--data {options.data}: --stream reads "
                                                     f"{', '.join(STREAM_SUFFIXES)} files, not "
                                                     f"{path.suffix or '(no suffix)'!r}")
    return resolve_model(options.model)


def _check_output(args):
    """Without ``--resume`` a directory holding a checkpoint needs ``--overwrite``; with it, a non-empty directory
    without one is refused unless ``--overwrite``."""
    def check(path: Path) -> None:
        has_checkpoint = (path / STREAM_CHECKPOINT).is_file()
        if args.resume and has_checkpoint:
            return
        if has_checkpoint and not args.overwrite:
            raise OutputDirectoryError(f"output directory {path} holds a stream checkpoint ({STREAM_CHECKPOINT}): pass "
                                       "--resume to continue that run, or --overwrite to start over")
        check_output_dir(path, overwrite=args.overwrite)
    return check


def _setup(options: RunOptions, model_path: str) -> tuple[Run, int]:
    """Model, tokenizer and task (no data read), patched; and the block length."""
    device, dtype = resolve_device(options.device), parse_dtype(options.dtype)
    model, tokenizer, report, _ = _load_for_objective(options, "lm", model_path, None, device, dtype)
    _check_heads(model, report.path)
    positions = usable_positions(model.config)
    block = min(options.max_seq_length, positions) if positions else options.max_seq_length
    task = make_task("lm", task_name=None, metric=None, group_size=options.group_size,
                     num_labels=model.config.num_labels)
    handle = patch(model, backend=options.backend)
    name = options.data_label or Path(options.data).name
    kind = ("the whole file tokenized as one stream (line breaks are tokens too)" if options.data.endswith(".txt")
            else "every document's text tokenized and joined with the end-of-sequence token")
    description = {
        "model": str(options.model), "model_dir": report.path,
        "model_label": options.model_label or model_label(options.model, report.path),
        "model_type": model.config.model_type, "objective": "lm", "task_name": "lm", "task": repr(task),
        "metric": task.metric_name, "labels": None, "examples": "streamed", "batches": "streamed",
        "data": f"{name}, streamed: {kind}, cut into consecutive blocks of up to {block} tokens; each block is one "
                "example, and perplexity is exp of the mean next-token loss over every predicted token",
        "batch_size": options.batch_size, "max_seq_length": options.max_seq_length, "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "backend": options.backend,
        "attention": f"{resolve_backend(handle.backend, device)} backend, padding-free (layers run on the real "
                     "tokens only)", "random_head": report.random_head, "warnings": [],
    }
    return Run(model, tokenizer, task, [], 0, device, description), block


def _collate(run: Run, options: RunOptions):
    positions = usable_positions(run.model.config)

    def collate(blocks: list[list[int]]) -> dict:
        (batch,) = make_batches([Example(text=None, input_ids=block) for block in blocks], run.tokenizer,
                                max_seq_length=options.max_seq_length, batch_size=len(blocks), max_positions=positions)
        return move_batch(batch, run.device)
    return collate


def _fingerprint(args, options: RunOptions, run: Run) -> dict:
    return {"model": model_fingerprint(run.model)["checksum"], "data": data_identity(options.data),
            "data_path": str(Path(options.data).resolve()), "text_field": args.text_field,
            "max_seq_length": options.max_seq_length, "batch_size": options.batch_size,
            "data_subset": options.data_subset or 0, "importance": args.importance, "dtype": options.dtype,
            "backend": options.backend, "device": run.device.type, "checkpoint_every": args.checkpoint_every}


def run_streamed_importance(args, console: Console) -> int:
    started = time.perf_counter()
    options = RunOptions.pick(vars(args))
    model_path = check_stream_options(args, options)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.command)
    with open_run_directory(args.output_dir, _check_output(args)) as output:
        interrupts.stage("setup")
        run, block = _setup(options, model_path)
        description = run.description
        console.say(f"Data: {description['data']}")
        console.say(f"Model: {description['model_label']} ({description['model_type']}), task lm, metric perplexity; "
                    f"batches of {options.batch_size} blocks; {description['device']}, {description['dtype']}, "
                    f"{description['attention']}\n")
        fingerprint = _fingerprint(args, options, run)
        checkpoint = output.live(STREAM_CHECKPOINT)
        resume, start = None, StreamPosition()
        if args.resume and checkpoint.is_file():
            payload = read_stream_checkpoint(checkpoint, fingerprint)
            try:
                resume = decode_totals(payload["totals"], model=run.model, task=run.task)
                start = StreamPosition.from_dict(payload["position"])
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"the stream checkpoint {checkpoint} is inconsistent ({error}), so it cannot be "
                                 "resumed. Start over with --overwrite (without --resume)") from None
            console.say(f"Resuming after {resume['batches']} batches ({start.blocks} blocks) from {checkpoint}")
        summary = new_summary(args.command, vars(args), run.description)
        analysis, seconds = _analyse(args, console, options, run, block, fingerprint, checkpoint, resume, start)
        interrupts.stage("results")
        _write(console, run, analysis, output, summary, seconds, resumed=0 if resume is None else resume["batches"])
        first = next(iter(stream_batches(open_tokens(options.data, run.tokenizer, text_field=args.text_field),
                                         _collate(run, options), block=block, batch_size=options.batch_size)))
        patterns_step(Run(run.model, run.tokenizer, run.task, [first[0]], 0, run.device, run.description),
                      analysis.importance, output, summary)
        interrupts.stage("finish")
        finish(console, output, summary, started)
    return 0


def _analyse(args, console, options, run, block, fingerprint, checkpoint, resume, start):
    """The streamed pass with progress and checkpoints; ``(analysis, seconds)``."""
    source = open_tokens(options.data, run.tokenizer, text_field=args.text_field, start=start.source)
    batches = stream_batches(source, _collate(run, options), block=block, batch_size=options.batch_size,
                             max_blocks=options.data_subset, start=start)
    unit = "rows" if Path(options.data).suffix.lower() == ".parquet" else "B"
    bar = tqdm(total=source.size, unit=unit, unit_scale=True, desc="importance (streamed)",
               disable=not console.progress, initial=int(fraction_read(source, start.source) * source.size))
    counted = {"tokens": 0, "written": 0}
    began = time.perf_counter()
    stop_after = stop_after_checkpoints()

    def on_batch(batch, position):
        counted["tokens"] += int(batch["attention_mask"].sum())
        rate = counted["tokens"] / max(time.perf_counter() - began, 1e-9)
        bar.update(int(fraction_read(source, position.source) * source.size) - bar.n)
        bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)

    def on_snapshot(totals, position):
        write_stream_checkpoint(checkpoint, fingerprint, encode_totals(totals), position.to_dict())
        counted["written"] += 1
        if stop_after and counted["written"] >= stop_after and not position.done:
            os._exit(STOPPED_EXIT_CODE)

    try:
        analysis = analyze_stream(run.model, batches, run.task, resume=resume, every=args.checkpoint_every,
                                  on_snapshot=on_snapshot, on_batch=on_batch, importance=args.importance,
                                  normalize_by_layer=not args.dont_normalize_importance_by_layer,
                                  normalize_global=not args.dont_normalize_global_importance)
    finally:
        bar.close()
    seconds = time.perf_counter() - began
    console.say(f"Streamed {counted['tokens']:,} tokens in {seconds:.1f} s "
                f"({counted['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)")
    return analysis, seconds


def _write(console, run, analysis, output, summary, seconds, *, resumed: int) -> None:
    write_importance(console, run, analysis, output, summary, seconds=seconds,
                     mode=summary["options"].get("importance"))
    summary["importance"].update(streamed=True, resumed_after_batches=resumed)
    console.say(format_table(analysis.importance, title="Head importance (normalised; rows = layers)"))
    console.say(format_table(analysis.entropy, title="\nAttention entropy (nats per token)"))
    console.say(f"\n{run.description['metric']} = {analysis.metric:.4f} on {analysis.examples} blocks "
                f"({analysis.tokens:,} tokens)")

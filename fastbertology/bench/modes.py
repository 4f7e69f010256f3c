"""The benchmark's modes: each prepares a copy of the workload's model and returns what to time.

``reference``
    the transformers 4.x / run_bertology loop (:mod:`fastbertology.bench.reference`): eager attention with the head
    mask, maps captured for the entropy, every parameter requiring grad so that ``loss.backward()`` also computes
    weight gradients (dropped at the start of each timed pass). Masking cases run ``mask_heads``; sweep cases the
    naive eager loop, one pass per single-head mask, no gradients.
``sdpa-forward``
    the stock model with ``attn_implementation="sdpa"``, frozen, ``task.forward`` of every batch under
    ``torch.no_grad()``: no analysis, no backward, no loss — the floor an analysis is compared with.
``sdpa-frozen``
    the same model, forward + task loss + activation backward per batch (the input-embedding output is made a leaf
    that requires grad); no head mask, no statistics, no metric.
``fastbertology``
    :func:`~fastbertology.importance.analyze_heads` (importance + entropy + max probability + metric in one pass)
    on the patched model (``backend="auto"``: Triton on CUDA, PyTorch on CPU), padding-free (the default), with the
    layer checkpointing and loss chunk of the memory plan (:mod:`fastbertology.memory_plan`) for the device's memory;
    masking cases run :func:`~fastbertology.masking.iterative_masking`, sweep cases
    :func:`~fastbertology.sweeps.ablation_sweep` (batched masks, prefix reuse; the case's ablation kind, whose
    reference is the hook loop of :mod:`fastbertology.bench.ablation_reference`), head-type cases
    :func:`~fastbertology.head_types.head_type_scores` (no gradients; the reference: the eager maps of
    :mod:`fastbertology.bench.head_types_reference`), patching cases
    :func:`~fastbertology.activation_patching.activation_patching` (heads batched per pass).
``fastbertology-eager``
    the same with ``cuda_graphs="off"``: every step eager, the A/B of CUDA-graph replay (``fastbertology`` replays
    where it can: see :mod:`fastbertology.step_graphs`). Without CUDA the two are one mode, and this row is skipped.
``fastbertology-padded``
    the same with ``patch(model, padding_free=False)``: every padding token computed, to show what padding-free
    buys (and so no graph replay: buckets pack the real tokens).

Patching cases pair every batch with a corrupted copy of its inputs (:func:`corrupted_pairs`). Every mode runs on
the same batches; ``warmup`` is one untimed pass (masking: one importance pass; sweep: the
unmasked baseline pass or a layer sweep of one batch).
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from .. import patch
from ..activation_patching import activation_patching
from ..architectures import heads_per_layer
from ..gates import learn_gates
from ..head_types import head_type_scores
from ..importance import HeadAnalysis, analyze_heads
from ..kernels import resolve_backend
from ..loading import DTYPES
from ..masking import iterative_masking
from ..memory_plan import current_memory, device_memory, plan_memory
from ..sweeps import SweepResult, ablation_sweep, single_head_masks
from ..tasks.language_modeling import chunkable_vocabulary
from .ablation_reference import reference_ablation_sweep
from .cases import BenchCase
from .head_types_reference import reference_head_types
from .reference import reference_analysis, reference_masking, reference_patching, reference_sweep
from .workloads import Workload

# head-type cases: the induction sequences (2 x 8 tokens fit every workload's positions)
HEAD_TYPE_OPTIONS = {"induction_period": 8, "induction_count": 32, "seed": 0}
GATE_STEPS = 40  # gate-learning steps of a gates case (batches, cycled); the target: half the heads


def _gates_run(model, batches, task) -> Callable[[], ModeResult]:
    """A gates case's timed unit on a patched ``model``: :func:`~fastbertology.gates.learn_gates` with frozen
    weights for :data:`GATE_STEPS` steps towards half the heads."""
    counts = heads_per_layer(model)
    target = max(1, len(counts) * counts[0] // 2)

    def run():
        result = learn_gates(model, batches, task, steps=GATE_STEPS, target=target)
        return ModeResult(passes=GATE_STEPS, gates=result.gates)  # passes: steps (one batch each)
    return run


@dataclass
class ModeResult:
    """What one timed run produced: ``passes`` over the data, and what the mode computes (for comparisons)."""

    passes: int
    analysis: HeadAnalysis | None = None
    mask: torch.Tensor | None = None  # masking: the kept head mask [L, H]
    sweep: SweepResult | None = None
    metric: float | None = None
    head_types: dict[str, torch.Tensor] | None = None  # head-type cases: score -> [L, H]
    patching: torch.Tensor | None = None  # patching: the mean batch loss per patched head [L, H]
    gates: torch.Tensor | None = None  # gates: every head's gate open probability [L, H]
    cuda_graphs: dict | None = None  # analysis and masking: how the steps ran (GraphUse.as_dict())


@dataclass
class PreparedMode:
    """One mode of one case, ready to time: ``run()`` is the timed unit, ``warmup()`` an untimed pass, ``close()``
    undoes patches and hooks and frees the model. ``backend``: the attention that runs."""

    run: Callable[[], ModeResult]
    warmup: Callable[[], object]
    backend: str
    padding_free: bool | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)
    model: torch.nn.Module | None = None

    def close(self) -> None:
        while self.undo:
            self.undo.pop()()
        if self.model is not None:
            device = next(self.model.parameters()).device
            self.model.to("meta")  # frees the parameters now, even while a closure still holds the module
            self.model = None
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()


def _analysis_result(analysis: HeadAnalysis) -> ModeResult:
    return ModeResult(passes=1, analysis=analysis, metric=analysis.metric, cuda_graphs=analysis.cuda_graphs)


def corrupted_pairs(model, batches: list[dict]) -> list[dict]:
    """Every batch with ``corrupted_input_ids``: each real token id t replaced by ``(7 t + 13) mod (V - 2) + 1``
    (V: the vocabulary size), padding untouched, so lengths and padding are the clean batch's."""
    vocab = model.config.vocab_size
    return [{**batch, "corrupted_input_ids": torch.where(batch["attention_mask"].bool(),
                                                          (batch["input_ids"] * 7 + 13) % (vocab - 2) + 1,
                                                          batch["input_ids"])} for batch in batches]


def _passes_per_patching(model) -> int:
    counts = heads_per_layer(model)
    return len(counts) * counts[0] + 2  # every head, the clean and the corrupted run


def _reference(case: BenchCase, model, workload: Workload, *, importance: str, **_) -> PreparedMode:
    batches, task = workload.batches, workload.task
    if case.kind == "head-types":
        model.requires_grad_(False)

        def run():
            return ModeResult(passes=1, head_types=reference_head_types(model, batches, **HEAD_TYPE_OPTIONS))
        return PreparedMode(run, lambda: reference_head_types(model, batches[:1], **HEAD_TYPE_OPTIONS), "eager")
    if case.kind == "gates":  # the eager way: the same training on explicit attention that stores every map
        handle = patch(model, backend="reference", padding_free=False)
        run = _gates_run(model, batches, task)
        return PreparedMode(run, lambda: learn_gates(model, batches[:1], task, steps=1, target=1), "eager",
                            undo=[handle.remove])
    if case.kind == "patching":
        model.requires_grad_(False)
        paired = corrupted_pairs(model, batches)

        def run():
            losses, _, corrupted = reference_patching(model, paired, task)
            return ModeResult(passes=_passes_per_patching(model), patching=losses, metric=corrupted)
        return PreparedMode(run, lambda: reference_patching(model, paired[:1], task), "eager")
    if case.kind == "sweep":
        model.requires_grad_(False)
        counts = heads_per_layer(model)
        masks = single_head_masks(len(counts), counts[0])
        if case.ablation != "zero":
            sweep_with = partial(reference_ablation_sweep, model, batches, task, ablation=case.ablation)

            def run():
                sweep = sweep_with(masks)
                return ModeResult(passes=len(masks) + 1, sweep=sweep, metric=sweep.baseline_score)
            return PreparedMode(run, lambda: sweep_with(masks[:1]), "eager")

        def run():
            sweep = reference_sweep(model, batches, task, masks)
            return ModeResult(passes=len(masks) + 1, sweep=sweep, metric=sweep.baseline_score)
        return PreparedMode(run, lambda: reference_sweep(model, batches, task, masks[:0]), "eager")

    model.requires_grad_(True)

    def analysis_pass(**options):
        model.zero_grad(set_to_none=True)  # every timed pass allocates its weight gradients, as the script's first
        return reference_analysis(model, batches, task, importance=importance, **options)

    if case.kind == "masking":
        def run():
            model.zero_grad(set_to_none=True)
            mask, curve = reference_masking(model, batches, task, masking_amount=case.masking_amount,
                                            masking_threshold=case.masking_threshold, importance=importance)
            return ModeResult(passes=len(curve), mask=mask, metric=curve[-1]["score"])
        return PreparedMode(run, partial(analysis_pass, entropy=False), "eager")
    return PreparedMode(lambda: _analysis_result(analysis_pass()), analysis_pass, "eager")


def _sdpa_forward(case: BenchCase, model, workload: Workload, **_) -> PreparedMode:
    model.set_attn_implementation("sdpa")
    model.requires_grad_(False)

    def run():
        with torch.no_grad():
            for batch in workload.batches:
                workload.task.forward(model, batch)
        return ModeResult(passes=1)
    return PreparedMode(run, run, "sdpa")


def _sdpa_frozen(case: BenchCase, model, workload: Workload, **_) -> PreparedMode:
    model.set_attn_implementation("sdpa")
    model.requires_grad_(False)
    # the input embeddings' output [B, N, D] becomes a leaf that requires grad: the activation backward runs
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True))

    def run():
        for batch in workload.batches:
            workload.task.evaluate(model, batch).loss.backward()
        return ModeResult(passes=1)
    return PreparedMode(run, run, "sdpa", undo=[hook.remove])


def _fastbertology(case: BenchCase, model, workload: Workload, *, importance: str, backend: str,
                   padding_free: bool, cuda_graphs: str = "auto") -> PreparedMode:
    handle = patch(model, backend=backend, padding_free=padding_free)
    resolved = resolve_backend(backend, next(model.parameters()).device)
    batches, task = workload.batches, workload.task
    prepared = partial(PreparedMode, backend=resolved, padding_free=padding_free, undo=[handle.remove])
    if case.kind == "head-types":
        model.requires_grad_(False)

        def run():
            return ModeResult(passes=1, head_types=head_type_scores(model, batches, **HEAD_TYPE_OPTIONS).tables())
        return prepared(run, lambda: head_type_scores(model, batches[:1], **HEAD_TYPE_OPTIONS))
    if case.kind == "gates":
        return prepared(_gates_run(model, batches, task), lambda: learn_gates(model, batches[:1], task, steps=1,
                                                                               target=1))
    if case.kind == "patching":
        paired = corrupted_pairs(model, batches)

        def run():
            result = activation_patching(model, paired, task)
            return ModeResult(passes=_passes_per_patching(model), patching=result.values, metric=result.corrupted_loss)
        return prepared(run, lambda: activation_patching(model, paired[:1], task))
    if case.kind == "sweep":
        def run():
            sweep = ablation_sweep(model, batches, task, kind="heads", ablation=case.ablation)
            return ModeResult(passes=len(sweep.scores) + 1, sweep=sweep, metric=sweep.baseline_score)
        return prepared(run, lambda: ablation_sweep(model, batches[:1], task, kind="layers"))

    if case.kind == "analysis":  # the memory plan of the command line, within the device's memory
        task, checkpoint_layers = planned_task(model, batches, task)
    else:
        checkpoint_layers = False

    def analysis_pass():
        return analyze_heads(model, batches, task, importance=importance, cuda_graphs=cuda_graphs,
                             checkpoint_layers=checkpoint_layers)

    if case.kind == "masking":
        def run():
            result = iterative_masking(model, batches, task, masking_amount=case.masking_amount,
                                       masking_threshold=case.masking_threshold, importance=importance,
                                       cuda_graphs=cuda_graphs)
            return ModeResult(passes=len(result.curve), mask=result.head_mask, metric=result.curve[-1]["score"],
                              cuda_graphs=result.cuda_graphs)
        return prepared(run, analysis_pass)
    return prepared(lambda: _analysis_result(analysis_pass()), analysis_pass)


def planned_task(model, batches, task):
    """``(task, checkpoint_layers)`` as the memory plan sets them within the device's memory (a copy of ``task``
    with the plan's language-model loss chunk; the other modes keep the workload's task)."""
    device = next(model.parameters()).device
    vocabulary = chunkable_vocabulary(task, model)
    plan = plan_memory(model, batches, vocabulary=vocabulary, device=device, budget=device_memory(device),
                       budget_source="device memory", in_use=current_memory(device))
    if vocabulary is not None:
        task = copy.copy(task)
        task.loss_chunk_tokens = plan.loss_chunk_tokens
    return task, plan.checkpointing


PREPARERS = {
    "reference": _reference,
    "sdpa-forward": _sdpa_forward,
    "sdpa-frozen": _sdpa_frozen,
    "fastbertology": partial(_fastbertology, padding_free=True),
    "fastbertology-eager": partial(_fastbertology, padding_free=True, cuda_graphs="off"),
    "fastbertology-padded": partial(_fastbertology, padding_free=False),
}


def prepare_mode(case: BenchCase, mode: str, workload: Workload, device, *, backend: str = "auto",
                 importance: str = "per_batch") -> PreparedMode:
    """Copy ``workload.model`` to ``device`` in the mode's dtype, configure it for ``mode`` (see the module
    docstring) and return what to time. ``backend``: fastbertology's attention backend; ``importance``:
    ``"per_batch"`` (run_bertology) or ``"per_example"``, for the reference and fastbertology alike."""
    if mode not in case.modes:
        raise ValueError(f"case {case.name} has modes {', '.join(case.modes)}, not {mode!r}")
    model = copy.deepcopy(workload.model).to(device=torch.device(device), dtype=DTYPES[case.mode_dtype(mode)]).eval()
    prepared = PREPARERS[mode](case, model, workload, importance=importance, backend=backend)
    prepared.model = model
    return prepared

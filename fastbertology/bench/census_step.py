"""The host census of one importance batch: what :func:`~fastbertology.importance.analyze_heads` asks of the GPU.

:func:`census_importance` runs ``analyze_heads`` (``importance="per_batch"``, run_bertology's mode) over two
batches of a random-init model patched with ``backend="triton"`` (padding-free, as the real run) under
:class:`~fastbertology.bench.census.Census`: the first, a small warm-up batch, is not counted (first-call caches),
the second is *the step* (the loop body for one batch: the model call with the patch, the mask gradient, the
accumulators, the metric, the loss read), and what ``analyze_heads`` does after its loop is *the pass end*.
Whatever code the tree holds is what gets counted.

:func:`host_time` measures the thread time of the same step without the census (the Triton launches still only
recorded, ``TRITON_INTERPRET=1`` set for the duration so that the Triton backend takes CPU tensors), on a *host
twin*: the same layers, heads and sequence lengths with a head dim of 2, a small vocabulary and at most
``TWIN_BATCH`` examples, so that the CPU arithmetic is small next to the host work (the census shows the host work
does not depend on the batch's size). The model's own share comes from the stock twin, frozen, with the activation
backward (as the benchmark's ``sdpa-frozen``) but an attention function that does no work (``out = q``: on the CPU
a real attention would be arithmetic, where the patched twin's Triton kernels are not run). Indicative only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator

import torch
from transformers import AttentionInterface

from .. import patch
from ..architectures import transformer_layers
from ..batching import move_batch, padded_batches
from ..importance import analyze_heads
from .census import PRETEND, REGIONS, Census, Event, Tally, _triton_recorders, count_triton_launches, tally
from .workloads import ModelSize, SyntheticWorkload, build_model, synthetic_examples

WARMUP_EXAMPLES = 2
TWIN_BATCH = 2


def census_batches(size: ModelSize, batch: int, seq: int) -> tuple[dict, dict]:
    """``(warm-up batch, counted batch)`` on the CPU: ``batch`` synthetic examples (lengths uniform in
    ``[seq/4, seq]``, as the benchmark) and the first examples of it as the warm-up."""
    examples = synthetic_examples(size, batch, seq)
    (counted,) = padded_batches(examples, batch)
    warm = {key: value[:WARMUP_EXAMPLES] for key, value in counted.items()}
    return warm, counted


@contextlib.contextmanager
def _model_hooks(census: Census, model: torch.nn.Module) -> Iterator[None]:
    """Tell ``census`` when a module of ``model`` runs (whatever module a task calls: the model, its base model,
    a head) and which transformer layer runs."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    own = {id(module) for module in model.modules()}

    def enter(module, *_):
        if id(module) in own:
            census.enter_model()

    def leave(module, *_):
        if id(module) in own:
            census.exit_model()

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    for index, layer in enumerate(dict.fromkeys(transformer_layers(model))):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=index: census.enter_layer(i), prepend=True))
        handles.append(layer.register_forward_hook(lambda *_: census.exit_layer(), always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_step(model: torch.nn.Module, warm: dict, batch: dict, task, *, cuda_graphs: str = "off") -> list[Event]:
    """Events of one ``analyze_heads`` step over ``batch`` (phase ``"step"``) and of the pass end (``"pass_end"``)
    of a model patched with the Triton backend, after the uncounted ``warm`` batch. ``model`` and the batches are on
    the CPU; under the census the model's tensors are the device's and the batches go there by ``move_batch``.
    ``cuda_graphs``: handed to ``analyze_heads`` (``"off"``: the eager step)."""
    census = Census()

    def batches():
        yield warm
        census.counting = "step"
        yield batch
        census.counting = "pass_end"

    handle = patch(model, backend="triton")
    try:
        with census, _model_hooks(census, model):
            census.track([*model.parameters(), *model.buffers()])
            # the batches reach the device as the benchmark's do (not counted: the step starts on the device)
            warm, batch = move_batch(warm, PRETEND), move_batch(batch, PRETEND)
            try:
                analyze_heads(model, batches(), task, importance="per_batch", cuda_graphs=cuda_graphs)
            except ValueError:
                # the recorded launches compute nothing: the pass end may find non-finite values (the loss, the
                # importance table) and refuse them; the step itself must run through
                if census.counting != "pass_end":
                    raise
    finally:
        census.counting = None
        handle.remove()
    return census.events


def _divided(total: Tally, by: int) -> dict:
    return {key: round(value / by, 2) for key, value in total.as_dict().items()}


def summarize(events: list[Event], layers: int) -> dict:
    """Counts of :func:`count_step`'s events: per batch by region, per layer (the batch's total / ``layers``),
    layer 0 and the mean of the other layers (ops inside the layers only), the pass end, and every sync."""
    step = [e for e in events if e.phase == "step"]
    by_region = {region: [e for e in step if e.region == region] for region in REGIONS}
    in_layer = {index: [e for e in step if e.layer == index] for index in range(layers)}
    later = [e for index in range(1, layers) for e in in_layer[index]]
    summary = {
        "per_batch": {**{r: tally(v).as_dict() for r, v in by_region.items()}, "total": tally(step).as_dict()},
        "per_layer": {**{r: _divided(tally(v), layers) for r, v in by_region.items()},
                      "total": _divided(tally(step), layers)},
        "layer_0": {**{r: tally(e for e in in_layer[0] if e.region == r).as_dict() for r in REGIONS},
                    "total": tally(in_layer[0]).as_dict()},
        "layer_1_on": {**{r: _divided(tally(e for e in later if e.region == r), max(layers - 1, 1))
                          for r in REGIONS}, "total": _divided(tally(later), max(layers - 1, 1))},
        "outside_layers": tally(e for e in step if e.layer is None).as_dict(),
        "pass_end": tally(e for e in events if e.phase == "pass_end").as_dict(),
        "triton_launches": dict(count_triton_launches(step)),
        "syncs": [{"phase": e.phase, "region": e.region, "layer": e.layer, "what": e.name, "where": e.location}
                  for e in events if e.sync],
    }
    return summary


def census_importance(size: ModelSize, batch: int, seq: int) -> dict:
    """The census of one importance batch of a random-init ``size`` model (see the module docstring)."""
    warm, counted = census_batches(size, batch, seq)
    model = build_model(size)
    task = SyntheticWorkload(size, batch, seq).task()
    events = count_step(model, warm, counted, task)
    return {"model": size.describe(), "batch": batch, "seq": seq, "layers": size.layers,
            "tokens": int(counted["attention_mask"].sum()), **summarize(events, size.layers)}


def host_twin(size: ModelSize) -> ModelSize:
    """``size`` with head dim 2, a 4x MLP and at most 1024 tokens of vocabulary (see the module docstring)."""
    hidden = 2 * size.heads
    return dataclasses.replace(size, hidden=hidden, intermediate=4 * hidden, vocab=min(size.vocab, 1024))


def _timed_steps(run_step, warm: dict, batch: dict, repeats: int) -> float:
    """Minimum thread time (s) of ``run_step(batches)``'s loop body over ``repeats`` batches, after ``warm``."""
    times = []

    def batches():
        yield warm
        for _ in range(repeats):
            start = time.thread_time()
            yield batch
            times.append(time.thread_time() - start)

    try:
        run_step(batches())
    except ValueError:
        # the recorded launches compute nothing: the pass end may refuse the non-finite loss or importance it finds;
        # the timed steps ran through
        if len(times) < repeats:
            raise
    return min(times)


@contextlib.contextmanager
def _triton_on_cpu() -> Iterator[None]:
    """Triton launches recorded (not run) and CPU tensors accepted by the Triton backend (TRITON_INTERPRET=1)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with _triton_recorders(Census()):
            yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


NOOP_ATTENTION = "fastbertology_census_noop"


def _noop_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that does no work: ``query [B, H, N, D]`` as the output ``[B, N, H, D]``."""
    return query.transpose(1, 2), None


def host_time(size: ModelSize, batch: int, seq: int, *, repeats: int = 5) -> dict:
    """Host µs per layer of one importance step (patched, Triton backend) and of the stock frozen step with a no-op
    attention, on :func:`host_twin` of ``size`` (thread time, minimum over ``repeats``; indicative only)."""
    twin, batch = host_twin(size), min(batch, TWIN_BATCH)
    warm, counted = census_batches(twin, batch, seq)
    task = SyntheticWorkload(twin, batch, seq).task()
    model = build_model(twin)
    handle = patch(model, backend="triton")
    try:
        with _triton_on_cpu():
            patched = _timed_steps(lambda b: analyze_heads(model, b, task, cuda_graphs="off"), warm, counted, repeats)
    finally:
        handle.remove()
    stock = build_model(twin)
    AttentionInterface.register(NOOP_ATTENTION, _noop_attention)
    stock.set_attn_implementation(NOOP_ATTENTION)
    stock.requires_grad_(False)
    hook = stock.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True))

    def stock_steps(batches):
        for item in batches:
            task.evaluate(stock, item).loss.backward()
    try:
        stock_time = _timed_steps(stock_steps, warm, counted, repeats)
    finally:
        hook.remove()
    per_layer = 1e6 / size.layers
    return {"twin": f"{twin.describe()}, batch {batch}", "repeats": repeats,
            "patched_us": round(patched * per_layer, 1),
            "stock_noop_us": round(stock_time * per_layer, 1),
            "difference_us": round((patched - stock_time) * per_layer, 1)}

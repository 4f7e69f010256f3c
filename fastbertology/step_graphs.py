"""CUDA-graph replay of analysis steps: one step's launches (the patched forward, the mask gradient, the
accumulators, the metric) captured once per bucket of batches and replayed for every batch of that bucket.

An analysis hands :class:`StepRunner` a *step body* ``body(batch) -> loss`` (0-d tensor) that accumulates
everything it computes **in place** into tensors made before the step (importance, statistics, metric state).
For a batch whose bucket (:mod:`fastbertology.buckets`) it has not seen, the runner copies the batch into static
buffers of the bucket's shapes, runs the body eagerly (the batch's real step, which also compiles every kernel),
captures the body into a graph, replays it once on the same batch from the state the eager step started from to
check that it ends where the eager step ended, and from then on fills the static buffers and replays. A batch
that cannot be bucketed (not right-padded, no mask known on the host) runs eagerly, as does every batch after
graphs were turned off.

Graphs are turned off (:class:`GraphUse` says why; the analyses carry it to the output and ``summary.json``):
``--cuda-graphs off``; no CUDA device; a backend other than Triton; attention hooks (ablation, activation patching);
a task that does not declare its step capturable (``cuda_graph_refusal``: None); a model whose layers do not run
padding-free; a capture that fails (e.g. a host read in the model); a body that replaces an accumulator instead of
updating it; a replay that does not reproduce the eager step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import kernels
from .buckets import Bucket, BucketPlan, plan_bucket
from .packing import PackedBatch, attach_plan, known_lengths

CUDA_GRAPH_MODES = ("auto", "off")
_FILL = {"attention_mask": 0, "labels": -100}  # per-token entries' value at the bucket's extra positions (else 0)


@dataclass
class GraphUse:
    """Whether the steps of a pass replayed CUDA graphs, and why not where they did not."""

    mode: str
    enabled: bool
    reason: str | None = None  # why graphs are off (or were turned off during the pass)
    captured: int = 0  # graphs captured in this pass
    replays: int = 0  # steps replayed
    eager_steps: int = 0  # steps run eagerly (warm-ups of new buckets included)
    buckets: list = field(default_factory=list)  # [B, N_b, T_b] of the graphs the pass used

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def turn_off(self, reason: str) -> None:
        self.enabled, self.reason = False, reason


def graph_refusal(model: torch.nn.Module, task, mode: str, device: torch.device) -> str | None:
    """Why the steps of ``task`` on the patched ``model`` cannot replay graphs under ``--cuda-graphs mode``, or
    None when they can."""
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPH_MODES}, got {mode!r}")
    if mode == "off":
        return "turned off (--cuda-graphs off)"
    if device.type != "cuda":
        return f"no CUDA device (the model is on {device.type}): CUDA graphs need one"
    state = model._fastbertology_state
    backend = kernels.resolve_backend(state.backend, device)
    if backend != "triton":
        return f"the {backend!r} attention backend runs eagerly (graphs are captured around the Triton kernels)"
    return _model_and_task_refusal(state, task)


def _model_and_task_refusal(state, task) -> str | None:
    if not state.padding_free:
        return "the model is patched with padding_free=False (graph buckets pack the real tokens)"
    if state.attention_hooks:
        return "attention hooks (ablation, activation patching) are installed: their steps run eagerly"
    stacks = state.entry.stacks
    if len(stacks) != 1 or stacks[0].padding_argument != "attention_mask":
        return f"{state.entry.name}: only models with one stack of layers packed from attention_mask replay graphs"
    refusal = getattr(task, "cuda_graph_refusal", "this task does not declare its step capturable "
                                                   "(cuda_graph_refusal = None)")
    if refusal is not None:
        return f"{getattr(task, 'name', type(task).__name__)}: {refusal}"
    return None


class StaticBatch:
    """The device buffers of one bucket: the batch's tensors widened to ``N_b`` and the packing plan's tensors,
    refilled for every batch of the bucket (copies only: the captured graph reads these addresses)."""

    def __init__(self, batch: dict, plan: BucketPlan, device: torch.device):
        bucket = plan.bucket
        self.bucket = bucket
        self.seq = batch["attention_mask"].shape[1]
        self.tensors: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.device == device:
                shape = (bucket.batch, bucket.seq, *value.shape[2:]) if _per_token(value, bucket.batch, self.seq) \
                    else tuple(value.shape)
                self.tensors[key] = torch.full(shape, _FILL.get(key, 0), dtype=value.dtype, device=device)
        self.index = torch.empty(bucket.tokens, dtype=torch.long, device=device)
        self.cu_seqlens = torch.empty(2 * bucket.batch + 1, dtype=torch.int32, device=device)
        self.query_weights = torch.empty(1, bucket.tokens, dtype=torch.float32, device=device)
        self.packing = kernels.Packing(self.cu_seqlens, plan.lengths, longest=bucket.seq)
        self.batch: dict = {}

    def fill(self, batch: dict, plan: BucketPlan) -> dict:
        """Copy ``batch`` (right-padded ``[B, N]``, on the device) and ``plan`` into the buffers; returns the
        static batch (the buffers, and the entries that are not device tensors as they are)."""
        for key, static in self.tensors.items():
            value = batch[key]
            if static.shape != value.shape:  # per token, widened: the extra columns get their fill value
                static[:, : value.shape[1]].copy_(value)
                static[:, value.shape[1]:].fill_(_FILL.get(key, 0))
            else:
                static.copy_(value)
        for static, host in ((self.index, plan.index), (self.cu_seqlens, plan.cu_seqlens),
                             (self.query_weights, plan.query_weights)):
            static.copy_(_pinned(host, static.device), non_blocking=True)
        mask = self.tensors["attention_mask"]
        attach_plan(mask, PackedBatch(self.index, self.bucket.batch, self.bucket.seq, self.packing,
                                      query_weights=self.query_weights))
        self.batch = {key: self.tensors.get(key, value) for key, value in batch.items()}
        return self.batch

    def fits(self, batch: dict) -> bool:
        """Whether ``batch`` has this bucket's device entries, dtypes and shapes (per-token ones up to ``N_b``)."""
        mask = batch["attention_mask"]
        device_keys = {key for key, value in batch.items()
                       if isinstance(value, torch.Tensor) and value.device == mask.device}
        if device_keys != set(self.tensors) or mask.shape[1] > self.bucket.seq:
            return False
        for key, static in self.tensors.items():
            value = batch[key]
            widened = static.shape != value.shape
            expected = (static.shape[0], mask.shape[1], *static.shape[2:]) if widened else tuple(static.shape)
            if value.dtype != static.dtype or tuple(value.shape) != tuple(expected):
                return False
        return True


def _per_token(value: torch.Tensor, batch: int, seq: int) -> bool:
    return value.dim() >= 2 and value.shape[0] == batch and value.shape[1] == seq


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.pin_memory() if device.type == "cuda" and torch.cuda.is_available() else tensor


class CudaGraph:
    """A captured CUDA graph of a function and its output (graphs of one runner share one memory pool: they are
    replayed one at a time, and every output is consumed before the next replay)."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.output = None

    def capture(self, function: Callable[[], torch.Tensor]) -> None:
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = function()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class EmulatedGraph:
    """The CPU stand-in of :class:`CudaGraph` for tests: capture keeps the function, replay calls it. Run with the
    Triton backend under the interpreter, the kernels then see only what a captured graph would: the static
    buffers and the launch plan made for the bucket (the packed lengths of the batch that was captured)."""

    def __init__(self, pool=None):
        self.function = None

    def capture(self, function: Callable[[], torch.Tensor]) -> None:
        """Runs ``function`` once, as a capture runs its Python (the runner takes back what it added)."""
        self.function = function
        function()

    def replay(self) -> torch.Tensor:
        return self.function()


def _values(accumulators: Callable[[], dict]) -> dict:
    """``{name: tensor}`` copies of the accumulators (numbers as float64 0-d tensors)."""
    return {name: (value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value),
                                                                                                dtype=torch.float64))
            for name, value in accumulators().items()}


def _identities(accumulators: Callable[[], dict]) -> dict:
    return {name: id(value) for name, value in accumulators().items()}


class StepRunner:
    """Runs a step body over batches: graph replays per bucket where :class:`GraphUse` allows, else eagerly.

    body:         ``body(batch) -> loss`` (0-d tensor); accumulates in place into what ``accumulators()`` lists.
    accumulators: ``() -> {name: tensor or number}``, every value the body accumulates into.
    limit:        the longest sequence the model takes (bucketed lengths stay within it), or None.
    graph_type:   :class:`CudaGraph` (CUDA), or :class:`EmulatedGraph` (tests on the CPU).
    """

    def __init__(self, body: Callable[[dict], torch.Tensor], accumulators: Callable[[], dict], use: GraphUse, *,
                 limit: int | None = None, graph_type=CudaGraph):
        self.body = body
        self.accumulators = accumulators
        self.use = use
        self.limit = limit
        self.graph_type = graph_type
        self.graphs: dict[Bucket, tuple[StaticBatch, object]] = {}
        self.pool = None  # the graphs' shared memory pool, made at the first capture

    def run(self, batch: dict) -> torch.Tensor:
        """One step over ``batch`` (on the model's device); returns its loss (a fresh 0-d tensor)."""
        plan = self._plan(batch) if self.use.enabled else None
        if plan is None:
            self.use.eager_steps += 1
            return self.body(batch)
        known = self.graphs.get(plan.bucket)
        if known is not None and known[0].fits(batch):
            static, graph = known
            static.fill(batch, plan)
            self.use.replays += 1
            self._note(plan.bucket)
            return graph.replay().clone()
        return self._warm_up_and_capture(batch, plan)

    def _plan(self, batch: dict) -> BucketPlan | None:
        mask = batch.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        lengths = known_lengths(mask)
        if lengths is None or sum(lengths) == 0:
            return None
        return plan_bucket(lengths, limit=self.limit)

    def _note(self, bucket: Bucket) -> None:
        entry = [bucket.batch, bucket.seq, bucket.tokens]
        if entry not in self.use.buckets:
            self.use.buckets.append(entry)

    def _warm_up_and_capture(self, batch: dict, plan: BucketPlan) -> torch.Tensor:
        device = batch["attention_mask"].device
        static = StaticBatch(batch, plan, device)
        inputs = static.fill(batch, plan)
        before = _values(self.accumulators)
        loss = self._eager(inputs, device)  # the batch's real step (compiles the kernels, makes lazy state)
        self.use.eager_steps += 1
        after = _values(self.accumulators)
        identities = _identities(self.accumulators)
        if self.pool is None and self.graph_type is CudaGraph:
            self.pool = torch.cuda.graph_pool_handle()
        graph = self.graph_type(self.pool)
        try:
            graph.capture(lambda: self.body(inputs))
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly, and say why
            self.use.turn_off(f"capture failed for bucket {plan.bucket}: {type(error).__name__}: {error}")
        rebound = _identities(self.accumulators) != identities
        self._restore(after)  # a CUDA capture computes nothing; the CPU stand-in ran the body: take it back
        if rebound and self.use.enabled:
            self.use.turn_off("the step replaces an accumulator instead of updating it in place (a replay would "
                              "not accumulate): its task's update_metric must update tensors in place")
        if not self.use.enabled:
            return loss
        # the check: replayed from the state the eager step started from, the graph must end where it ended
        self._restore(before)
        replayed = graph.replay().clone()
        problem = _difference(after, _values(self.accumulators), loss, replayed)
        self._restore(after)
        if problem is not None:
            self.use.turn_off(f"a replay did not reproduce the eager step ({problem})")
            return loss
        self.graphs[plan.bucket] = (static, graph)
        self.use.captured += 1
        self._note(plan.bucket)
        return loss

    def _restore(self, values: dict) -> None:
        """Set the accumulators to ``values`` (:func:`_values`; zeros for one made or grown since: a pass starts
        from zero)."""
        for name, value in self.accumulators().items():
            if isinstance(value, torch.Tensor):
                saved = values[name]
                value.copy_(saved if saved.shape == value.shape else torch.zeros_like(value))

    def _eager(self, inputs: dict, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return self.body(inputs).clone()
        side = torch.cuda.Stream(device)  # warm up on a side stream, as before a capture
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            loss = self.body(inputs).clone()
        torch.cuda.current_stream(device).wait_stream(side)
        return loss


def _difference(eager: dict, replayed: dict, loss: torch.Tensor, replay_loss: torch.Tensor) -> str | None:
    """None when the replay ended with the accumulators (and the loss) of the eager step, else what differs.
    Reads the device (once per captured bucket)."""
    if not torch.allclose(loss.double(), replay_loss.double(), rtol=1e-6, atol=1e-9, equal_nan=True):
        return f"loss {float(loss)} eager, {float(replay_loss)} replayed"
    for name, value in eager.items():
        other = replayed[name].to(value.device)
        if other.shape != value.shape or not torch.allclose(other.double(), value.double(), rtol=1e-6, atol=1e-9,
                                                            equal_nan=True):
            largest = float((other.double() - value.double()).abs().max()) if other.shape == value.shape \
                else float("nan")
            return f"{name}: largest difference {largest:.3g}"
    return None

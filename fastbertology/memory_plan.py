"""The memory plan of an analysis pass: what it will hold, and the settings that make it fit a budget.

Before any work, :func:`plan_memory` estimates the peak memory of the importance pass (forward plus the backward
to the head mask, with frozen weights) from the model, the batches and what is in use already:

* weights (parameters and buffers) and everything else in use when the plan is made (``in_use``: on CUDA the
  allocated GPU memory, on the CPU the resident memory of the process: the runtime, the model, the data);
* per layer and token, the activations a layer keeps for the backward (:func:`activation_bytes_per_token`, a
  formula from the model's shapes, checked against a measurement in the tests); without checkpointing all layers
  keep them, with per-layer checkpointing (:mod:`fastbertology.checkpointing`) each layer keeps only its input
  ``[T, D]`` and one layer's activations exist at a time (recomputed in the backward, with their gradients);
* the CPU backend's attention: the probabilities it keeps per layer for short inputs, and one block of scores;
* the language-model loss: logits, their float32 copy, log-probabilities and gradient, ``tokens x vocabulary``
  each, for all predicted tokens of a batch at once or for one chunk of them
  (:func:`~fastbertology.tasks.language_modeling.chunked_token_losses`).

The budget is ``--max-memory`` (the process's peak GPU memory on CUDA, ``torch.cuda.max_memory_allocated``; its
peak resident memory on the CPU), else the device's memory (the GPU's total; on the CPU the memory available now
plus what the process holds). The plan keeps every layer's activations when that fits, else turns checkpointing
on; it takes the loss over all tokens at once when that fits, else in chunks of at most ``LOSS_SLAB_BYTES`` of
logits and smaller while that helps (checkpointing comes after the smallest chunk); when nothing fits it
refuses with the numbers and a fix (:class:`MemoryPlanError`). The run then records the measured peak
(:func:`peak_memory`) beside the estimate in ``summary.json``. On the CPU the commands first make freed tensors'
memory go back to the system at once (:func:`return_freed_memory`), so that resident memory follows the tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re
import resource
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .architectures import stack_layers
from .kernels.torch_attention import CHUNK_ELEMENTS, KEEP_PROBS_ELEMENTS

# The most memory the language-model loss's logits may take by default (one chunk, float32): 256 MiB
LOSS_SLAB_BYTES = 256 << 20
# The smallest loss chunk the plan goes down to (tokens)
MIN_LOSS_CHUNK = 128
# Allowance on the estimated working memory for allocator slack and small temporaries
MARGIN = 0.10
# On the CPU, resident memory the outputs add after the pass (plots, the report)
OUTPUT_ALLOWANCE = 64 << 20

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*")


class MemoryPlanError(ValueError):
    """Nothing fits the budget; the message gives the numbers and a fix."""


def parse_memory_size(text: str, *, option: str = "--max-memory") -> int:
    """``"24GiB"``, ``"3000MiB"``, ``"1.5GB"`` -> bytes. A number and a unit (B, KB, MB, GB, TB: powers of 1000;
    KiB, MiB, GiB, TiB: powers of 1024; any case), nothing else; ValueError naming ``option`` otherwise."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{option}: cannot read {text!r} as a memory size; write a number and a unit, e.g. 24GiB or "
                         "3000MiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{option}: the memory size must be positive, got {text!r}")
    return size


def format_bytes(size: float) -> str:
    """``1.5 GiB``, ``300 MiB``, ``12 KiB``, ``80 B``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}" if abs(size) < 100 * scale else f"{size / scale:.0f} {unit}"
    return f"{int(size)} B"


# --------------------------------------------------------------------------------------------------------------
# Measurements of the process
# --------------------------------------------------------------------------------------------------------------
def current_memory(device: torch.device) -> int:
    """Bytes in use now: allocated GPU memory on CUDA, resident memory of the process on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); OSError where there is none."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def peak_memory(device: torch.device) -> int:
    """The process's peak so far: ``torch.cuda.max_memory_allocated`` on CUDA, peak resident memory on the CPU.

    On the CPU it is the kernel's high-water mark of this process's own address space (``VmHWM``), not
    ``getrusage``'s ``ru_maxrss``: Linux carries the latter over ``vfork`` + ``exec``, so a process started by a
    large one (``subprocess`` from a notebook or a test runner) would report its parent's resident size as its
    own peak."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return proc_status_kib("VmHWM") * 1024


# glibc's mallopt parameter M_MMAP_THRESHOLD, and the size from which allocations get their own mapping
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Make resident memory follow the live tensors on the CPU: glibc serves allocations of at least
    ``MMAP_THRESHOLD`` bytes from their own mappings (a fixed ``M_MMAP_THRESHOLD``), which go back to the system
    when the tensor is freed. With glibc's default (a threshold that grows up to 32 MiB as large blocks are freed),
    the pass's many tensors of 1 to 32 MiB come from the heap, whose holes are not given back: measured on the
    Llama twin, 670 MiB of resident memory above the live tensors. False where there is no glibc ``mallopt``."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def device_memory(device: torch.device) -> int:
    """The default budget: the GPU's total memory; on the CPU, the memory available now plus the process's."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + current_memory(device)
    raise OSError("/proc/meminfo has no MemAvailable line: give the budget with --max-memory")


# --------------------------------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """What a transformer layer's saved activations depend on."""

    hidden: int  # D
    intermediate: int  # I
    heads: int  # H
    kv_heads: int  # H_kv
    head_dim: int  # d
    dtype_bytes: int  # b: bytes per element of the model's dtype
    norms: int  # layer norms in a layer
    norm_upcast: bool  # RMSNorm-style norms that keep a float32 copy of their input
    gated: bool  # gated MLP (act(gate(x)) * up(x))
    activation_saves: int  # tensors of I elements the activation function keeps (1; 4 for gelu_new's formula)
    rotary: bool  # rotary position embeddings (cos and sin, d each, per token)


def layer_shape(model: nn.Module) -> LayerShape:
    """The :class:`LayerShape` of ``model``'s first layer (its config and its modules)."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = [layer for layers in stack_layers(model) for layer in layers]
    modules = list(layers[0].named_modules()) if layers else []
    names = [type(module).__name__ for _, module in modules]
    norms = [name for name in names if "Norm" in name]
    activation_saves = 4 if "NewGELUActivation" in names else 2 if "QuickGELUActivation" in names else 1
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    return LayerShape(
        hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype_bytes=torch.finfo(dtype).bits // 8, norms=len(norms) or 2,
        norm_upcast=any("RMSNorm" in name for name in norms),
        gated=any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in modules),
        activation_saves=activation_saves,
        rotary=any("rotary" in name.lower() for name, _ in model.named_modules()))


def activation_bytes_per_token(shape: LayerShape) -> int:
    """Bytes one layer keeps for the backward per token, with frozen weights (no linear layer keeps its input):

    * the input of each norm (``D`` values; float32 for RMSNorm, which upcasts) and its statistics (float32: 1 per
      norm for RMSNorm, 2 for LayerNorm);
    * what attention keeps: ``q``, ``k``, ``v`` and the output, ``(2 H + 2 H_kv) d`` values (the output in float32
      for half types: it is masked before it is rounded), and the float32 log-sum-exp per head; with rotary
      embeddings, cos and sin (``2 d``);
    * the MLP: its activation's input (and what the activation keeps: 4 tensors for gelu_new's tanh formula, 1 for
      ReLU, GELU, SiLU), plus for gated MLPs the activation's output and the up projection: ``3 I`` values.
    """
    b, norm_b = shape.dtype_bytes, 4 if shape.norm_upcast else shape.dtype_bytes
    norms = shape.norms * (shape.hidden * norm_b + 4 * (1 if shape.norm_upcast else 2))
    attention = ((shape.heads + 2 * shape.kv_heads) * b + shape.heads * max(b, 4)) * shape.head_dim + 4 * shape.heads
    rotary = 2 * shape.head_dim * b if shape.rotary else 0
    mlp = (2 + shape.activation_saves if shape.gated else shape.activation_saves) * shape.intermediate * b
    return norms + attention + rotary + mlp


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """What :func:`plan_memory` decided, and why (sizes in bytes)."""

    device: str
    measures: str  # what the budget bounds
    budget: int
    budget_source: str  # "--max-memory" or how the device's memory was read
    weights: int
    in_use: int  # at plan time (weights, data, runtime)
    layers: int
    longest_sequence: int
    batch_tokens: int  # tokens of the largest batch (B x N)
    activation_per_token_layer: int
    activation_per_sequence_layer: int  # for the longest sequence
    checkpointing: bool
    loss_chunk_tokens: int | None  # None: the loss over all predicted tokens at once (or no LM loss)
    vocabulary: int | None
    estimated_peak: int
    estimated_peak_without_checkpointing: int

    def lines(self) -> list[str]:
        """The plan in words, as printed before the work."""
        where = "peak GPU memory" if self.device == "cuda" else "peak resident memory"
        lines = [f"weights {format_bytes(self.weights)}; in use before the pass {format_bytes(self.in_use)}",
                 f"per {self.longest_sequence}-token sequence and layer: "
                 f"{format_bytes(self.activation_per_sequence_layer)} of activations "
                 f"({format_bytes(self.activation_per_token_layer)} per token), {self.layers} layers, "
                 f"largest batch {self.batch_tokens} tokens",
                 "per-layer activation checkpointing " + (
                     f"on (without it: {format_bytes(self.estimated_peak_without_checkpointing)})"
                     if self.checkpointing else "off (every layer's activations fit)")]
        if self.vocabulary is not None:
            lines.append(f"language-model loss in chunks of {self.loss_chunk_tokens} tokens x {self.vocabulary} "
                         "logits" if self.loss_chunk_tokens else "language-model loss over all tokens at once")
        lines.append(f"estimated {where} {format_bytes(self.estimated_peak)} of {format_bytes(self.budget)} "
                     f"({self.budget_source})")
        return lines

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Pass:
    """The sizes of one batch's pass that the estimate depends on."""

    tokens: int  # T = B x N of the largest batch
    score_elements: int  # H x sum of n^2 over its sequences
    longest: int
    predicted: int  # tokens that predict a token (language modelling), <= T


def _batch_sizes(batches, heads: int) -> _Pass:
    tokens = score = longest = 0
    for batch in batches:
        ids = batch.get("input_ids")
        if ids is None:
            continue
        lengths = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else [ids.shape[1]] * len(ids)
        tokens = max(tokens, ids.numel())
        score = max(score, heads * sum(int(n) ** 2 for n in lengths))
        longest = max(longest, ids.shape[1])
    return _Pass(tokens, score, longest, tokens)


def _estimate(shape: LayerShape, layers: int, sizes: _Pass, *, checkpointing: bool, chunk: int | None,
              vocabulary: int | None, cpu_attention: bool) -> int:
    """Bytes the pass adds to what is in use (see the module docstring), with the margin."""
    activations = activation_bytes_per_token(shape) * sizes.tokens  # one layer's
    kept = transient = 0
    if cpu_attention:  # the CPU backend keeps small probabilities per layer; one block of scores and its gradient
        kept = 4 * sizes.score_elements if sizes.score_elements <= KEEP_PROBS_ELEMENTS else 0
        transient = 2 * 4 * min(sizes.score_elements, CHUNK_ELEMENTS)
    if checkpointing:  # every layer's input; one layer's activations (recomputed) and their gradients
        held = layers * sizes.tokens * shape.hidden * shape.dtype_bytes + 2 * activations + kept
    else:
        held = layers * (activations + kept) + activations
    loss = 0
    if vocabulary is not None:  # logits (model dtype), a float32 copy for half types, log-probabilities, gradient
        per_logit = shape.dtype_bytes + (4 if shape.dtype_bytes < 4 else 0) + 8
        loss = min(sizes.predicted, chunk or sizes.predicted) * vocabulary * per_logit
    return int((held + transient + loss) * (1 + MARGIN))


def default_loss_chunk(vocabulary: int) -> int:
    """Tokens per loss chunk whose float32 logits take at most ``LOSS_SLAB_BYTES`` (a power of two)."""
    return max(MIN_LOSS_CHUNK, 2 ** int(math.log2(max(1, LOSS_SLAB_BYTES // (4 * vocabulary)))))


def plan_memory(model: nn.Module, batches, *, vocabulary: int | None, device: torch.device, budget: int,
                budget_source: str, in_use: int, peak_so_far: int = 0) -> MemoryPlan:
    """The plan for an importance pass of ``model`` over ``batches`` (dicts with ``input_ids`` ``[B, N]`` and
    ``attention_mask``) within ``budget`` bytes, ``in_use`` bytes being in use already and the process's peak
    having been ``peak_so_far`` (loading). ``vocabulary``: the LM head's size when the task is language modelling
    with a chunkable loss (else None). MemoryPlanError when even checkpointing and the smallest loss chunk do not
    fit."""
    if peak_so_far > budget:
        raise MemoryPlanError(f"--max-memory: the process already reached {format_bytes(peak_so_far)} before the "
                              f"analysis (loading the model and the data), more than {format_bytes(budget)} "
                              f"({budget_source}); raise --max-memory above {format_bytes(peak_so_far)}")
    shape = layer_shape(model)
    layers = sum(len(stack) for stack in stack_layers(model))
    sizes = _batch_sizes(batches, shape.heads)
    cpu_attention = device.type != "cuda"
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    per_token = activation_bytes_per_token(shape)

    def peak(checkpointing, chunk):
        work = _estimate(shape, layers, sizes, checkpointing=checkpointing, chunk=chunk, vocabulary=vocabulary,
                         cpu_attention=cpu_attention)
        return max(peak_so_far, in_use + work + (OUTPUT_ALLOWANCE if cpu_attention else 0))

    chunks = [None]  # the loss over all tokens at once first (no recomputed logits), then ever smaller chunks
    if vocabulary is not None:
        chunk = default_loss_chunk(vocabulary)
        while chunk >= MIN_LOSS_CHUNK:
            if chunk < sizes.predicted:
                chunks.append(chunk)
            chunk //= 2
    choice = next(((checkpointing, chunk) for checkpointing in (False, True) for chunk in chunks
                   if peak(checkpointing, chunk) <= budget), None)
    plan = MemoryPlan(
        device=device.type, measures="torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
        budget=budget, budget_source=budget_source, weights=weights, in_use=in_use, layers=layers,
        longest_sequence=sizes.longest, batch_tokens=sizes.tokens, activation_per_token_layer=per_token,
        activation_per_sequence_layer=per_token * sizes.longest, checkpointing=True if choice is None else choice[0],
        loss_chunk_tokens=chunks[-1] if choice is None else choice[1], vocabulary=vocabulary,
        estimated_peak=peak(True, chunks[-1]) if choice is None else peak(*choice),
        estimated_peak_without_checkpointing=peak(False, chunks[0]))
    if choice is None:
        raise MemoryPlanError(_refusal(plan, sizes))
    return plan


def _refusal(plan: MemoryPlan, sizes: _Pass) -> str:
    """Why nothing fits, and what would."""
    room = plan.budget - plan.in_use
    need = plan.estimated_peak - plan.in_use
    fix = []
    if room > 0 and sizes.tokens > sizes.longest:
        fix.append(f"a smaller --batch-size (the pass needs about {format_bytes(need)} per batch of "
                   f"{sizes.tokens} tokens; {format_bytes(room)} are left)")
    fix.append("a shorter --max-seq-length")
    fix.append(f"a larger --max-memory (at least {format_bytes(plan.estimated_peak)})")
    return (f"--max-memory: the analysis does not fit in {format_bytes(plan.budget)} ({plan.budget_source}): "
            f"{format_bytes(plan.in_use)} are in use before it (weights {format_bytes(plan.weights)}) and even with "
            f"per-layer checkpointing and a loss chunk of {plan.loss_chunk_tokens or sizes.predicted} tokens its "
            f"estimated peak is {format_bytes(plan.estimated_peak)}. Use " + ", or ".join(fix))

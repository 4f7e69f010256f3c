"""Drop-in patch that gives transformers 5 models head masks, attention maps and per-head statistics again.

Most families of the registry (:mod:`fastbertology.architectures`) route attention through transformers'
``AttentionInterface``: the patch registers an attention function and a 2-D mask function under the name
``"fastbertology"`` and selects it on the model. OpenAI GPT, BLOOM, MPT and Falcon compute attention in their own
modules: their instances get the replacement forward of their registry entry (``Architecture.attention_forward``;
OpenAI GPT's by default). A family may also change the model while it is patched (``Architecture.prepare_patch``:
T5's position bias, see :mod:`fastbertology.families_t5`).

``model(..., head_mask=m)`` is intercepted by a forward pre-hook on the model (and on its base model), which
validates the mask and keeps it for the duration of the call; each attention module knows its row (see
:class:`~fastbertology.architectures.AttentionSite`) and reads its slice. Encoder-decoder models (BART) also take
transformers 4.x's ``decoder_head_mask`` and ``cross_attn_head_mask``, and a ``head_mask`` over all their rows
(``[Le + 2 Ld, H]``: encoder | decoder self-attention | cross-attention), which is what the analyses pass.
Everything is undone by :meth:`PatchHandle.remove`.

**Layer applications.** A pre-hook on every transformer layer records which layer *application* (over all
stacks, in execution order) runs: a module applied several times in one pass (ALBERT) is the next of its
applications on every call. A shared attention module reads its row from that cursor.

**Grouped-query attention and sliding windows.** Key/value heads are handed to the kernels as the model computes
them (``[B, H_kv, N, D]``; query head h reads key/value head ``h // (H / H_kv)``); a layer pruned to unequal groups
(:mod:`fastbertology.pruning`) gathers, for each query head, its own key/value head first. A sliding window
(``sliding_window=W``: query i sees keys ``i - W < j <= i``) goes to the kernels' ``window``; where the kernels lack
one of the two, the call is refused with the reason, except a window no shorter than the sequences, which changes
nothing.

**Cross-attention** (BART's decoder) has queries and keys of different lengths, which the kernels' contract does
not take: it runs here, in plain PyTorch (:func:`rectangular_attention`: explicit scores and probabilities, the
reference math, differentiable through autograd), with the same head-mask semantics and statistics.

**Padding-free execution** (on by default, ``patch(model, padding_free=False)`` turns it off). When a call has a
right-padded 2-D ``attention_mask`` with padding in it, the layers of the stacks that read it (a decoder-only or
encoder-only model's layers; BART's encoder) run on the real tokens only: a pre-hook on the stack's first layer
application gathers the ``T`` real tokens of the ``[B, N, D]`` hidden states into one packed stream ``[1, T, D]``
(and the per-position layer arguments of the registry's ``packed_arguments``, e.g. rotary position embeddings),
every layer (linear layers, layer norms, MLP, attention: forward and backward) works on that stream, attention stays
within each sequence through :class:`~fastbertology.kernels.Packing`, and a hook on the last application scatters
the result back to ``[B, N, D]``. Embeddings (a lookup), the final layer norm and the task head see the usual padded
shapes; hidden states at padding positions are zero instead of the values stock transformers computes there (which
no loss reads: they are padding). Calls that ask for ``output_attentions`` or ``output_hidden_states`` (they return
per-position tensors), or that build a cache for generation, run padded, exactly as before. BART's decoder always
runs padded (its cross-attention reads the padded encoder output).
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field

import torch

from . import kernels
from .architectures import Architecture, architecture, attention_sites, heads_per_layer, stack_layers
from .attention_functions import (  # noqa: F401 - IMPLEMENTATION_NAME, UNEQUAL_GROUPS re-exported for pruning
    IMPLEMENTATION_NAME,
    UNEQUAL_GROUPS,
    _grouped_key_values,
    _interface_attention,
    _openai_attention_forward,
    _window_options,
    rectangular_attention,
    register_implementation,
)
from .attention_hooks import AttentionCall, run_hooks
from .head_mask import head_mask_rows, normalize_head_mask
from .packing import PackedBatch, plan_packing
from .patch_copies import PICKLE_REFUSAL, StateHook, copy_state, refuse_torch_compile
from .recording import block_sums, head_sums


# --------------------------------------------------------------------------------------------------------------
# Per-model state
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _CallContext:
    """What one forward call of the model asked for, and where it is."""

    head_mask: torch.Tensor | None = None  # [R, H] or [B, R, H] over all rows
    output_attentions: bool = False
    packed: dict[int, PackedBatch] = field(default_factory=dict)  # stack -> packing its layers run on
    application: int | None = None  # the layer application running now (over all stacks)
    stack: int = 0  # the stack of that application
    calls: dict[int, int] = field(default_factory=dict)  # id(layer module) -> its calls so far in this pass
    packed_values: dict = field(default_factory=dict)  # (argument, id(value)) -> (value, packed value)
    mask_rows: dict = field(default_factory=dict)  # (batch, sequences) -> the head mask's rows, [B or S, H] each
    statistics: list = field(default_factory=list)  # (row, entropy, max_prob, query mask) per layer, reduced at the end

    def head_mask_row(self, row: int, batch: int, sequences: int | None = None) -> torch.Tensor | None:
        """Row ``row`` of the call's head mask as ``[B, H]`` (None without a mask); ``[S, H]`` for a packed stream
        of ``sequences`` S > B (a CUDA-graph bucket's filler sequences follow the B examples: ones for them). The
        mask is split into its rows once per call (:func:`~fastbertology.head_mask.head_mask_rows`), not sliced per
        layer."""
        if self.head_mask is None:
            return None
        key = (batch, sequences)
        rows = self.mask_rows.get(key)
        if rows is None:
            rows = self.mask_rows[key] = head_mask_rows(self.head_mask, batch, sequences)
        return rows[row]


@dataclass
class _Binding:
    """What an attention module needs to know: the patch state, its row per layer application, its stack."""

    state: PatchState
    rows: dict[int, int]  # application -> row
    stack: int
    cross: bool

    def row(self) -> int:
        """The row of the running application (a module applied once has one row)."""
        if len(self.rows) == 1:
            return next(iter(self.rows.values()))
        application = self.state.context.application
        if application not in self.rows:
            raise RuntimeError(f"a shared attention module ran in layer application {application}, which is not one "
                               f"of its applications {sorted(self.rows)}; run the model, not its modules")
        return self.rows[application]


@dataclass
class PatchState:
    model: torch.nn.Module
    entry: Architecture
    backend: str
    num_layers: int  # rows
    parts: list[str] = field(default_factory=list)  # per row: "layers", "encoder", "decoder" or "cross"
    first_applications: dict[int, int] = field(default_factory=dict)  # stack -> its first application
    last_applications: dict[int, int] = field(default_factory=dict)  # stack -> its last application
    padding_free: bool = True
    recorders: list = field(default_factory=list)
    attention_hooks: list = field(default_factory=list)  # see fastbertology.attention_hooks
    context: _CallContext = field(default_factory=_CallContext)
    depth: int = 0
    calls: int = 0  # model calls so far (a call of the model and the base model inside it counts once)
    step_runners: dict = field(default_factory=dict)  # CUDA-graph step runners of the analyses (graph_passes)
    replaying: bool = False  # a checkpointed layer's forward is being recomputed (see fastbertology.checkpointing)

    def __deepcopy__(self, memo):  # copies of a patched model are patched (see fastbertology.patch_copies)
        return copy_state(self, memo, _CallContext)

    def __reduce_ex__(self, protocol):
        raise TypeError(PICKLE_REFUSAL)

    def attend(self, binding: _Binding, module, query, key, value, key_padding_mask, *, causal, scale, dropout,
               output_attentions, window=None, modifiers=None):
        """Run one attention application. q ``[B, H, N_q, D]``, k, v ``[B, H_kv, N_k, D]`` (packed: ``[1, H, T, D]``)
        -> ``(out [B, N_q, H, D], probs [B, H, N_q, N_k] or None)``. ``key_padding_mask`` (bool ``[B, N_k]``) is
        ignored for packed calls (they have no padding). ``window``: a sliding window (or None). ``modifiers``: the
        kernels' score modifiers as keyword arguments (``softcap``, ``sinks``...), or None.

        ``probs`` are the post-softmax probabilities times the head mask, as transformers 4.x returned them.
        """
        if dropout and module.training:
            raise RuntimeError(
                "fastbertology does not implement attention dropout: call model.eval() (the analyses run in eval "
                "mode), or set the config's attention dropout probability to 0 for training"
            )
        row = binding.row()
        packed = None if binding.cross else self.context.packed.get(binding.stack)
        heads = query.shape[1]
        batch = packed.batch if packed is not None else query.shape[0]
        mask = self.context.head_mask_row(row, batch, packed.packing.num_sequences if packed is not None else None)
        if heads == 0:  # every head of this layer was pruned
            return query.new_zeros(query.shape).transpose(1, 2), None
        key, value = _grouped_key_values(module, query, key, value)
        modifiers = modifiers or {}
        if binding.cross and modifiers:
            raise ValueError(f"cross-attention with score modifiers ({', '.join(modifiers)}) is not supported")
        if binding.cross:
            out, stats = rectangular_attention(query, key, value, head_mask=mask, key_padding_mask=key_padding_mask,
                                               scale=scale, return_probs=output_attentions)
            self._record(row, stats, None)
            out = out.transpose(1, 2)  # [B, N_q, H, D]
            return self._hooked(out, stats, binding, row, mask, query, key, None, key_padding_mask, False, scale,
                                None), stats.probs
        options = {**_window_options(window, packed.packing.max_seqlen if packed is not None else key.shape[2]),
                   **modifiers}
        # the output comes as [B, N_q, H, D], what the model expects (the Triton kernels write it so: no transpose)
        if packed is not None:
            out, stats = kernels.attention(query, key, value, head_mask=mask, causal=causal, scale=scale,
                                           packing=packed.packing, output_layout="bnhd", backend=self.backend,
                                           **options)
            self._record(row, stats, packed.query_weights)  # None, or 0 on a graph bucket's filler tokens
            return self._hooked(out, stats, binding, row, mask, query, key, packed, None, causal, scale, options), None
        out, stats = kernels.attention(
            query, key, value, head_mask=mask, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
            return_probs=output_attentions, output_layout="bnhd", backend=self.backend, **options,
        )
        self._record(row, stats, key_padding_mask)
        out = self._hooked(out, stats, binding, row, mask, query, key, None, key_padding_mask, causal, scale, options)
        return out, stats.probs

    def _hooked(self, out, stats, binding, row, mask, query, key, packed, key_padding_mask, causal, scale, options):
        """``out [B, N, H, D]`` after the attention hooks (:mod:`fastbertology.attention_hooks`), which see the call
        (with ``out [B, H, N, D]``) and may replace it."""
        if not self.attention_hooks:
            return out
        out = out.transpose(1, 2)
        call = AttentionCall(row=row, part=self.parts[row], cross=binding.cross, query=query, key=key, out=out,
                             lse=stats.lse, head_mask=mask, packed=packed, key_padding_mask=key_padding_mask,
                             causal=causal, scale=query.shape[-1] ** -0.5 if scale is None else float(scale),
                             window=(options or {}).get("window"),
                             modifiers=kernels.ScoreModifiers(**{name: value for name, value in (options or {}).items()
                                                                 if name in kernels.ScoreModifiers._fields}))
        return run_hooks(self.attention_hooks, call).transpose(1, 2)

    def _record(self, row, stats, query_mask):
        """Keep a layer's row statistics for the reduction at the end of the model call (:meth:`flush_statistics`:
        one per call, not per layer); outside a model call, reduce them now."""
        if not self.recorders or self.replaying:  # a recomputed forward was recorded when it first ran
            return
        if self.depth == 0:
            sums, tokens = head_sums(stats.entropy, stats.max_prob, query_mask)
            for recorder in self.recorders:
                recorder.add_sums(row, sums, tokens)
            return
        self.context.statistics.append((row, stats.entropy, stats.max_prob, query_mask))

    def flush_statistics(self) -> None:
        """Reduce the call's kept row statistics, one :func:`~fastbertology.recording.block_sums` per group of layers
        with one shape and query mask (e.g. all of a decoder-only model's), and hand them to the recorders."""
        pending, self.context.statistics = self.context.statistics, []
        if not pending or not self.recorders:
            return
        groups: dict = {}
        for row, entropy, max_prob, query_mask in pending:
            key = (tuple(entropy.shape), entropy.dtype, entropy.device, None if query_mask is None else id(query_mask))
            groups.setdefault(key, []).append((row, entropy, max_prob, query_mask))
        for items in groups.values():
            sums, tokens = block_sums([(entropy, max_prob) for _, entropy, max_prob, _ in items], items[0][3])
            rows = tuple(row for row, *_ in items)
            for recorder in self.recorders:
                recorder.add_block(rows, sums, tokens)


# --------------------------------------------------------------------------------------------------------------
# Hooks that take the head masks out of the call
# --------------------------------------------------------------------------------------------------------------
def _model_device(model):
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _call_arguments(module, args, kwargs) -> dict:
    """The arguments of a ``module(*args, **kwargs)`` call by name (positional ones named after ``forward``)."""
    if not args:
        return kwargs
    names = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in _POSITIONAL]
    return {**dict(zip(names, args)), **kwargs}


def _flag(call: dict, config, name: str) -> bool:
    """A boolean call option, falling back to the config's default."""
    value = call.get(name)
    return bool(getattr(config, name, False) if value is None else value)


def _packing_for_call(state, call: dict) -> dict[int, PackedBatch]:
    """The stacks whose layers run padding-free in this call, and how (see the module docstring)."""
    config = state.model.config
    if not state.padding_free:
        return {}
    if any(_flag(call, config, name) for name in ("output_attentions", "output_hidden_states",
                                                  *state.entry.padded_options)):
        return {}
    if any(call.get(name) is not None for name in ("past_key_values", "cache")):
        return {}
    if _flag(call, config, "use_cache") and state.entry.builds_cache(config):
        return {}
    plans = {}
    for index, stack in enumerate(state.entry.stacks):
        mask = call.get(stack.padding_argument) if stack.padding_argument else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            plan = plan_packing(mask)
            if plan is not None:
                plans[index] = plan
    return plans


def _rows_of(state, part: str, total_rows: int, mask) -> list[int]:
    """The rows a mask argument covers: its part's rows, or every row for a ``head_mask`` over all of them."""
    parts = state.parts
    rows = [row for row, name in enumerate(parts) if part in ("all", name)]
    covers_all = isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-2] == total_rows
    if part != "all" and covers_all and len(rows) != total_rows:
        return list(range(total_rows))
    return rows


def compose_head_mask(state, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The call's mask arguments (``head_mask``, and ``decoder_head_mask`` / ``cross_attn_head_mask`` for
    encoder-decoder models) -> one ``[R, H]`` or ``[B, R, H]`` mask over all rows (ones where none was given).
    Each argument is checked against its rows (:func:`~fastbertology.head_mask.normalize_head_mask`); gradients
    reach every given mask."""
    counts = heads_per_layer(state.model)
    device = _model_device(state.model)
    placed: list[tuple[list[int], torch.Tensor]] = []
    for name, part in state.entry.mask_arguments:
        if name not in masks:
            continue
        rows = _rows_of(state, part, len(counts), masks[name])
        try:
            mask = normalize_head_mask(masks[name], heads_per_layer=[counts[r] for r in rows], device=device)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        placed.append((rows, mask))
    if len(placed) == 1 and len(placed[0][0]) == len(counts):
        return placed[0][1]
    if len(set(counts)) > 1:
        raise ValueError(f"this model's rows have different head counts {counts} (it was pruned, or its encoder and "
                         "decoder have different head counts); head masks over all rows need one count")
    batches = {mask.shape[0] for _, mask in placed if mask.dim() == 3}
    if len(batches) > 1:
        raise ValueError(f"per-example head masks of different batch sizes {sorted(batches)} were given together")
    dtype = functools.reduce(torch.promote_types, [mask.dtype for _, mask in placed])
    shape = ((batches.pop(),) if batches else ()) + (len(counts), max(counts))
    full = torch.ones(shape, dtype=dtype, device=device)
    for rows, mask in placed:
        index = torch.tensor(rows, dtype=torch.long, device=device)
        full = full.index_copy(-2, index, mask.expand(*shape[:-2], len(rows), shape[-1]).to(full.dtype))
    return full


def _make_pre_hook(state):
    names = [name for name, _ in state.entry.mask_arguments]

    def pre_hook(module, args, kwargs):
        # The post hook runs even when this hook raises (always_call), so count the call first.
        state.depth += 1
        refuse_torch_compile()
        if state.depth == 1:
            state.calls += 1
            call = _call_arguments(module, args, kwargs)
            state.context = _CallContext(output_attentions=_flag(call, state.model.config, "output_attentions"),
                                         packed=_packing_for_call(state, call))
        given = {name: kwargs.pop(name) for name in names if kwargs.get(name) is not None}
        for name in names:
            kwargs.pop(name, None)
        if given:
            if state.context.head_mask is not None:
                raise ValueError("head masks were given twice (to the model and to its base model)")
            state.context.head_mask = compose_head_mask(state, given)
        return args, kwargs

    return pre_hook


def _make_post_hook(state):
    def post_hook(module, args, output):
        state.depth -= 1
        if state.depth == 0:
            state.flush_statistics()
            state.context = _CallContext()
        return output

    return post_hook


def _make_layer_pre_hook(state, applications: list[int], stack: int, packed_arguments: tuple[str, ...]):
    """Pre-hook of one layer module (applied at ``applications``): sets the cursor, and packs the hidden states
    ``[B, N, D]`` -> ``[1, T, D]`` (and the per-position arguments) at the stack's first application."""
    def pre_hook(module, args, kwargs):
        context = state.context
        count = context.calls.get(id(module), 0)
        context.calls[id(module)] = count + 1
        context.application = applications[min(count, len(applications) - 1)]
        context.stack = stack
        packed = context.packed.get(stack)
        if packed is None:
            return None
        first = context.application == state.first_applications[stack]
        hidden = args[0] if args else kwargs.get("hidden_states")
        if first and (not isinstance(hidden, torch.Tensor) or tuple(hidden.shape[:2]) != (packed.batch, packed.seq)):
            del context.packed[stack]  # not the batch the plan was made for: run this call padded
            return None
        kwargs = _packed_arguments(context, packed, packed_arguments, kwargs)
        if not first:
            return args, kwargs
        if args:
            return (packed.pack(hidden), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": packed.pack(hidden)}

    return pre_hook


def _packed_arguments(context: _CallContext, packed: PackedBatch, names: tuple[str, ...], kwargs: dict) -> dict:
    """``kwargs`` with the per-position layer arguments ``names`` (a tensor ``[B or 1, N, ...]`` or a tuple of them)
    packed to ``[1, T, ...]``; each value is packed once per call (every layer gets the same one)."""
    if not names:
        return kwargs
    kwargs = dict(kwargs)
    for name in names:
        value = kwargs.get(name)
        key = (name, id(value))
        if key in context.packed_values:
            kwargs[name] = context.packed_values[key][1]
            continue
        if packed.fits(value):
            result = packed.pack(value)
        elif isinstance(value, tuple) and value and all(packed.fits(part) for part in value):
            result = tuple(packed.pack(part) for part in value)
        else:
            continue
        context.packed_values[key] = (value, result)  # (keeps value alive: its id stays unique in this call)
        kwargs[name] = result
    return kwargs


def _make_unpack_hook(state, stack: int):
    """Hook of a stack's last layer: its output hidden states ``[1, T, D]`` -> ``[B, N, D]`` (zeros at padding)."""
    def post_hook(module, args, output):
        packed = state.context.packed.get(stack)
        if packed is None or state.context.application != state.last_applications[stack]:
            return None
        if isinstance(output, torch.Tensor):
            return packed.unpack(output)
        if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([packed.unpack(output[0]), *output[1:]])
        raise RuntimeError(f"padding-free execution cannot unpack a layer output of type {type(output).__name__}; "
                           "patch the model with fastbertology.patch(model, padding_free=False)")

    return post_hook


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
class PatchHandle:
    """Undo handle returned by :func:`patch`; also a context manager (``with patch(model): ...``)."""

    def __init__(self, state: PatchState, undo: list):
        self.state = state
        self._undo = undo

    @property
    def model(self):
        return self.state.model

    @property
    def backend(self) -> str:
        return self.state.backend

    def remove(self) -> None:
        """Restore the model's stock attention and forget the hooks. Calling it twice is harmless."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def current_packing(model: torch.nn.Module) -> PackedBatch | None:
    """The packing of the stack running now in the model call in progress (None outside a call, or when that
    stack runs padded)."""
    state = getattr(model, "_fastbertology_state", None)
    return None if state is None else state.context.packed.get(state.context.stack)


def current_application(model: torch.nn.Module) -> int | None:
    """The layer application (over all stacks, in execution order) running now, or None outside a layer."""
    state = getattr(model, "_fastbertology_state", None)
    return None if state is None else state.context.application


def calls_so_far(model: torch.nn.Module) -> int:
    """How many times the patched ``model`` (or its base model) has been called (the call in progress included)."""
    return model._fastbertology_state.calls


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, "_fastbertology_state", None) is not None


def _bind_sites(state, sites, undo) -> None:
    """Give every attention module its :class:`_Binding` (rows per application)."""
    bindings: dict[int, _Binding] = {}
    for site in sites:
        binding = bindings.get(id(site.module))
        if binding is None:
            binding = bindings[id(site.module)] = _Binding(state, {}, site.stack, site.cross)
            site.module._fastbertology_layer = binding
            undo.append(lambda module=site.module: delattr(module, "_fastbertology_layer"))
        binding.rows[site.application] = site.row


def _hook_layers(state, undo) -> None:
    """The cursor / packing pre-hook and the unpacking hook on every layer module of every stack."""
    application = 0
    for index, layers in enumerate(stack_layers(state.model)):
        if not layers:
            continue
        state.first_applications[index] = application
        state.last_applications[index] = application + len(layers) - 1
        positions: dict[int, list[int]] = {}
        modules: dict[int, torch.nn.Module] = {}
        for layer in layers:
            positions.setdefault(id(layer), []).append(application)
            modules[id(layer)] = layer
            application += 1
        for key, layer in modules.items():
            pre = layer.register_forward_pre_hook(
                StateHook(_make_layer_pre_hook, state, positions[key], index, state.entry.packed_arguments),
                with_kwargs=True)
            undo.append(pre.remove)
            if state.last_applications[index] in positions[key]:
                post = layer.register_forward_hook(StateHook(_make_unpack_hook, state, index))
                undo.append(post.remove)


def patch(model: torch.nn.Module, backend: str = "auto", *, padding_free: bool = True) -> PatchHandle:
    """Patch a loaded model of a supported family (:func:`fastbertology.architectures.supported_model_types`) in
    place; return a :class:`PatchHandle`.

    After patching, ``model(..., head_mask=m)`` takes ``m`` of shape ``[H]``, ``[L, H]`` or ``[B, L, H]`` (floats,
    multiplying each head's post-softmax probabilities, differentiable; BART also ``decoder_head_mask`` and
    ``cross_attn_head_mask``, see the module docstring), ``output_attentions=True`` returns the masked
    probabilities ``[B, H, N, N]`` per layer, and :func:`fastbertology.record` collects per-head statistics.

    backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch otherwise), ``"torch"``, ``"triton"`` or
    ``"reference"`` (explicit, for testing).
    padding_free: run the layers on the real tokens only for calls with right padding (see the module docstring).
    """
    entry = architecture(model)
    if backend not in kernels.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(kernels.BACKENDS)}")
    if is_patched(model):
        raise RuntimeError("this model is already patched by fastbertology; call .remove() on the handle patch() "
                           "returned first (a deep copy of a patched model is patched, without a handle: copy the "
                           "model before patching it for a stock copy)")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError(f"a {entry.name} model with add_cross_attention=True is not supported by fastbertology "
                         "(its cross-attention modules are not in the registry); BART's cross-attention is")
    sites = attention_sites(model)
    state = PatchState(model=model, entry=entry, backend=backend, num_layers=len(sites),
                       parts=[site.part for site in sites], padding_free=padding_free)
    undo = []

    model._fastbertology_state = state
    undo.append(lambda: delattr(model, "_fastbertology_state"))
    _bind_sites(state, sites, undo)
    if not entry.attention_interface:
        for module in {id(site.module): site.module for site in sites}.values():
            if "forward" not in vars(module):  # (a layer pruned to zero heads has its own forward: keep that one)
                module.forward = types.MethodType(entry.attention_forward or _openai_attention_forward, module)
                undo.append(lambda module=module: delattr(module, "forward"))

    if entry.attention_interface:
        register_implementation()
        previous = model.config._attn_implementation
        model.set_attn_implementation(IMPLEMENTATION_NAME)
        if model.config._attn_implementation != IMPLEMENTATION_NAME:  # transformers declined it (with a log line)
            PatchHandle(state, undo).remove()
            raise ValueError(_interface_refusal(model, entry))
        # (a model pruned to unequal key/value groups meanwhile keeps fastbertology's attention: it needs it)
        undo.append(lambda: model.set_attn_implementation(
            IMPLEMENTATION_NAME if getattr(model.config, UNEQUAL_GROUPS, None) else previous))

    if entry.prepare_patch is not None:
        undo.append(entry.prepare_patch(model))
    _hook_layers(state, undo)
    hooked = [model] if model.base_model is model else [model, model.base_model]
    for module in hooked:
        pre = module.register_forward_pre_hook(StateHook(_make_pre_hook, state), with_kwargs=True)
        post = module.register_forward_hook(StateHook(_make_post_hook, state), always_call=True)
        undo.extend([pre.remove, post.remove])
    return PatchHandle(state, undo)


def _interface_refusal(model: torch.nn.Module, entry: Architecture) -> str:
    """Why a family registered as calling transformers' attention functions cannot be patched in this transformers:
    its model computes attention itself there (GPT-J before 5.24), so a patch would see none of its heads and a head
    mask would be silently ignored."""
    import transformers

    return (f"{entry.name}'s attention does not go through transformers' attention functions in transformers "
            f"{transformers.__version__} ({type(model).__name__} refused set_attn_implementation), so fastbertology "
            "could not mask or measure its heads; install a transformers release it is tested with: "
            "pip install 'transformers>=5.24,<5.26'")


# Names other modules import from here (the registry owns them)
from .architectures import attention_modules, transformer_layers  # noqa: E402,F401

"""Drop-in patch that gives transformers 5 models head masks, attention maps and per-head statistics again.

BERT, RoBERTa and GPT-2 route attention through transformers' ``AttentionInterface``: the patch registers an
attention function and a 2-D mask function under the name ``"fastbertology"`` and selects it on the model.
OpenAI GPT has a legacy ``Attention`` module with its own ``_attn``: its instances get a replacement forward.

``model(..., head_mask=m)`` is intercepted by a forward pre-hook on the model (and on its base model), which
validates the mask and keeps it for the duration of the call; each attention module knows its layer index and
reads its slice. Everything is undone by :meth:`PatchHandle.remove`.

**Padding-free execution** (on by default, ``patch(model, padding_free=False)`` turns it off). When a call has a
right-padded 2-D ``attention_mask`` with padding in it, the layers run on the real tokens only: a pre-hook on the
first transformer layer gathers the ``T`` real tokens of the ``[B, N, D]`` hidden states into one packed stream
``[1, T, D]``, every layer (linear layers, layer norms, MLP, attention: forward and backward) works on that stream,
attention stays within each sequence through :class:`~fastbertology.kernels.Packing`, and a hook on the last
layer scatters the result back to ``[B, N, D]``. Embeddings (a lookup), the final layer norm and the task head see
the usual padded shapes; hidden states at padding positions are zero instead of the values stock transformers
computes there (which no loss reads: they are padding). Calls that ask for ``output_attentions`` or
``output_hidden_states`` (they return per-position tensors), or that build a cache for generation, run padded,
exactly as before.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import kernels
from .architectures import architecture, attention_modules, heads_per_layer, transformer_layers
from .head_mask import layer_head_mask, normalize_head_mask

IMPLEMENTATION_NAME = "fastbertology"


# --------------------------------------------------------------------------------------------------------------
# Per-model state and the shared attention path
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedBatch:
    """How one call's right-padded batch ``[B, N]`` maps to the packed stream of its ``T`` real tokens."""

    index: torch.Tensor  # [T] long: the flat position b * N + n of every real token, in order
    batch: int  # B
    seq: int  # N
    packing: kernels.Packing  # the sequences (one per example, some possibly empty) of the stream

    @property
    def total(self) -> int:
        return self.packing.total

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, N, ...]`` -> ``[1, T, ...]`` (the real tokens, in order)."""
        flat = hidden.reshape(self.batch * self.seq, *hidden.shape[2:])
        return flat.index_select(0, self.index.to(flat.device)).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[B, N, ...]`` with zeros at the padding positions (differentiable)."""
        flat = packed.new_zeros(self.batch * self.seq, *packed.shape[2:])
        return flat.index_copy(0, self.index.to(flat.device), packed[0]).view(self.batch, self.seq, *packed.shape[2:])


def plan_packing(attention_mask: torch.Tensor) -> PackedBatch | None:
    """A :class:`PackedBatch` for a right-padded 2-D ``attention_mask [B, N]`` (1 = token) that has padding in it;
    None when there is no padding, no token at all, or the padding is not on the right (left padding or holes:
    positions that stock heads may read, e.g. BERT's pooler reads position 0). Reads the mask on the host once."""
    keep = attention_mask.detach().to("cpu", torch.bool)
    batch, seq = keep.shape
    lengths = keep.sum(1)
    total = int(lengths.sum())
    if total == batch * seq or total == 0:
        return None
    if not torch.equal(keep, torch.arange(seq)[None, :] < lengths[:, None]):
        return None
    index = keep.flatten().nonzero().squeeze(1).to(attention_mask.device)
    return PackedBatch(index, batch, seq, kernels.Packing.from_lengths(lengths.tolist(), attention_mask.device))


@dataclass
class _CallContext:
    """What one forward call of the model asked for."""

    head_mask: torch.Tensor | None = None  # [L, H] or [B, L, H]
    output_attentions: bool = False
    packed: PackedBatch | None = None  # the layers run padding-free on this packing


@dataclass
class PatchState:
    model: torch.nn.Module
    backend: str
    num_layers: int
    padding_free: bool = True
    recorders: list = field(default_factory=list)
    context: _CallContext = field(default_factory=_CallContext)
    depth: int = 0

    def attend(self, layer, module, query, key, value, key_padding_mask, *, causal, scale, dropout,
               output_attentions):
        """Run one layer's attention. q, k, v ``[B, H, N, D]`` (packed: ``[1, H, T, D]``) -> ``(out [B, N, H, D],
        probs [B, H, N, N] or None)``. ``key_padding_mask`` is ignored for packed calls (they have no padding).

        ``probs`` are the post-softmax probabilities times the head mask, as transformers 4.x returned them.
        """
        if dropout and module.training:
            raise RuntimeError(
                "fastbertology does not implement attention dropout: call model.eval() (the analyses run in eval "
                "mode), or set the config's attention dropout probability to 0 for training"
            )
        packed = self.context.packed
        heads = query.shape[1]
        batch = packed.batch if packed is not None else query.shape[0]
        mask = layer_head_mask(self.context.head_mask, layer, batch)
        if heads == 0:  # every head of this layer was pruned
            return query.new_zeros(query.shape).transpose(1, 2), None
        if packed is not None:
            out, stats = kernels.attention(query, key, value, head_mask=mask, causal=causal, scale=scale,
                                           packing=packed.packing, backend=self.backend)
            for recorder in self.recorders:
                recorder.add(layer, stats.entropy, stats.max_prob, None)
            return out.transpose(1, 2), None
        out, stats = kernels.attention(
            query, key, value, head_mask=mask, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
            return_probs=output_attentions, backend=self.backend,
        )
        for recorder in self.recorders:
            recorder.add(layer, stats.entropy, stats.max_prob, key_padding_mask)
        return out.transpose(1, 2), stats.probs


def _key_padding_from_2d(attention_mask, n_keys):
    """Our mask function hands a bool ``[B, K]`` mask (or None). Anything else is refused with the reason."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"fastbertology needs a 2-D attention_mask [batch, seq] (1 = token, 0 = padding); got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}. Custom 4-D masks are not supported."
        )
    return attention_mask[:, -n_keys:].to(torch.bool)


def _interface_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with ``AttentionInterface`` (BERT, RoBERTa, GPT-2)."""
    binding = getattr(module, "_fastbertology_layer", None)
    if binding is None:
        raise RuntimeError(
            f"attention implementation {IMPLEMENTATION_NAME!r} reached a module that fastbertology.patch() did not "
            "prepare (cross-attention is not supported); patch the model with fastbertology.patch(model)"
        )
    state, layer = binding
    key_padding_mask = None if state.context.packed is not None else _key_padding_from_2d(attention_mask, key.shape[2])
    return state.attend(
        layer, module, query, key, value, key_padding_mask,
        causal=bool(getattr(module, "is_causal", False)), scale=scaling, dropout=dropout,
        output_attentions=state.context.output_attentions,
    )


def _key_padding_mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                               attention_mask=None, **kwargs):
    """Mask function registered with ``AttentionMaskInterface``: the 2-D padding mask ``[B, K]`` as given (no
    check for "no padding at all": that would be a device-to-host sync and a graph break under torch.compile)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def _register_implementation():
    AttentionInterface.register(IMPLEMENTATION_NAME, _interface_attention)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, _key_padding_mask_function)


def _openai_attention_forward(self, x, attention_mask=None, output_attentions=False):
    """Replacement forward of ``transformers.models.openai.modeling_openai.Attention`` (causal, legacy masks)."""
    state, layer = self._fastbertology_layer
    batch, seq = x.shape[:2]
    query, key, value = self.c_attn(x).split(self.split_size, dim=2)
    # [B, N, H*D] -> [B, H, N, D]
    query, key, value = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in (query, key, value))
    key_padding_mask = None
    if attention_mask is not None and state.context.packed is None:  # additive [B, 1, 1, N]: 0 / dtype-min
        if attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1):
            raise ValueError(f"OpenAI GPT attention mask must come from a 2-D mask; got {tuple(attention_mask.shape)}")
        key_padding_mask = attention_mask[:, 0, 0, :] > torch.finfo(attention_mask.dtype).min / 2
    scale = value.shape[-1] ** -0.5 if self.scale else 1.0
    out, probs = state.attend(
        layer, self, query, key, value, key_padding_mask, causal=True, scale=scale,
        dropout=self.attn_dropout.p, output_attentions=output_attentions,
    )
    out = self.c_proj(out.reshape(batch, seq, -1))  # [B, N, H, D] -> [B, N, H*D]
    out = self.resid_dropout(out)
    return [out, probs] if output_attentions else [out]


# --------------------------------------------------------------------------------------------------------------
# Hooks that take head_mask out of the call
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


def _packing_for_call(state, call: dict) -> PackedBatch | None:
    """Whether this call runs padding-free, and how (see the module docstring)."""
    config = state.model.config
    mask = call.get("attention_mask")
    if not state.padding_free or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if _flag(call, config, "output_attentions") or _flag(call, config, "output_hidden_states"):
        return None
    if any(call.get(name) is not None for name in ("past_key_values", "cache")):
        return None
    if _flag(call, config, "use_cache") and architecture(state.model).builds_cache(config):
        return None
    return plan_packing(mask)


def _make_pre_hook(state):
    def pre_hook(module, args, kwargs):
        # The post hook runs even when this hook raises (always_call), so count the call first.
        state.depth += 1
        if state.depth == 1:
            call = _call_arguments(module, args, kwargs)
            state.context = _CallContext(output_attentions=_flag(call, state.model.config, "output_attentions"),
                                         packed=_packing_for_call(state, call))
        head_mask = kwargs.pop("head_mask", None)
        if head_mask is not None:
            if state.context.head_mask is not None:
                raise ValueError("head_mask was given twice (to the model and to its base model)")
            state.context.head_mask = normalize_head_mask(
                head_mask, heads_per_layer=heads_per_layer(state.model), device=_model_device(state.model)
            )
        return args, kwargs

    return pre_hook


def _make_post_hook(state):
    def post_hook(module, args, output):
        state.depth -= 1
        if state.depth == 0:
            state.context = _CallContext()
        return output

    return post_hook


def _make_pack_hook(state):
    """Pre-hook of the first layer: its hidden states ``[B, N, D]`` -> the packed stream ``[1, T, D]``."""
    def pre_hook(module, args, kwargs):
        packed = state.context.packed
        if packed is None:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape[:2]) != (packed.batch, packed.seq):
            state.context.packed = None  # not the batch the plan was made for: run this call padded
            return None
        if args:
            return (packed.pack(hidden), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": packed.pack(hidden)}

    return pre_hook


def _make_unpack_hook(state):
    """Hook of the last layer: its output hidden states ``[1, T, D]`` -> ``[B, N, D]`` (zeros at padding)."""
    def post_hook(module, args, output):
        packed = state.context.packed
        if packed is None:
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


def current_packing(model) -> PackedBatch | None:
    """The packing of the model call in progress (None outside a call, or when the call runs padded)."""
    state = getattr(model, "_fastbertology_state", None)
    return None if state is None else state.context.packed


def is_patched(model) -> bool:
    return getattr(model, "_fastbertology_state", None) is not None


def patch(model, backend: str = "auto", *, padding_free: bool = True) -> PatchHandle:
    """Patch a loaded BERT, RoBERTa, GPT-2 or OpenAI GPT model in place; return a :class:`PatchHandle`.

    After patching, ``model(..., head_mask=m)`` takes ``m`` of shape ``[H]``, ``[L, H]`` or ``[B, L, H]`` (floats,
    multiplying each head's post-softmax probabilities, differentiable), ``output_attentions=True`` returns the
    masked probabilities ``[B, H, N, N]`` per layer, and :func:`fastbertology.record` collects per-head statistics.

    backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch otherwise), ``"torch"``, ``"triton"`` or
    ``"reference"`` (explicit, for testing).
    padding_free: run the layers on the real tokens only for calls with right padding (see the module docstring).
    """
    entry = architecture(model)
    if backend not in kernels.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(kernels.BACKENDS)}")
    if is_patched(model):
        raise RuntimeError("this model is already patched by fastbertology; call .remove() on the first handle first")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("models with cross-attention are not supported by fastbertology (self-attention only)")
    modules = attention_modules(model)
    state = PatchState(model=model, backend=backend, num_layers=len(modules), padding_free=padding_free)
    undo = []

    model._fastbertology_state = state
    undo.append(lambda: delattr(model, "_fastbertology_state"))
    for layer, module in enumerate(modules):
        module._fastbertology_layer = (state, layer)
        undo.append(lambda module=module: delattr(module, "_fastbertology_layer"))
        if not entry.attention_interface and "forward" not in vars(module):
            # (a layer pruned to zero heads already has its own instance forward: keep that one)
            module.forward = types.MethodType(_openai_attention_forward, module)
            undo.append(lambda module=module: delattr(module, "forward"))

    if entry.attention_interface:
        _register_implementation()
        previous = model.config._attn_implementation
        model.set_attn_implementation(IMPLEMENTATION_NAME)
        undo.append(lambda: model.set_attn_implementation(previous))

    layers = transformer_layers(model)
    if len(layers):
        first = layers[0].register_forward_pre_hook(_make_pack_hook(state), with_kwargs=True)
        last = layers[-1].register_forward_hook(_make_unpack_hook(state))
        undo.extend([first.remove, last.remove])

    hooked = [model] if model.base_model is model else [model, model.base_model]
    for module in hooked:
        pre = module.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True)
        post = module.register_forward_hook(_make_post_hook(state), always_call=True)
        undo.extend([pre.remove, post.remove])
    return PatchHandle(state, undo)

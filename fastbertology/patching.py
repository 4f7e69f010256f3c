"""Drop-in patch that gives transformers 5 models head masks, attention maps and per-head statistics again.

BERT, RoBERTa and GPT-2 route attention through transformers' ``AttentionInterface``: the patch registers an
attention function and a 2-D mask function under the name ``"fastbertology"`` and selects it on the model.
OpenAI GPT has a legacy ``Attention`` module with its own ``_attn``: its instances get a replacement forward.

``model(..., head_mask=m)`` is intercepted by a forward pre-hook on the model (and on its base model), which
validates the mask and keeps it for the duration of the call; each attention module knows its layer index and
reads its slice. Everything is undone by :meth:`PatchHandle.remove`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import kernels
from .head_mask import layer_head_mask, normalize_head_mask

IMPLEMENTATION_NAME = "fastbertology"


# --------------------------------------------------------------------------------------------------------------
# Which modules are the attention layers of each supported model type
# --------------------------------------------------------------------------------------------------------------
def _bert_attention_modules(base):
    return [layer.attention.self for layer in base.encoder.layer]


def _gpt_attention_modules(base):
    return [block.attn for block in base.h]


def _bert_heads(module):
    return module.num_attention_heads


def _gpt2_heads(module):
    return module.num_heads


def _openai_heads(module):
    return module.n_head


@dataclass(frozen=True)
class ModelSpec:
    """How to find a model type's self-attention modules and read their head counts."""

    attention_modules: Callable[[torch.nn.Module], list]  # base model -> self-attention module of every layer
    heads: Callable[[torch.nn.Module], int]  # attention module -> its current number of heads
    uses_attention_interface: bool


MODEL_SPECS = {
    "bert": ModelSpec(_bert_attention_modules, _bert_heads, True),
    "roberta": ModelSpec(_bert_attention_modules, _bert_heads, True),
    "gpt2": ModelSpec(_gpt_attention_modules, _gpt2_heads, True),
    "openai-gpt": ModelSpec(_gpt_attention_modules, _openai_heads, False),
}


def model_spec(model) -> ModelSpec:
    """The :class:`ModelSpec` of ``model``; ValueError naming the supported types otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_SPECS:
        raise ValueError(
            f"fastbertology does not support model type {model_type!r}; supported: {', '.join(sorted(MODEL_SPECS))}"
        )
    return MODEL_SPECS[model_type]


def attention_modules(model) -> list:
    """The self-attention module of every layer, in layer order."""
    return model_spec(model).attention_modules(model.base_model)


def heads_per_layer(model) -> list[int]:
    """Current number of heads of every layer (pruned layers may have fewer)."""
    spec = model_spec(model)
    return [spec.heads(module) for module in spec.attention_modules(model.base_model)]


# --------------------------------------------------------------------------------------------------------------
# Per-model state and the shared attention path
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _CallContext:
    """What one forward call of the model asked for."""

    head_mask: torch.Tensor | None = None  # [L, H] or [B, L, H]
    output_attentions: bool = False


@dataclass
class PatchState:
    model: torch.nn.Module
    backend: str
    num_layers: int
    recorders: list = field(default_factory=list)
    context: _CallContext = field(default_factory=_CallContext)
    depth: int = 0

    def attend(self, layer, module, query, key, value, key_padding_mask, *, causal, scale, dropout,
               output_attentions):
        """Run one layer's attention. q, k, v ``[B, H, N, D]`` -> ``(out [B, N, H, D], probs [B, H, N, N] or None)``.

        ``probs`` are the post-softmax probabilities times the head mask, as transformers 4.x returned them.
        """
        if dropout and module.training:
            raise RuntimeError(
                "fastbertology does not implement attention dropout: call model.eval() (the analyses run in eval "
                "mode), or set the config's attention dropout probability to 0 for training"
            )
        batch, heads = query.shape[:2]
        mask = layer_head_mask(self.context.head_mask, layer, batch)
        if heads == 0:  # every head of this layer was pruned
            return query.new_zeros(query.shape).transpose(1, 2), None
        out, stats = kernels.attention(
            query, key, value, head_mask=mask, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
            return_probs=output_attentions, backend=self.backend,
        )
        for recorder in self.recorders:
            recorder.add(layer, stats.entropy, stats.max_prob, key_padding_mask)
        probs = None
        if output_attentions:
            probs = stats.probs
            if mask is not None:
                probs = probs * kernels.reference.expand_head_mask(mask, batch, heads)[:, :, None, None]
            probs = probs.to(query.dtype)
        return out.transpose(1, 2), probs


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
    return state.attend(
        layer, module, query, key, value, _key_padding_from_2d(attention_mask, key.shape[2]),
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
    if attention_mask is not None:  # additive [B, 1, 1, N]: 0 for tokens, dtype-min for padding
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


def _make_pre_hook(state):
    def pre_hook(module, args, kwargs):
        # The post hook runs even when this hook raises (always_call), so count the call first.
        state.depth += 1
        if state.depth == 1:
            output_attentions = kwargs.get("output_attentions")
            if output_attentions is None:
                output_attentions = bool(getattr(state.model.config, "output_attentions", False))
            state.context = _CallContext(output_attentions=bool(output_attentions))
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


def is_patched(model) -> bool:
    return getattr(model, "_fastbertology_state", None) is not None


def patch(model, backend: str = "auto") -> PatchHandle:
    """Patch a loaded BERT, RoBERTa, GPT-2 or OpenAI GPT model in place; return a :class:`PatchHandle`.

    After patching, ``model(..., head_mask=m)`` takes ``m`` of shape ``[H]``, ``[L, H]`` or ``[B, L, H]`` (floats,
    multiplying each head's post-softmax probabilities, differentiable), ``output_attentions=True`` returns the
    masked probabilities ``[B, H, N, N]`` per layer, and :func:`fastbertology.record` collects per-head statistics.

    backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch otherwise), ``"torch"``, ``"triton"`` or
    ``"reference"`` (explicit, for testing).
    """
    spec = model_spec(model)
    if backend not in kernels.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(kernels.BACKENDS)}")
    if is_patched(model):
        raise RuntimeError("this model is already patched by fastbertology; call .remove() on the first handle first")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("models with cross-attention are not supported by fastbertology (self-attention only)")
    modules = spec.attention_modules(model.base_model)
    state = PatchState(model=model, backend=backend, num_layers=len(modules))
    undo = []

    model._fastbertology_state = state
    undo.append(lambda: delattr(model, "_fastbertology_state"))
    for layer, module in enumerate(modules):
        module._fastbertology_layer = (state, layer)
        undo.append(lambda module=module: delattr(module, "_fastbertology_layer"))
        if not spec.uses_attention_interface and "forward" not in vars(module):
            # (a layer pruned to zero heads already has its own instance forward: keep that one)
            module.forward = types.MethodType(_openai_attention_forward, module)
            undo.append(lambda module=module: delattr(module, "forward"))

    if spec.uses_attention_interface:
        _register_implementation()
        previous = model.config._attn_implementation
        model.set_attn_implementation(IMPLEMENTATION_NAME)
        undo.append(lambda: model.set_attn_implementation(previous))

    hooked = [model] if model.base_model is model else [model, model.base_model]
    for module in hooked:
        pre = module.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True)
        post = module.register_forward_hook(_make_post_hook(state), always_call=True)
        undo.extend([pre.remove, post.remove])
    return PatchHandle(state, undo)

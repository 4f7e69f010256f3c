"""Physical head pruning for transformers 5 (which removed ``PreTrainedModel.prune_heads``).

``prune_heads(model, {layer: [heads]})`` removes the heads' rows of Q, K and V (weights and biases) and the
matching input columns of the attention output projection (its bias stays), updates the attention modules'
head counts so the model runs, and records the removed heads in ``config.pruned_heads`` as
``{layer: sorted ORIGINAL head indices}``. A pruned head contributes exactly what a head mask of 0 gives
(transformers 4.x semantics): its context output is zero, so the output projection never sees it.

Head indices given to ``prune_heads`` refer to a layer's CURRENT heads (as in transformers 4.x): after pruning
head 0 of a 4-head layer, index 0 means original head 1. ``config.pruned_heads`` always holds original indices.

A layer may lose all of its heads. Its attention module then short-circuits (an instance-level ``forward``):
the context is a ``[..., 0]`` tensor, so the attention block outputs just the output projection's bias, and the
attention probabilities (when the model returns them) are an empty ``[B, 0, N_q, N_k]`` tensor.

``load_pruned`` reads a ``save_pretrained`` checkpoint of a pruned model (safetensors only, no remote code).

Which modules hold a family's heads, and how (separate ``nn.Linear`` projections or a fused ``Conv1D``), comes from
the architecture registry (:mod:`fastbertology.architectures`).
"""

from __future__ import annotations

import functools
import json
import operator
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .architectures import Architecture, architecture, transformer_layers

__all__ = [
    "count_parameters",
    "heads_to_prune_from_mask",
    "load_pruned",
    "prune_heads",
    "pruned_heads",
]

HeadsToPrune = Mapping[int, Iterable[int]]


# ---------------------------------------------------------------------------------------------------------------
# Tensor surgery
# ---------------------------------------------------------------------------------------------------------------


def _head_index(heads: Iterable[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Feature indices ``[len(heads) * head_dim]`` of the given heads in a ``[num_heads * head_dim]`` axis."""
    heads = torch.as_tensor(list(heads), dtype=torch.long, device=device)
    offsets = torch.arange(head_dim, dtype=torch.long, device=device)
    return (heads[:, None] * head_dim + offsets[None, :]).reshape(-1)


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap ``module.<name>`` for a new Parameter holding ``value`` (same ``requires_grad``)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))


def _select_linear_outputs(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features ``index`` of an ``nn.Linear``: weight ``[out, in] -> [len(index), in]``, bias too."""
    _replace_parameter(linear, "weight", linear.weight.index_select(0, index))
    if linear.bias is not None:
        _replace_parameter(linear, "bias", linear.bias.index_select(0, index))
    linear.out_features = index.numel()


def _select_linear_inputs(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features ``index`` of an ``nn.Linear``: weight ``[out, in] -> [out, len(index)]``; bias kept."""
    _replace_parameter(linear, "weight", linear.weight.index_select(1, index))
    linear.in_features = index.numel()


def _select_conv1d_outputs(conv: nn.Module, index: torch.Tensor) -> None:
    """Keep output features ``index`` of a transformers ``Conv1D``: weight ``[nx, nf] -> [nx, len(index)]``."""
    _replace_parameter(conv, "weight", conv.weight.index_select(1, index))
    _replace_parameter(conv, "bias", conv.bias.index_select(0, index))
    conv.nf = index.numel()


def _select_conv1d_inputs(conv: nn.Module, index: torch.Tensor) -> None:
    """Keep input features ``index`` of a ``Conv1D``: weight ``[nx, nf] -> [len(index), nf]``; bias kept."""
    _replace_parameter(conv, "weight", conv.weight.index_select(0, index))
    conv.nx = index.numel()


def _fused_qkv_index(keep: torch.Tensor, split_size: int) -> torch.Tensor:
    """Indices into a fused ``[3 * split_size]`` q|k|v axis keeping features ``keep`` of each part."""
    return torch.cat([keep, keep + split_size, keep + 2 * split_size])


# ---------------------------------------------------------------------------------------------------------------
# Forwards for attention modules with no heads left
# ---------------------------------------------------------------------------------------------------------------


def _returns_weights(module: nn.Module) -> bool:
    """Whether the module's attention implementation returns probabilities (eager and custom ones do)."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    return not (impl == "sdpa" or impl.startswith(("flash", "paged")))


def _empty_probs(hidden_states: torch.Tensor, key_length: int) -> torch.Tensor:
    """Attention probabilities of a layer with no heads: ``[B, 0, N_q, N_k]``."""
    batch, query_length = hidden_states.shape[0], hidden_states.shape[1]
    return hidden_states.new_zeros(batch, 0, query_length, key_length)


def _advance_cache(cache, hidden_states: torch.Tensor, layer_idx: int, kwargs: dict) -> int:
    """Record ``N_q`` new positions in ``cache`` for a layer with no heads; returns the key length.

    The keys/values stored are ``[B, 1, N_q, 1]`` zeros (never read): transformers 5's ``DynamicLayer`` reports a
    sequence length of 0 for zero-element tensors, which would break positions during generation when the
    layer whose length is queried (layer 0) has no heads.
    """
    batch, query_length = hidden_states.shape[0], hidden_states.shape[1]
    dummy = hidden_states.new_zeros(batch, 1, query_length, 1)
    keys, _ = cache.update(dummy, dummy, layer_idx, kwargs=kwargs)
    return keys.shape[-2]


def _self_attention_cache(cache):
    """The self-attention part of an ``EncoderDecoderCache`` (or the cache itself)."""
    return getattr(cache, "self_attention_cache", cache)


def _bert_empty_forward(module: nn.Module, hidden_states: torch.Tensor, attention_mask=None, cache=None, **kwargs):
    """``BertSelfAttention.forward`` with 0 heads: ``hidden_states [B, N, D] -> ([B, N, 0], probs or None)``."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    key_length = hidden_states.shape[1]
    if cache is not None:
        key_length = _advance_cache(_self_attention_cache(cache), hidden_states, module.layer_idx, kwargs)
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    probs = _empty_probs(hidden_states, key_length) if _returns_weights(module) else None
    return context, probs


def _gpt2_empty_forward(module: nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """``GPT2Attention.forward`` with 0 heads: ``[B, N, D] -> (c_proj bias [B, N, D], probs or None)``."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    key_length = hidden_states.shape[1]
    if cache is not None:
        key_length = _advance_cache(_self_attention_cache(cache), hidden_states, module.layer_idx, kwargs)
    output = _conv1d_of_nothing(module.c_proj, hidden_states)
    probs = _empty_probs(hidden_states, key_length) if _returns_weights(module) else None
    return module.resid_dropout(output), probs


def _openai_empty_forward(module: nn.Module, x: torch.Tensor, attention_mask=None, output_attentions=False):
    """openai-gpt ``Attention.forward`` with 0 heads: ``[B, N, D] -> [c_proj bias [B, N, D], (probs [B,0,N,N])]``."""
    outputs = [module.resid_dropout(_conv1d_of_nothing(module.c_proj, x))]
    if output_attentions:
        outputs.append(_empty_probs(x, x.shape[1]))
    return outputs


def _conv1d_of_nothing(conv: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """What a ``Conv1D`` with 0 input features returns for ``like [..., D]``: its bias, ``[..., nf]``.

    (``Conv1D.forward`` itself fails on 0 inputs: ``x.view(-1, 0)`` is ambiguous.)
    """
    return like.new_zeros(*like.shape[:-1], conv.nf) + conv.bias


def _install_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``module(...)`` run ``forward(module, ...)``; hooks and the module's class stay as they are.

    The class must stay: transformers 5 records ``output_attentions`` with forward hooks on modules matched by class.
    """
    module.forward = functools.partial(forward, module)


# ---------------------------------------------------------------------------------------------------------------
# Pruning one layer, by projection layout (the registry says which layout a family has)
# ---------------------------------------------------------------------------------------------------------------

# by what the self-attention module returns (Projections.empty): its context before the output projection, or
# the projected output as a tuple, or as a list (the legacy modules that take output_attentions themselves)
_EMPTY_FORWARDS = {"context": _bert_empty_forward, "projected": _gpt2_empty_forward,
                   "projected-list": _openai_empty_forward}


def _part(module: nn.Module, path: str) -> nn.Module:
    """``module.<path>`` for a dotted path (``"self.query"``)."""
    return operator.attrgetter(path)(module)


def _prune_layer(entry: Architecture, layer: nn.Module, heads: list[int]) -> None:
    """Remove current heads ``heads`` of one layer: q/k/v rows and output-projection columns (by the layout of
    ``entry.projections``), then the head counts; a layer left without heads gets an empty forward."""
    projections = entry.projections
    block, self_attention = entry.attention_block(layer), entry.self_attention(layer)
    num_heads = entry.heads(self_attention)
    gone = set(heads)
    keep = [h for h in range(num_heads) if h not in gone]
    if projections.layout == "separate":
        query = _part(block, projections.query)
        head_dim = query.out_features // num_heads
        index = _head_index(keep, head_dim, query.weight.device)
        for path in (projections.query, projections.key, projections.value):
            _select_linear_outputs(_part(block, path), index)
        _select_linear_inputs(_part(block, projections.output), index)
    elif projections.layout == "fused-conv1d":
        qkv = _part(block, projections.qkv)
        width = qkv.nf // 3
        head_dim = width // num_heads
        index = _head_index(keep, head_dim, qkv.weight.device)
        _select_conv1d_outputs(qkv, _fused_qkv_index(index, width))
        _select_conv1d_inputs(_part(block, projections.output), index)
    else:
        raise ValueError(f"unknown projection layout {projections.layout!r} in the {entry.name} registry entry")
    setattr(self_attention, projections.heads_attribute, len(keep))
    for name in projections.width_attributes:
        setattr(self_attention, name, len(keep) * head_dim)
    if not keep:
        _install_forward(self_attention, _EMPTY_FORWARDS[projections.empty])


def _head_parameters(entry: Architecture, layer: nn.Module) -> int:
    """Q, K, V weights and biases plus the output projection's weight of one layer (what shrinks with heads)."""
    projections = entry.projections
    block = entry.attention_block(layer)
    paths = (projections.query, projections.key, projections.value) if projections.layout == "separate" else (
        projections.qkv,)
    qkv = sum(p.numel() for path in paths for p in _part(block, path).parameters())
    return qkv + _part(block, projections.output).weight.numel()


# ---------------------------------------------------------------------------------------------------------------
# Index bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def pruned_heads(config) -> dict[int, list[int]]:
    """``config.pruned_heads`` normalised to ``{int layer: sorted list of original heads}`` (``{}`` if absent).

    JSON turns the layer keys into strings; this turns them back.
    """
    recorded = getattr(config, "pruned_heads", None) or {}
    return {int(layer): sorted(int(h) for h in heads) for layer, heads in recorded.items() if len(heads) > 0}


def heads_to_prune_from_mask(mask) -> dict[int, list[int]]:
    """``{layer: [heads whose mask is 0]}`` from a ``[L, H]`` 0/1 head mask (tensor, ndarray or nested list).

    Layers with nothing to prune are left out. The indices are the mask's columns, so for an already pruned model
    the mask must cover the current heads of each layer.
    """
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"A head mask for pruning must have shape [num_layers, num_heads]; got {array.shape}.")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("A head mask for pruning must contain only 0 (prune) and 1 (keep).")
    return {layer: np.flatnonzero(row == 0).tolist() for layer, row in enumerate(array) if (row == 0).any()}


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}.") from None


def _validated_request(heads_to_prune, num_layers: int, current_heads: Callable[[int], int]) -> dict[int, list[int]]:
    """Check layers and current head indices; returns ``{layer: sorted unique heads}`` without empty layers."""
    if isinstance(heads_to_prune, (torch.Tensor, np.ndarray)):
        heads_to_prune = heads_to_prune_from_mask(heads_to_prune)
    if not isinstance(heads_to_prune, Mapping):
        raise ValueError("heads_to_prune must be a dict {layer: [head indices]} or a [L, H] 0/1 head mask.")
    request: dict[int, list[int]] = {}
    for layer_key, heads in heads_to_prune.items():
        # (layer keys may be strings of integers, as in a JSON-loaded ``pruned_heads``)
        layer = _as_int(int(layer_key) if isinstance(layer_key, str) and layer_key.isdigit() else layer_key,
                        "A layer index")
        if not 0 <= layer < num_layers:
            raise ValueError(f"Layer index {layer} is out of range: the model has {num_layers} layers.")
        if layer in request:
            raise ValueError(f"Layer {layer} is given twice.")
        heads = [_as_int(h, f"A head index of layer {layer}") for h in heads]
        available = current_heads(layer)
        bad = [h for h in heads if not 0 <= h < available]
        if bad:
            raise ValueError(
                f"Head indices {bad} of layer {layer} are out of range: the layer has {available} heads now "
                "(indices refer to the layer's current heads)."
            )
        if len(set(heads)) != len(heads):
            raise ValueError(f"Duplicate head indices for layer {layer}: {heads}.")
        if heads:
            request[layer] = sorted(heads)
    return request


def _remaining_original_heads(config, layer: int, current: int) -> list[int]:
    """Original indices of a layer's current heads, from ``config.pruned_heads``; checks the count agrees."""
    total = config.num_attention_heads
    gone = set(pruned_heads(config).get(layer, []))
    remaining = [h for h in range(total) if h not in gone]
    if len(remaining) != current:
        raise ValueError(
            f"config.pruned_heads says layer {layer} has {len(remaining)} of {total} heads left, but its attention "
            f"module has {current}; the config does not describe this model."
        )
    return remaining


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def prune_heads(model: nn.Module, heads_to_prune: HeadsToPrune | torch.Tensor | np.ndarray) -> nn.Module:
    """Physically remove attention heads, in place; returns ``model``.

    Args:
        model: a transformers 5 BERT, RoBERTa, GPT-2 or OpenAI GPT model (any head class).
        heads_to_prune: ``{layer: [head indices]}`` with indices of the layer's CURRENT heads, or a ``[L, H]``
            0/1 head mask (0 = prune) as a tensor or ndarray, for a model whose layers still have ``H`` heads.

    Per pruned head of size ``d``: Q, K, V lose ``d`` output rows (weight ``[d, D]`` and bias ``[d]`` each) and
    the output projection loses ``d`` input columns (its bias stays). ``config.pruned_heads`` becomes
    ``{layer: sorted original indices}``, merged with earlier prunes. All inputs are validated before anything
    changes; bad layer or head indices raise ``ValueError``.
    """
    entry = architecture(model)
    layers = transformer_layers(model)
    config = model.config

    def current_heads(layer: int) -> int:
        return entry.heads(entry.self_attention(layers[layer]))

    request = _validated_request(heads_to_prune, len(layers), current_heads)
    originals = {layer: _remaining_original_heads(config, layer, current_heads(layer)) for layer in request}

    record = pruned_heads(config)
    for layer, heads in request.items():
        _prune_layer(entry, layers[layer], heads)
        record[layer] = sorted(set(record.get(layer, [])) | {originals[layer][h] for h in heads})
    config.pruned_heads = dict(sorted(record.items()))
    return model


def count_parameters(model: nn.Module, *, attention_heads_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once).

    With ``attention_heads_only=True``: only the parameters that pruning removes head by head, i.e. Q, K, V
    weights and biases and the attention output projections' weights, summed over layers.
    """
    if not attention_heads_only:
        return sum(p.numel() for p in model.parameters())
    entry = architecture(model)
    return sum(_head_parameters(entry, layer) for layer in transformer_layers(model))


# ---------------------------------------------------------------------------------------------------------------
# Loading a pruned checkpoint
# ---------------------------------------------------------------------------------------------------------------

_WEIGHTS_NAME = "model.safetensors"
_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path/model.safetensors`` or in the shards listed by ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = os.path.join(path, _WEIGHTS_NAME)
    index = os.path.join(path, _WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise FileNotFoundError(f"No {_WEIGHTS_NAME} or {_WEIGHTS_INDEX_NAME} in {path} (only safetensors are loaded).")


def _build_model(model_class, config, **kwargs) -> nn.Module:
    """Construct a randomly initialised model from ``config`` (a PreTrainedModel class or an Auto class)."""
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class._from_config(config, **kwargs)
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config, **kwargs)
    raise TypeError(f"{model_class!r} is neither a transformers model class nor an Auto model class.")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that tolerates only missing keys aliasing a loaded tensor (tied weights)."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"The checkpoint has weights the pruned model does not: {sorted(result.unexpected_keys)}")
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded = {id(tensors[name]) for name in state if name in tensors}
    missing = [name for name in result.missing_keys if id(tensors.get(name)) not in loaded]
    if missing:
        raise ValueError(f"The checkpoint lacks weights of the model: {sorted(missing)}")


def load_pruned(model_class, path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a ``save_pretrained`` directory of a (possibly) pruned model, in eval mode.

    Args:
        model_class: a transformers model class (``BertForSequenceClassification``, ...) or an Auto class.
        path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded safetensors index).
        **kwargs: as for ``from_pretrained``: config attributes (``num_labels=``, ``dtype=``,
            ``attn_implementation=``, ...) override the saved config; the rest go to the model's constructor.

    The model is built with the config's full head counts, pruned to ``config.pruned_heads``, then given the
    checkpoint's weights. Never runs remote code; reads safetensors only.
    """
    from transformers import AutoConfig

    if kwargs.pop("trust_remote_code", False):
        raise ValueError("load_pruned never runs remote code (trust_remote_code=True is refused).")
    if not kwargs.pop("use_safetensors", True):
        raise ValueError("load_pruned reads safetensors only (use_safetensors=False is refused).")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory saved with save_pretrained.")
    config_class = getattr(model_class, "config_class", None) or AutoConfig
    config, model_kwargs = config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
    to_prune = pruned_heads(config)
    config.pruned_heads = {}
    model = _build_model(model_class, config, **model_kwargs)
    prune_heads(model, to_prune)  # on a fresh model, current indices are the original ones
    _load_state(model, _read_safetensors(path))
    return model.eval()

"""Physical head pruning for transformers 5 (which removed ``PreTrainedModel.prune_heads``).

``prune_heads(model, {row: [heads]})`` removes the heads' rows of Q, K and V (weights and biases) and the
matching input columns of the attention output projection (its bias stays), updates the attention modules'
head counts so the model runs, and records the removed heads in ``config.pruned_heads`` as
``{row: sorted ORIGINAL head indices}``. A pruned head contributes exactly what a head mask of 0 gives
(transformers 4.x semantics): its context output is zero, so the output projection never sees it. Rows are those
of :mod:`fastbertology.architectures` (a layer; for BART encoder | decoder self-attention | cross-attention).

Head indices given to ``prune_heads`` refer to a row's CURRENT heads (as in transformers 4.x): after pruning
head 0 of a 4-head layer, index 0 means original head 1. ``config.pruned_heads`` always holds original indices.

**Projection layouts** (the registry's :class:`~fastbertology.architectures.Projections`): separate q/k/v/o
``nn.Linear`` (k/v possibly with fewer heads), GPT-2's fused ``Conv1D``, GPT-NeoX's fused per-head
``query_key_value`` (``[H, 3, d]`` rows), Phi-3's fused ``qkv_proj`` (q ``[H d]`` | k ``[H_kv d]`` | v ``[H_kv d]``).

**Grouped-query attention.** Pruning removes query heads: their q rows and o columns. A key/value head is removed
when every query head of its group is gone. While every remaining key/value head keeps the same number of query
heads, the layer is stock grouped-query attention again (``num_key_value_groups`` is updated). Otherwise (*unequal
groups*) stock transformers cannot run it: the module records the key/value head of each query head
(``_fastbertology_kv_heads``), ``config.fastbertology_unequal_groups`` lists such rows (saved with the model), and
the model's attention implementation becomes fastbertology's, which runs those layers with or without
:func:`fastbertology.patch` (unpatched: no head masks, no statistics). :func:`load_pruned` restores all of that.

**Shared layers** (ALBERT): one attention module serves several rows, so its heads can only be removed from all of
them at once: a request must prune the same (current) heads in every row of a shared module, else ValueError.

A layer may lose all of its heads. Its attention module then short-circuits (an instance-level ``forward``): it
returns what its output projection makes of nothing (its bias), and the attention probabilities (when the model
returns them) are an empty ``[B, 0, N_q, N_k]`` tensor.

``load_pruned`` reads a ``save_pretrained`` checkpoint of a pruned model (safetensors only, no remote code), with
transformers' weight conversions of everything but the attention projections (:mod:`fastbertology.pruned_checkpoint`).
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .architectures import Architecture, AttentionSite, Projections, architecture, attention_sites
from .patching import IMPLEMENTATION_NAME, UNEQUAL_GROUPS, register_implementation
from .pruned_checkpoint import load_state, read_safetensors
from .pruned_config import read_pruned_heads

__all__ = [
    "count_parameters",
    "heads_to_prune_from_mask",
    "load_pruned",
    "prune_heads",
    "pruned_heads",
    "requires_patch",
]

HeadsToPrune = Mapping[int, Iterable[int]]


# ---------------------------------------------------------------------------------------------------------------
# Tensor surgery
# ---------------------------------------------------------------------------------------------------------------


def _head_index(heads: Iterable[int], head_dim: int, device: torch.device, *, offset: int = 0) -> torch.Tensor:
    """Feature indices ``[len(heads) * head_dim]`` of the given heads in a ``[num_heads * head_dim]`` axis that
    starts at ``offset``."""
    heads = torch.as_tensor(list(heads), dtype=torch.long, device=device)
    offsets = torch.arange(head_dim, dtype=torch.long, device=device)
    return (offset + heads[:, None] * head_dim + offsets[None, :]).reshape(-1)


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


def _key_length(module: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> int:
    """The key length an attention call with no heads would have had; advances a generation cache (self-attention
    only: a cross-attention's keys are the encoder's, ``key_value_states``)."""
    cross = kwargs.get("key_value_states")
    if cross is not None:
        return cross.shape[1]
    cache = next((kwargs[name] for name in ("cache", "past_key_values", "layer_past") if kwargs.get(name) is not None),
                 None)
    if cache is None:
        return hidden_states.shape[1]
    return _advance_cache(_self_attention_cache(cache), hidden_states, module.layer_idx, kwargs)


def _project_nothing(projection: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """What an output projection with 0 input features returns for ``like [..., D]``: its bias ``[..., out]`` (or
    zeros). (``Conv1D.forward`` itself fails on 0 inputs: ``x.view(-1, 0)`` is ambiguous.)"""
    width = projection.out_features if isinstance(projection, nn.Linear) else projection.nf
    out = like.new_zeros(*like.shape[:-1], width)
    return out if projection.bias is None else out + projection.bias


def _context_empty_forward(module: nn.Module, projections: Projections, hidden_states: torch.Tensor, *args,
                           **kwargs):
    """A module that returns its context (BERT's self-attention) with 0 heads: ``[B, N, D] -> ([B, N, 0], probs)``."""
    key_length = _key_length(module, hidden_states, kwargs)
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    return context, (_empty_probs(hidden_states, key_length) if _returns_weights(module) else None)


def _projected_empty_forward(module: nn.Module, projections: Projections, hidden_states: torch.Tensor, *args,
                             **kwargs):
    """A module that returns its projected output with 0 heads: ``[B, N, D] -> (output bias [B, N, D], probs)``."""
    key_length = _key_length(module, hidden_states, kwargs)
    output = _project_nothing(_part(module, projections.output), hidden_states)
    return output, (_empty_probs(hidden_states, key_length) if _returns_weights(module) else None)


def _projected_list_empty_forward(module: nn.Module, projections: Projections, x: torch.Tensor,
                                  attention_mask=None, output_attentions=False):
    """openai-gpt ``Attention.forward`` with 0 heads: ``[B, N, D] -> [c_proj bias [B, N, D], (probs [B,0,N,N])]``."""
    outputs = [_project_nothing(_part(module, projections.output), x)]
    if output_attentions:
        outputs.append(_empty_probs(x, x.shape[1]))
    return outputs


def _projected_norm_empty_forward(module: nn.Module, projections: Projections, hidden_states: torch.Tensor, *args,
                                  **kwargs):
    """A module that returns ``norm(hidden + projected)`` (ALBERT) with 0 heads: ``(norm(hidden + bias), probs)``."""
    output = _project_nothing(_part(module, projections.output), hidden_states)
    norm = _part(module, projections.residual_norm)
    probs = _empty_probs(hidden_states, hidden_states.shape[1]) if _returns_weights(module) else None
    return norm(hidden_states + output), probs


# by what the attention module returns (Projections.empty)
_EMPTY_FORWARDS = {"context": _context_empty_forward, "projected": _projected_empty_forward,
                   "projected-list": _projected_list_empty_forward, "projected-norm": _projected_norm_empty_forward}


def _install_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``module(...)`` run ``forward(module, ...)``; hooks and the module's class stay as they are.

    The class must stay: transformers 5 records ``output_attentions`` with forward hooks on modules matched by class.
    """
    module.forward = functools.partial(forward, module)


# ---------------------------------------------------------------------------------------------------------------
# Pruning one attention module, by projection layout (the registry says which layout a family has)
# ---------------------------------------------------------------------------------------------------------------


def _part(module: nn.Module, path: str) -> nn.Module:
    """``module.<path>`` for a dotted path (``"self.query"``)."""
    return operator.attrgetter(path)(module)


class _LayerConfig:
    """A per-layer view of a model config: ``overrides`` (head counts) on top of the live model config (every
    other attribute, ``_attn_implementation`` included, is the model's). For modules whose forward reads head
    counts from ``self.config`` (Phi-3)."""

    def __init__(self, config, **overrides):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_config", "_overrides"):
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_config"), name, value)


def _group_of(original_heads: int, original_kv_heads: int) -> int:
    """Query heads per key/value head in the unpruned model (1 without grouped-query attention)."""
    return original_heads // max(original_kv_heads, 1)


def _prune_module(entry: Architecture, site: AttentionSite, remove: list[int], before: list[int],
                  after: list[int], group: int) -> None:
    """Remove current heads ``remove`` of one attention module. ``before`` / ``after``: the original indices of its
    query heads before and after; ``group``: original query heads per key/value head. Cuts the projections by
    layout, then updates head counts, grouped-query bookkeeping and (0 heads) the forward."""
    projections = entry.projections
    module, block = site.module, site.block
    head_dim = projections.head_dim(module, block)
    keep = [h for h in range(len(before)) if h not in set(remove)]
    kv_before = sorted({h // group for h in before})
    kv_after = sorted({h // group for h in after})
    keep_kv = [kv_before.index(k) for k in kv_after]
    heads, kv_heads = len(before), len(kv_before)
    if projections.layout == "separate":
        query = _part(block, projections.query)
        device = query.weight.device
        _select_linear_outputs(query, _head_index(keep, head_dim, device))
        for path in (projections.key, projections.value):
            _select_linear_outputs(_part(block, path), _head_index(keep_kv, head_dim, device))
        _select_linear_inputs(_part(block, projections.output), _head_index(keep, head_dim, device))
    elif projections.layout == "fused-conv1d":
        qkv = _part(block, projections.qkv)
        width = qkv.nf // 3
        index = _head_index(keep, head_dim, qkv.weight.device)
        _select_conv1d_outputs(qkv, torch.cat([index, index + width, index + 2 * width]))
        _select_conv1d_inputs(_part(block, projections.output), index)
    elif projections.layout == "fused-per-head":
        qkv = _part(block, projections.qkv)
        _select_linear_outputs(qkv, _head_index(keep, 3 * head_dim, qkv.weight.device))
        _select_linear_inputs(_part(block, projections.output), _head_index(keep, head_dim, qkv.weight.device))
    elif projections.layout == "fused-qkv":
        qkv = _part(block, projections.qkv)
        device = qkv.weight.device
        _select_linear_outputs(qkv, torch.cat([
            _head_index(keep, head_dim, device), _head_index(keep_kv, head_dim, device, offset=heads * head_dim),
            _head_index(keep_kv, head_dim, device, offset=(heads + kv_heads) * head_dim)]))
        _select_linear_inputs(_part(block, projections.output), _head_index(keep, head_dim, device))
    else:  # Projections checks its layout: only a layout added there but not here gets here
        raise ValueError(f"pruning does not know projection layout {projections.layout!r} ({entry.name})")
    for path, kind in projections.head_norms:
        norms = _part(module, path)  # an nn.ModuleList, one module per head
        kept = [norms[h] for h in (keep if kind == "query" else keep_kv)]
        norms._modules.clear()
        norms.extend(kept)
    for path in projections.head_parameters:  # one entry per query head: keep the remaining heads'
        owner, _, name = path.rpartition(".")
        owner = _part(module, owner) if owner else module
        parameter = getattr(owner, name)
        index = torch.as_tensor(keep, dtype=torch.long, device=parameter.device)
        setattr(owner, name, nn.Parameter(parameter.detach().index_select(0, index),
                                          requires_grad=parameter.requires_grad))
    _update_counts(projections, module, after, kv_after, group, head_dim)
    if not keep:
        _install_forward(module, _empty_forward(projections))


def _empty_forward(projections: Projections) -> Callable:
    """The no-heads forward of ``projections.empty``, as ``forward(module, *args, **kwargs)``."""
    forward = _EMPTY_FORWARDS[projections.empty]

    def empty(module, *args, **kwargs):
        return forward(module, projections, *args, **kwargs)

    return empty


def _update_counts(projections: Projections, module: nn.Module, after: list[int], kv_after: list[int], group: int,
                   head_dim: int) -> None:
    """Head counts, widths and grouped-query bookkeeping of a module whose query heads are now ``after`` (original
    indices) and key/value heads ``kv_after``."""
    if projections.heads_attribute:
        setattr(module, projections.heads_attribute, len(after))
    if projections.kv_heads_attribute:
        setattr(module, projections.kv_heads_attribute, len(kv_after))
    for name in projections.width_attributes:
        setattr(module, name, len(after) * head_dim)
    if projections.config_head_counts:
        config = module.config
        base = object.__getattribute__(config, "_config") if isinstance(config, _LayerConfig) else config
        module.config = _LayerConfig(base, num_attention_heads=len(after), num_key_value_heads=len(kv_after))
    sizes = [sum(1 for h in after if h // group == k) for k in kv_after]
    if len(set(sizes)) <= 1:  # equal groups (or no heads): stock grouped-query attention
        if projections.groups_attribute and sizes:
            setattr(module, projections.groups_attribute, sizes[0])
        if hasattr(module, "_fastbertology_kv_heads"):
            del module._fastbertology_kv_heads
    else:
        module._fastbertology_kv_heads = tuple(kv_after.index(h // group) for h in after)
        if projections.groups_attribute:
            setattr(module, projections.groups_attribute, None)  # stock repeat_kv cannot run this layer


def _head_parameters(entry: Architecture, block: nn.Module) -> int:
    """Q, K, V weights and biases plus the output projection's weight of one block (what shrinks with heads)."""
    projections = entry.projections
    paths = (projections.query, projections.key, projections.value) if projections.layout == "separate" else (
        projections.qkv,)
    qkv = sum(p.numel() for path in paths for p in _part(block, path).parameters())
    return qkv + _part(block, projections.output).weight.numel()


# ---------------------------------------------------------------------------------------------------------------
# Index bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def pruned_heads(config) -> dict[int, list[int]]:
    """``config.pruned_heads`` normalised to ``{int row: sorted list of original heads}`` (``{}`` if absent).

    JSON turns the row keys into strings; this turns them back. A malformed field raises ValueError naming it
    (:func:`fastbertology.pruned_config.read_pruned_heads`).
    """
    return read_pruned_heads(getattr(config, "pruned_heads", None) or None)


def requires_patch(config) -> list[int]:
    """The rows of a model pruned to unequal key/value groups (which run only through fastbertology's attention);
    ``[]`` for every other model."""
    return sorted(int(row) for row in getattr(config, UNEQUAL_GROUPS, None) or [])


def heads_to_prune_from_mask(mask) -> dict[int, list[int]]:
    """``{row: [heads whose mask is 0]}`` from a ``[L, H]`` 0/1 head mask (tensor, ndarray or nested list).

    Rows with nothing to prune are left out. The indices are the mask's columns, so for an already pruned model
    the mask must cover the current heads of each row.
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
    """Check rows and current head indices; returns ``{row: sorted unique heads}`` without empty rows."""
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


def _remaining_original_heads(config, total: int, layer: int, current: int) -> list[int]:
    """Original indices of a row's current heads, from ``config.pruned_heads``; checks the count agrees."""
    gone = set(pruned_heads(config).get(layer, []))
    remaining = [h for h in range(total) if h not in gone]
    if len(remaining) != current:
        raise ValueError(
            f"config.pruned_heads says layer {layer} has {len(remaining)} of {total} heads left, but its attention "
            f"module has {current}; the config does not describe this model."
        )
    return remaining


def _shared_groups(sites: list[AttentionSite], request: dict[int, list[int]]) -> list[list[int]]:
    """The requested rows grouped by attention module; a shared module (ALBERT) must get the same heads in every
    one of its rows (ValueError otherwise)."""
    rows_of: dict[int, list[int]] = {}
    for site in sites:
        rows_of.setdefault(id(site.module), []).append(site.row)
    groups, seen = [], set()
    for row in request:
        rows = rows_of[id(sites[row].module)]
        if rows[0] in seen:
            continue
        seen.add(rows[0])
        if len(rows) > 1 and any(request.get(other) != request[row] for other in rows):
            asked = {other: request.get(other, []) for other in rows}
            raise ValueError(
                f"rows {rows} share one attention module (the model applies the same layer weights in each), so a "
                f"head can only be pruned from all of them at once; the request prunes {asked}. Prune the same heads "
                "in every one of these rows (masking a head in one row only is what head masks are for)")
        groups.append(rows)
    return groups


def _mark_unequal_groups(model: nn.Module, sites: list[AttentionSite]) -> None:
    """Record the rows pruned to unequal key/value groups in the config, and route the model's attention through
    fastbertology's implementation while there are any (stock attention cannot run them)."""
    rows = sorted(site.row for site in sites if getattr(site.module, "_fastbertology_kv_heads", None) is not None)
    config = model.config
    if rows:
        setattr(config, UNEQUAL_GROUPS, rows)
        register_implementation()
        if config._attn_implementation != IMPLEMENTATION_NAME:
            model.set_attn_implementation(IMPLEMENTATION_NAME)
    elif hasattr(config, UNEQUAL_GROUPS):
        delattr(config, UNEQUAL_GROUPS)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def prune_heads(model: nn.Module, heads_to_prune: HeadsToPrune | torch.Tensor | np.ndarray) -> nn.Module:
    """Physically remove attention heads, in place; returns ``model``.

    Args:
        model: a transformers 5 model of a family in the registry (any head class).
        heads_to_prune: ``{row: [head indices]}`` with indices of the row's CURRENT (query) heads, or a ``[L, H]``
            0/1 head mask (0 = prune) as a tensor or ndarray, for a model whose rows still have ``H`` heads.

    Per pruned query head of size ``d``: Q loses ``d`` output rows (weight ``[d, D]`` and bias ``[d]``) and the
    output projection ``d`` input columns (its bias stays); K and V lose theirs with the head (multi-head
    attention) or with the last query head of their group (grouped-query attention). ``config.pruned_heads``
    becomes ``{row: sorted original indices}``, merged with earlier prunes. All inputs are validated before
    anything changes; bad row or head indices, and different heads for the rows of a shared module, raise
    ``ValueError``.
    """
    entry = architecture(model)
    if entry.prune_refusal is not None and entry.prune_refusal(model.config):
        raise ValueError(f"cannot prune this {entry.name} model: {entry.prune_refusal(model.config)}")
    sites = attention_sites(model)
    config = model.config
    total = entry.head_count(config)
    group = _group_of(total, getattr(config, "num_key_value_heads", None) or total)

    def current_heads(row: int) -> int:
        return entry.projections.heads(sites[row].module, sites[row].block)

    request = _validated_request(heads_to_prune, len(sites), current_heads)
    groups = _shared_groups(sites, request)
    originals = {row: _remaining_original_heads(config, total, row, current_heads(row)) for row in request}

    record = pruned_heads(config)
    for rows in groups:
        row = rows[0]
        before = originals[row]
        after = [h for index, h in enumerate(before) if index not in set(request[row])]
        _prune_module(entry, sites[row], request[row], before, after, group)
        for shared in rows:
            record[shared] = sorted(set(record.get(shared, [])) | {before[h] for h in request[row]})
    config.pruned_heads = dict(sorted(record.items()))
    _mark_unequal_groups(model, sites)
    if entry.after_pruning is not None:  # (T5: each row reads the position bias of its remaining heads)
        entry.after_pruning(model, sites)
    return model


def count_parameters(model: nn.Module, *, attention_heads_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once).

    With ``attention_heads_only=True``: only the parameters that pruning removes head by head, i.e. Q, K, V
    weights and biases and the attention output projections' weights, summed over attention modules (a module
    shared by several rows counted once).
    """
    if not attention_heads_only:
        return sum(p.numel() for p in model.parameters())
    entry = architecture(model)
    blocks = {id(site.block): site.block for site in attention_sites(model)}
    return sum(_head_parameters(entry, block) for block in blocks.values())


# ---------------------------------------------------------------------------------------------------------------
# Loading a pruned checkpoint
# ---------------------------------------------------------------------------------------------------------------

def _build_model(model_class, config, **kwargs) -> nn.Module:
    """Construct a randomly initialised model from ``config`` (a PreTrainedModel class or an Auto class)."""
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class._from_config(config, **kwargs)
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config, **kwargs)
    raise TypeError(f"{model_class!r} is neither a transformers model class nor an Auto model class.")


def load_pruned(model_class, path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a ``save_pretrained`` directory of a (possibly) pruned model, in eval mode.

    Args:
        model_class: a transformers model class (``BertForSequenceClassification``, ...) or an Auto class.
        path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded safetensors index).
        **kwargs: as for ``from_pretrained``: config attributes (``num_labels=``, ``dtype=``,
            ``attn_implementation=``, ...) override the saved config; the rest go to the model's constructor.

    The model is built with the config's full head counts, pruned to ``config.pruned_heads``, then given the
    checkpoint's weights. A model pruned to unequal key/value groups comes back with fastbertology's attention
    implementation (see the module docstring): it runs as it is, and through :func:`fastbertology.patch` with
    head masks. Never runs remote code; reads safetensors only.
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
    source = os.path.join(path, "config.json")
    try:
        to_prune = pruned_heads(config)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    config.pruned_heads = {}
    if hasattr(config, UNEQUAL_GROUPS):
        delattr(config, UNEQUAL_GROUPS)  # recomputed by the pruning below
    model = _build_model(model_class, config, **model_kwargs)
    try:
        prune_heads(model, to_prune)  # on a fresh model, current indices are the original ones
    except ValueError as error:
        raise ValueError(f"{source}: pruned_heads {to_prune} does not fit the model: {error}") from None
    try:
        load_state(model, read_safetensors(path))
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"the weights in {path} do not fit the model that {source} describes (pruned_heads "
                         f"{to_prune}): {_first_line(error)}. Save the pruned model again with save_pretrained"
                         ) from None
    return model.eval()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__

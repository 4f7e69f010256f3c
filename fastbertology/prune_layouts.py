"""Cutting one attention module's heads out of its projections, by projection layout (the registry's
:class:`~fastbertology.architectures.Projections` says which layout a family has); :mod:`fastbertology.pruning`
decides which heads and keeps the books.

Layouts: separate q/k/v/o ``nn.Linear`` (k/v possibly with fewer heads), GPT-2's fused ``Conv1D``, GPT-NeoX's fused
per-head ``query_key_value`` (``[H, 3, d]`` rows), Phi-3's fused ``qkv_proj`` (q ``[H d]`` | k ``[H_kv d]`` | v
``[H_kv d]``; Falcon's multi-query ``query_key_value`` with ``H_kv = 1``) and Falcon's new decoder architecture
(``"fused-grouped"``: ``[C, g + 2, d]``, each group's ``g`` query heads, then its key, then its value).

**Key/value groups.** Pruning removes query heads: their q rows and o columns. A key/value head is removed when
every query head of its group is gone. In the ``"fused-grouped"`` layout the model reads every group as ``g``
query heads, so the groups must stay equal in size: the remaining query heads of each original key/value head are
cut into chunks of ``g`` consecutive heads, ``g`` the greatest common divisor of the remaining group sizes, and
every chunk gets its own copy of its original key and value rows. Each query head still reads its own key/value
head, so the pruned layer is exact; the copies are real parameters (``count_parameters`` counts them, and
``num_kv_heads`` counts the chunks). The layout depends only on the remaining original heads, so pruning in steps
gives the same weights as pruning once (what ``load_pruned`` relies on).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .architecture_types import AttentionSite, Projections, submodule
from .prune_empty import install_empty_forward

__all__ = ["check_groups", "head_parameters", "key_value_groups", "prune_module"]


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


def key_value_groups(layout: str, heads: list[int], group: int) -> list[list[int]]:
    """The query heads (original indices, ascending) of each key/value head of a layer whose query heads are
    ``heads`` (original, ascending); ``group``: original query heads per key/value head. The ``"fused-grouped"``
    layout cuts each original group into chunks of equal size (module docstring), the others keep it whole."""
    by_kv: dict[int, list[int]] = {}
    for head in heads:
        by_kv.setdefault(head // group, []).append(head)
    groups = list(by_kv.values())
    if layout != "fused-grouped" or not groups:
        return groups
    size = math.gcd(*(len(part) for part in groups))
    return [part[start:start + size] for part in groups for start in range(0, len(part), size)]


def check_groups(projections: Projections, site: AttentionSite, before: list[int], group: int) -> None:
    """ValueError unless the module's key/value heads are the groups its query heads ``before`` (original indices)
    make (a ``"fused-grouped"`` layout's chunks follow from them; the other layouts need no check)."""
    if projections.layout != "fused-grouped":
        return
    groups = len(key_value_groups(projections.layout, before, group))
    held = projections.kv_heads(site.module, site.block)
    if groups != held:
        raise ValueError(f"row {site.row}'s attention module holds {len(before)} heads in {held} key/value groups, "
                         f"not in the {groups} groups its remaining original heads {before} make: config.pruned_heads "
                         "does not describe this model")


def _fused_grouped_rows(before: list[int], groups_before: list[list[int]], groups_after: list[list[int]],
                        keep_kv: list[int]) -> list[int]:
    """The head-sized rows of a ``"fused-grouped"`` projection (``[C, g + 2, d]``, current layout ``groups_before``)
    that make up the layout ``groups_after``: each group's query rows, then its key and value rows (from current
    group ``keep_kv[i]``, copied where several new groups share one)."""
    size = len(before) // len(groups_before)  # current query heads per group: rows [C, size + 2]
    position = {head: index for index, head in enumerate(before)}
    rows = []
    for heads, kv in zip(groups_after, keep_kv):
        rows += [position[h] // size * (size + 2) + position[h] % size for h in heads]
        rows += [kv * (size + 2) + size, kv * (size + 2) + size + 1]
    return rows


def prune_module(projections: Projections, site: AttentionSite, remove: list[int], before: list[int],
                 after: list[int], group: int) -> None:
    """Remove current heads ``remove`` of one attention module. ``before`` / ``after``: the original indices of its
    query heads before and after; ``group``: original query heads per key/value head. Cuts the projections by
    layout, then updates head counts, grouped-query bookkeeping and (0 heads) the forward."""
    module, block = site.module, site.block
    head_dim = projections.head_dim(module, block)
    keep = [h for h in range(len(before)) if h not in set(remove)]
    groups_before = key_value_groups(projections.layout, before, group)
    groups_after = key_value_groups(projections.layout, after, group)
    current_kv = {head: index for index, heads in enumerate(groups_before) for head in heads}
    keep_kv = [current_kv[heads[0]] for heads in groups_after]  # the current key/value head of each one after
    heads, kv_heads = len(before), len(groups_before)
    if projections.layout == "separate":
        query = submodule(block, projections.query)
        device = query.weight.device
        _select_linear_outputs(query, _head_index(keep, head_dim, device))
        for path in (projections.key, projections.value):
            _select_linear_outputs(submodule(block, path), _head_index(keep_kv, head_dim, device))
        _select_linear_inputs(submodule(block, projections.output), _head_index(keep, head_dim, device))
    elif projections.layout == "fused-conv1d":
        qkv = submodule(block, projections.qkv)
        width = qkv.nf // 3
        index = _head_index(keep, head_dim, qkv.weight.device)
        _select_conv1d_outputs(qkv, torch.cat([index, index + width, index + 2 * width]))
        _select_conv1d_inputs(submodule(block, projections.output), index)
    elif projections.layout == "fused-per-head":
        qkv = submodule(block, projections.qkv)
        _select_linear_outputs(qkv, _head_index(keep, 3 * head_dim, qkv.weight.device))
        _select_linear_inputs(submodule(block, projections.output), _head_index(keep, head_dim, qkv.weight.device))
    elif projections.layout == "fused-qkv":
        qkv = submodule(block, projections.qkv)
        device = qkv.weight.device
        _select_linear_outputs(qkv, torch.cat([
            _head_index(keep, head_dim, device), _head_index(keep_kv, head_dim, device, offset=heads * head_dim),
            _head_index(keep_kv, head_dim, device, offset=(heads + kv_heads) * head_dim)]))
        _select_linear_inputs(submodule(block, projections.output), _head_index(keep, head_dim, device))
    elif projections.layout == "fused-grouped":
        qkv = submodule(block, projections.qkv)
        device = qkv.weight.device
        rows = _fused_grouped_rows(before, groups_before, groups_after, keep_kv)
        _select_linear_outputs(qkv, _head_index(rows, head_dim, device))
        _select_linear_inputs(submodule(block, projections.output), _head_index(keep, head_dim, device))
    else:  # Projections checks its layout: only a layout added there but not here gets here
        raise ValueError(f"pruning does not know projection layout {projections.layout!r}")
    for path, kind in projections.head_norms:
        norms = submodule(module, path)  # an nn.ModuleList, one module per head
        kept = [norms[h] for h in (keep if kind == "query" else keep_kv)]
        norms._modules.clear()
        norms.extend(kept)
    for path in projections.head_parameters:  # one entry per query head: keep the remaining heads'
        owner, _, name = path.rpartition(".")
        owner = submodule(module, owner) if owner else module
        parameter = getattr(owner, name)
        index = torch.as_tensor(keep, dtype=torch.long, device=parameter.device)
        setattr(owner, name, nn.Parameter(parameter.detach().index_select(0, index),
                                          requires_grad=parameter.requires_grad))
    _update_counts(projections, module, after, groups_after, head_dim)
    if not keep:
        install_empty_forward(module, projections)


def _update_counts(projections: Projections, module: nn.Module, after: list[int], groups: list[list[int]],
                   head_dim: int) -> None:
    """Head counts, widths and grouped-query bookkeeping of a module whose query heads are now ``after`` (original
    indices), those of its key/value heads ``groups``."""
    if projections.heads_attribute:
        setattr(module, projections.heads_attribute, len(after))
    if projections.kv_heads_attribute:
        setattr(module, projections.kv_heads_attribute, len(groups))
    for name in projections.width_attributes:
        setattr(module, name, len(after) * head_dim)
    if projections.config_head_counts:
        config = module.config
        base = object.__getattribute__(config, "_config") if isinstance(config, _LayerConfig) else config
        module.config = _LayerConfig(base, num_attention_heads=len(after), num_key_value_heads=len(groups))
    sizes = [len(heads) for heads in groups]
    if len(set(sizes)) <= 1:  # equal groups (or no heads): stock grouped-query attention
        if projections.groups_attribute and sizes:
            setattr(module, projections.groups_attribute, sizes[0])
        if hasattr(module, "_fastbertology_kv_heads"):
            del module._fastbertology_kv_heads
    else:
        kv_of = {head: index for index, heads in enumerate(groups) for head in heads}
        module._fastbertology_kv_heads = tuple(kv_of[h] for h in after)
        if projections.groups_attribute:
            setattr(module, projections.groups_attribute, None)  # stock repeat_kv cannot run this layer


def head_parameters(projections: Projections, block: nn.Module) -> int:
    """Q, K, V weights and biases plus the output projection's weight of one block (what shrinks with heads; the
    ``"fused-grouped"`` layout's key/value copies included)."""
    paths = (projections.query, projections.key, projections.value) if projections.layout == "separate" else (
        projections.qkv,)
    qkv = sum(p.numel() for path in paths for p in submodule(block, path).parameters())
    return qkv + submodule(block, projections.output).weight.numel()

"""Physical head pruning for transformers 5 (which removed ``PreTrainedModel.prune_heads``).

``prune_heads(model, {row: [heads]})`` removes the heads' rows of Q, K and V (weights and biases) and the
matching input columns of the attention output projection (its bias stays), updates the attention modules'
head counts so the model runs, and records the removed heads in ``config.pruned_heads`` as
``{row: sorted ORIGINAL head indices}``. A pruned head contributes exactly what a head mask of 0 gives
(transformers 4.x semantics): its context output is zero, so the output projection never sees it. Rows are those
of :mod:`fastbertology.architectures` (a layer; for BART encoder | decoder self-attention | cross-attention).

Head indices given to ``prune_heads`` refer to a row's CURRENT heads (as in transformers 4.x): after pruning
head 0 of a 4-head layer, index 0 means original head 1. ``config.pruned_heads`` always holds original indices.

**Projection layouts** (the registry's :class:`~fastbertology.architectures.Projections`, chosen by the model's
config: ``Architecture.projections_of``): separate q/k/v/o ``nn.Linear`` (k/v possibly with fewer heads), GPT-2's
fused ``Conv1D``, GPT-NeoX's fused per-head ``query_key_value`` (``[H, 3, d]`` rows), Phi-3's fused ``qkv_proj`` (q
``[H d]`` | k ``[H_kv d]`` | v ``[H_kv d]``; Falcon's multi-query ``query_key_value``, one key/value head) and
Falcon's new decoder architecture (``[C, g + 2, d]``: groups of ``g`` query heads with their key and value). The
cutting is :mod:`fastbertology.prune_layouts`.

**Grouped-query attention.** Pruning removes query heads: their q rows and o columns. A key/value head is removed
when every query head of its group is gone. While every remaining key/value head keeps the same number of query
heads, the layer is stock grouped-query attention again (``num_key_value_groups`` is updated). Otherwise (*unequal
groups*) stock transformers cannot run it: the module records the key/value head of each query head
(``_fastbertology_kv_heads``), ``config.fastbertology_unequal_groups`` lists such rows (saved with the model), and
the model's attention implementation becomes fastbertology's, which runs those layers with or without
:func:`fastbertology.patch` (unpatched: no head masks, no statistics). :func:`load_pruned` restores all of that.
Falcon's new decoder architecture never has unequal groups: its groups are cut into equal chunks, each with a copy
of its key and value rows (exact; :mod:`fastbertology.prune_layouts`).

**Shared layers** (ALBERT): one attention module serves several rows, so its heads can only be removed from all of
them at once: a request must prune the same (current) heads in every row of a shared module, else ValueError.

A layer may lose all of its heads. Its attention module then short-circuits (an instance-level ``forward``): it
returns what its output projection makes of nothing (its bias), and the attention probabilities (when the model
returns them) are an empty ``[B, 0, N_q, N_k]`` tensor (:mod:`fastbertology.prune_empty`).

``load_pruned`` reads a ``save_pretrained`` checkpoint of a pruned model (safetensors only, no remote code), with
transformers' weight conversions of everything but the attention projections (:mod:`fastbertology.pruned_checkpoint`).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .architectures import AttentionSite, architecture, attention_sites
from .patching import IMPLEMENTATION_NAME, UNEQUAL_GROUPS, register_implementation
from .prune_layouts import check_groups, head_parameters, prune_module
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


def _group_of(original_heads: int, original_kv_heads: int) -> int:
    """Query heads per key/value head in the unpruned model (1 without grouped-query attention)."""
    return original_heads // max(original_kv_heads, 1)


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
    sites = attention_sites(model)
    config = model.config
    projections = entry.projections_of(config)
    total = entry.head_count(config)
    group = _group_of(total, entry.kv_head_count(config) or total)

    def current_heads(row: int) -> int:
        return projections.heads(sites[row].module, sites[row].block)

    request = _validated_request(heads_to_prune, len(sites), current_heads)
    groups = _shared_groups(sites, request)
    originals = {row: _remaining_original_heads(config, total, row, current_heads(row)) for row in request}
    for row, before in originals.items():
        check_groups(projections, sites[row], before, group)

    record = pruned_heads(config)
    for rows in groups:
        row = rows[0]
        before = originals[row]
        after = [h for index, h in enumerate(before) if index not in set(request[row])]
        prune_module(projections, sites[row], request[row], before, after, group)
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
    projections = architecture(model).projections_of(model.config)
    blocks = {id(site.block): site.block for site in attention_sites(model)}
    return sum(head_parameters(projections, block) for block in blocks.values())


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

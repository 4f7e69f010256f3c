"""The architecture registry: everything fastbertology knows about a model family, in one place.

One :class:`Architecture` entry per family says where the transformer layers are (one or more :class:`Stack` s:
an encoder, a decoder), which module of a layer computes its self-attention (and its cross-attention), how the
attention projections store their heads (:class:`Projections`: what pruning cuts), whether its attention goes
through transformers' ``AttentionInterface``, which call arguments carry head masks, which layer arguments hold
per-position values, when it builds a generation cache, how many positions it can use, which model classes load
it for each kind of task, and whether it reads text or images. Patching, recording, pruning, sweeps, loading, the
tasks and the benchmark read these entries through the functions below; no other module names a model type.

**Rows.** Every attention module application of a forward pass is an :class:`AttentionSite` with a *row*: its row
in every ``[L, H]`` table (head masks, importance, entropy, sweeps, ``config.pruned_heads``). Rows run over the
stacks in order, the self-attention of each layer first, then (encoder-decoder models) the cross-attention of each
decoder layer: BART's rows (and T5's) are ``encoder 0..Le-1 | decoder self-attention Le..Le+Ld-1 | cross-attention
Le+Ld..Le+2Ld-1``; CLIP's dual model's are ``vision | text`` (the order it runs them). For every other family a
row is a layer.

**Shared layers** (ALBERT). A stack may apply one layer module several times (ALBERT applies one layer
``num_hidden_layers`` times): ``Stack.layers`` lists the *applications* in execution order, so the same module
appears several times, and each application is a row of its own. Masks, statistics and importance are per
application; pruning removes weights that every application shares, so it must remove the same heads from every
application of a module (:mod:`fastbertology.pruning` refuses anything else).

Adding a family is one entry in the family table (plus tests; pruning and patching need new code only for a new
projection layout or a new kind of attention module). A model type that is not there is refused with a message that
names the entry to add; a few families whose attention is outside the kernels' contract are refused by name, with
the feature.

The types live in :mod:`fastbertology.architecture_types`, the family table in :mod:`fastbertology.family_table`
(Whisper's and Gemma 3's entries in :mod:`fastbertology.architectures_more`, which uses the table's helpers); this
module joins them, looks entries up and walks a model's layers.
"""

from __future__ import annotations

from torch import nn

from .architecture_types import (
    CAUSAL_KINDS,
    IMAGE_KINDS,
    LAYOUTS,
    TEXT_KINDS,
    Architecture,
    AttentionSite,
    Projections,
    Stack,
)
from .architectures_more import MORE_ARCHITECTURES, MORE_REFUSED
from .family_table import ARCHITECTURES as TABLE_ARCHITECTURES
from .family_table import REFUSED as TABLE_REFUSED

__all__ = ["Architecture", "Stack", "Projections", "AttentionSite", "ARCHITECTURES", "REFUSED", "architecture",
           "supported_model_types", "transformer_layers", "attention_modules", "attention_sites", "heads_per_layer",
           "kv_heads_per_layer", "attention_blocks", "row_applications", "row_parts", "row_attentions", "LAYOUTS",
           "TEXT_KINDS", "CAUSAL_KINDS", "IMAGE_KINDS"]

ARCHITECTURES: tuple[Architecture, ...] = TABLE_ARCHITECTURES + MORE_ARCHITECTURES
REFUSED = TABLE_REFUSED | MORE_REFUSED
_BY_MODEL_TYPE = {model_type: entry for entry in ARCHITECTURES for model_type in entry.model_types}


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` in the registry."""
    return tuple(_BY_MODEL_TYPE)


def architecture(model_or_config) -> Architecture:
    """The registry entry of a model (or of its config / a ``model_type`` string). ValueError naming the feature
    for refused families, and the supported types and what adding one takes otherwise."""
    config = None
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(f"fastbertology does not support model type {model_type!r}: its attention uses "
                         f"{REFUSED[model_type]}, which the attention kernels do not compute (a head mask there "
                         "would not mean what it means elsewhere)")
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"fastbertology does not support model type {model_type!r}; supported: "
            f"{', '.join(sorted(_BY_MODEL_TYPE))}. A new family is one Architecture entry in "
            "fastbertology/family_table.py (where its layers, attention modules and projections are)."
        )
    entry = _BY_MODEL_TYPE[model_type]
    feature = entry.refuses(config) if config is not None else None
    if feature:
        raise ValueError(f"fastbertology does not support this {entry.name} model: its config sets {feature}, which "
                         "the attention kernels do not compute (a head mask there would not mean what it means "
                         "elsewhere)")
    return entry


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def stack_layers(model: nn.Module) -> list[list[nn.Module]]:
    """The layer applications of every stack, in execution order."""
    entry = architecture(model)
    base = _base(model)
    return [list(stack.layers(base)) for stack in entry.stacks]


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layer applications of ``model`` over all stacks, in execution order (a module that is
    applied several times, as ALBERT's, appears several times)."""
    return [layer for layers in stack_layers(model) for layer in layers]


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention application of a forward pass, in row order (see the module docstring)."""
    entry = architecture(model)
    sites: list[AttentionSite] = []
    cross: list[tuple[nn.Module, nn.Module, int, int]] = []
    application = 0
    for index, (stack, layers) in enumerate(zip(entry.stacks, stack_layers(model))):
        for layer in layers:
            sites.append(AttentionSite(len(sites), stack.self_attention(layer), stack.attention_block(layer),
                                       application, stack.name, index))
            if stack.cross_attention is not None:
                cross.append((stack.cross_attention(layer), stack.cross_block(layer), application, index))
            application += 1
    for module, block, at, index in cross:
        sites.append(AttentionSite(len(sites), module, block, at, "cross", index, cross=True))
    return sites


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every row, in row order (a shared module appears once per application)."""
    return [site.module for site in attention_sites(model)]


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The module that owns the attention projections of every row (what pruning edits), in row order."""
    return [site.block for site in attention_sites(model)]


def heads_per_layer(model: nn.Module) -> list[int]:
    """Current number of (query) heads of every row (pruned rows may have fewer)."""
    projections = architecture(model).projections_of(model.config)
    return [projections.heads(site.module, site.block) for site in attention_sites(model)]


def kv_heads_per_layer(model: nn.Module) -> list[int]:
    """Current number of key/value heads of every row (fewer than the query heads with grouped-query attention)."""
    projections = architecture(model).projections_of(model.config)
    return [projections.kv_heads(site.module, site.block) for site in attention_sites(model)]


def row_applications(model: nn.Module) -> list[int]:
    """For every row, the layer application (over all stacks, in execution order) it belongs to."""
    return [site.application for site in attention_sites(model)]


def row_parts(model: nn.Module) -> list[str]:
    """For every row, what it is: ``"layers"``, ``"encoder"``, ``"decoder"`` or ``"cross"``."""
    return [site.part for site in attention_sites(model)]


def row_attentions(model: nn.Module, output) -> list:
    """The attention maps of a model output (``output_attentions=True``), one ``[B, H, N_q, N_k]`` tensor per row,
    in row order (BART's encoder, decoder and cross-attention maps come in three fields; a model of such a family
    with the encoder only, Whisper's audio classifier, returns its maps as ``attentions``)."""
    maps = []
    names = architecture(model).attention_outputs
    for name in names if any(hasattr(output, name) for name in names) else ("attentions",):
        field = getattr(output, name, None)
        if field is None:
            raise ValueError(f"the model output has no {name!r}: call the model with output_attentions=True")
        maps.extend(field)
    return maps

"""The architecture registry: everything fastbertology knows about a model family, in one place.

One :class:`Architecture` entry per family says where the transformer layers and their self-attention modules are,
how the head count is read, how the attention projections store their heads (what pruning cuts), whether the
family is causal, whether its attention goes through transformers' ``AttentionInterface``, when it builds a
generation cache, how many positions it can use, and what kind of language-model head it has. Patching,
recording, pruning, sweeps, loading, the tasks and the benchmark read these entries through the functions below;
no other module names a model type.

Adding a family is one entry here (plus tests; pruning and patching need new code only for a new projection
layout or a new kind of attention module). A model type that is not here is refused with a message that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Architecture", "Projections", "ARCHITECTURES", "architecture", "supported_model_types",
           "transformer_layers", "attention_modules", "heads_per_layer", "attention_blocks"]


@dataclass(frozen=True)
class Projections:
    """How a layer's attention projections hold their heads (what pruning cuts), relative to the *attention block*
    (:attr:`Architecture.attention_block`).

    layout:     ``"separate"``: ``query``, ``key``, ``value`` and ``output`` are ``nn.Linear`` (weight ``[out, in]``,
                heads along the output features of q/k/v and the input features of the output projection);
                ``"fused-conv1d"``: ``qkv`` is one transformers ``Conv1D`` (weight ``[in, 3 * H * d]``, q | k | v)
                and ``output`` a ``Conv1D`` (weight ``[H * d, out]``).
    head_count: attributes of the self-attention module that hold the head count, and the ones that hold
                ``heads * head_dim`` (updated when heads are removed).
    empty:      which forward a self-attention module with no heads left gets (see :mod:`fastbertology.pruning`),
                by what the module returns: ``"context"`` (its context, before the output projection, and the
                probabilities), ``"projected"`` (the projected output and the probabilities, a tuple) or
                ``"projected-list"`` (the same as a list, for modules that take ``output_attentions`` themselves).
    """

    layout: str
    query: str = ""
    key: str = ""
    value: str = ""
    qkv: str = ""
    output: str = ""
    heads_attribute: str = "num_heads"
    width_attributes: tuple[str, ...] = ()
    empty: str = ""


@dataclass(frozen=True)
class Architecture:
    """One model family.

    model_types:         ``config.model_type`` values of the family.
    layers:              base model -> its transformer layers (blocks), in order.
    self_attention:      layer -> the module that computes its self-attention (what the attention function sees).
    attention_block:     layer -> the module that owns the attention projections (pruned by :attr:`projections`).
    projections:         see :class:`Projections`.
    causal:              config -> whether self-attention is causal.
    attention_interface: attention goes through transformers' ``AttentionInterface`` (else the patch replaces the
                         self-attention module's forward).
    builds_cache:        config -> whether ``use_cache`` (its default) builds a generation cache.
    usable_positions:    config -> the longest sequence the position embeddings allow.
    causal_lm:           a causal language model whose logits are exactly ``lm_head(base model output)``:
                         language modelling may project at the predicting positions only.
    """

    name: str
    model_types: tuple[str, ...]
    layers: Callable[[nn.Module], nn.ModuleList]
    self_attention: Callable[[nn.Module], nn.Module]
    attention_block: Callable[[nn.Module], nn.Module]
    projections: Projections
    causal: Callable[[object], bool]
    attention_interface: bool
    builds_cache: Callable[[object], bool]
    usable_positions: Callable[[object], int | None]
    causal_lm: bool = False

    def heads(self, self_attention: nn.Module) -> int:
        """The current number of heads of a self-attention module of this family."""
        return getattr(self_attention, self.projections.heads_attribute)


def _is_decoder(config) -> bool:
    return bool(getattr(config, "is_decoder", False))


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _roberta_positions(config) -> int | None:
    """RoBERTa numbers positions from ``padding_idx + 1``: that many fewer usable positions than embeddings."""
    limit = _max_positions(config)
    return None if limit is None else limit - (getattr(config, "pad_token_id", None) or 0) - 1


BERT_SELF_ATTENTION = Projections("separate", query="self.query", key="self.key", value="self.value",
                                  output="output.dense", heads_attribute="num_attention_heads",
                                  width_attributes=("all_head_size",), empty="context")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="BERT", model_types=("bert",), layers=lambda base: base.encoder.layer,
        self_attention=lambda layer: layer.attention.self, attention_block=lambda layer: layer.attention,
        projections=BERT_SELF_ATTENTION, causal=_is_decoder, attention_interface=True, builds_cache=_is_decoder,
        usable_positions=_max_positions,
    ),
    Architecture(
        name="RoBERTa", model_types=("roberta",), layers=lambda base: base.encoder.layer,
        self_attention=lambda layer: layer.attention.self, attention_block=lambda layer: layer.attention,
        projections=BERT_SELF_ATTENTION, causal=_is_decoder, attention_interface=True, builds_cache=_is_decoder,
        usable_positions=_roberta_positions,
    ),
    Architecture(
        name="GPT-2", model_types=("gpt2",), layers=lambda base: base.h, self_attention=lambda layer: layer.attn,
        attention_block=lambda layer: layer.attn,
        projections=Projections("fused-conv1d", qkv="c_attn", output="c_proj", heads_attribute="num_heads",
                                width_attributes=("split_size",), empty="projected"),
        causal=lambda config: True, attention_interface=True, builds_cache=lambda config: True,
        usable_positions=lambda config: config.n_positions, causal_lm=True,
    ),
    Architecture(
        name="OpenAI GPT", model_types=("openai-gpt",), layers=lambda base: base.h,
        self_attention=lambda layer: layer.attn, attention_block=lambda layer: layer.attn,
        projections=Projections("fused-conv1d", qkv="c_attn", output="c_proj", heads_attribute="n_head",
                                width_attributes=("split_size",), empty="projected-list"),
        causal=lambda config: True, attention_interface=False, builds_cache=lambda config: False,
        usable_positions=lambda config: config.n_positions, causal_lm=True,
    ),
)

_BY_MODEL_TYPE = {model_type: entry for entry in ARCHITECTURES for model_type in entry.model_types}


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` in the registry."""
    return tuple(_BY_MODEL_TYPE)


def architecture(model_or_config) -> Architecture:
    """The registry entry of a model (or of its config / a ``model_type`` string). ValueError naming the supported
    types otherwise, and what adding one takes."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"fastbertology does not support model type {model_type!r}; supported: "
            f"{', '.join(sorted(_BY_MODEL_TYPE))}. A new family is one Architecture entry in "
            "fastbertology/architectures.py (where its layers, attention modules and projections are)."
        )
    return _BY_MODEL_TYPE[model_type]


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers (blocks) of ``model``, in order."""
    return architecture(model).layers(_base(model))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, in layer order."""
    entry = architecture(model)
    return [entry.self_attention(layer) for layer in entry.layers(_base(model))]


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The module that owns the attention projections of every layer (what pruning edits), in layer order."""
    entry = architecture(model)
    return [entry.attention_block(layer) for layer in entry.layers(_base(model))]


def heads_per_layer(model: nn.Module) -> list[int]:
    """Current number of heads of every layer (pruned layers may have fewer)."""
    entry = architecture(model)
    return [entry.heads(module) for module in attention_modules(model)]

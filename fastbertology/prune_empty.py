"""Forwards of attention modules that pruning left without heads (:mod:`fastbertology.pruning`).

A layer may lose all of its heads. Its attention module then short-circuits (an instance-level ``forward``): it
returns what its output projection makes of nothing (its bias), and the attention probabilities (when the model
returns them) are an empty ``[B, 0, N_q, N_k]`` tensor. Which forward a module gets depends on what it returns
(:attr:`fastbertology.architectures.Projections.empty`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .architecture_types import Projections, submodule

__all__ = ["install_empty_forward"]


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
    output = _project_nothing(submodule(module, projections.output), hidden_states)
    return output, (_empty_probs(hidden_states, key_length) if _returns_weights(module) else None)


def _projected_list_empty_forward(module: nn.Module, projections: Projections, x: torch.Tensor,
                                  attention_mask=None, output_attentions=False):
    """openai-gpt ``Attention.forward`` with 0 heads: ``[B, N, D] -> [c_proj bias [B, N, D], (probs [B,0,N,N])]``."""
    outputs = [_project_nothing(submodule(module, projections.output), x)]
    if output_attentions:
        outputs.append(_empty_probs(x, x.shape[1]))
    return outputs


def _projected_norm_empty_forward(module: nn.Module, projections: Projections, hidden_states: torch.Tensor, *args,
                                  **kwargs):
    """A module that returns ``norm(hidden + projected)`` (ALBERT) with 0 heads: ``(norm(hidden + bias), probs)``."""
    output = _project_nothing(submodule(module, projections.output), hidden_states)
    norm = submodule(module, projections.residual_norm)
    probs = _empty_probs(hidden_states, hidden_states.shape[1]) if _returns_weights(module) else None
    return norm(hidden_states + output), probs


# by what the attention module returns (Projections.empty)
_EMPTY_FORWARDS = {"context": _context_empty_forward, "projected": _projected_empty_forward,
                   "projected-list": _projected_list_empty_forward, "projected-norm": _projected_norm_empty_forward}


def install_empty_forward(module: nn.Module, projections: Projections) -> None:
    """Make ``module(...)`` run the no-heads forward of ``projections.empty``; hooks and the module's class stay as
    they are (an instance-level ``forward``).

    The class must stay: transformers 5 records ``output_attentions`` with forward hooks on modules matched by class.
    """
    module.forward = functools.partial(_EMPTY_FORWARDS[projections.empty], module, projections)

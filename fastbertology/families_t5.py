"""T5 and mT5 in the architecture registry: their entries, the relative position bias as the kernels' table, and
what pruning adds so that a pruned model runs stock.

**Rows** as for BART: encoder self-attention | decoder self-attention | cross-attention (``[Le + 2 Ld, H]``).

**Relative position bias.** T5 adds to every self-attention score ``s_ij = q_i . k_j`` (unscaled: ``scale=1``) a
learned per-head bias of the bucketed distance ``j - i`` (:meth:`T5Attention._relative_position_bucket`:
bidirectional in the encoder, causal in the decoder), from the embedding ``relative_attention_bias [buckets, H]`` of
the first layer of each stack, which every layer of the stack shares. The kernels take it as ``relative_bias``
``[H, 2M - 1]``: entry ``(j - i) + M - 1`` is the bias of distance ``j - i``, filled from T5's own bucketing function
(:func:`relative_bias_table`, ``O(H * M)``); the stock ``[1, H, N, N]`` bias is never built while the model is
patched (:func:`prepare_patch` makes ``compute_bias`` return a ``[1, H, 1, 1]`` placeholder the attention function
does not read). Cross-attention has no position bias.

**Pruning.** The bias embedding belongs to the stack, not to a layer: pruning keeps all its columns, and every
pruned row reads the columns of its remaining original heads. :func:`after_pruning` gives the attention modules of
a pruned model hooks that hand each module the bias of its own heads (and pass the full bias on to the next layer),
so that the pruned model runs stock, and after ``save_pretrained`` -> ``load_pruned``, as the masked one.
"""

from __future__ import annotations

import torch
from torch import nn

from .architecture_types import Architecture, Projections, Stack
from .pruned_config import kept_heads

__all__ = ["T5_FAMILIES", "relative_bias_table", "prepare_patch", "after_pruning"]


def _stack_module(base: nn.Module, name: str) -> nn.Module | None:
    """The ``encoder`` / ``decoder`` stack of a T5 base model (None where the model lacks it: T5EncoderModel)."""
    return getattr(base, name, None)


def _blocks(name: str):
    def layers(base: nn.Module):
        stack = _stack_module(base, name)
        return stack.block if stack is not None else ()

    return layers


def _bias_module(model: nn.Module, stack: int) -> nn.Module:
    """The self-attention module of the first layer of stack ``stack`` (0 encoder, 1 decoder): it owns the
    ``relative_attention_bias`` embedding that every layer of the stack reads."""
    base = getattr(model, "base_model", model)
    layers = _blocks(("encoder", "decoder")[stack])(base)
    return layers[0].layer[0].SelfAttention


def relative_bias_table(model: nn.Module, stack: int, row: int, span: int) -> torch.Tensor:
    """The kernels' ``relative_bias`` ``[H_row, 2 * span - 1]`` of self-attention row ``row`` of stack ``stack``:
    entry ``r + span - 1`` holds T5's bias of distance ``r = j - i`` (key minus query position) for each of the row's
    current heads, from the stack's ``relative_attention_bias`` embedding and T5's bucketing function."""
    module = _bias_module(model, stack)
    weight = module.relative_attention_bias.weight  # [buckets, H]
    distances = torch.arange(-(span - 1), span, device=weight.device)
    buckets = type(module)._relative_position_bucket(
        distances, bidirectional=not module.is_decoder, num_buckets=module.relative_attention_num_buckets,
        max_distance=module.relative_attention_max_distance)
    table = weight[buckets].transpose(0, 1)  # [H, 2 * span - 1]
    kept = kept_heads(model.config, row, weight.shape[1])
    if len(kept) != weight.shape[1]:
        table = table[torch.tensor(kept, dtype=torch.long, device=weight.device)]
    return table.contiguous()


# ---------------------------------------------------------------------------------------------------- patching
def _placeholder_bias(module, query_length, key_length, device=None, past_seen_tokens=0):
    """``compute_bias`` while patched: zeros ``[1, H, 1, 1]`` (the kernels compute the bias from the table)."""
    weight = module.relative_attention_bias.weight
    return weight.new_zeros(1, weight.shape[1], 1, 1)


def prepare_patch(model: nn.Module):
    """While patched, the bias-owning modules' ``compute_bias`` returns a placeholder instead of the ``[1, H, N, N]``
    bias (which packed calls would build over all ``T`` tokens). Returns the undo."""
    modules = [module for module in model.modules() if getattr(module, "has_relative_attention_bias", False)]
    for module in modules:
        module.compute_bias = _placeholder_bias.__get__(module)

    def undo():
        for module in modules:
            vars(module).pop("compute_bias", None)

    return undo


# ---------------------------------------------------------------------------------------------------- pruning
def _cache_length(module: nn.Module, kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    cache = getattr(cache, "self_attention_cache", cache)
    return int(cache.get_seq_length(module.layer_idx))


def _pruned_pre_hook(module, args, kwargs):
    """Hand a pruned T5 attention module the bias of its own heads; keep the stack's full bias for the next layer."""
    kwargs = dict(kwargs)
    if module._fastbertology_cross:  # zeros of this module's own head count (computed by the module)
        kwargs["position_bias"] = None
        return args, kwargs
    full = kwargs.get("position_bias")
    if full is None:  # the stack's first layer: the full bias of every original head
        hidden = args[0] if args else kwargs["hidden_states"]
        past = _cache_length(module, kwargs)
        full = module.compute_bias(hidden.shape[1], hidden.shape[1] + past, device=hidden.device,
                                   past_seen_tokens=past)
    module._fastbertology_full_bias = full
    kept = module._fastbertology_bias_heads
    kwargs["position_bias"] = full if full.shape[1] == 1 else full[:, kept]
    return args, kwargs


def _pruned_post_hook(module, args, kwargs, output):
    """``(out, bias, probs)`` with the full bias passed on (a module with no heads returns ``(out, probs)``)."""
    full = None if module._fastbertology_cross else vars(module).pop("_fastbertology_full_bias", None)
    return output[0], full, output[-1]


def after_pruning(model: nn.Module, sites) -> None:
    """Give every attention module of a pruned T5 model (``sites``: its attention sites, in row order) the hooks
    that hand it the position bias of its remaining heads (see the module docstring); idempotent."""
    if not getattr(model.config, "pruned_heads", None):
        return
    total = model.config.num_heads
    for site in sites:
        module = site.module
        module._fastbertology_cross = site.cross
        module._fastbertology_bias_heads = kept_heads(model.config, site.row, total)
        if getattr(module, "_fastbertology_bias_hooks", None) is None:
            module._fastbertology_bias_hooks = (
                module.register_forward_pre_hook(_pruned_pre_hook, with_kwargs=True),
                module.register_forward_hook(_pruned_post_hook, with_kwargs=True),
            )


# ---------------------------------------------------------------------------------------------------- entries
T5_PROJECTIONS = Projections("separate", query="q", key="k", value="v", output="o", heads_attribute="n_heads",
                             head_dim_attribute="key_value_proj_dim", width_attributes=("inner_dim",),
                             empty="projected")


def _t5(name: str, model_types: tuple[str, ...]) -> Architecture:
    never, always = (lambda config: False), (lambda config: True)
    return Architecture(
        name=name, model_types=model_types,
        stacks=(
            Stack("encoder", _blocks("encoder"), self_attention=lambda layer: layer.layer[0].SelfAttention,
                  attention_block=lambda layer: layer.layer[0].SelfAttention, causal=never),
            Stack("decoder", _blocks("decoder"), self_attention=lambda layer: layer.layer[0].SelfAttention,
                  attention_block=lambda layer: layer.layer[0].SelfAttention, causal=always,
                  cross_attention=lambda layer: layer.layer[1].EncDecAttention,
                  cross_block=lambda layer: layer.layer[1].EncDecAttention, padding_argument=None),
        ),
        projections=T5_PROJECTIONS, attention_interface=True,
        builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
        usable_positions=lambda config: None,  # relative positions: no position table to run out of
        model_classes={"classification": "AutoModelForSequenceClassification"},
        mask_arguments=(("head_mask", "encoder"), ("decoder_head_mask", "decoder"), ("cross_attn_head_mask", "cross")),
        head_count=lambda config: config.num_heads,
        attention_outputs=("encoder_attentions", "decoder_attentions", "cross_attentions"),
        relative_bias=relative_bias_table, prepare_patch=prepare_patch, after_pruning=after_pruning,
    )


T5_FAMILIES = (_t5("T5", ("t5",)), _t5("mT5", ("mt5",)))

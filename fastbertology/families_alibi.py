"""BLOOM and MPT in the architecture registry: ALiBi through the kernels' ``alibi_slopes``, their replacement
attention forwards, and what pruning adds so that a pruned model runs stock.

**ALiBi.** BLOOM adds ``slope_h * p_j`` to the score of key ``j`` (``p_j``: the key's position among the real
tokens, ``cumsum(attention_mask) - 1``). Within a query's row this differs from the kernels' ``slope_h * (j - i)``
by a constant (left padding shifts every ``p_j`` of a row by the same amount; ``- slope_h * i`` is constant in the
row), which the softmax ignores: the probabilities are the model's exactly. The slopes are read from BLOOM's own
ALiBi builder (its value at position 1 minus position 0), one per original head; a pruned row takes those of its
remaining heads (``config.pruned_heads``). MPT adds ``slope_h * (j + 1 - N_k)`` (key index ``j``, padding or
not): again ``slope_h * (j - i)`` plus a per-row constant. (Its slopes come from its own builder too, with the
model's ``alibi_bias_max`` of 8, which is what ``MptModel`` passes whatever ``attn_config`` says.)

**Attention modules.** Both compute attention in their own module (not through transformers' attention
interface): the patch gives every attention module a replacement forward (:func:`bloom_attention_forward`,
:func:`mpt_attention_forward`) that projects q, k, v as the stock forward does (BLOOM: fused per-head
``query_key_value`` ``[H, 3, d]``; MPT: ``Wqkv`` ``q | k | v``, clipped by ``clip_qkv``), hands them and the slopes
to the kernels, and applies the output projection (BLOOM: and the residual) as the stock forward does.

**Pruning.** The models build their ALiBi tensors for all heads (BLOOM ``[B * H, 1, N]``, MPT ``[H, 1, L]``);
:func:`after_pruning` gives the attention modules of a pruned model a pre-hook that keeps the rows of their
remaining heads, and a BLOOM module with no heads left the residual the stock forward adds.
"""

from __future__ import annotations

import torch
from torch import nn

from .architecture_types import CAUSAL_KINDS, Architecture, Projections, Stack
from .pruned_config import kept_heads

__all__ = ["ALIBI_FAMILIES", "alibi_slopes", "bloom_slopes", "mpt_slopes", "bloom_attention_forward",
           "mpt_attention_forward"]


def bloom_slopes(heads: int, device=None) -> torch.Tensor:
    """BLOOM's ALiBi slopes ``[heads]`` (float32), from its own builder: the bias at position 1 minus position 0."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    positions = build_alibi_tensor(torch.ones(1, 2, device=device), heads, torch.float32).view(heads, 2)
    return positions[:, 1] - positions[:, 0]


def mpt_slopes(heads: int, device=None) -> torch.Tensor:
    """MPT's ALiBi slopes ``[heads]`` (float32), from its own builder as ``MptModel`` calls it."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    positions = build_mpt_alibi_tensor(heads, 2, device=device).view(heads, 2)
    return (positions[:, 1] - positions[:, 0]).float()


def alibi_slopes(config, row: int, builder, total: int, device=None) -> torch.Tensor:
    """The ALiBi slopes ``[H_row]`` (float32) of the current heads of ``row`` of a model with ``total`` heads, from
    the family's slopes ``builder`` (:func:`bloom_slopes`, :func:`mpt_slopes`)."""
    slopes = builder(total, device)
    kept = kept_heads(config, row, total)
    return slopes[torch.tensor(kept, dtype=torch.long, device=slopes.device)] if len(kept) != total else slopes


def _key_padding(attention_mask, n_keys: int, family: str, *, true_masks: bool = False):
    """Keys to keep, bool ``[B, N_k]``, from a 4-D causal mask ``[B, 1, N_q, N_k]`` (additive float, or bool: True =
    keep, or with ``true_masks`` True = hide, as MPT's): the last query row sees every real key. None without one."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"{family}'s attention mask must come from a 2-D mask; got {tuple(attention_mask.shape)}")
    last = attention_mask[:, 0, -1, -n_keys:]
    if last.dtype == torch.bool:
        return ~last if true_masks else last
    return last > torch.finfo(last.dtype).min / 2


def _no_cached_keys(key, seq: int, family: str) -> None:
    if key.shape[2] != seq:
        raise ValueError(f"fastbertology's {family} attention takes no cached keys (generation with a cache): call "
                         "the model without past keys and values")


def bloom_attention_forward(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None,
                            use_cache=False, output_attentions=False, **kwargs):
    """Replacement forward of ``BloomAttention``: ``[B, N, D]`` -> ``(dense(context) + residual, probs or None)``;
    the model's ``alibi`` tensor is not read (the kernels take the slopes)."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    binding = self._fastbertology_layer
    state = binding.state
    batch, seq = hidden_states.shape[:2]
    fused = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3, self.head_dim)
    query, key, value = (fused[..., part, :].transpose(1, 2) for part in range(3))  # [B, H, N, d] each
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
        _no_cached_keys(key, seq, "BLOOM")
    packed = binding.stack in state.context.packed
    key_padding_mask = None if packed else _key_padding(attention_mask, key.shape[2], "BLOOM")
    config = state.model.config
    slopes = alibi_slopes(config, binding.row(), bloom_slopes, config.n_head, query.device).to(query.dtype)
    out, probs = state.attend(binding, self, query, key, value, key_padding_mask, causal=True,
                              scale=self.inv_norm_factor, dropout=self.attention_dropout.p,
                              output_attentions=output_attentions, modifiers={"alibi_slopes": slopes})
    out = self.dense(out.reshape(batch, seq, -1))  # [B, N, H, d] -> [B, N, H * d]
    return dropout_add(out, residual, self.hidden_dropout, self.training), probs


def mpt_attention_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    """Replacement forward of ``MptAttention``: ``[B, N, D]`` -> ``(out_proj(context), probs or None)``; the model's
    ``position_bias`` (its ALiBi tensor) is not read (the kernels take the slopes)."""
    binding = self._fastbertology_layer
    state = binding.state
    batch, seq = hidden_states.shape[:2]
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (part.reshape(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
                         for part in mixed.chunk(3, dim=2))
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        _no_cached_keys(key, seq, "MPT")
    packed = binding.stack in state.context.packed
    key_padding_mask = None if packed else _key_padding(attention_mask, key.shape[2], "MPT", true_masks=True)
    config = state.model.config
    slopes = alibi_slopes(config, binding.row(), mpt_slopes, config.n_heads, query.device).to(query.dtype)
    out, probs = state.attend(binding, self, query, key, value, key_padding_mask, causal=True,
                              scale=self.softmax_scale, dropout=self.attn_dropout_p,
                              output_attentions=state.context.output_attentions,
                              modifiers={"alibi_slopes": slopes})
    return self.out_proj(out.reshape(batch, seq, -1)), probs


# ---------------------------------------------------------------------------------------------------- pruning
def _pruned_pre_hook(module, args, kwargs):
    """Keep the ALiBi rows of the module's remaining heads (the model builds them for all): BLOOM's ``alibi``
    ``[B * H, 1, N]``, MPT's ``position_bias`` ``[H, 1, L]``."""
    name = module._fastbertology_alibi_argument
    alibi = kwargs.get(name)
    total = module._fastbertology_total_heads
    if alibi is None or alibi.shape[0] % total:
        return None
    rows = alibi.view(-1, total, *alibi.shape[1:])[:, module._fastbertology_alibi_heads]
    return args, {**kwargs, name: rows.reshape(-1, *alibi.shape[1:])}


def _empty_post_hook(module, args, kwargs, output):
    """A BLOOM module with no heads left returns what the stock forward would: the residual plus the dense bias."""
    if getattr(module, "num_heads", 1):
        return None
    residual = args[1] if len(args) > 1 else kwargs["residual"]
    return output[0] + residual, output[1]


def _after_pruning(argument: str, head_count):
    """The family's ``after_pruning``: its ALiBi tensor is the call argument ``argument``; ``head_count``: config ->
    the original number of heads."""
    def after_pruning(model: nn.Module, sites) -> None:
        """Give every attention module of a pruned model its ALiBi rows and, with no heads left, BLOOM's residual;
        idempotent (``sites``: its attention sites, in row order)."""
        _hook_pruned(model, sites, argument, head_count(model.config))

    return after_pruning


def _hook_pruned(model: nn.Module, sites, argument: str, total: int) -> None:
    if not getattr(model.config, "pruned_heads", None):
        return
    for site in sites:
        module = site.module
        module._fastbertology_alibi_argument = argument
        module._fastbertology_total_heads = total
        module._fastbertology_alibi_heads = kept_heads(model.config, site.row, total)
        if getattr(module, "_fastbertology_alibi_hooks", None) is None:
            module._fastbertology_alibi_hooks = (
                module.register_forward_pre_hook(_pruned_pre_hook, with_kwargs=True),
                module.register_forward_hook(_empty_post_hook, with_kwargs=True),
            )


def _bloom_heads(config) -> int:
    return config.n_head


def _mpt_heads(config) -> int:
    return config.n_heads


BLOOM = Architecture(
    name="BLOOM", model_types=("bloom",),
    stacks=(Stack("layers", lambda base: base.h, self_attention=lambda layer: layer.self_attention,
                  attention_block=lambda layer: layer.self_attention, causal=lambda config: True),),
    projections=Projections("fused-per-head", qkv="query_key_value", output="dense", heads_attribute="num_heads",
                            head_dim_attribute="head_dim", empty="projected"),
    attention_interface=False, builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
    usable_positions=lambda config: None,  # ALiBi: no position table to run out of
    causal_lm=True, model_classes=dict(CAUSAL_KINDS), attention_forward=bloom_attention_forward,
    after_pruning=_after_pruning("alibi", _bloom_heads), head_count=_bloom_heads,
)

MPT = Architecture(
    name="MPT", model_types=("mpt",),
    stacks=(Stack("layers", lambda base: base.blocks, self_attention=lambda layer: layer.attn,
                  attention_block=lambda layer: layer.attn, causal=lambda config: True),),
    projections=Projections("fused-qkv", qkv="Wqkv", output="out_proj", heads_attribute="n_heads",
                            head_dim_attribute="head_dim", empty="projected"),
    attention_interface=False, builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
    usable_positions=lambda config: config.max_seq_len,  # (the length of the model's ALiBi tensor)
    causal_lm=True, model_classes=dict(CAUSAL_KINDS), attention_forward=mpt_attention_forward,
    after_pruning=_after_pruning("position_bias", _mpt_heads), head_count=_mpt_heads,
)

ALIBI_FAMILIES = (BLOOM, MPT)

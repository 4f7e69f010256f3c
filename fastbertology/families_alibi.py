"""BLOOM in the architecture registry: ALiBi through the kernels' ``alibi_slopes``, its replacement attention
forward, and what pruning adds so that a pruned model runs stock.

**ALiBi.** BLOOM adds ``slope_h * p_j`` to the score of key ``j`` (``p_j``: the key's position among the real
tokens, ``cumsum(attention_mask) - 1``). Within a query's row this differs from the kernels' ``slope_h * (j - i)``
by a constant (left padding shifts every ``p_j`` of a row by the same amount; ``- slope_h * i`` is constant in the
row), which the softmax ignores: the probabilities are the model's exactly. The slopes are read from BLOOM's own
ALiBi builder (its value at position 1 minus position 0), one per original head; a pruned row takes those of its
remaining heads (``config.pruned_heads``).

**Attention module.** BLOOM computes attention in its own ``BloomAttention.forward`` (not through transformers'
attention interface): the patch gives every attention module :func:`bloom_attention_forward`, which projects the
fused per-head ``query_key_value`` (``[H, 3, d]``), hands q, k, v and the slopes to the kernels, and applies the
output projection and the residual as the stock forward does.

**Pruning.** The model builds its ALiBi tensor ``[B * H, 1, N]`` for ``config.n_head`` heads; :func:`after_pruning`
gives the attention modules of a pruned model a pre-hook that keeps the rows of their remaining heads, and a module
with no heads left the residual the stock forward adds.
"""

from __future__ import annotations

import torch
from torch import nn

from .architecture_types import CAUSAL_KINDS, Architecture, Projections, Stack

__all__ = ["ALIBI_FAMILIES", "alibi_slopes", "bloom_attention_forward", "after_pruning"]


def _kept_heads(config, row: int, total: int) -> list[int]:
    """The original indices of the current heads of ``row`` (``config.pruned_heads`` lists the removed ones)."""
    pruned = getattr(config, "pruned_heads", None) or {}
    gone = set(pruned.get(row, pruned.get(str(row), [])))
    return [head for head in range(total) if head not in gone]


def alibi_slopes(config, row: int, device=None) -> torch.Tensor:
    """The ALiBi slopes ``[H_row]`` (float32) of the current heads of ``row``, from BLOOM's own ALiBi builder."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    total = config.n_head
    positions = build_alibi_tensor(torch.ones(1, 2, device=device), total, torch.float32).view(total, 2)
    slopes = positions[:, 1] - positions[:, 0]  # slope * 1 - slope * 0
    kept = _kept_heads(config, row, total)
    return slopes[torch.tensor(kept, dtype=torch.long, device=slopes.device)] if len(kept) != total else slopes


def _key_padding(attention_mask, n_keys: int):
    """Keys to keep, bool ``[B, N_k]``, from BLOOM's 4-D causal mask (additive float or bool, ``[B, 1, N_q, N_k]``):
    the last query row sees every real key. None without a mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"BLOOM's attention mask must come from a 2-D mask; got {tuple(attention_mask.shape)}")
    last = attention_mask[:, 0, -1, -n_keys:]
    if last.dtype == torch.bool:
        return last
    return last > torch.finfo(last.dtype).min / 2


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
        if key.shape[2] != seq:
            raise ValueError("fastbertology's BLOOM attention takes no cached keys (generation with a cache): call the "
                             "model without past keys and values")
    packed = binding.stack in state.context.packed
    key_padding_mask = None if packed else _key_padding(attention_mask, key.shape[2])
    slopes = alibi_slopes(state.model.config, binding.row(), device=query.device).to(query.dtype)
    out, probs = state.attend(binding, self, query, key, value, key_padding_mask, causal=True,
                              scale=self.inv_norm_factor, dropout=self.attention_dropout.p,
                              output_attentions=output_attentions, modifiers={"alibi_slopes": slopes})
    out = self.dense(out.reshape(batch, seq, -1))  # [B, N, H, d] -> [B, N, H * d]
    return dropout_add(out, residual, self.hidden_dropout, self.training), probs


# ---------------------------------------------------------------------------------------------------- pruning
def _pruned_pre_hook(module, args, kwargs):
    """Keep the ALiBi rows ``[B * H, 1, N]`` of the module's remaining heads (the model builds them for all)."""
    alibi = kwargs.get("alibi")
    kept = module._fastbertology_alibi_heads
    if alibi is None or alibi.shape[0] % module._fastbertology_total_heads:
        return None
    total = module._fastbertology_total_heads
    rows = alibi.view(-1, total, *alibi.shape[1:])[:, kept]
    return args, {**kwargs, "alibi": rows.reshape(-1, *alibi.shape[1:])}


def _empty_post_hook(module, args, kwargs, output):
    """A module with no heads left returns what the stock forward would: the residual plus the dense bias."""
    if module.num_heads:
        return None
    residual = args[1] if len(args) > 1 else kwargs["residual"]
    return output[0] + residual, output[1]


def after_pruning(model: nn.Module, sites) -> None:
    """Give every attention module of a pruned BLOOM model its ALiBi rows and, with no heads left, its residual;
    idempotent (``sites``: its attention sites, in row order)."""
    if not getattr(model.config, "pruned_heads", None):
        return
    total = model.config.n_head
    for site in sites:
        module = site.module
        module._fastbertology_total_heads = total
        module._fastbertology_alibi_heads = _kept_heads(model.config, site.row, total)
        if getattr(module, "_fastbertology_alibi_hooks", None) is None:
            module._fastbertology_alibi_hooks = (
                module.register_forward_pre_hook(_pruned_pre_hook, with_kwargs=True),
                module.register_forward_hook(_empty_post_hook, with_kwargs=True),
            )


BLOOM = Architecture(
    name="BLOOM", model_types=("bloom",),
    stacks=(Stack("layers", lambda base: base.h, self_attention=lambda layer: layer.self_attention,
                  attention_block=lambda layer: layer.self_attention, causal=lambda config: True),),
    projections=Projections("fused-per-head", qkv="query_key_value", output="dense", heads_attribute="num_heads",
                            head_dim_attribute="head_dim", empty="projected"),
    attention_interface=False, builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
    usable_positions=lambda config: None,  # ALiBi: no position table to run out of
    causal_lm=True, model_classes=dict(CAUSAL_KINDS), attention_forward=bloom_attention_forward,
    after_pruning=after_pruning,
)

ALIBI_FAMILIES = (BLOOM,)

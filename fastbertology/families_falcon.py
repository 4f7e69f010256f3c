"""Falcon in the architecture registry: rotary or ALiBi positions, multi-head, multi-query and the new decoder
architecture (grouped key/value heads), through a replacement attention forward.

**Attention module.** Falcon computes attention in its own ``FalconAttention.forward`` (transformers 5.24 and
earlier with its own ``_split_heads`` and an ``alibi`` argument; 5.25 on through the attention functions, with ALiBi
folded into the mask): the patch gives every attention module :func:`falcon_attention_forward`, which splits the
fused ``query_key_value`` itself (:func:`split_fused_qkv`: ``[H, 3, d]``; multi-query ``q [H * d] | k [d] | v [d]``;
new decoder architecture ``[H_kv, H / H_kv + 2, d]``), applies the rotary embeddings (when the model has no ALiBi)
and hands q, k, v (one key/value head per group) to the kernels. It reads only what every transformers 5 version's
module holds (the head counts, the layout flags, the projections), so one forward serves them all.

**ALiBi** (``config.alibi``). What the model means, and what its SDPA path computes: ``s_ij = (q_i . k_j + slope_h
* p_j) / sqrt(d)`` with ``p_j`` the key's position among the real tokens; the kernels take ``alibi_slopes =
slope_h / sqrt(d)``, which differs by a constant within each query's row. (Stock *eager* Falcon with ALiBi adds the
bias twice up to transformers 5.24: once itself, once inside the mask the model built for SDPA.) The slopes are the
model's, rounded to bfloat16 as its builder rounds them; the builder also computes ``slope * position`` in bfloat16,
which is exact while positions stay below 256 (longer sequences: the kernels keep the bias linear, the stock model
rounds it).

**Pruning** cuts all three layouts (:func:`falcon_projections`): multi-head ``[H, 3, d]`` (``"fused-per-head"``),
multi-query ``q | k | v`` with one key/value head (``"fused-qkv"``; the key/value head goes with the last query
head) and the new decoder architecture ``[H_kv, G + 2, d]`` (``"fused-grouped"``). Falcon reads every group of the
new decoder architecture as ``num_heads // num_kv_heads`` query heads, so groups must stay equal: pruning cuts the
remaining heads of each original group into chunks of the greatest common divisor of the remaining group sizes, each
chunk with its own copy of its group's key and value rows (exact: every query head still reads its own key and
value; ``num_kv_heads`` then counts the chunks, and the copies count as parameters). A pruned model runs stock and
patched; a pruned ALiBi model too: :func:`after_pruning` hands each module its heads' rows of the model's ALiBi
tensor and mask.
"""

from __future__ import annotations

import math

import torch

from .architecture_types import CAUSAL_KINDS, Architecture, Projections, Stack
from .pruned_config import kept_heads

__all__ = ["FALCON_FAMILIES", "falcon_attention_forward", "falcon_kv_heads", "falcon_projections", "falcon_slopes",
           "split_fused_qkv"]


def falcon_slopes(config, row: int, device=None) -> torch.Tensor:
    """The kernels' ALiBi slopes ``[H_row]`` (float64) of ``row``: Falcon's own (its builder's value at position 1
    minus position 0, bfloat16-rounded as it rounds them) divided by ``sqrt(head_dim)``."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    total = config.num_attention_heads
    positions = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long, device=device), total, torch.float32)
    slopes = (positions.view(total, 2)[:, 1] - positions.view(total, 2)[:, 0]).double() / math.sqrt(
        config.hidden_size // total)
    kept = kept_heads(config, row, total)
    return slopes[torch.tensor(kept, dtype=torch.long, device=slopes.device)] if len(kept) != total else slopes


def _key_padding(attention_mask, n_keys: int):
    """Keys to keep, bool ``[B, N_k]``, from Falcon's 4-D mask (additive, ALiBi included, or bool: True = keep)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"Falcon's attention mask must come from a 2-D mask; got {tuple(attention_mask.shape)}")
    last = attention_mask[:, 0, -1, -n_keys:]
    return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2


def split_fused_qkv(module, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``FalconAttention``'s ``query_key_value`` output ``[B, N, F]`` -> ``query [B, N, H, d]`` and ``key,
    value [B, N, H_kv, d]`` (views), by the module's layout: new decoder architecture ``[H_kv, H / H_kv + 2, d]``
    (each group's query heads, its key, its value), multi-query ``q [H d] | k [d] | v [d]``, else ``[H, 3, d]``."""
    batch, seq = fused.shape[:2]
    head_dim = module.head_dim
    if module.new_decoder_architecture:
        grouped = fused.view(batch, seq, module.num_kv_heads, -1, head_dim)  # [B, N, H_kv, H / H_kv + 2, d]
        return grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
    if module.multi_query:
        return fused.view(batch, seq, -1, head_dim).split([module.num_heads, 1, 1], dim=2)
    return fused.view(batch, seq, module.num_heads, 3, head_dim).unbind(3)


def falcon_attention_forward(self, hidden_states, alibi=None, attention_mask=None, position_ids=None,
                             layer_past=None, use_cache=False, output_attentions=False, position_embeddings=None,
                             **kwargs):
    """Replacement forward of ``FalconAttention``: ``[B, N, D]`` -> ``(dense(context), probs or None)``. ``alibi``:
    what transformers 5.24 and earlier pass (unused: the kernels take the model's slopes, and the mask's ALiBi part
    is not read)."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    binding = self._fastbertology_layer
    state = binding.state
    batch, seq = hidden_states.shape[:2]
    query, key, value = split_fused_qkv(self, self.query_key_value(hidden_states))  # [B, N, H or H_kv, d]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, H or H_kv, N, d]
    modifiers = {}
    if state.model.config.alibi:
        modifiers["alibi_slopes"] = falcon_slopes(state.model.config, binding.row(), query.device).to(query.dtype)
    else:
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
        if key.shape[2] != seq:
            raise ValueError("fastbertology's Falcon attention takes no cached keys (generation with a cache): call "
                             "the model without past keys and values")
    packed = binding.stack in state.context.packed
    key_padding_mask = None if packed else _key_padding(attention_mask, key.shape[2])
    out, probs = state.attend(binding, self, query, key, value, key_padding_mask, causal=True,
                              scale=self.inv_norm_factor, dropout=getattr(self.attention_dropout, "p",
                                                                          self.attention_dropout),
                              output_attentions=output_attentions, modifiers=modifiers)
    return self.dense(out.reshape(batch, seq, -1)), probs


def _pruned_pre_hook(module, args, kwargs):
    """ALiBi Falcon builds its ALiBi tensor (``[B, H, 1, N]``, or ``[B * H, 1, N]`` without a 4-D mask) and its mask
    ``[B, H, N, N]`` (ALiBi folded in) for all heads: a pruned module keeps its remaining heads' rows of both."""
    kept, total = module._fastbertology_alibi_heads, module._fastbertology_total_heads
    kwargs = dict(kwargs)
    alibi, mask = kwargs.get("alibi"), kwargs.get("attention_mask")
    if alibi is not None and alibi.dim() == 4:
        kwargs["alibi"] = alibi[:, kept]
    elif alibi is not None:
        kwargs["alibi"] = alibi.view(-1, total, *alibi.shape[1:])[:, kept].reshape(-1, *alibi.shape[1:])
    if mask is not None and mask.dim() == 4 and mask.shape[1] == total:
        kwargs["attention_mask"] = mask[:, kept]
    return args, kwargs


def after_pruning(model, sites) -> None:
    """Give the attention modules of a pruned ALiBi Falcon model the rows of their heads (idempotent)."""
    if not getattr(model.config, "pruned_heads", None) or not model.config.alibi:
        return
    total = model.config.num_attention_heads
    for site in sites:
        site.module._fastbertology_total_heads = total
        site.module._fastbertology_alibi_heads = kept_heads(model.config, site.row, total)
        if getattr(site.module, "_fastbertology_alibi_hook", None) is None:
            site.module._fastbertology_alibi_hook = site.module.register_forward_pre_hook(_pruned_pre_hook,
                                                                                          with_kwargs=True)


# num_key_value_groups: what transformers 5.25's stock attention repeats each key/value head by (set by pruning;
# earlier versions have no such attribute and ignore it)
_LAYOUT = dict(qkv="query_key_value", output="dense", heads_attribute="num_heads", head_dim_attribute="head_dim",
               kv_heads_attribute="num_kv_heads", groups_attribute="num_key_value_groups", empty="projected")
MULTI_HEAD = Projections("fused-per-head", **_LAYOUT)  # [H, 3, d]
MULTI_QUERY = Projections("fused-qkv", **_LAYOUT)  # q [H d] | k [d] | v [d]
NEW_DECODER = Projections("fused-grouped", **_LAYOUT)  # [H_kv, G + 2, d]


def falcon_projections(config) -> Projections:
    """The projection layout of a Falcon model with ``config`` (module docstring)."""
    if getattr(config, "new_decoder_architecture", False):
        return NEW_DECODER
    return MULTI_QUERY if getattr(config, "multi_query", False) else MULTI_HEAD


def falcon_kv_heads(config) -> int:
    """The original number of key/value heads: ``num_kv_heads`` (new decoder architecture), 1 (multi-query) or one
    per query head."""
    if getattr(config, "new_decoder_architecture", False):
        return config.num_kv_heads
    return 1 if getattr(config, "multi_query", False) else config.num_attention_heads


FALCON = Architecture(
    name="Falcon", model_types=("falcon",),
    stacks=(Stack("layers", lambda base: base.h, self_attention=lambda layer: layer.self_attention,
                  attention_block=lambda layer: layer.self_attention, causal=lambda config: True),),
    projections=MULTI_HEAD, projections_for=falcon_projections, kv_head_count=falcon_kv_heads,
    attention_interface=False, builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
    usable_positions=lambda config: None if config.alibi else config.max_position_embeddings,
    causal_lm=True, model_classes=dict(CAUSAL_KINDS), packed_arguments=("position_embeddings", "position_ids"),
    attention_forward=falcon_attention_forward, after_pruning=after_pruning,
)

FALCON_FAMILIES = (FALCON,)

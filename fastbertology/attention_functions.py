"""The functions fastbertology hands transformers: the attention function and the 2-D mask function registered
under ``"fastbertology"`` with ``AttentionInterface`` / ``AttentionMaskInterface``, OpenAI GPT's replacement
forward, and the cross-attention that runs in plain PyTorch (:func:`rectangular_attention`). Each reads its patch
state from the module it is called on (``module._fastbertology_layer``, set by :func:`fastbertology.patch`) and
hands the call to :meth:`~fastbertology.patching.PatchState.attend`; see :mod:`fastbertology.patching`."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import kernels

IMPLEMENTATION_NAME = "fastbertology"
UNEQUAL_GROUPS = "fastbertology_unequal_groups"  # config attribute set by pruning (see fastbertology.pruning)


def _model_name(module) -> str:
    config = getattr(module, "config", None)
    return repr(getattr(config, "model_type", type(module).__name__))


def _grouped_key_values(module, query, key, value):
    """Key/value heads as the kernels take them: unchanged for multi-head attention and for equal groups (when the
    kernels take grouped keys); for a layer pruned to unequal groups, each query head's own key/value head
    gathered (``module._fastbertology_kv_heads``: the key/value head of every query head)."""
    if key.shape[1] == query.shape[1] and getattr(module, "_fastbertology_kv_heads", None) is None:
        return key, value
    kv_heads = getattr(module, "_fastbertology_kv_heads", None)
    if kv_heads is not None:
        index = torch.as_tensor(kv_heads, dtype=torch.long, device=key.device)
        return key.index_select(1, index), value.index_select(1, index)
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads in equal groups")
    return key, value


def _window_options(window, longest: int) -> dict:
    """The kernels' ``window`` option for a sliding window ``window`` over sequences of at most ``longest`` keys."""
    if window is None or window >= longest:
        return {}  # a window no shorter than the sequences hides nothing
    return {"window": int(window)}


def rectangular_attention(query, key, value, *, head_mask=None, key_padding_mask=None, scale=None,
                          return_probs=False):
    """Attention of ``N_q`` queries over ``N_k`` keys (cross-attention), in plain PyTorch and differentiable.

    q ``[B, H, N_q, D]``, k, v ``[B, H or H_kv, N_k, D]``; ``head_mask`` ``[H]`` or ``[B, H]`` multiplies each head's
    probabilities; ``key_padding_mask`` bool ``[B, N_k]`` (True = keep). Computes in float32 or wider. Returns
    ``(out [B, H, N_q, D], AttentionStats)`` with the statistics of the unmasked softmax, and the probabilities
    times the head mask with ``return_probs``. Rows that see no key get zeros.
    """
    acc = torch.promote_types(query.dtype, torch.float32)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if key.shape[1] != query.shape[1]:  # grouped key/value heads: query head h reads h // (H / H_kv)
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.to(acc), key.to(acc).transpose(-1, -2)) * scale  # [B, H, N_q, N_k]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, value.to(acc))
    plogp = torch.where(probs > 0, probs * probs.clamp(min=torch.finfo(acc).tiny).log(), torch.zeros_like(probs))
    masked_probs = probs
    if head_mask is not None:
        mask = (head_mask if head_mask.dim() == 2 else head_mask[None]).to(acc)[:, :, None, None]
        out, masked_probs = out * mask, probs * mask
    stats = kernels.AttentionStats(
        lse=torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).detach(), entropy=-plogp.sum(-1).detach(),
        max_prob=probs.amax(-1).detach(), probs=masked_probs.detach().to(query.dtype) if return_probs else None)
    return out.to(query.dtype), stats


def _key_padding_from_2d(attention_mask, n_keys):
    """Our mask function hands a bool ``[B, K]`` mask (or None). Anything else is refused with the reason."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"fastbertology needs a 2-D attention_mask [batch, seq] (1 = token, 0 = padding); got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}. Custom 4-D masks are not supported."
        )
    return attention_mask[:, -n_keys:].to(torch.bool)


# attention-function arguments of features the patch does not hand to the kernels (yet)
_REFUSED_ARGUMENTS = {"position_bias": "an additive position bias", "alibi": "ALiBi position biases"}


def score_modifiers(kwargs) -> dict:
    """The kernels' score modifiers from transformers' attention-function arguments: ``softcap`` (Gemma 2's
    ``attn_logit_softcapping``) and ``s_aux`` / ``sinks`` (GPT-OSS's per-head sink logits, ``[H]``). Only those
    that are set; see :mod:`fastbertology.kernels.modifiers`."""
    options = {}
    if kwargs.get("softcap") is not None:
        options["softcap"] = float(kwargs["softcap"])
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None:
        options["sinks"] = sinks.reshape(-1)
    return options


def _refuse_unsupported(module, kwargs) -> None:
    """A ValueError naming the feature and the model for attention arguments the kernels do not compute."""
    for name, feature in _REFUSED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"model {_model_name(module)} uses {feature} ({name}=...), which fastbertology's "
                             "attention kernels do not compute; its heads cannot be masked here")


def _interface_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with ``AttentionInterface`` (every family but OpenAI GPT)."""
    binding = getattr(module, "_fastbertology_layer", None)
    if binding is None and getattr(getattr(module, "config", None), UNEQUAL_GROUPS, None):
        return _unpatched_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if binding is None:
        raise RuntimeError(
            f"attention implementation {IMPLEMENTATION_NAME!r} reached a module that fastbertology.patch() did not "
            "prepare (for example the cross-attention of a BERT decoder, or a model pruned to unequal key/value groups "
            "that was not patched); patch the model with fastbertology.patch(model)"
        )
    state = binding.state
    modifiers = score_modifiers(kwargs)
    if state.entry.relative_bias is not None:  # (T5: the model's position_bias is a placeholder, see families_t5)
        kwargs = {name: value for name, value in kwargs.items() if name != "position_bias"}
    _refuse_unsupported(module, kwargs)
    packed = not binding.cross and binding.stack in state.context.packed
    if state.entry.relative_bias is not None and not binding.cross:
        modifiers["relative_bias"] = _relative_bias(state, binding, key.shape[2] if not packed
                                                    else state.context.packed[binding.stack].packing.max_seqlen)
    key_padding_mask = None if packed else _key_padding_from_2d(attention_mask, key.shape[2])
    return state.attend(
        binding, module, query, key, value, key_padding_mask,
        causal=_is_causal(module, kwargs) and not binding.cross, scale=scaling, dropout=dropout,
        output_attentions=state.context.output_attentions, window=kwargs.get("sliding_window"), modifiers=modifiers,
    )


def _relative_bias(state, binding, span: int) -> torch.Tensor:
    """The family's relative position bias table ``[H, 2 * span - 1]`` of the running row. A table that requires
    grad (the model's bias parameter is trainable) cannot go to the Triton kernels, which do not differentiate it."""
    table = state.entry.relative_bias(state.model, binding.stack, binding.row(), max(span, 1))
    if table.requires_grad and torch.is_grad_enabled() and kernels.resolve_backend(
            state.backend, table.device) == "triton":
        raise ValueError(
            f"the {state.entry.name} relative position bias requires grad, and the Triton attention kernels do not "
            "compute its gradient: freeze it (model.requires_grad_(False), as the analyses do) or patch the model "
            "with backend='torch'")
    return table


def _is_causal(module, kwargs) -> bool:
    """Causal attention: the call's ``is_causal`` where given (CLIP's text tower passes it to modules that are not
    causal themselves), else the module's, as transformers' own attention functions decide."""
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if causal is None else causal)


def _unpatched_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """Attention of a model pruned to unequal key/value groups that is not patched (it cannot run stock): the
    kernels without head masks or statistics, PyTorch backend on the CPU and Triton on CUDA, each query head with
    its own key/value head gathered (a plain way to run such a model; analyses go through the patch). Returns
    ``(out [B, N, H, D], None)``."""
    _refuse_unsupported(module, kwargs)
    if dropout and module.training:
        raise RuntimeError("fastbertology does not implement attention dropout: call model.eval()")
    kv_heads = getattr(module, "_fastbertology_kv_heads", None)
    if kv_heads is None:  # equal groups (or none): query head h reads key/value head h // group
        kv_heads = [h * key.shape[1] // max(query.shape[1], 1) for h in range(query.shape[1])]
    index = torch.as_tensor(kv_heads, dtype=torch.long, device=key.device)
    key, value = key.index_select(1, index), value.index_select(1, index)  # one key/value head per query head
    options = {**_window_options(kwargs.get("sliding_window"), key.shape[2]), **score_modifiers(kwargs)}
    out, _ = kernels.attention(query, key, value, key_padding_mask=_key_padding_from_2d(attention_mask, key.shape[2]),
                               causal=_is_causal(module, kwargs), scale=scaling, **options)
    return out.transpose(1, 2), None


def _key_padding_mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                               attention_mask=None, **kwargs):
    """Mask function registered with ``AttentionMaskInterface``: the 2-D padding mask ``[B, K]`` as given (no
    check for "no padding at all": that would be a device-to-host sync and a graph break under torch.compile)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def register_implementation() -> None:
    """Register the attention and mask functions under ``"fastbertology"`` (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION_NAME, _interface_attention)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, _key_padding_mask_function)


def _openai_attention_forward(self, x, attention_mask=None, output_attentions=False):
    """Replacement forward of ``transformers.models.openai.modeling_openai.Attention`` (causal, legacy masks)."""
    binding = self._fastbertology_layer
    state = binding.state
    batch, seq = x.shape[:2]
    query, key, value = self.c_attn(x).split(self.split_size, dim=2)
    # [B, N, H*D] -> [B, H, N, D]
    query, key, value = (t.view(batch, seq, self.n_head, -1).transpose(1, 2) for t in (query, key, value))
    key_padding_mask = None
    if attention_mask is not None and binding.stack not in state.context.packed:  # additive [B, 1, 1, N]
        if attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1):
            raise ValueError(f"OpenAI GPT attention mask must come from a 2-D mask; got {tuple(attention_mask.shape)}")
        key_padding_mask = attention_mask[:, 0, 0, :] > torch.finfo(attention_mask.dtype).min / 2
    scale = value.shape[-1] ** -0.5 if self.scale else 1.0
    out, probs = state.attend(
        binding, self, query, key, value, key_padding_mask, causal=True, scale=scale,
        dropout=self.attn_dropout.p, output_attentions=output_attentions,
    )
    out = self.c_proj(out.reshape(batch, seq, -1))  # [B, N, H, D] -> [B, N, H*D]
    out = self.resid_dropout(out)
    return [out, probs] if output_attentions else [out]

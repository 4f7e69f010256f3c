"""The family table of the architecture registry (:mod:`fastbertology.architectures`): one :class:`Architecture`
entry per supported family, the per-family helpers they use, and the families refused by name (``REFUSED``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from .architecture_types import CAUSAL_KINDS, IMAGE_KINDS, Architecture, Projections, Stack
from .families_alibi import ALIBI_FAMILIES
from .families_falcon import FALCON_FAMILIES
from .families_modernbert import MODERNBERT_FAMILIES
from .families_t5 import T5_FAMILIES


# --------------------------------------------------------------------------------------------------------------
# Per-family helpers
# --------------------------------------------------------------------------------------------------------------
def _is_decoder(config) -> bool:
    return bool(getattr(config, "is_decoder", False))


def _always(config) -> bool:
    return True


def _never(config) -> bool:
    return False


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _roberta_positions(config) -> int | None:
    """RoBERTa numbers positions from ``padding_idx + 1``: that many fewer usable positions than embeddings."""
    limit = _max_positions(config)
    return None if limit is None else limit - (getattr(config, "pad_token_id", None) or 0) - 1


def _albert_layers(base: nn.Module) -> list[nn.Module]:
    """ALBERT's layer applications: application i runs the layers of group ``int(i / (L / groups))`` (as
    ``AlbertTransformer.forward``), each group's ``inner_group_num`` layers in order."""
    config = base.config
    groups = base.encoder.albert_layer_groups
    per_group = config.num_hidden_layers / config.num_hidden_groups
    return [layer for i in range(config.num_hidden_layers) for layer in groups[int(i / per_group)].albert_layers]


def _gemma_causal(config) -> bool:
    return not getattr(config, "use_bidirectional_attention", False)


def _decoder_stack(layers, self_attention=lambda layer: layer.self_attn, causal=_always) -> Stack:
    return Stack("layers", layers, self_attention=self_attention, attention_block=self_attention, causal=causal)


BERT_SELF_ATTENTION = Projections("separate", query="self.query", key="self.key", value="self.value",
                                  output="output.dense", heads_attribute="num_attention_heads",
                                  head_dim_attribute="attention_head_size", width_attributes=("all_head_size",),
                                  empty="context")
BERT_STACK = Stack("layers", lambda base: base.encoder.layer, self_attention=lambda layer: layer.attention.self,
                   attention_block=lambda layer: layer.attention, causal=_is_decoder)
# Llama-style q_proj / k_proj / v_proj / o_proj with grouped-query attention and a head_dim attribute
GQA_PROJECTIONS = Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="o_proj",
                              head_dim_attribute="head_dim", groups_attribute="num_key_value_groups",
                              empty="projected")
ROTARY = ("position_embeddings", "position_ids")


def _bert_like(name: str, model_types: tuple[str, ...], usable_positions=_max_positions) -> Architecture:
    """BERT's layout: ``encoder.layer[i].attention.self`` / ``.output.dense``."""
    return Architecture(name=name, model_types=model_types, stacks=(BERT_STACK,), projections=BERT_SELF_ATTENTION,
                        attention_interface=True, builds_cache=_is_decoder, usable_positions=usable_positions)


def _llama_like(name: str, model_types: tuple[str, ...], causal=_always, projections=GQA_PROJECTIONS,
                padded_options: tuple[str, ...] = ()) -> Architecture:
    """Llama's layout: ``layers[i].self_attn.{q,k,v,o}_proj``, grouped-query attention, rotary positions."""
    return Architecture(name=name, model_types=model_types, stacks=(_decoder_stack(lambda base: base.layers,
                                                                                   causal=causal),),
                        projections=projections, attention_interface=True, builds_cache=_always,
                        usable_positions=_max_positions, causal_lm=True, model_classes=dict(CAUSAL_KINDS),
                        packed_arguments=ROTARY, padded_options=padded_options)


def _vit_like(name: str, model_types: tuple[str, ...]) -> Architecture:
    """ViT's layout: ``layers[i].attention.{q,k,v,o}_proj``, image inputs."""
    return Architecture(
        name=name, model_types=model_types,
        stacks=(Stack("layers", lambda base: base.layers, self_attention=lambda layer: layer.attention,
                      attention_block=lambda layer: layer.attention, causal=_never),),
        projections=Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="o_proj",
                                heads_attribute="num_attention_heads", head_dim_attribute="head_dim",
                                empty="projected"),
        attention_interface=True, builds_cache=_never, usable_positions=lambda config: None,
        model_classes=dict(IMAGE_KINDS), inputs="image",
    )


CLIP_PROJECTIONS = Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="out_proj",
                               heads_attribute="num_heads", head_dim_attribute="head_dim", empty="projected")


def _clip_layers(tower: str) -> Callable[[nn.Module], Sequence[nn.Module]]:
    """The layers of one CLIP tower (``"text_model"`` or ``"vision_model"``) of a CLIP model; none when the model
    lacks it (CLIPForImageClassification has the vision tower only)."""
    def layers(base: nn.Module) -> Sequence[nn.Module]:
        model = getattr(base, tower, None)
        return model.encoder.layers if model is not None else ()

    return layers


def _clip_stack(name: str, layers, *, text: bool) -> Stack:
    """A CLIP tower: the text tower is causal and reads the padding of ``attention_mask``; images have none."""
    return Stack(name, layers, self_attention=lambda layer: layer.self_attn,
                 attention_block=lambda layer: layer.self_attn, causal=_always if text else _never,
                 padding_argument="attention_mask" if text else None)


ARCHITECTURES: tuple[Architecture, ...] = (
    _bert_like("BERT", ("bert",)),
    _bert_like("RoBERTa", ("roberta",), usable_positions=_roberta_positions),
    _bert_like("XLM-RoBERTa", ("xlm-roberta",), usable_positions=_roberta_positions),
    _bert_like("ELECTRA", ("electra",)),
    Architecture(
        name="DistilBERT", model_types=("distilbert",),
        stacks=(Stack("layers", lambda base: base.transformer.layer, self_attention=lambda layer: layer.attention,
                      attention_block=lambda layer: layer.attention, causal=_never),),
        projections=Projections("separate", query="q_lin", key="k_lin", value="v_lin", output="out_lin",
                                heads_attribute="n_heads", head_dim_attribute="attention_head_size",
                                empty="projected"),
        attention_interface=True, builds_cache=_never, usable_positions=_max_positions,
    ),
    Architecture(
        name="ALBERT", model_types=("albert",),
        stacks=(Stack("layers", _albert_layers, self_attention=lambda layer: layer.attention,
                      attention_block=lambda layer: layer.attention, causal=_never),),
        projections=Projections("separate", query="query", key="key", value="value", output="dense",
                                heads_attribute="num_attention_heads", head_dim_attribute="attention_head_size",
                                width_attributes=("all_head_size",), empty="projected-norm",
                                residual_norm="LayerNorm"),
        attention_interface=True, builds_cache=_never, usable_positions=_max_positions,
    ),
    Architecture(
        name="GPT-2", model_types=("gpt2",), stacks=(_decoder_stack(lambda base: base.h, lambda layer: layer.attn),),
        projections=Projections("fused-conv1d", qkv="c_attn", output="c_proj", heads_attribute="num_heads",
                                head_dim_attribute="head_dim", width_attributes=("split_size",),
                                empty="projected"),
        attention_interface=True, builds_cache=_always, usable_positions=lambda config: config.n_positions,
        causal_lm=True, model_classes=dict(CAUSAL_KINDS),
    ),
    Architecture(
        name="OpenAI GPT", model_types=("openai-gpt",),
        stacks=(_decoder_stack(lambda base: base.h, lambda layer: layer.attn),),
        projections=Projections("fused-conv1d", qkv="c_attn", output="c_proj", heads_attribute="n_head",
                                width_attributes=("split_size",), empty="projected-list"),
        attention_interface=False, builds_cache=_never, usable_positions=lambda config: config.n_positions,
        causal_lm=True, model_classes=dict(CAUSAL_KINDS),
    ),
    Architecture(
        name="GPT-NeoX", model_types=("gpt_neox",),
        stacks=(_decoder_stack(lambda base: base.layers, lambda layer: layer.attention),),
        projections=Projections("fused-per-head", qkv="query_key_value", output="dense",
                                head_dim_attribute="head_size", empty="projected"),
        attention_interface=True, builds_cache=_always, usable_positions=_max_positions, causal_lm=True,
        model_classes=dict(CAUSAL_KINDS), packed_arguments=ROTARY,
    ),
    Architecture(
        name="OPT", model_types=("opt",), stacks=(_decoder_stack(lambda base: base.decoder.layers),),
        projections=Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="out_proj",
                                heads_attribute="num_heads", head_dim_attribute="head_dim", empty="projected"),
        attention_interface=True, builds_cache=_always, usable_positions=_max_positions, causal_lm=True,
        model_classes=dict(CAUSAL_KINDS), packed_arguments=("position_ids",),
    ),
    _llama_like("Llama", ("llama",)),
    _llama_like("Qwen2", ("qwen2",)),
    _llama_like("Qwen3", ("qwen3",)),
    _llama_like("Mistral", ("mistral",)),
    _llama_like("Gemma", ("gemma",), causal=_gemma_causal),
    Architecture(
        name="Phi-3", model_types=("phi3",), stacks=(_decoder_stack(lambda base: base.layers),),
        projections=Projections("fused-qkv", qkv="qkv_proj", output="o_proj", head_dim_attribute="head_dim",
                                kv_heads_attribute="num_key_value_heads", groups_attribute="num_key_value_groups",
                                config_head_counts=True, empty="projected"),
        attention_interface=True, builds_cache=_always, usable_positions=_max_positions, causal_lm=True,
        model_classes=dict(CAUSAL_KINDS), packed_arguments=ROTARY,
    ),
    # Mistral's attention (sliding window included) with a mixture-of-experts MLP; router logits are per position
    _llama_like("Mixtral", ("mixtral",), padded_options=("output_router_logits",)),
    # attention logit soft-capping (the kernels' softcap) and alternating sliding / global layers (layer_types); its
    # logits are soft-capped too (final_logit_softcapping), so language modelling runs the whole model (causal_lm off)
    replace(_llama_like("Gemma 2", ("gemma2",), causal=_gemma_causal), causal_lm=False),
    # attention sinks (the kernels' sinks: one logit per query head, cut with the heads), alternating sliding / global
    # layers, a mixture-of-experts MLP whose router logits are per position
    _llama_like("GPT-OSS", ("gpt_oss",), projections=replace(GQA_PROJECTIONS, head_parameters=("sinks",)),
                padded_options=("output_router_logits",)),
    # partial rotary (the first partial_rotary_factor of every head); optional q/k layer norms shared by all heads
    _llama_like("Phi", ("phi",), projections=replace(GQA_PROJECTIONS, output="dense")),
    # per-layer sliding windows (layer_types) and layers without rotary positions (no_rope_layers)
    _llama_like("SmolLM3", ("smollm3",)),
    # partial rotary; optional q/k layer norms with one norm per head (cut with the heads)
    _llama_like("StableLM", ("stablelm",), projections=replace(
        GQA_PROJECTIONS, heads_attribute="num_heads", kv_heads_attribute="num_key_value_heads",
        head_norms=(("q_layernorm.norms", "query"), ("k_layernorm.norms", "key")))),
    Architecture(
        name="GPT-J", model_types=("gptj",), stacks=(_decoder_stack(lambda base: base.h, lambda layer: layer.attn),),
        projections=Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="out_proj",
                                heads_attribute="num_attention_heads", head_dim_attribute="head_dim",
                                empty="projected"),
        attention_interface=True, builds_cache=_always, usable_positions=_max_positions, causal_lm=True,
        model_classes=dict(CAUSAL_KINDS), packed_arguments=ROTARY,
    ),
    # CLIP's towers, each loadable on its own from a CLIP checkpoint (CLIPTextModel, CLIPVisionModel and their
    # *WithProjection); the text tower is causal (its encoder passes is_causal=True with the call)
    Architecture(
        name="CLIP text", model_types=("clip_text_model",),
        stacks=(_clip_stack("layers", lambda base: base.encoder.layers, text=True),), projections=CLIP_PROJECTIONS,
        attention_interface=True, builds_cache=_never, usable_positions=_max_positions,
        model_classes={"encoder": "AutoModel"},
    ),
    Architecture(
        name="CLIP vision", model_types=("clip_vision_model",),
        stacks=(_clip_stack("layers", lambda base: base.encoder.layers, text=False),), projections=CLIP_PROJECTIONS,
        attention_interface=True, builds_cache=_never, usable_positions=lambda config: None,
        model_classes={"encoder": "AutoModel"}, inputs="image",
    ),
    # CLIPModel runs the vision tower, then the text tower: rows vision | text (one table needs equal head counts);
    # CLIPForImageClassification has the vision rows only
    Architecture(
        name="CLIP", model_types=("clip",),
        stacks=(_clip_stack("vision", _clip_layers("vision_model"), text=False),
                _clip_stack("text", _clip_layers("text_model"), text=True)),
        projections=CLIP_PROJECTIONS, attention_interface=True, builds_cache=_never,
        usable_positions=lambda config: config.text_config.max_position_embeddings,
        model_classes=dict(IMAGE_KINDS), inputs="image",
        head_count=lambda config: config.vision_config.num_attention_heads,
    ),
    _vit_like("ViT", ("vit",)),
    _vit_like("DeiT", ("deit",)),
    Architecture(
        name="BART", model_types=("bart",),
        stacks=(
            Stack("encoder", lambda base: base.encoder.layers, self_attention=lambda layer: layer.self_attn,
                  attention_block=lambda layer: layer.self_attn, causal=_never),
            Stack("decoder", lambda base: base.decoder.layers, self_attention=lambda layer: layer.self_attn,
                  attention_block=lambda layer: layer.self_attn, causal=_always,
                  cross_attention=lambda layer: layer.encoder_attn, cross_block=lambda layer: layer.encoder_attn,
                  padding_argument=None),
        ),
        projections=Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="out_proj",
                                heads_attribute="num_heads", head_dim_attribute="head_dim",
                                width_attributes=(), empty="projected"),
        attention_interface=True, builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
        usable_positions=_max_positions, model_classes={"classification": "AutoModelForSequenceClassification"},
        mask_arguments=(("head_mask", "encoder"), ("decoder_head_mask", "decoder"),
                        ("cross_attn_head_mask", "cross")),
        head_count=lambda config: config.encoder_attention_heads,
        attention_outputs=("encoder_attentions", "decoder_attentions", "cross_attentions"),
    ),
    *T5_FAMILIES,
    *ALIBI_FAMILIES,
    *MODERNBERT_FAMILIES,
    *FALCON_FAMILIES,
)

# Families whose attention is outside the kernels' contract: refused by name, with the feature.
REFUSED = {
    "deberta": "disentangled relative position attention (position terms added to the scores)",
    "deberta-v2": "disentangled relative position attention (position terms added to the scores)",
}

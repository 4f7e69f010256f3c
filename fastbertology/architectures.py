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
decoder layer: BART's rows are ``encoder 0..Le-1 | decoder self-attention Le..Le+Ld-1 | cross-attention
Le+Ld..Le+2Ld-1``; CLIP's dual model's are ``vision | text`` (the order it runs them). For every other family a
row is a layer.

**Shared layers** (ALBERT). A stack may apply one layer module several times (ALBERT applies one layer
``num_hidden_layers`` times): ``Stack.layers`` lists the *applications* in execution order, so the same module
appears several times, and each application is a row of its own. Masks, statistics and importance are per
application; pruning removes weights that every application shares, so it must remove the same heads from every
application of a module (:mod:`fastbertology.pruning` refuses anything else).

Adding a family is one entry here (plus tests; pruning and patching need new code only for a new projection
layout or a new kind of attention module). A model type that is not here is refused with a message that names the
entry to add; a few families whose attention is outside the kernels' contract are refused by name, with the feature.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

__all__ = ["Architecture", "Stack", "Projections", "AttentionSite", "ARCHITECTURES", "REFUSED", "architecture",
           "supported_model_types", "transformer_layers", "attention_modules", "attention_sites", "heads_per_layer",
           "kv_heads_per_layer", "attention_blocks", "row_applications", "row_parts", "row_attentions"]

LAYOUTS = ("separate", "fused-conv1d", "fused-per-head", "fused-qkv")


def _part(module: nn.Module, path: str):
    """``module.<path>`` for a dotted path (``"self.query"``)."""
    return operator.attrgetter(path)(module)


@dataclass(frozen=True)
class Projections:
    """How a layer's attention projections hold their heads (what pruning cuts), relative to the *attention block*
    (:attr:`Stack.attention_block`); attributes are those of the attention module (:attr:`Stack.self_attention`).

    layout:             ``"separate"``: ``query``, ``key``, ``value`` and ``output`` are ``nn.Linear`` (weight
                        ``[out, in]``; heads along the output features of q/k/v and the input features of the output
                        projection; k/v may have fewer heads than q: grouped-query attention);
                        ``"fused-conv1d"``: ``qkv`` is one transformers ``Conv1D`` (weight ``[in, 3 * H * d]``,
                        q | k | v) and ``output`` a ``Conv1D`` (weight ``[H * d, out]``);
                        ``"fused-per-head"``: ``qkv`` is one ``nn.Linear`` whose output features are ``[H, 3, d]``
                        (head h's q, k, v next to each other: GPT-NeoX's ``query_key_value``);
                        ``"fused-qkv"``: ``qkv`` is one ``nn.Linear`` with output features q ``[H * d]`` | k
                        ``[H_kv * d]`` | v ``[H_kv * d]`` (Phi-3's ``qkv_proj``).
    heads_attribute:    attribute holding the query-head count ("" when the module has none: the count is read from
                        the projection widths and ``head_dim_attribute``); updated by pruning.
    head_dim_attribute: attribute holding the head size ("" only for families with a ``heads_attribute``).
    kv_heads_attribute: attribute holding the key/value head count, where the module keeps one; updated by pruning.
    groups_attribute:   attribute holding query heads per key/value head (grouped-query attention), updated by
                        pruning while the groups stay equal.
    width_attributes:   attributes holding ``heads * head_dim`` (updated when heads are removed).
    config_head_counts: the module's forward reads ``self.config.num_attention_heads`` / ``num_key_value_heads``
                        (Phi-3): pruning gives the module a per-layer view of the model config with its own counts.
    empty:              which forward a module with no heads left gets (see :mod:`fastbertology.pruning`), by what
                        the module returns: ``"context"`` (its context, before the output projection, and the
                        probabilities), ``"projected"`` (the projected output and the probabilities, a tuple),
                        ``"projected-list"`` (the same as a list, for modules that take ``output_attentions``
                        themselves) or ``"projected-norm"`` (``residual_norm(hidden + projected)``, ALBERT).
    residual_norm:      the layer norm of ``"projected-norm"`` modules.
    head_norms:         ``(path, "query" | "key")``: ``nn.ModuleList`` s of the attention module with one module per
                        query (or key/value) head, e.g. StableLM's per-head q/k layer norms; pruning keeps the
                        entries of the remaining heads.
    """

    layout: str
    query: str = ""
    key: str = ""
    value: str = ""
    qkv: str = ""
    output: str = ""
    heads_attribute: str = ""
    head_dim_attribute: str = ""
    kv_heads_attribute: str = ""
    groups_attribute: str = ""
    width_attributes: tuple[str, ...] = ()
    config_head_counts: bool = False
    empty: str = ""
    residual_norm: str = ""
    head_norms: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown projection layout {self.layout!r}; known: {', '.join(LAYOUTS)}")

    def head_dim(self, module: nn.Module, block: nn.Module) -> int:
        """The head size ``d`` of one attention module."""
        if self.head_dim_attribute:
            return int(getattr(module, self.head_dim_attribute))
        heads = int(getattr(module, self.heads_attribute))
        return self._fused_width(block) // max(heads, 1)

    def _fused_width(self, block: nn.Module) -> int:
        """``H * d`` of a ``fused-conv1d`` block (a third of its q | k | v width)."""
        return _part(block, self.qkv).nf // 3

    def heads(self, module: nn.Module, block: nn.Module) -> int:
        """The current number of query heads of one attention module."""
        if self.heads_attribute:
            return int(getattr(module, self.heads_attribute))
        head_dim = self.head_dim(module, block)
        if self.layout == "separate":
            return _part(block, self.query).out_features // head_dim
        if self.layout == "fused-per-head":
            return _part(block, self.qkv).out_features // (3 * head_dim)
        if self.layout == "fused-qkv":
            return _part(block, self.qkv).out_features // head_dim - 2 * self.kv_heads(module, block)
        return self._fused_width(block) // head_dim

    def kv_heads(self, module: nn.Module, block: nn.Module) -> int:
        """The current number of key/value heads (equal to :meth:`heads` without grouped-query attention)."""
        if self.kv_heads_attribute:
            return int(getattr(module, self.kv_heads_attribute))
        if self.layout == "separate":
            return _part(block, self.key).out_features // self.head_dim(module, block)
        return self.heads(module, block)


@dataclass(frozen=True)
class Stack:
    """One stack of transformer layers (a decoder-only or encoder-only model has one; BART two).

    name:              ``"layers"``, ``"encoder"`` or ``"decoder"`` (CLIP's dual model: ``"vision"``, ``"text"``):
                       the rows of its self-attention in head tables.
    layers:            base model -> the layer *applications*, in execution order (a module may appear several
                       times: ALBERT applies one layer repeatedly).
    self_attention:    layer -> the module that computes its self-attention (what the attention function sees).
    attention_block:   layer -> the module that owns the self-attention projections (pruned by the projections).
    causal:            config -> whether self-attention is causal.
    cross_attention:   layer -> its cross-attention module (encoder-decoder models), rows named ``"cross"``.
    cross_block:       layer -> the module that owns the cross-attention projections.
    padding_argument:  the model call argument whose right padding this stack's layers run without
                       (padding-free execution); None: the stack always runs padded.
    """

    name: str
    layers: Callable[[nn.Module], Sequence[nn.Module]]
    self_attention: Callable[[nn.Module], nn.Module]
    attention_block: Callable[[nn.Module], nn.Module]
    causal: Callable[[object], bool]
    cross_attention: Callable[[nn.Module], nn.Module] | None = None
    cross_block: Callable[[nn.Module], nn.Module] | None = None
    padding_argument: str | None = "attention_mask"


TEXT_KINDS = {"classification": "AutoModelForSequenceClassification", "encoder": "AutoModel"}
CAUSAL_KINDS = {**TEXT_KINDS, "causal-lm": "AutoModelForCausalLM"}
IMAGE_KINDS = {"classification": "AutoModelForImageClassification", "encoder": "AutoModel"}


@dataclass(frozen=True)
class Architecture:
    """One model family.

    model_types:         ``config.model_type`` values of the family.
    stacks:              its :class:`Stack` s, in execution order.
    projections:         see :class:`Projections` (self- and cross-attention alike).
    attention_interface: attention goes through transformers' ``AttentionInterface`` (else the patch replaces the
                         self-attention module's forward).
    builds_cache:        config -> whether ``use_cache`` (its default) builds a generation cache.
    usable_positions:    config -> the longest sequence the position embeddings allow (None: no such limit).
    causal_lm:           a causal language model whose logits are exactly ``lm_head(base model output)``:
                         language modelling may project at the predicting positions only.
    model_classes:       task kind (``"classification"``, ``"causal-lm"``, ``"encoder"``) -> the transformers Auto
                         class that loads the family for it.
    inputs:              ``"text"`` (``input_ids``), ``"image"`` (``pixel_values``, no padding) or ``"audio"``
                         (``input_features``: log-mel frames of a fixed length, no padding).
    mask_arguments:      call argument -> the rows it masks: ``"all"``, a stack name or ``"cross"``. transformers
                         4.x's ``head_mask``, ``decoder_head_mask``, ``cross_attn_head_mask``.
    packed_arguments:    layer call arguments with per-position values ``[B or 1, N, ...]`` (a tensor or a tuple of
                         them, e.g. rotary ``position_embeddings``) that padding-free execution packs like the hidden
                         states.
    head_count:          config -> the original number of query heads of every row.
    attention_outputs:   the fields of the model's output that hold the attention maps (``output_attentions``), in
                         row order (see :func:`row_attentions`).
    padded_options:      boolean call options (default: the config's) that return per-position outputs of the
                         layers besides ``output_attentions`` / ``output_hidden_states`` (Mixtral's
                         ``output_router_logits``): a call with one of them runs padded.
    refuses:             config -> a setting of this config that the kernels do not compute (refused by name), or
                         None (Gemma 3's ``attn_logit_softcapping``).
    """

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[Stack, ...]
    projections: Projections
    attention_interface: bool
    builds_cache: Callable[[object], bool]
    usable_positions: Callable[[object], int | None]
    causal_lm: bool = False
    model_classes: dict = field(default_factory=lambda: dict(TEXT_KINDS))
    inputs: str = "text"
    mask_arguments: tuple[tuple[str, str], ...] = (("head_mask", "all"),)
    packed_arguments: tuple[str, ...] = ()
    head_count: Callable[[object], int] = lambda config: config.num_attention_heads
    attention_outputs: tuple[str, ...] = ("attentions",)
    padded_options: tuple[str, ...] = ()
    refuses: Callable[[object], str | None] = lambda config: None

    def heads(self, self_attention: nn.Module, block: nn.Module | None = None) -> int:
        """The current number of (query) heads of an attention module of this family (``block``: the module that
        owns its projections, when it is not the attention module itself)."""
        return self.projections.heads(self_attention, self_attention if block is None else block)


@dataclass(frozen=True)
class AttentionSite:
    """One application of an attention module in a forward pass: a row of the head tables.

    row:         its row in ``[L, H]`` tables.
    module:      the attention module (what the attention function sees; shared modules appear in several sites).
    block:       the module that owns its projections.
    application: the index of its layer application over all stacks, in execution order (what prefix reuse skips).
    part:        the name of its stack (``"layers"``, ``"encoder"``, ``"decoder"``, ``"vision"``, ``"text"``: its
                 self-attention) or ``"cross"``.
    stack:       the index of its stack.
    cross:       a cross-attention site.
    """

    row: int
    module: nn.Module
    block: nn.Module
    application: int
    part: str
    stack: int
    cross: bool = False


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
)

# Families whose attention is outside the kernels' contract: refused by name, with the feature.
REFUSED = {
    "t5": "an additive relative position bias (T5's position_bias is added to every attention score)",
    "mt5": "an additive relative position bias (mT5's position_bias is added to every attention score)",
    "bloom": "ALiBi (additive linear position biases on the attention scores)",
    "mpt": "ALiBi (additive linear position biases on the attention scores)",
    "gemma2": "attention logit soft-capping (tanh on the scores) and alternating sliding windows",
    "gpt_oss": "attention sinks (a learned extra logit per head in the softmax)",
    "deberta": "disentangled relative position attention (position terms added to the scores)",
    "deberta-v2": "disentangled relative position attention (position terms added to the scores)",
}

from .architectures_more import MORE_REFUSED, more_architectures  # noqa: E402 (they use the classes above)

ARCHITECTURES += more_architectures()
REFUSED |= MORE_REFUSED
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
            "fastbertology/architectures.py (where its layers, attention modules and projections are)."
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
    entry = architecture(model)
    return [entry.projections.heads(site.module, site.block) for site in attention_sites(model)]


def kv_heads_per_layer(model: nn.Module) -> list[int]:
    """Current number of key/value heads of every row (fewer than the query heads with grouped-query attention)."""
    entry = architecture(model)
    return [entry.projections.kv_heads(site.module, site.block) for site in attention_sites(model)]


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

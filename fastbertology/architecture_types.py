"""The types of the architecture registry (:mod:`fastbertology.architectures`): :class:`Projections` (how an
attention module stores its heads), :class:`Stack` (a stack of layers), :class:`Architecture` (one family) and
:class:`AttentionSite` (one attention application of a forward pass, a row of the head tables)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

LAYOUTS = ("separate", "fused-conv1d", "fused-per-head", "fused-qkv", "fused-grouped")


def submodule(module: nn.Module, path: str) -> nn.Module:
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
                        ``[H_kv * d]`` | v ``[H_kv * d]`` (Phi-3's ``qkv_proj``; Falcon's multi-query
                        ``query_key_value``, one key/value head);
                        ``"fused-grouped"``: ``qkv`` is one ``nn.Linear`` whose output features are ``[C, g + 2, d]``:
                        ``C`` groups (``kv_heads_attribute``), each ``g = H / C`` query heads, then its key, then its
                        value (Falcon's new decoder architecture). Groups must stay equal: pruning cuts every group's
                        remaining query heads into chunks of the gcd of the remaining group sizes, each chunk with
                        its own copy of its group's key and value (:mod:`fastbertology.prune_layouts`).
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
    head_parameters:    parameters of the attention module with one entry per query head along their first axis
                        (GPT-OSS's attention ``sinks``); pruning keeps the entries of the remaining heads.
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
    head_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown projection layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if self.layout == "fused-grouped" and not self.kv_heads_attribute:
            raise ValueError("the fused-grouped projection layout needs kv_heads_attribute (its group count)")

    def head_dim(self, module: nn.Module, block: nn.Module) -> int:
        """The head size ``d`` of one attention module."""
        if self.head_dim_attribute:
            return int(getattr(module, self.head_dim_attribute))
        heads = int(getattr(module, self.heads_attribute))
        return self._fused_width(block) // max(heads, 1)

    def _fused_width(self, block: nn.Module) -> int:
        """``H * d`` of a ``fused-conv1d`` block (a third of its q | k | v width)."""
        return submodule(block, self.qkv).nf // 3

    def heads(self, module: nn.Module, block: nn.Module) -> int:
        """The current number of query heads of one attention module."""
        if self.heads_attribute:
            return int(getattr(module, self.heads_attribute))
        head_dim = self.head_dim(module, block)
        if self.layout == "separate":
            return submodule(block, self.query).out_features // head_dim
        if self.layout == "fused-per-head":
            return submodule(block, self.qkv).out_features // (3 * head_dim)
        if self.layout == "fused-qkv" and not self.kv_heads_attribute:  # as many key/value heads (ModernBERT)
            return submodule(block, self.qkv).out_features // (3 * head_dim)
        if self.layout in ("fused-qkv", "fused-grouped"):  # (each key/value head: a key and a value)
            return submodule(block, self.qkv).out_features // head_dim - 2 * self.kv_heads(module, block)
        return self._fused_width(block) // head_dim

    def kv_heads(self, module: nn.Module, block: nn.Module) -> int:
        """The current number of key/value heads (equal to :meth:`heads` without grouped-query attention)."""
        if self.kv_heads_attribute:
            return int(getattr(module, self.kv_heads_attribute))
        if self.layout == "separate":
            return submodule(block, self.key).out_features // self.head_dim(module, block)
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
    projections_for:     config -> the :class:`Projections` of a model with that config, for families whose layout
                         depends on it (Falcon), or None: always ``projections``. Read through
                         :meth:`projections_of`.
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
    kv_head_count:       config -> the original number of key/value heads of every row (None: as many as query
                         heads).
    attention_outputs:   the fields of the model's output that hold the attention maps (``output_attentions``), in
                         row order (see :func:`row_attentions`).
    padded_options:      boolean call options (default: the config's) that return per-position outputs of the
                         layers besides ``output_attentions`` / ``output_hidden_states`` (Mixtral's
                         ``output_router_logits``): a call with one of them runs padded.
    refuses:             config -> a setting of this config that the kernels do not compute (refused by name), or
                         None (Gemma 3's ``attn_logit_softcapping``).
    relative_bias:       ``(model, stack, row, M) -> [H_row, 2M - 1]``: the kernels' relative position bias table of a
                         self-attention row (T5's bucketed bias; :mod:`fastbertology.families_t5`), or None.
    prepare_patch:       ``model -> undo``: family-specific changes while the model is patched, or None.
    attention_forward:   the replacement forward of the self-attention modules of a family whose attention does not
                         go through the interface (``attention_interface=False``; None: OpenAI GPT's).
    after_pruning:       ``(model, sites) -> None``: what a pruned model of the family needs to run stock (called
                         by pruning and by ``load_pruned``), or None.
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
    kv_head_count: Callable[[object], int | None] = lambda config: getattr(config, "num_key_value_heads", None)
    attention_outputs: tuple[str, ...] = ("attentions",)
    padded_options: tuple[str, ...] = ()
    refuses: Callable[[object], str | None] = lambda config: None
    relative_bias: Callable | None = None
    prepare_patch: Callable | None = None
    after_pruning: Callable | None = None
    attention_forward: Callable | None = None
    projections_for: Callable[[object], Projections] | None = None

    def projections_of(self, config) -> Projections:
        """The :class:`Projections` of a model of this family with ``config``."""
        return self.projections if self.projections_for is None else self.projections_for(config)

    def heads(self, config, self_attention: nn.Module, block: nn.Module | None = None) -> int:
        """The current number of (query) heads of an attention module of a model of this family with ``config``
        (``block``: the module that owns its projections, when it is not the attention module itself)."""
        return self.projections_of(config).heads(self_attention, self_attention if block is None else block)


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

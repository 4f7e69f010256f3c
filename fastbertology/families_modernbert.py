"""ModernBERT in the architecture registry.

**Alternating global / local layers.** ``config.layer_types`` says which layers attend globally and which locally
(every ``global_attn_every_n_layers``-th layer is global). A local layer's query ``i`` sees the keys with
``|i - j| <= local_attention // 2`` (``config.sliding_window``, bidirectional); the attention module hands the
attention function ``sliding_window = config.sliding_window + 1``, which is the kernels' non-causal ``window``
exactly (``|i - j| < window``), so no bias table is needed. Each kind of layer has its own rotary base; both
kinds of position embeddings are packed with the hidden states in padding-free calls.

**Unpadding.** transformers 5's ModernBERT runs padded (4.x unpadded the batch itself before its layers); the
patch's padding-free execution packs the real tokens instead, with the same result.

**Projections.** ``Wqkv`` holds ``q | k | v`` (``[3, H, d]`` along its outputs) and ``Wo`` the output; the module
keeps no head count: it is read from the widths.
"""

from __future__ import annotations

from .architecture_types import Architecture, Projections, Stack

__all__ = ["MODERNBERT_FAMILIES"]

MODERNBERT = Architecture(
    name="ModernBERT", model_types=("modernbert",),
    stacks=(Stack("layers", lambda base: base.layers, self_attention=lambda layer: layer.attn,
                  attention_block=lambda layer: layer.attn, causal=lambda config: False),),
    projections=Projections("fused-qkv", qkv="Wqkv", output="Wo", head_dim_attribute="head_dim", empty="projected"),
    attention_interface=True, builds_cache=lambda config: False,
    usable_positions=lambda config: getattr(config, "max_position_embeddings", None),
    packed_arguments=("position_embeddings",),
)

MODERNBERT_FAMILIES = (MODERNBERT,)

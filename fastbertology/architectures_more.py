"""More registry entries (see :mod:`fastbertology.architectures`): Whisper and Gemma 3, kept in a module of their own
so that the family table stays small (it uses the table's helpers; the table does not import it).
:mod:`fastbertology.architectures` adds ``MORE_ARCHITECTURES`` to ``ARCHITECTURES`` and ``MORE_REFUSED`` to
``REFUSED``; nothing else imports this module.

* **Whisper** (``whisper``: ``WhisperForConditionalGeneration``, ``WhisperForAudioClassification``) reads audio:
  ``input_features [B, n_mels, 2 * max_source_positions]`` (log-mel frames, always of that length: the encoder has
  no padding). Rows as BART's: encoder | decoder self-attention | cross-attention; the audio
  classifier has the encoder rows only. The decoder reads ``decoder_input_ids`` and runs padded (its padding is
  ``decoder_attention_mask``), as BART's.
* **Gemma 3** (``gemma3_text``: ``Gemma3ForCausalLM``, ``Gemma3TextModel``, ``Gemma3TextForSequenceClassification``):
  Llama's layout with q/k norms shared by the heads, sliding-window layers between global ones (``layer_types``;
  each layer hands its own ``sliding_window`` to the attention function, None for global layers) and, with
  ``use_bidirectional_attention``, bidirectional attention (a window ``|i - j| < sliding_window``). A config that
  sets ``attn_logit_softcapping`` is refused by name. The multimodal ``gemma3`` is refused (see ``MORE_REFUSED``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from .architecture_types import Architecture, Projections, Stack
from .family_table import _always, _gemma_causal, _llama_like, _never

MORE_REFUSED = {
    "gemma3": "bidirectional attention among the tokens of each image inside its causal text model (a block mask) and "
              "a SigLIP vision tower; analyse a text-only Gemma 3 checkpoint (model type gemma3_text, "
              "Gemma3ForCausalLM)",
}


def _layers_of(stack: str):
    """base model -> the layers of its ``stack`` (``"encoder"`` or ``"decoder"``); none when the model lacks that
    stack (Whisper's audio classifier has the encoder only)."""
    def layers(base: nn.Module) -> Sequence[nn.Module]:
        module = getattr(base, stack, None)
        return module.layers if module is not None else ()

    return layers


def _softcapping(config) -> str | None:
    """Gemma 3's attention logit soft-capping, when its config sets it."""
    if getattr(config, "attn_logit_softcapping", None) is None:
        return None
    return (f"attn_logit_softcapping={config.attn_logit_softcapping} (attention logit soft-capping: tanh on the "
            "scores)")


def _more_architectures() -> tuple[Architecture, ...]:
    """The entries of this module: Whisper and Gemma 3."""
    def self_attention(layer):
        return layer.self_attn

    whisper = Architecture(
        name="Whisper", model_types=("whisper",),
        stacks=(
            Stack("encoder", _layers_of("encoder"), self_attention=self_attention, attention_block=self_attention,
                  causal=_never, padding_argument=None),
            Stack("decoder", _layers_of("decoder"), self_attention=self_attention, attention_block=self_attention,
                  causal=_always, cross_attention=lambda layer: layer.encoder_attn,
                  cross_block=lambda layer: layer.encoder_attn, padding_argument=None),
        ),
        projections=Projections("separate", query="q_proj", key="k_proj", value="v_proj", output="out_proj",
                                heads_attribute="num_heads", head_dim_attribute="head_dim", empty="projected"),
        attention_interface=True, builds_cache=lambda config: bool(getattr(config, "use_cache", True)),
        usable_positions=lambda config: config.max_target_positions,
        model_classes={"classification": "AutoModelForAudioClassification"},  # (the command line refuses audio)
        inputs="audio",
        mask_arguments=(("head_mask", "encoder"), ("decoder_head_mask", "decoder"),
                        ("cross_attn_head_mask", "cross")),
        head_count=lambda config: config.encoder_attention_heads,
        attention_outputs=("encoder_attentions", "decoder_attentions", "cross_attentions"),
    )
    gemma3 = replace(_llama_like("Gemma 3", ("gemma3_text",), causal=_gemma_causal), refuses=_softcapping)
    return whisper, gemma3


MORE_ARCHITECTURES = _more_architectures()

"""Tiny random models of the issue-11 families, and the independent oracle for their head masks.

The oracle never uses fastbertology: it runs the stock model (SDPA attention, or for the families whose attention
SDPA cannot compute, with soft-capping and sinks, the explicit float64 attention below) with a forward pre-hook on
every attention output projection that multiplies each head's slice of the projection's input (the concatenated
head contexts ``[..., H * d]``) by the head mask. That is 4.x semantics (``O_h = m_h P_h V_h``) by a route that
shares no code with the patch: the output projections of each family are named here, independently of the
registry.

Rows (the first axis of ``[R, H]`` masks) follow the registry's convention, restated here as the specification:
one row per attention application in execution order; BART: encoder | decoder self-attention | cross-attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import transformers as tf

VOCAB = 101
HEADS = 4
HIDDEN = 32
PAD, BOS, EOS = 1, 0, 2


@dataclass(frozen=True)
class Family:
    """One family's tiny model and what the oracle needs to know about it.

    kind:        ``"classification"`` (``logits [B, C]``), ``"lm"`` (``[B, N, V]``), ``"image"`` (pixel values,
                 ``[B, C]``), ``"seq2seq"`` (BART sequence classification), ``"audio"`` (Whisper's audio classifier:
                 ``input_features``, ``[B, C]``), ``"speech2text"`` (Whisper: ``input_features`` and right-padded
                 ``decoder_input_ids`` / ``decoder_attention_mask``, ``[B, N, V]``), or a model without a task head:
                 ``"text-encoder"`` / ``"image-encoder"`` (CLIP's towers: ``last_hidden_state [B, N, D]``).
    outputs:     model -> the attention output projection of every row, in row order (a shared one repeated).
    attentions:  output field -> the row of its first map (``attentions`` and, for BART, the three kinds).
    gqa:         the tiny model has fewer key/value heads than query heads.
    window:      its sliding window (None: none).
    load:        keyword arguments for ``load_pruned`` (what ``save_pretrained`` does not keep of the build).
    oracle:      the attention implementation of the oracle: ``"sdpa"``, ``"oracle"`` (:func:`oracle_attention`,
                 for attention with soft-capping or sinks, which SDPA does not take), or ``"eager64"``: the stock
                 eager attention with its softmax kept in the dtype of the scores (BLOOM computes attention in its
                 own module and takes its softmax in float32).
    sinks:       the attention has sinks (its maps leave out the sink's probability).
    maps:        the implementation whose attention maps the tests compare with: ``"eager"``, or ``"oracle"`` where
                 stock eager attention turns rows that padding and a window hide completely into NaN, which the next
                 layer carries into real tokens (ModernBERT's local layers), or ``"eager-alibi-once"``: stock eager
                 Falcon with ALiBi adds the bias twice (itself, and in the mask it builds for SDPA), so its own
                 ALiBi term is zeroed and the mask's remains (what SDPA computes).
    """

    name: str
    build: Callable[[], torch.nn.Module]
    kind: str
    outputs: Callable[[torch.nn.Module], list]
    attentions: dict = field(default_factory=lambda: {"attentions": 0})
    gqa: bool = False
    window: int | None = None
    load: dict = field(default_factory=dict)
    oracle: str = "sdpa"
    sinks: bool = False
    maps: str = "eager"

    def model(self, dtype=torch.float64):
        """The tiny model in eval mode, built in ``dtype`` (so that buffers computed at construction, as Gemma's
        embedding scale, are what ``from_pretrained`` in that dtype computes)."""
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return self.build().to(dtype).eval()
        finally:
            torch.set_default_dtype(previous)

    @property
    def text(self) -> bool:
        """Reads ``input_ids`` (with their padding)."""
        return self.kind not in ("image", "image-encoder", "audio", "speech2text")

    @property
    def encoder_only(self) -> bool:
        """A model without a task head (its output is ``last_hidden_state``; no labels, no loss)."""
        return self.kind.endswith("-encoder")


def _encoder(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                intermediate_size=48, max_position_embeddings=70, num_labels=3, **extra)


def _decoder(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS, **extra)


def _vision(**extra):
    return dict(image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=3,
                num_attention_heads=HEADS, intermediate_size=48, num_labels=3, **extra)


def _random_norms(model, names=("q_layernorm", "k_layernorm")):
    """``model`` with random affine parameters in its q/k layer norms (initialised to the identity, every head's
    norm would equal every other's, and cutting the wrong one would go unnoticed)."""
    generator = torch.Generator().manual_seed(3)
    for name, parameter in model.named_parameters():
        if any(part in name for part in names):
            with torch.no_grad():
                parameter.copy_(parameter + 0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def _random_sinks(model):
    """``model`` with attention sinks of the size of its scores (their initialisation, 0.02, would hardly matter)."""
    generator = torch.Generator().manual_seed(4)
    for name, parameter in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def _llama_outputs(model):
    return [layer.self_attn.o_proj for layer in model.model.layers]


FAMILIES = {
    "xlm-roberta": Family(
        "xlm-roberta",
        lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**_encoder(pad_token_id=PAD))),
        "classification", lambda m: [layer.attention.output.dense for layer in m.roberta.encoder.layer]),
    "electra": Family(
        "electra", lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(**_encoder(embedding_size=16))),
        "classification", lambda m: [layer.attention.output.dense for layer in m.electra.encoder.layer]),
    "distilbert": Family(
        "distilbert", lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=3, n_heads=HEADS, hidden_dim=48, max_position_embeddings=64,
            num_labels=3)),
        "classification", lambda m: [layer.attention.out_lin for layer in m.distilbert.transformer.layer]),
    # two layer modules, each applied twice: rows 0 1 2 3 = (group 0 layer 0, layer 1) x 2 applications
    "albert": Family(
        "albert", lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(**_encoder(
            embedding_size=16, num_hidden_groups=1, inner_group_num=2) | {"num_hidden_layers": 2})),
        "classification",
        lambda m: [layer.attention.dense for _ in range(2)
                   for layer in m.albert.encoder.albert_layer_groups[0].albert_layers]),
    "gpt_neox": Family(
        "gpt_neox", lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_decoder(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))),
        "lm", lambda m: [layer.attention.dense for layer in m.gpt_neox.layers]),
    "opt": Family(
        "opt", lambda: tf.OPTForCausalLM(tf.OPTConfig(**_decoder(ffn_dim=48, word_embed_proj_dim=16))),
        "lm", lambda m: [layer.self_attn.out_proj for layer in m.model.decoder.layers]),
    "llama": Family("llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder(num_key_value_heads=2,
                                                                                    attention_bias=True))),
                    "lm", _llama_outputs, gqa=True),
    "qwen2": Family("qwen2", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder(num_key_value_heads=2))),
                    "lm", _llama_outputs, gqa=True),
    "qwen3": Family("qwen3", lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_decoder(num_key_value_heads=2,
                                                                                    head_dim=8))),
                    "lm", _llama_outputs, gqa=True),
    "mistral": Family("mistral", lambda: tf.MistralForCausalLM(tf.MistralConfig(**_decoder(num_key_value_heads=2,
                                                                                            sliding_window=6))),
                      "lm", _llama_outputs, gqa=True, window=6),
    "gemma": Family("gemma", lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_decoder(num_key_value_heads=1,
                                                                                    head_dim=16))),
                    "lm", _llama_outputs, gqa=True),
    "phi3": Family("phi3", lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_decoder(num_key_value_heads=2))),
                   "lm", _llama_outputs, gqa=True),
    "mixtral": Family("mixtral", lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_decoder(
        num_key_value_heads=2, sliding_window=6, num_local_experts=3, num_experts_per_tok=2),
        experts_implementation="eager")),  # (the grouped matrix products take no float64)
        "lm", _llama_outputs, gqa=True, window=6, load={"experts_implementation": "eager"}),
    "phi": Family("phi", lambda: _random_norms(tf.PhiForCausalLM(tf.PhiConfig(**_decoder(num_key_value_heads=2,
                                                                                     qk_layernorm=True)))),
                  "lm", lambda m: [layer.self_attn.dense for layer in m.model.layers], gqa=True),
    # layer 2 has no rotary positions and a sliding window of 6; layers 0 and 1 rotary, full attention
    "smollm3": Family("smollm3", lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**_decoder(
        num_key_value_heads=2, no_rope_layer_interval=3, use_sliding_window=True, sliding_window=6))),
        "lm", _llama_outputs, gqa=True, window=6),
    # one q (k) layer norm per query (key/value) head
    "stablelm": Family("stablelm", lambda: _random_norms(tf.StableLmForCausalLM(tf.StableLmConfig(**_decoder(
        num_key_value_heads=2, qk_layernorm=True, use_qkv_bias=True)))), "lm", _llama_outputs, gqa=True),
    # soft-capping at 2 (tiny random scores stay well inside the default 50); sliding window 6 in layers 0 and 2
    "gemma2": Family("gemma2", lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_decoder(
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))),
        "lm", _llama_outputs, gqa=True, window=6, oracle="oracle"),
    # sinks, sliding window 6 in layers 0 and 2, a mixture of experts
    "gpt_oss": Family("gpt_oss", lambda: _random_sinks(tf.GptOssForCausalLM(tf.GptOssConfig(**_decoder(
        num_key_value_heads=2, head_dim=8, num_local_experts=3, num_experts_per_tok=2, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), experts_implementation="eager"))),
        "lm", _llama_outputs, gqa=True, window=6, load={"experts_implementation": "eager"}, oracle="oracle",
        sinks=True),
    "gptj": Family("gptj", lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=HEADS, n_inner=48, n_positions=64, rotary_dim=4,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)),
        "lm", lambda m: [layer.attn.out_proj for layer in m.transformer.h]),
    # the same layouts with as many key/value heads as query heads (they run on kernels without GQA support too)
    "llama-mha": Family("llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder(num_key_value_heads=HEADS))),
                        "lm", _llama_outputs),
    "phi3-mha": Family("phi3", lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_decoder(num_key_value_heads=HEADS))),
                       "lm", _llama_outputs),
    "vit": Family("vit", lambda: tf.ViTForImageClassification(tf.ViTConfig(**_vision())), "image",
                  lambda m: [layer.attention.o_proj for layer in m.vit.layers]),
    "deit": Family("deit", lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**_vision())), "image",
                   lambda m: [layer.attention.o_proj for layer in m.deit.layers]),
    "bart": Family(
        "bart", lambda: tf.BartForSequenceClassification(tf.BartConfig(
            vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            num_labels=3, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS)),
        "seq2seq",
        lambda m: ([layer.self_attn.out_proj for layer in m.model.encoder.layers]
                   + [layer.self_attn.out_proj for layer in m.model.decoder.layers]
                   + [layer.encoder_attn.out_proj for layer in m.model.decoder.layers]),
        attentions={"encoder_attentions": 0, "decoder_attentions": 2, "cross_attentions": 4}),
}


def _t5(config_class, model_class):
    """A tiny T5 / mT5 classifier: 2 encoder and 2 decoder layers, 8 buckets up to distance 12 (so the lengths
    reach T5's logarithmic buckets), the bias tables random (their initialisation is tiny) and frozen (the Triton
    kernels refuse a table that requires grad; tests/test_families_t5.py checks that and the table's gradient)."""
    model = model_class(config_class(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, num_labels=3, dropout_rate=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD))
    generator = torch.Generator().manual_seed(5)
    for name, parameter in model.named_parameters():
        if name.endswith("relative_attention_bias.weight"):
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            parameter.requires_grad_(False)
    return model


def _t5_outputs(model):
    base = model.transformer
    return ([block.layer[0].SelfAttention.o for block in base.encoder.block]
            + [block.layer[0].SelfAttention.o for block in base.decoder.block]
            + [block.layer[1].EncDecAttention.o for block in base.decoder.block])


SEQ2SEQ_MAPS = {"encoder_attentions": 0, "decoder_attentions": 2, "cross_attentions": 4}
FAMILIES |= {
    # relative position bias (the kernels' relative_bias table), unscaled scores; rows as BART's
    "t5": Family("t5", lambda: _t5(tf.T5Config, tf.T5ForSequenceClassification), "seq2seq", _t5_outputs,
                 attentions=SEQ2SEQ_MAPS),
    "mt5": Family("mt5", lambda: _t5(tf.MT5Config, tf.MT5ForSequenceClassification), "seq2seq", _t5_outputs,
                  attentions=SEQ2SEQ_MAPS),
}

# ALiBi in BLOOM's own attention module (fused per-head query_key_value); 4 heads: slopes 1/4, 1/16, 1/64, 1/256
FAMILIES["bloom"] = Family("bloom", lambda: tf.BloomForCausalLM(tf.BloomConfig(
    vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=3, n_head=HEADS, pad_token_id=PAD, bos_token_id=BOS,
    eos_token_id=EOS)), "lm", lambda m: [layer.self_attention.dense for layer in m.transformer.h], oracle="eager64")

# ALiBi in MPT's own attention module (fused Wqkv q | k | v), clip_qkv on
FAMILIES["mpt"] = Family("mpt", lambda: tf.MptForCausalLM(tf.MptConfig(
    vocab_size=VOCAB, d_model=HIDDEN, n_layers=3, n_heads=HEADS, expansion_ratio=2, max_seq_len=32,
    attn_config={"clip_qkv": 2.0}, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)), "lm",
    lambda m: [block.attn.out_proj for block in m.transformer.blocks], oracle="eager64")

# alternating global / local layers (global, local, global); the local window |i - j| <= 2 is shorter than the
# sequences (the kernels' non-causal window 3)
FAMILIES["modernbert"] = Family("modernbert", lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=3, num_attention_heads=HEADS,
    global_attn_every_n_layers=2, local_attention=4, max_position_embeddings=64, num_labels=3, pad_token_id=PAD,
    bos_token_id=BOS, eos_token_id=EOS, cls_token_id=BOS, sep_token_id=EOS)), "classification",
    lambda m: [layer.attn.Wo for layer in m.model.layers], window=2, maps="oracle")


def _falcon(**extra):
    return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3,
                                                num_attention_heads=HEADS, pad_token_id=PAD, bos_token_id=BOS,
                                                eos_token_id=EOS, **extra))


def _falcon_outputs(model):
    return [layer.self_attention.dense for layer in model.transformer.h]


FAMILIES |= {
    # multi-head Falcon with rotary positions, and with ALiBi (slope / sqrt(d), once: what SDPA computes)
    "falcon": Family("falcon", lambda: _falcon(multi_query=False), "lm", _falcon_outputs),
    "falcon-alibi": Family("falcon", lambda: _falcon(multi_query=False, alibi=True), "lm", _falcon_outputs,
                           maps="eager-alibi-once"),
    # multi-query (one key/value head) with ALiBi; the new decoder architecture (2 key/value groups, rotary)
    "falcon-mq": Family("falcon", lambda: _falcon(multi_query=True, alibi=True), "lm", _falcon_outputs,
                        maps="eager-alibi-once"),
    "falcon-new": Family("falcon", lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2), "lm",
                         _falcon_outputs, gqa=True),
}


def _clip_text(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS, **extra)


def _clip_vision():
    return {key: value for key, value in _vision().items() if key != "num_labels"}


FAMILIES |= {
    "clip-text": Family("clip_text_model", lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**_clip_text())),
                        "text-encoder", lambda m: [layer.self_attn.out_proj for layer in m.encoder.layers]),
    "clip-vision": Family("clip_vision_model", lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**_clip_vision())),
                          "image-encoder", lambda m: [layer.self_attn.out_proj for layer in m.encoder.layers]),
    "clip": Family("clip", lambda: tf.CLIPForImageClassification(tf.CLIPConfig(
        text_config=_clip_text(), vision_config=_clip_vision(), num_labels=3)), "image",
        lambda m: [layer.self_attn.out_proj for layer in m.vision_model.encoder.layers]),
}


def _whisper(**extra):
    """A tiny Whisper: 4 log-mel bins, 16 frames (2 x max_source_positions: the encoder's fixed input length)."""
    return tf.WhisperConfig(**dict(
        vocab_size=VOCAB, num_mel_bins=4, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_source_positions=8, max_target_positions=32, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=BOS, num_labels=3, classifier_proj_size=16) | extra)


def _whisper_outputs(model):
    """Whisper's output projections: encoder | decoder self-attention | cross-attention (the audio classifier has
    the encoder only)."""
    base = getattr(model, "model", model)
    decoder = list(base.decoder.layers) if hasattr(base, "decoder") else []
    return ([layer.self_attn.out_proj for layer in base.encoder.layers]
            + [layer.self_attn.out_proj for layer in decoder] + [layer.encoder_attn.out_proj for layer in decoder])


FAMILIES |= {
    "whisper": Family("whisper", lambda: tf.WhisperForConditionalGeneration(_whisper()), "speech2text",
                      _whisper_outputs,
                      attentions={"encoder_attentions": 0, "decoder_attentions": 2, "cross_attentions": 4}),
    "whisper-audio": Family("whisper", lambda: tf.WhisperForAudioClassification(_whisper(encoder_layers=3)),
                            "audio", _whisper_outputs),
    # layers 0 and 2 slide a window of 6 keys, layer 1 is global; q/k norms (shared by the heads) made random
    "gemma3": Family("gemma3_text", lambda: _random_norms(tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_decoder(
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))), ("q_norm", "k_norm")),
        "lm", _llama_outputs, gqa=True, window=6),
}
NAMES = list(FAMILIES)
TEXT_NAMES = [name for name in NAMES if FAMILIES[name].text]


def rows(family: Family, model) -> int:
    return len(family.outputs(model))


def inputs(family: Family, lengths, *, seed: int = 1) -> dict:
    """Model inputs for ``len(lengths)`` examples: right-padded text (``input_ids``, ``attention_mask``; BART's
    sequences end in EOS, as its classifier needs), ``pixel_values [B, 3, 8, 8]`` (images have no padding) or
    Whisper's ``input_features [B, 4, 16]`` (no padding) and, for speech recognition, right-padded decoder text
    (``decoder_input_ids``, ``decoder_attention_mask``, starting with the decoder start token)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    if family.kind in ("audio", "speech2text"):
        features = {"input_features": torch.randn(batch, 4, 16, generator=generator, dtype=torch.float64)}
        if family.kind == "audio":
            return features
        text = inputs(replace(family, kind="lm"), lengths, seed=seed)
        text["input_ids"][:, 0] = BOS
        return features | {"decoder_input_ids": text["input_ids"], "decoder_attention_mask": text["attention_mask"]}
    if not family.text:
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=generator, dtype=torch.float64)}
    seq = max(lengths)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    if family.kind == "seq2seq":
        input_ids[torch.arange(batch), torch.tensor(lengths) - 1] = EOS
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def main_output(output) -> torch.Tensor:
    """The logits, or the last hidden states of a model without a task head."""
    logits = getattr(output, "logits", None)
    return output.last_hidden_state if logits is None else logits


def with_labels(family: Family, batch: dict) -> dict:
    """``{"labels": ...}`` for the call, or nothing for a model without a task head."""
    return {} if family.encoder_only else {"labels": labels(family, batch)}


def text_mask(batch: dict) -> torch.Tensor | None:
    """The padding mask of the batch's text (``[B, N]``, 1 = token): its ``attention_mask``, or Whisper's
    ``decoder_attention_mask``; None without text."""
    return batch.get("attention_mask", batch.get("decoder_attention_mask"))


def labels(family: Family, batch: dict) -> torch.Tensor:
    """Class ids ``[B]``, or LM targets (``input_ids`` with -100 at padding; Whisper: the decoder text's next
    tokens, -100 at padding and after the last token, as transformers' loss reads them unshifted)."""
    if family.kind == "lm":
        return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if family.kind == "speech2text":
        following = torch.nn.functional.pad(batch["decoder_input_ids"][:, 1:], (0, 1), value=PAD)
        real = torch.nn.functional.pad(batch["decoder_attention_mask"][:, 1:], (0, 1), value=0)
        return following.masked_fill(real == 0, -100)
    size = len(next(iter(batch.values())))
    return torch.arange(size) % 3


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None,
                     **kwargs):
    """Explicit attention in the dtype of the inputs, as the model means it (registered with transformers as
    ``"oracle"``): ``s = cap(scale * q . k) + mask`` (additive 4-D mask, transformers' eager mask), softmax over the
    keys and, with ``s_aux`` (GPT-OSS's sinks), one more logit per head whose value is zero. Unlike Gemma 2's stock
    eager attention, the softmax stays in float64."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def _register_oracle():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("oracle", oracle_attention)
    AttentionMaskInterface.register("oracle", eager_mask)


_register_oracle()


def _row_mask(head_mask, row):
    """The mask of one row broadcastable to ``[B, N, H, 1]``."""
    if head_mask.dim() == 2:
        return head_mask[row][None, None, :, None]
    return head_mask[:, row][:, None, :, None]


def _mpt_attention(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
    """MPT's attention as its ``MptAttention.forward`` computes it (no cache), with the softmax in the dtype of the
    scores: ``q k^T * softmax_scale + alibi[..., -N:]``, hidden where the bool mask is True."""
    batch, seq = hidden_states.shape[:2]
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (t.reshape(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
                         for t in mixed.chunk(3, dim=2))
    scores = query @ key.transpose(-1, -2) * self.softmax_scale + position_bias[:, -seq:, -seq:]
    scores = scores.masked_fill(attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    context = (probs @ value).transpose(1, 2).reshape(batch, seq, -1)
    return self.out_proj(context), probs


@contextlib.contextmanager
def _mpt_attention_in_the_input_dtype():
    """Stock MPT takes its softmax in float32 (``scores.float()``): inside the block its attention modules compute
    in the dtype of their inputs (:func:`_mpt_attention`)."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    stock = MptAttention.forward
    MptAttention.forward = _mpt_attention
    try:
        yield
    finally:
        MptAttention.forward = stock


@contextlib.contextmanager
def _softmax_in_the_input_dtype():
    """``torch.nn.functional.softmax`` ignoring a ``dtype=`` argument inside the block (stock BLOOM asks for a float32
    softmax, which would make a float64 oracle float32-accurate)."""
    stock = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        return stock(input, dim=dim)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = stock


def _zero_alibi(module, args, kwargs):
    """Falcon's eager attention without its own ALiBi term (the mask carries it already)."""
    if kwargs.get("alibi") is None:
        return None
    return args, {**kwargs, "alibi": torch.zeros_like(kwargs["alibi"])}


def stock_precision(family: Family):
    """Inside the block, the family's unpatched model computes in the dtype of its inputs (what a pruned model
    runs stock is compared with the float64 oracle)."""
    if family.oracle != "eager64":
        return contextlib.nullcontext()
    return _mpt_attention_in_the_input_dtype() if family.name == "mpt" else _softmax_in_the_input_dtype()


@contextlib.contextmanager
def oracle_head_mask(family: Family, model, head_mask, *, implementation: str = "sdpa"):
    """Inside the block, the stock ``model`` applies ``head_mask`` (``[R, H]`` or ``[B, R, H]``) by scaling each
    head's slice of the output projections' inputs. Independent of fastbertology.

    implementation: ``"sdpa"`` (exact in float64; the family's ``oracle`` implementation where SDPA cannot run it)
    or ``"eager"`` (returns the attention maps; several families' eager attention takes its softmax in float32, so
    its numbers are float32-accurate only)."""
    if implementation == "sdpa":
        implementation = family.oracle
    elif implementation == "eager":
        implementation = family.maps
    if implementation == "eager-alibi-once":
        handles = [module.register_forward_pre_hook(_zero_alibi, with_kwargs=True) for module in model.modules()
                   if type(module).__name__ == "FalconAttention"]
        try:
            with oracle_head_mask(family, model, head_mask, implementation="stock-eager"):
                yield model
        finally:
            for handle in handles:
                handle.remove()
        return
    if implementation == "eager64":
        with stock_precision(family), oracle_head_mask(family, model, head_mask, implementation="stock-eager"):
            yield model
        return
    projections = family.outputs(model)
    rows_of: dict[int, list[int]] = {}
    for row, module in enumerate(projections):
        rows_of.setdefault(id(module), []).append(row)
    calls: dict[int, int] = {}
    handles = [model.register_forward_pre_hook(lambda module, args: calls.clear())]

    def scale(module, args):
        count = calls.get(id(module), 0)
        calls[id(module)] = count + 1
        row = rows_of[id(module)][count]
        context = args[0]
        heads = context.view(*context.shape[:-1], HEADS, -1)
        return ((heads * _row_mask(head_mask, row).to(context.dtype)).view(context.shape), *args[1:])

    for _key, rows_list in rows_of.items():
        handles.append(projections[rows_list[0]].register_forward_pre_hook(scale))
    if implementation == "stock-eager":  # (the family's stock eager attention, whatever its ``maps``)
        implementation = "eager"
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:  # (Falcon refuses the switch; its modules and its
        model.config._attn_implementation = implementation  # mask read the config at run time)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        model.config._attn_implementation = previous
        for handle in handles:
            handle.remove()


def expected_attentions(family: Family, output, head_mask) -> dict[str, list[torch.Tensor]]:
    """The stock eager maps times the head mask of their rows (4.x's ``attentions``), per output field."""
    maps = {}
    for name, first in family.attentions.items():
        stock = getattr(output, name)
        masks = [None if head_mask is None else (head_mask[first + i] if head_mask.dim() == 2
                                                 else head_mask[:, first + i])
                 for i in range(len(stock))]
        maps[name] = [probs if mask is None else probs * (mask[None, :, None, None] if mask.dim() == 1
                                                          else mask[:, :, None, None])
                      for probs, mask in zip(stock, masks)]
    return maps


def hidden_state_fields(output) -> list[str]:
    return [name for name in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
            if getattr(output, name, None) is not None]


def loss_of(output, batch) -> torch.Tensor:
    """A scalar depending on every output that is not padding (for gradient checks)."""
    logits = main_output(output)
    if logits.dim() == 2:
        return (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum()
    real = text_mask(batch) if text_mask(batch) is not None else torch.ones(logits.shape[:2])
    return (torch.tanh(logits) * real[..., None].to(logits.dtype)).sum()

"""Tiny random models of every supported type, and an independent eager implementation of 4.x head masking.

The reference here never uses fastbertology: it runs the stock transformers model with an eager attention
function (or, for OpenAI GPT, an ``_attn`` override) that multiplies the post-softmax probabilities by the head
mask, exactly as transformers 4.x did.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    AttentionInterface,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    OpenAIGPTConfig,
    OpenAIGPTLMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

VOCAB = 101
LAYERS = 3
HEADS = 4
HIDDEN = 32  # head dim 8


def tiny_model(model_type: str, *, seed: int = 0, dtype=torch.float64, attn_implementation: str | None = None):
    """A tiny randomly initialised model in eval mode. Returns ``(model, num_layers, num_heads)``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if attn_implementation is not None:
        common["attn_implementation"] = attn_implementation
    if model_type == "bert":
        config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=48, max_position_embeddings=64, num_labels=3, **common)
        model = BertForSequenceClassification(config)
    elif model_type == "roberta":
        config = RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               intermediate_size=48, max_position_embeddings=70, pad_token_id=1, **common)
        model = RobertaForMaskedLM(config)
    elif model_type == "gpt2":
        config = GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, bos_token_id=0,
                            eos_token_id=0, **common)
        model = GPT2LMHeadModel(config)
    elif model_type == "openai-gpt":
        config = OpenAIGPTConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, **common)
        model = OpenAIGPTLMHeadModel(config)
    else:
        raise ValueError(model_type)
    return model.to(dtype).eval(), LAYERS, HEADS


MODEL_TYPES = ["bert", "roberta", "gpt2", "openai-gpt"]


def random_batch(batch: int, seq: int, lengths=None, *, seed: int = 1):
    """``input_ids [B, N]`` (avoiding the pad ids 0 and 1) and a right-padded ``attention_mask [B, N]``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row, length in enumerate(lengths or []):
        attention_mask[row, length:] = 0
        input_ids[row, length:] = 1
    return input_ids, attention_mask


def retrieval_batches():
    """Two retrieval batches of 4 (query, positive) pairs with odd lengths, right padding and example indices."""
    batches = []
    for index, (queries, positives) in enumerate([([5, 9, 3, 7], [8, 2, 6, 9]), ([4, 4, 1, 6], [7, 3, 9, 2])]):
        q_ids, q_mask = random_batch(4, max(queries), queries, seed=20 + index)
        p_ids, p_mask = random_batch(4, max(positives), positives, seed=30 + index)
        batches.append({"input_ids": q_ids, "attention_mask": q_mask, "pair_input_ids": p_ids,
                        "pair_attention_mask": p_mask, "example_index": torch.arange(4 * index, 4 * index + 4)})
    return batches


def _reference_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers 4.x eager attention: softmax(QK^T * scale + mask) * head_mask, then @ V."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    head_mask = module._reference_head_mask
    if head_mask is not None:
        probs = probs * head_mask
    return torch.matmul(probs, value).transpose(1, 2), probs


def _reference_openai_attn(module):
    """4.x ``Attention._attn`` of OpenAI GPT: -1e4 causal masking, softmax, ``w * head_mask``, ``[w @ v, w]``."""

    def _attn(q, k, v, attention_mask=None, output_attentions=False):
        w = torch.matmul(q, k)
        if module.scale:
            w = w / v.size(-1) ** 0.5
        b = module.bias[:, :, : w.size(-2), : w.size(-1)]
        w = w * b + -1e4 * (1 - b)
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        if module._reference_head_mask is not None:
            w = w * module._reference_head_mask
        return [torch.matmul(w, v)] + ([w] if output_attentions else [])

    return _attn


def _layer_masks(head_mask, num_layers):
    """``[H]`` / ``[L, H]`` / ``[B, L, H]`` -> per layer a tensor broadcastable to ``[B, H, N, N]``."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        return [head_mask[None, :, None, None]] * num_layers
    if head_mask.dim() == 2:
        return [head_mask[layer][None, :, None, None] for layer in range(num_layers)]
    return [head_mask[:, layer, :, None, None] for layer in range(num_layers)]


@contextlib.contextmanager
def reference_head_mask(model, head_mask):
    """Run the stock model with 4.x head-mask semantics inside the block (independent of fastbertology)."""
    AttentionInterface.register("reference_head_mask", _reference_eager_attention)
    AttentionMaskInterface.register("reference_head_mask", eager_mask)
    base = model.base_model
    if model.config.model_type in ("bert", "roberta"):
        modules = [layer.attention.self for layer in base.encoder.layer]
    else:
        modules = [block.attn for block in base.h]
    for module, mask in zip(modules, _layer_masks(head_mask, len(modules))):
        module._reference_head_mask = mask
        if model.config.model_type == "openai-gpt":
            module._attn = _reference_openai_attn(module)
    previous = None
    if model.config.model_type != "openai-gpt":
        previous = model.config._attn_implementation
        model.set_attn_implementation("reference_head_mask")
    try:
        yield model
    finally:
        for module in modules:
            del module._reference_head_mask
            if model.config.model_type == "openai-gpt":
                del module._attn
        if previous is not None:
            model.set_attn_implementation(previous)


def model_loss(model, output, input_ids, attention_mask):
    """A scalar loss depending on every output position that is not padding (for gradient checks)."""
    logits = output.logits
    if logits.dim() == 2:
        return (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum()
    weights = attention_mask[..., None].to(logits.dtype)
    return (torch.tanh(logits) * weights).sum()

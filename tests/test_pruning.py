"""Physical head pruning (fastbertology.pruning) on tiny random BERT, RoBERTa, GPT-2 and OpenAI GPT models.

The reference for a pruned model is the unpruned model with the pruned heads' input columns of the attention
output projection set to zero: the head's context is multiplied by 0, i.e. 4.x head-mask semantics.
Everything runs in float64 so pruned and reference outputs agree to rounding.
"""

from __future__ import annotations

import copy
import json

import models
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    CamembertConfig,
    CamembertModel,
    GPT2LMHeadModel,
)

from fastbertology.pruning import count_parameters, heads_to_prune_from_mask, load_pruned, prune_heads

LAYERS, HEADS, HIDDEN, VOCAB = models.LAYERS, models.HEADS, models.HIDDEN, models.VOCAB
HEAD_DIM = HIDDEN // HEADS
MODEL_TYPES = ["bert", "roberta", "gpt2", "openai-gpt"]
# Per pruned head: Q, K, V weight rows [d, D] and biases [d], plus the output projection's input columns [D, d].
PARAMS_PER_HEAD = 4 * HIDDEN * HEAD_DIM + 3 * HEAD_DIM


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(model_type: str, *, attn_implementation: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random float64 model in eval mode (3 layers x 4 heads, hidden 32): :func:`models.tiny_model`."""
    return models.tiny_model(model_type, seed=seed, attn_implementation=attn_implementation)[0]


def batch(lengths=(7, 5, 2), *, seed: int = 1) -> dict[str, torch.Tensor]:
    """``input_ids [B, N]`` (ids >= 2, clear of pad ids) and a right-padded ``attention_mask [B, N]``."""
    generator = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    input_ids = torch.randint(2, VOCAB, (len(lengths), seq), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def zero_heads(model, heads: dict[int, list[int]]):
    """Reference: a copy of ``model`` whose output projection ignores ``heads`` (original indices)."""
    reference = copy.deepcopy(model)
    base = reference.base_model
    with torch.no_grad():
        for layer, layer_heads in heads.items():
            for h in layer_heads:
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                if model.config.model_type in ("bert", "roberta"):
                    base.encoder.layer[layer].attention.output.dense.weight[:, cols] = 0  # Linear: [out, in]
                else:
                    base.h[layer].attn.c_proj.weight[cols, :] = 0  # Conv1D: [in, out]
    return reference


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pruned_equals_zeroed_heads(model_type):
    model = tiny_model(model_type)
    heads = {0: [0, 2], 2: [1]}
    expected = logits(zero_heads(model, heads), batch())
    unpruned = logits(model, batch())

    prune_heads(model, {str(layer): torch.tensor(h) for layer, h in heads.items()})  # JSON keys, tensor heads

    assert model.config.pruned_heads == heads
    assert not torch.allclose(unpruned, expected)  # the heads did matter
    assert_close(logits(model, batch()), expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_layer_and_partial_layer(model_type):
    model = tiny_model(model_type, attn_implementation="eager")
    heads = {1: [0, 1, 2, 3], 0: [3]}
    reference = zero_heads(model, heads)
    inputs = batch((9, 4, 7))

    prune_heads(model, heads)
    out = model(**inputs, output_attentions=True)
    ref = reference(**inputs, output_attentions=True)

    assert model.config.pruned_heads == {0: [3], 1: [0, 1, 2, 3]}
    assert_close(out.logits, ref.logits)
    assert len(out.attentions) == LAYERS
    assert out.attentions[1].shape == (3, 0, 9, 9)
    assert_close(out.attentions[0], ref.attentions[0][:, :3])
    assert_close(out.attentions[2], ref.attentions[2])
    if model_type != "openai-gpt":  # the default attention (sdpa) returns no probabilities
        model.set_attn_implementation("sdpa")
        assert_close(logits(model, inputs), ref.logits)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_repeated_pruning_keeps_original_indices(model_type):
    model = tiny_model(model_type)
    prune_heads(model, {0: [1]})
    prune_heads(model, {0: [1], 2: [3]})  # layer 0's current head 1 is original head 2
    assert model.config.pruned_heads == {0: [1, 2], 2: [3]}
    assert_close(logits(model, batch()), logits(zero_heads(tiny_model(model_type), {0: [1, 2], 2: [3]}), batch()))

    prune_heads(model, {0: [0, 1]})  # the rest of layer 0: original heads 0 and 3
    expected_heads = {0: [0, 1, 2, 3], 2: [3]}
    assert model.config.pruned_heads == expected_heads
    assert_close(logits(model, batch()), logits(zero_heads(tiny_model(model_type), expected_heads), batch()))
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(model, {0: [0]})  # no heads left in layer 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parameter_counts(model_type):
    model = tiny_model(model_type)
    total = count_parameters(model)
    heads_total = count_parameters(model, attention_heads_only=True)
    assert total == sum(p.numel() for p in model.parameters())
    assert heads_total == LAYERS * (3 * (HIDDEN * HIDDEN + HIDDEN) + HIDDEN * HIDDEN)

    prune_heads(model, {0: [0, 1, 2, 3], 2: [1, 3]})

    removed = 6 * PARAMS_PER_HEAD
    assert count_parameters(model) == total - removed
    assert count_parameters(model, attention_heads_only=True) == heads_total - removed


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_and_load_pruned(model_type, tmp_path):
    model = tiny_model(model_type)
    prune_heads(model, {2: [0, 1, 2, 3], 0: [1]})
    prune_heads(model, {0: [2]})
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pruned_heads"] == {"0": [1, 3], "2": [0, 1, 2, 3]}
    loaded = load_pruned(type(model), tmp_path)

    assert type(loaded) is type(model)
    assert loaded.config.pruned_heads == {0: [1, 3], 2: [0, 1, 2, 3]}
    assert not loaded.training
    assert count_parameters(loaded) == count_parameters(model)
    for inputs in (batch(), batch((4, 6, 1), seed=3)):
        assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_load_pruned_auto_class_and_shards(tmp_path):
    model = tiny_model("bert")
    prune_heads(model, {1: [0, 1, 2, 3], 2: [2]})
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()

    loaded = load_pruned(AutoModelForSequenceClassification, tmp_path)

    assert type(loaded) is BertForSequenceClassification
    assert torch.equal(logits(loaded, batch()), logits(model, batch()))

    # from_pretrained-style overrides: config attributes and dtype
    loaded32 = load_pruned(BertForSequenceClassification, tmp_path, num_labels=3, dtype=torch.float32,
                           attn_implementation="eager")
    assert loaded32.dtype == torch.float32 and loaded32.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(loaded32, batch()), logits(model, batch()).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="remote code"):
        load_pruned(BertForSequenceClassification, tmp_path, trust_remote_code=True)


def test_load_pruned_reports_missing_weights(tmp_path):
    model = tiny_model("gpt2")
    prune_heads(model, {0: [0]})
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.attn.c_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_proj\.weight"):
        load_pruned(GPT2LMHeadModel, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pruned(GPT2LMHeadModel, tmp_path / "nowhere")


def test_gpt2_generation_with_first_layer_fully_pruned():
    model = tiny_model("gpt2")
    heads = {0: [0, 1, 2, 3], 1: [2]}
    reference = zero_heads(model, heads)
    prune_heads(model, heads)
    prompt = batch((5,))["input_ids"]

    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


def test_heads_to_prune_from_mask():
    mask = torch.ones(LAYERS, HEADS)
    mask[0, 1] = mask[2, 0] = mask[2, 3] = 0
    expected = {0: [1], 2: [0, 3]}
    assert heads_to_prune_from_mask(mask) == expected
    assert heads_to_prune_from_mask(mask.numpy().astype(np.int64)) == expected

    model = tiny_model("roberta")
    reference = zero_heads(model, expected)
    prune_heads(model, mask)
    assert model.config.pruned_heads == expected
    assert_close(logits(model, batch()), logits(reference, batch()))

    with pytest.raises(ValueError, match="0 \\(prune\\) and 1"):
        heads_to_prune_from_mask(mask * 0.5)
    with pytest.raises(ValueError, match="shape"):
        heads_to_prune_from_mask(torch.ones(HEADS))


def test_unsupported_model_type():
    model = CamembertModel(CamembertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                                           num_attention_heads=HEADS, intermediate_size=48))
    with pytest.raises(ValueError, match="model type 'camembert'; supported: albert, bart, bert"):
        prune_heads(model, {0: [0]})
    with pytest.raises(ValueError, match="one Architecture entry in fastbertology/family_table.py"):
        count_parameters(model, attention_heads_only=True)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({3: [0]}, "Layer index 3 is out of range"),
        ({-1: [0]}, "Layer index -1 is out of range"),
        ({0: [4]}, r"Head indices \[4\] of layer 0 are out of range"),
        ({1: [-1]}, r"Head indices \[-1\] of layer 1 are out of range"),
        ({1: [2, 2]}, "Duplicate head indices for layer 1"),
        ({0: [1], 2: [0.5]}, "must be an integer"),
        ([0, 1], "must be a dict"),
    ],
)
def test_bad_requests_raise_and_change_nothing(request_, message):
    model = tiny_model("bert")
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        prune_heads(model, request_)
    assert getattr(model.config, "pruned_heads", None) in (None, {})
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])

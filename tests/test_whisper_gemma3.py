"""What Whisper and Gemma 3 add beyond the per-family tests of tests/test_families.py: the sequence-to-sequence
language-modelling loss on ``input_features`` batches, example counts of audio batches, Gemma 3's final logit
soft-capping in the language-modelling task, its bidirectional variant, and the refusals (attention soft-capping,
the multimodal ``gemma3``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers as tf
from families import FAMILIES, HEADS, inputs, labels, oracle_head_mask, text_mask

import fastbertology
from fastbertology import architectures, distributed
from fastbertology.importance import examples_in
from fastbertology.pruning import prune_heads
from fastbertology.tasks import ClassificationTask, LanguageModelingTask

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [9, 5, 7]


def _mask(rows, *, seed=5):
    mask = torch.rand(rows, HEADS, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    mask[0, 1] = 0.0
    return mask


def test_whisper_language_modelling_is_the_seq2seq_loss():
    """LanguageModelingTask on a speech-recognition batch (``input_features`` and padded decoder text) computes
    transformers' sequence-to-sequence loss (``labels``: the decoder text's next tokens), and its head-mask gradient
    is the oracle's."""
    spec = FAMILIES["whisper"]
    model = spec.model()
    batch = inputs(spec, LENGTHS)
    mask = _mask(6)
    oracle_mask = mask.clone().requires_grad_(True)
    with oracle_head_mask(spec, model, oracle_mask):
        expected = model(**batch, labels=labels(spec, batch), use_cache=False).loss
    expected.backward()
    ours_mask = mask.clone().requires_grad_(True)
    task = LanguageModelingTask()
    with fastbertology.patch(model, backend="torch"):
        result = task.evaluate(model, batch, head_mask=ours_mask)
        result.loss.backward()
    torch.testing.assert_close(result.loss, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours_mask.grad, oracle_mask.grad, atol=1e-9, rtol=1e-9)
    assert result.token_mask.sum(-1).tolist() == [length - 1 for length in LENGTHS]  # the start token: no target
    assert examples_in(task, batch) == task.batch_size(batch) == 3


def test_audio_batches_count_their_examples():
    """``input_features [B, n_mels, frames]`` count B examples for the tasks, the analyses and the data fingerprint
    of distributed runs (images' ``pixel_values`` too); a batch without any known input names the fix."""
    audio = inputs(FAMILIES["whisper-audio"], [1, 1, 1, 1]) | {"labels": torch.zeros(4, dtype=torch.long)}
    image = inputs(FAMILIES["vit"], [1, 1])
    task = ClassificationTask()
    assert task.batch_size(audio) == examples_in(task, audio) == 4
    assert distributed.data_fingerprint([audio, image])["examples"] == 6
    assert task.replicate(audio, 2)["input_features"].shape == (8, 4, 16)
    with pytest.raises(ValueError, match="none of input_ids, pixel_values, input_features.*batch_size"):
        task.batch_size({"labels": torch.zeros(2)})


def test_gemma3_final_logit_softcapping_reaches_the_language_modelling_loss():
    """A Gemma 3 that soft-caps its logits (``final_logit_softcapping``) is not a plain vocabulary projection of the
    base model: the language-modelling task's loss equals the model's own."""
    torch.manual_seed(0)
    spec = FAMILIES["gemma3"]
    model = spec.model()
    model.config.final_logit_softcapping = 0.5
    batch = inputs(spec, LENGTHS)
    mask = _mask(3)
    with torch.no_grad(), oracle_head_mask(spec, model, mask):
        logits = model(**batch, use_cache=False).logits  # [B, N, V], soft-capped (transformers' loss: float32)
    targets = labels(spec, batch)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        ours = LanguageModelingTask().evaluate(model, batch, head_mask=mask).loss
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_bidirectional_gemma3_equals_the_oracle():
    """``use_bidirectional_attention``: global layers see every key, sliding layers ``|i - j| < sliding_window``
    (the kernels' window without causality); padded and padding-free alike."""
    torch.manual_seed(0)
    model = tf.Gemma3TextModel(tf.Gemma3TextConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, max_position_embeddings=64, query_pre_attn_scalar=8, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True,
        pad_token_id=1)).double().eval()
    spec = replace(FAMILIES["gemma3"], kind="text-encoder", outputs=lambda m: [layer.self_attn.o_proj
                                                                               for layer in m.layers])
    batch = inputs(spec, LENGTHS)
    real = text_mask(batch).bool()
    mask = _mask(2)
    with torch.no_grad(), oracle_head_mask(spec, model, mask):
        expected = model(**batch, use_cache=False).last_hidden_state[real]
    for padding_free in (False, True):
        with fastbertology.patch(model, backend="torch", padding_free=padding_free), torch.no_grad():
            ours = model(**batch, head_mask=mask, use_cache=False).last_hidden_state[real]
        torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_gemma3_attention_softcapping_and_the_multimodal_gemma3_are_refused_by_name(tmp_path):
    from fastbertology.loading import ModelLoadingError, check_model_dir

    model = FAMILIES["gemma3"].model()
    model.config.attn_logit_softcapping = 50.0
    for call in (fastbertology.patch, lambda m: prune_heads(m, {0: [0]})):
        with pytest.raises(ValueError, match="Gemma 3 model: its config sets attn_logit_softcapping=50.0"):
            call(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadingError, match="attention logit soft-capping"):
        check_model_dir(str(tmp_path))
    with pytest.raises(ValueError, match="model type 'gemma3'.*bidirectional attention among the tokens of each image"
                                         r".*gemma3_text"):
        architectures.architecture("gemma3")

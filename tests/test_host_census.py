"""The host census (fastbertology/bench/census.py): its counting on hand-made code with known counts, and the
budget of one importance batch on the GPU code path (issue 18), which fails when a change adds host work.

The budgets are today's counts on a small BERT (3 layers, 4 heads, hidden 64; batch 4, seq 16 with padding);
tighten them as the host work shrinks. ISSUE_TARGETS (per layer of a 12-layer BERT) are met and tested.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from fastbertology.bench.census import Census, _is_triton_kernel, kernel_modules, tally
from fastbertology.bench.census_step import census_importance, host_time
from fastbertology.bench.workloads import TINY_BERT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import host_census  # noqa: E402 - benchmarks/host_census.py

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda")

# Issue 18's targets, per layer of a BERT importance batch on the GPU path (patch region: attention, statistics,
# head mask): GPU launches in all (4 of them the attention kernels), aten ops; syncs per analysis step.
ISSUE_TARGETS = {"launches": 6, "ops": 15, "syncs_per_step": 0}
# The lean path's counts (3-layer BERT, batch 4, seq 16), measured 2026-12-03; before it (commit 8259a0e) they were
# 67.5 ops, 31.5 allocations, 29.5 launches per layer, 220 / 97 / 92 per batch and 7 syncs per step. Layers 1+: mean
# inside a layer (layer 0 has no dK/dV launch; the last layer holds the unpacking of the padding-free stream, which
# a 3-layer model spreads over 2 layers). No sync is left in a step: the metrics accumulate on the device.
# Then (same day) the statistics reduced once per model call instead of once per layer, the head mask read without
# a detach and the mask-gradient partials made in their final shape: 20 / 12 / 7 per layer, 64 / 34 / 22 per batch.
# Then the output written as [B, N, H, D] by the kernel (no transpose, none in the backward), Delta and lse * log2(e)
# in one buffer, the dQ kernel's mask-gradient slots found by an offset (no slice): 16 / 11 / 7, 53 / 32 / 22.
BUDGET_LAYER = {"ops": 16, "allocs": 11, "launches": 7, "triton": 4}
BUDGET_LAYER_0_TRITON = 3
BUDGET_BATCH_PATCH = {"ops": 53, "allocs": 32, "launches": 22}  # per batch: per-call work (mask rows...) too
BUDGET_SYNCS_PER_STEP = 0


def counted(function, *device_tensors):
    """Events of ``function()`` under the census, with ``device_tensors`` on the pretend device."""
    with Census() as census:
        census.track(device_tensors)
        with census.phase("test"):
            result = function()
    return census.events, result


def test_item_of_a_device_tensor_is_one_sync_and_one_launch():
    x = torch.ones(3)
    events, value = counted(lambda: x.sum().item(), x)
    counts = tally(events)
    assert value == 3.0
    assert (counts.syncs, counts.launches, counts.allocs) == (1, 1, 1)
    assert [e.name for e in events if e.sync] == ["aten::_local_scalar_dense"]
    line = test_item_of_a_device_tensor_is_one_sync_and_one_launch.__code__.co_firstlineno + 2
    assert events[-1].location.endswith(f"test_host_census.py:{line}")  # the sync's source line


def test_device_factory_is_one_launch_and_one_allocation_and_reads_as_cuda():
    def make():
        tensor = torch.zeros(3, device=CUDA)
        return tensor, tensor.device, torch.zeros(2).device

    events, (tensor, device, host_device) = counted(make)
    counts = tally(events)
    assert (counts.launches, counts.allocs, counts.syncs) == (1, 1, 0)
    assert (counts.host_ops, counts.host_allocs) == (1, 1)  # torch.zeros(2): a host tensor
    assert device == torch.device("cuda", 0) and host_device.type == "cpu"
    assert tensor.device.type == "cpu"  # outside the census: the real CPU tensor


def test_views_and_empty_launch_nothing():
    x = torch.ones(4)
    events, _ = counted(lambda: (x.view(2, 2), x[1:], x.detach(), torch.empty(5, device=CUDA)), x)
    counts = tally(events)
    assert counts.ops == 4 and counts.launches == 0 and counts.allocs == 1  # empty allocates, launches nothing


def test_transfers_and_host_reads_are_syncs_where_they_block():
    x = torch.arange(4)
    cases = {
        "cpu": (lambda: x.cpu(), 1),
        "to host with a dtype": (lambda: x.to("cpu", torch.bool), 1),
        "tolist": (lambda: x.tolist(), 1),
        "bool": (lambda: bool(x.sum() > 0), 1),
        "nonzero": (lambda: x.nonzero(), 1),
        "blocking upload": (lambda: torch.arange(3).to(x.device), 1),
        "torch.tensor on the device": (lambda: torch.tensor([1, 2], device=x.device), 1),
        "new_tensor of a device tensor": (lambda: x.new_tensor([1, 2]), 1),
        "torch.equal": (lambda: torch.equal(x, x), 1),
        "boolean-mask indexing": (lambda: x[x > 1], 1),
        "integer indexing": (lambda: x[x.argsort()], 0),
        "non-blocking upload": (lambda: torch.arange(3).to(x.device, non_blocking=True), 0),
        "host only": (lambda: torch.arange(3).sum().item(), 0),
        "device only": (lambda: (x * 2).sum(), 0),
    }
    for name, (function, syncs) in cases.items():
        events, _ = counted(function, x)
        assert tally(events).syncs == syncs, name


def test_a_python_scalar_in_where_is_a_host_tensor():
    x = torch.randn(5)
    events, _ = counted(lambda: torch.where(x > 0, x, 0.0), x)
    assert [(e.name, e.launch) for e in events] == [("aten::gt", True), ("aten::scalar_tensor", False),
                                                    ("aten::where", True)]



def test_host_data_in_a_freed_device_tensors_place_is_a_host_tensor():
    """``torch.tensor(data)`` makes a host tensor even where its storage takes the place of a freed device tensor's
    (the census keys storages by address): the step census once counted syncs from such host tensors at random."""
    with Census() as census, census.phase("test"):
        misread = 0
        for _ in range(200):
            census.track([torch.ones(3)])  # a device tensor, freed at once
            misread += census.is_device(torch.tensor([1, 2, 3]))
    assert misread == 0

def test_backward_ops_are_counted_on_the_device_and_attributed():
    x = torch.ones(3, requires_grad=True)

    def step():
        (grad,) = torch.autograd.grad((x[0] * 2 + x[1]).sum(), x)
        return grad

    events, grad = counted(step, x)
    assert grad.tolist() == [2.0, 1.0, 0.0]
    names = [e.name for e in events]
    assert names.count("aten::select_backward") == 2  # one zeros + copy per select, on the device
    assert all(e.launch for e in events if e.name == "aten::select_backward")


def test_triton_kernels_are_restored_after_the_census():
    def kernels():
        return {(module.__name__, name): value for module in kernel_modules() for name, value in vars(module).items()
                if _is_triton_kernel(value)}

    before = kernels()
    assert before, "no Triton kernel found in fastbertology.kernels: the census would record no launch"
    modules = {module.__name__: module for module in kernel_modules()}
    with Census():
        during = {type(vars(modules[module])[name]).__name__ for module, name in before}
    assert during == {"_LaunchRecorder"}
    assert kernels() == before


@pytest.fixture(scope="module")
def small_bert_census():
    return census_importance(dataclasses.replace(TINY_BERT, layers=3), 4, 16)


def test_census_counts_something_in_every_region(small_bert_census):
    batch = small_bert_census["per_batch"]
    for region in ("patch", "model", "analysis"):
        assert batch[region]["ops"] > 0 and batch[region]["launches"] > 0, region
    assert small_bert_census["layer_0"]["patch"]["triton"] >= 1
    assert small_bert_census["layer_1_on"]["patch"]["triton"] >= 1


def test_attention_path_stays_within_its_budget_per_layer(small_bert_census):
    layer = small_bert_census["layer_1_on"]["patch"]
    over = {key: (layer[key], budget) for key, budget in BUDGET_LAYER.items() if layer[key] > budget}
    assert not over, f"host work per layer above budget (count, budget): {over}"
    assert small_bert_census["layer_0"]["patch"]["triton"] <= BUDGET_LAYER_0_TRITON
    batch = small_bert_census["per_batch"]["patch"]
    over = {key: (batch[key], budget) for key, budget in BUDGET_BATCH_PATCH.items() if batch[key] > budget}
    assert not over, f"host work per batch above budget (count, budget): {over}"


def test_issue_targets_per_layer_of_a_12_layer_bert():
    """Issue 18's targets, per layer of a 12-layer BERT (the counts do not depend on the widths: BERT-base's are
    the same, ``python benchmarks/host_census.py``): the batch's patch work divided by the layers."""
    per_layer = census_importance(dataclasses.replace(TINY_BERT, layers=12), 8, 32)["per_layer"]["patch"]
    assert per_layer["launches"] <= ISSUE_TARGETS["launches"], per_layer
    assert per_layer["ops"] <= ISSUE_TARGETS["ops"], per_layer
    assert per_layer["syncs"] == ISSUE_TARGETS["syncs_per_step"], per_layer


def test_syncs_per_step_stay_within_budget(small_bert_census):
    syncs = [s for s in small_bert_census["syncs"] if s["phase"] == "step"]
    assert len(syncs) <= BUDGET_SYNCS_PER_STEP, syncs
    assert all(s["where"] and s["where"] != "?" for s in syncs)
    assert all(s["layer"] is None for s in syncs), "a sync inside a layer: once per layer is the costliest kind"


def test_cuda_runtime_queries_are_answered_and_restored():
    saved = torch.cuda.get_device_capability, torch.cuda.synchronize
    with Census() as census, census.phase("test"):
        assert torch.cuda.get_device_capability(CUDA) == (9, 0)
        torch.cuda.synchronize()
        torch.cuda.current_stream().synchronize()
    assert [e.name for e in census.events if e.sync] == ["torch.cuda.synchronize", "Stream.synchronize"]
    assert (torch.cuda.get_device_capability, torch.cuda.synchronize) == saved


def test_report_of_the_script(small_bert_census, capsys):
    report = host_census.format_report(small_bert_census)
    assert "layers 1+ (inside, mean)" in report and "fastbertology/importance.py" in report
    assert f"syncs per batch: {len([s for s in small_bert_census['syncs'] if s['phase'] == 'step'])}" in report
    with pytest.raises(SystemExit):
        host_census.main(["--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err


def test_host_time_runs_the_patched_and_the_stock_step():
    timing = host_time(dataclasses.replace(TINY_BERT, layers=1), 2, 8, repeats=1)
    assert timing["patched_us"] > 0 and timing["stock_noop_us"] > 0
    json.dumps(timing)


def test_language_model_step_reads_nothing_back():
    """GPT-2's importance step (language modelling): the predicting positions are selected by an index made on the
    host, so the step has no sync (it had 5: the boolean selection's count, forward and backward)."""
    from fastbertology.bench.workloads import TINY_GPT2

    census = census_importance(dataclasses.replace(TINY_GPT2, layers=2), 4, 16)
    assert [s for s in census["syncs"] if s["phase"] == "step"] == []

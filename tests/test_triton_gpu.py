"""Triton attention kernels on the GPU: bf16/fp16/fp32, head dims up to 128, N up to 4096, grouped-query attention
and sliding windows, and peak memory.

Skipped without CUDA. Same pass rule as tests/test_triton_kernels.py (whose helpers are reused): kernel error
against the float64 reference <= 2x (outputs, statistics) / 3x (gradients) the same-dtype PyTorch error, plus a
floor of a few units in the last place. Timings live in benchmarks/bench_attention.py, not here.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from test_packed_attention import Case as PackedCase  # noqa: E402
from test_packed_attention import _check as _check_packed  # noqa: E402
from test_triton_kernels import Case, _check_against_reference, _inputs  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

GPU_CASES = [
    Case(BF16, 2, 3, 1, 64, mask="BH"),
    Case(BF16, 3, 2, 97, 32, causal=True, padding="general", mask="H", grads="mask"),
    Case(BF16, 2, 4, 257, 128, padding="general", mask="BH", strided=True),
    Case(BF16, 2, 2, 513, 64, padding="prefix", mask="H", grads="none"),
    Case(BF16, 1, 2, 4096, 128, causal=True, padding="prefix", mask="BH", strided=True, probs=False),
    Case(F16, 2, 4, 1025, 64, causal=True, padding="prefix_empty", mask="H", strided=True),
    Case(F16, 2, 3, 200, 128, padding="general", mask="BH", grads="qkv"),
    Case(F16, 1, 2, 4096, 64, causal=True, probs=False),
    Case(F32, 2, 2, 200, 32, padding="prefix", mask="BH"),
    Case(F32, 1, 2, 1025, 128, causal=True, padding="general", mask="H", strided=True),
    Case(F32, 1, 1, 4096, 64, causal=True, mask="H", probs=False),
    # grouped-query attention and sliding windows (Llama, Mistral, Gemma2, ModernBERT-like), long sequences
    Case(BF16, 2, 8, 2048, 128, causal=True, padding="prefix", mask="BH", kv_heads=2, strided=True, probs=False,
         tiny=True),
    Case(BF16, 1, 8, 4096, 64, causal=True, mask="H", kv_heads=1, window=1024, strided=True, probs=False),
    Case(BF16, 2, 4, 1025, 128, causal=True, padding="general", mask="BH", kv_heads=2, window=100, strided=True),
    Case(BF16, 2, 6, 1500, 64, padding="prefix", mask="BH", window=129, strided=True, tiny=True),
    Case(F16, 2, 6, 777, 32, causal=True, mask="H", kv_heads=3, window=64, grads="mask"),
    Case(F32, 1, 4, 1025, 128, causal=True, padding="general", mask="BH", kv_heads=1, window=300, strided=True),
]


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda")


@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_against_reference_gpu(case, device):
    from fastbertology.kernels.triton_attention import attention_triton

    _check_against_reference(case, *_inputs(case, device=device), attention_triton)


# Packed sequences (what patched models run on padded batches): odd and long lengths, an empty and a 1-token one
PACKED_GPU_CASES = [
    PackedCase(BF16, (128, 97, 1, 0, 513, 64), heads=12, head_dim=64, mask="SH"),
    PackedCase(BF16, (1025, 3, 257, 2048), heads=4, head_dim=64, causal=True, mask="SH"),
    PackedCase(F16, (200, 31, 4096), heads=2, head_dim=128, causal=True, mask="H", grads="qkv"),
    PackedCase(BF16, (60, 64, 33, 17) * 8, heads=12, head_dim=32, mask="SH", grads="mask"),  # short: 64-row blocks
    PackedCase(F32, (300, 77), heads=3, head_dim=64, causal=True, mask="SH"),
    PackedCase(BF16, (1025, 3, 257, 2048), heads=8, kv_heads=2, head_dim=128, causal=True, mask="SH", window=512),
    PackedCase(BF16, (128, 97, 1, 0, 513, 64) * 4, heads=12, kv_heads=1, head_dim=64, mask="SH", window=65),
]


@pytest.mark.parametrize("case", PACKED_GPU_CASES, ids=str)
def test_packed_against_reference_gpu(case, device):
    _check_packed("triton", case, device=device)


def test_fp32_ieee_dots(device, monkeypatch):
    """The exact float32 fallback (FP32_DOT_PRECISION="ieee") compiles and passes too."""
    from fastbertology.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "FP32_DOT_PRECISION", "ieee")
    case = Case(F32, 2, 2, 300, 64, causal=True, padding="general", mask="BH", strided=True)
    _check_against_reference(case, *_inputs(case, device=device), triton_attention.attention_triton)


def test_peak_memory_far_below_n_squared(device):
    """B4 H12 N4096 causal bf16, forward + backward with head-mask gradient: no N x N tensor is allocated."""
    from fastbertology.kernels.triton_attention import attention_triton

    batch, heads, seq, head_dim = 4, 12, 4096, 64
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, seq, heads, head_dim, generator=gen, device=device, dtype=BF16)
                         .transpose(1, 2) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    head_mask = torch.rand(batch, heads, generator=gen, device=device).requires_grad_(True)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen, device=device)
    key_padding_mask = torch.arange(seq, device=device)[None, :] < lengths[:, None]
    attention_triton(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=True)[0].backward(
        grad_out)  # compile outside the measurement
    for t in (q, k, v, head_mask):
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    out, stats = attention_triton(q, k, v, head_mask=head_mask, key_padding_mask=key_padding_mask, causal=True)
    out.backward(grad_out)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - baseline
    n_by_n = batch * heads * seq * seq * 2  # one bf16 [B, H, N, N] tensor: 1.5 GiB
    assert extra < n_by_n / 8, f"peak extra memory {extra / 2**20:.0f} MiB vs one N x N tensor {n_by_n / 2**20:.0f} MiB"
    assert torch.isfinite(head_mask.grad).all() and torch.isfinite(q.grad.float()).all()
    assert stats.probs is None


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode", ["per_batch", "per_example"])
def test_cuda_graph_replay_equals_eager(device, dtype, mode):
    """Importance, statistics and metric of a pass whose steps replay CUDA graphs equal the eager pass (the
    real capture of tests/test_step_graphs.py's emulated one); a second pass replays every step."""
    from transformers import BertConfig, BertForSequenceClassification

    import fastbertology
    from fastbertology.batching import move_batch
    from fastbertology.importance import analyze_heads, evaluate_metric
    from fastbertology.tasks import ClassificationTask

    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, num_labels=3)
    model = BertForSequenceClassification(config).eval().to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ((30, 7, 19, 64, 3, 40, 12, 25), (31, 8, 20, 60, 5, 41, 11, 22), (90, 1, 2, 3, 4, 5, 6, 7)):
        seq = max(lengths)
        ids = torch.randint(2, 500, (len(lengths), seq), generator=generator)
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append(move_batch({"input_ids": ids, "attention_mask": mask,
                                   "labels": torch.arange(len(lengths)) % 3}, device))
    task = ClassificationTask(num_labels=3)
    with fastbertology.patch(model, backend="triton"):
        eager = analyze_heads(model, batches, task, importance=mode, cuda_graphs="off")
        graphs = analyze_heads(model, batches, task, importance=mode)
        again = analyze_heads(model, batches, task, importance=mode)
        keep = (eager.importance > 0.5).to(device=device, dtype=torch.float32)
        report = {}
        eager_metric = evaluate_metric(model, batches, task, head_mask=keep, cuda_graphs="off")
        graph_metric = evaluate_metric(model, batches, task, head_mask=keep, graph_report=report)
    assert graphs.cuda_graphs["reason"] is None, graphs.cuda_graphs
    assert graphs.cuda_graphs["replays"] == 1 and again.cuda_graphs["replays"] == 3
    tolerance = dict(rtol=1e-5, atol=1e-9) if dtype == F32 else dict(rtol=2e-2, atol=1e-6)
    for result in (graphs, again):
        torch.testing.assert_close(result.raw_importance, eager.raw_importance, **tolerance)
        torch.testing.assert_close(result.entropy, eager.entropy, **tolerance)
        torch.testing.assert_close(result.max_prob, eager.max_prob, **tolerance)
        assert result.tokens == eager.tokens and result.metric == pytest.approx(eager.metric)
    assert report["replays"] == 1 and graph_metric == pytest.approx(eager_metric)


@pytest.mark.parametrize("chunk", [None, 64], ids=["logits", "chunked-loss"])
def test_cuda_graph_replay_of_language_modelling_equals_eager(device, chunk):
    """GPT-2 language-modelling importance replayed as CUDA graphs (the projected rows are the bucket's packed
    tokens) equals the eager pass; the CPU version with an emulated graph is tests/test_step_graphs.py's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import fastbertology
    from fastbertology.batching import move_batch
    from fastbertology.importance import analyze_heads
    from fastbertology.tasks import LanguageModelingTask

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=500, n_embd=128, n_layer=2, n_head=4, n_positions=128)
    model = GPT2LMHeadModel(config).eval().to(device)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ((30, 7, 19, 64), (31, 8, 20, 60), (90, 1, 2, 3)):
        seq = max(lengths)
        ids = torch.randint(2, 500, (len(lengths), seq), generator=generator)
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append(move_batch({"input_ids": ids, "attention_mask": mask}, device))
    task = LanguageModelingTask(loss_chunk_tokens=chunk)
    with fastbertology.patch(model, backend="triton"):
        eager = analyze_heads(model, batches, task, cuda_graphs="off")
        graphs = analyze_heads(model, batches, task)
    assert graphs.cuda_graphs["reason"] is None and graphs.cuda_graphs["replays"] == 1, graphs.cuda_graphs
    torch.testing.assert_close(graphs.raw_importance, eager.raw_importance, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(graphs.entropy, eager.entropy, rtol=1e-5, atol=1e-7)
    assert graphs.metric == pytest.approx(eager.metric, rel=1e-5)

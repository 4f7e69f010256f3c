"""Memory that fits the model: per-layer activation checkpointing, the chunked language-model loss, the CPU
backend's query blocks for long sequences, and the memory plan's formula and choices (fastbertology.memory_plan)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from fastbertology.kernels import Packing
from fastbertology.kernels import torch_attention as torch_backend

import fastbertology
from fastbertology import kernels
from fastbertology.architectures import stack_layers
from fastbertology.importance import analyze_heads
from fastbertology.memory_plan import (
    OUTPUT_ALLOWANCE,
    MemoryPlanError,
    activation_bytes_per_token,
    current_memory,
    layer_shape,
    parse_memory_size,
    plan_memory,
)
from fastbertology.tasks import LanguageModelingTask

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def _llama(dtype=torch.float32, **extra):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=176, max_position_embeddings=512, **extra)
    return tf.LlamaForCausalLM(config).to(dtype).eval()


def _gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512, bos_token_id=0,
                           eos_token_id=0)
    return tf.GPT2LMHeadModel(config).to(dtype).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _batches(lengths=((37, 20, 29), (41, 12)), seed=1):
    """Right-padded LM batches (padding-free execution packs them)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for sizes in lengths:
        seq = max(sizes)
        mask = (torch.arange(seq)[None] < torch.tensor(sizes)[:, None]).long()
        ids = torch.randint(3, VOCAB, (len(sizes), seq), generator=generator).masked_fill(mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# --------------------------------------------------------------------------------------------------------------
# Per-layer activation checkpointing
# --------------------------------------------------------------------------------------------------------------
def _attention_calls(model) -> list[int]:
    """A counter of attention-module forwards (it sees recomputations too)."""
    calls = [0]
    for layer in stack_layers(model)[0]:
        module = getattr(layer, "self_attn", None) or layer.attn
        module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("importance", ["per_batch", "per_example"])
def test_checkpointing_gives_the_same_importance_and_statistics(name, importance):
    model = MODELS[name]()
    calls = _attention_calls(model)
    fastbertology.patch(model, backend="torch")
    task, batches = LanguageModelingTask(), _batches()
    plain = analyze_heads(model, batches, task, importance=importance)
    plain_calls, calls[0] = calls[0], 0
    mask = torch.ones(3, 4)
    mask[1, 2] = 0.0  # a head mask is restored in the recomputation too
    checkpointed = analyze_heads(model, batches, task, importance=importance, checkpoint_layers=True)
    assert calls[0] == 2 * plain_calls  # every layer's forward ran again in the backward
    for field in ("raw_importance", "entropy", "max_prob"):
        torch.testing.assert_close(getattr(checkpointed, field), getattr(plain, field), rtol=1e-6, atol=0)
    assert (checkpointed.tokens, checkpointed.loss, checkpointed.metric) == (plain.tokens, plain.loss, plain.metric)
    masked = [analyze_heads(model, batches, task, head_mask=mask, checkpoint_layers=flag) for flag in (False, True)]
    torch.testing.assert_close(masked[1].raw_importance, masked[0].raw_importance, rtol=1e-6, atol=0)
    assert masked[1].raw_importance[1, 2] != plain.raw_importance[1, 2]  # the mask mattered


def test_checkpointing_keeps_only_layer_inputs():
    """What the backward keeps, measured with saved-tensor hooks: much less with checkpointing."""
    model = _llama()
    fastbertology.patch(model, backend="torch")
    batch = _batches(((200, 200),))[0]
    kept = {}
    for flag in (False, True):
        sizes = {}

        def pack(t, sizes=sizes):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            analyze_heads(model, [batch], LanguageModelingTask(), checkpoint_layers=flag)
        kept[flag] = sum(size for pointer, size in sizes.items() if pointer not in parameters)
    assert kept[True] < 0.5 * kept[False]


# --------------------------------------------------------------------------------------------------------------
# Chunked language-model loss
# --------------------------------------------------------------------------------------------------------------
def test_chunked_loss_equals_the_whole_loss():
    model = _llama()
    fastbertology.patch(model, backend="torch")
    batches = _batches()
    whole = analyze_heads(model, batches, LanguageModelingTask(), importance="per_example")
    chunked_task = LanguageModelingTask(loss_chunk_tokens=7)
    result = chunked_task.evaluate(model, batches[0])
    assert result.logits is None  # no [tokens, vocabulary] tensor was kept
    chunked = analyze_heads(model, batches, chunked_task, importance="per_example")
    torch.testing.assert_close(chunked.raw_importance, whole.raw_importance, rtol=1e-6, atol=0)
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-7) and chunked.metric == pytest.approx(whole.metric,
                                                                                                   rel=1e-7)


def test_chunked_loss_never_makes_the_whole_logits(monkeypatch):
    """Every vocabulary projection sees at most the chunk's tokens, in the forward and in the recomputation."""
    model = _llama()
    fastbertology.patch(model, backend="torch")
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(output.shape[0]))
    analyze_heads(model, _batches(), LanguageModelingTask(loss_chunk_tokens=16))
    assert rows and max(rows) <= 16 and len(rows) > 2 * 8  # forward and backward: several chunks per batch


# --------------------------------------------------------------------------------------------------------------
# Query blocks of the CPU backend
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_packed_query_blocks_equal_whole_sequences(monkeypatch, causal):
    generator = torch.Generator().manual_seed(0)
    lengths = [61, 3, 40]
    q = torch.randn(1, 4, sum(lengths), 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, sum(lengths), 8, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    mask = torch.rand(len(lengths), 4, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 4, sum(lengths), 8, generator=generator, dtype=torch.float64)

    def run():
        packing = Packing.from_lengths(lengths, q.device)
        out, stats = kernels.attention(q, k, v, head_mask=mask, causal=causal, packing=packing, backend="torch")
        grads = torch.autograd.grad(out, (q, k, v, mask), grad)
        return out, stats.lse, stats.entropy, stats.max_prob, *grads

    whole = run()
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 4 * 10 * 61)  # blocks of ~10 query rows
    monkeypatch.setattr(torch_backend, "KEEP_PROBS_ELEMENTS", 0)  # and recompute them in the backward
    pieces = torch_backend.PackedPieces(q, causal, Packing.from_lengths(lengths, q.device))
    assert len(pieces.pieces) > len(lengths)
    assert max(4 * (q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in pieces.pieces) <= 4 * 10 * 61
    for expected, got in zip(whole, run()):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_long_sequence_scores_stay_bounded():
    """A 32k-token sequence: no piece's scores exceed CHUNK_ELEMENTS (no [H, N, N]); the pieces tile the queries."""
    n, heads = 32768, 32
    q = torch.empty(1, heads, n, 2, device="meta")
    pieces = torch_backend.PackedPieces(q, True, Packing.from_lengths([n], "cpu"))
    assert max(heads * (q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in pieces.pieces) <= torch_backend.CHUNK_ELEMENTS
    assert [p[0] for p in pieces.pieces[1:]] == [p[1] for p in pieces.pieces[:-1]] and pieces.pieces[-1][1] == n


def test_attention_memory_grows_linearly_with_length():
    """Peak memory (growth of the resident set, fastbertology.bench.memory) of the CPU backend's forward and
    backward at 2048 and 4096 tokens: doubling the length at most doubles it (plus a constant block), where
    [H, N, N] would quadruple it (2 GiB of float32 scores alone at 4096 tokens and 32 heads). Resident-set growth
    is noisy: with glibc's default mmap threshold the freed heap's holes stay resident (the commands fix the
    threshold, return_freed_memory, and so does this test), and late in the whole suite the same call measured up
    to ~300 MiB more than alone; 32 heads keep the [H, N, N] bound far above that noise."""
    from fastbertology.bench.memory import PeakMemory
    from fastbertology.memory_plan import return_freed_memory

    return_freed_memory()
    HEADS = 32  # noqa: N806 - an [H, N, N] tensor (2 GiB at 4096 tokens) far above the linear peak (~0.3 GiB)

    def peak(n):
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(1, HEADS, n, 16, generator=generator, requires_grad=True)
        k, v = (torch.randn(1, HEADS // 4, n, 16, generator=generator, requires_grad=True) for _ in range(2))
        packing = Packing.from_lengths([n], "cpu")
        with PeakMemory(torch.device("cpu")) as measured:
            out, _ = kernels.attention(q, k, v, causal=True, packing=packing, backend="torch")
            out.sum().backward()
        return measured.mib * 2**20

    small, large = peak(2048), peak(4096)
    block = 3 * 4 * torch_backend.CHUNK_ELEMENTS
    assert small > 8 * 2048 * 16 * 4  # at least the queries: the measurement sees the allocations
    assert large <= 2 * small + block, (small, large)
    assert large < HEADS * 4096 * 4096 * 4, (small, large)  # an [H, N, N] float32 tensor alone


# --------------------------------------------------------------------------------------------------------------
# The memory plan
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("3000MiB", 3000 * 2**20), ("1.5GB", 1.5e9),
                                            (" 512 kib ", 512 * 1024), ("100B", 100)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["24", "GiB", "24 GiBs", "-1GiB", "0MiB", "1e9B", "24GiB of RAM", ""])
def test_parse_memory_size_refuses_with_the_fix(text):
    with pytest.raises(ValueError, match=r"--max-memory: .*(e\.g\. 24GiB|positive)"):
        parse_memory_size(text)


def _saved_bytes_per_token(model, n=256) -> float:
    """Measured: bytes of the tensors a middle layer saves for the backward (parameters excluded), per token."""
    fastbertology.patch(model, backend="torch")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    layer = stack_layers(model)[0][1]
    saved = {}

    def pack(t):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in parameters:
            saved[pointer] = t.untyped_storage().nbytes()
        return t

    forward = layer.forward

    def measured(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(*args, **kwargs)

    layer.forward = measured
    head_mask = torch.ones(3, 4, requires_grad=True)
    model(input_ids=torch.randint(3, VOCAB, (1, n)), head_mask=head_mask, use_cache=False)
    return sum(saved.values()) / n


@pytest.mark.parametrize("name, dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                         ("gpt2", torch.float32), ("gpt2", torch.bfloat16)])
def test_activation_formula_matches_a_measurement(name, dtype):
    model = MODELS[name](dtype)
    estimate = activation_bytes_per_token(layer_shape(model))
    measured = _saved_bytes_per_token(model)
    assert abs(estimate - measured) <= 0.02 * measured, (estimate, measured)


def _plan(model, budget, batches=None, in_use=100 << 20):
    return plan_memory(model, batches or _batches(((256, 256),)), vocabulary=VOCAB, device=torch.device("cpu"),
                       budget=budget, budget_source="--max-memory", in_use=in_use)


def test_plan_chooses_checkpointing_only_when_needed():
    model = _llama()
    roomy = _plan(model, 8 << 30)
    assert not roomy.checkpointing and roomy.estimated_peak <= 8 << 30
    work = roomy.estimated_peak - roomy.in_use - OUTPUT_ALLOWANCE  # the pass's own estimate
    tight_budget = roomy.in_use + OUTPUT_ALLOWANCE + int(0.8 * work)
    tight = _plan(model, tight_budget)
    assert tight.checkpointing and tight.estimated_peak <= tight_budget < tight.estimated_peak_without_checkpointing
    text = "\n".join(tight.lines())
    assert "checkpointing on" in text and "per 256-token sequence and layer" in text
    assert tight.to_json()["checkpointing"] is True


def test_plan_chunks_the_loss_for_large_vocabularies():
    model = _llama()
    batches = _batches(((256,) * 8,))
    roomy, tight = (plan_memory(model, batches, vocabulary=128256, device=torch.device("cpu"), budget=budget,
                                budget_source="test", in_use=0) for budget in (8 << 30, 2 << 30))
    assert roomy.loss_chunk_tokens is None  # 2048 x 128256 logits fit in 8 GiB: no recomputation
    assert not tight.checkpointing and tight.loss_chunk_tokens * 128256 * 4 <= 256 << 20


def test_plan_refuses_with_numbers_and_a_fix():
    with pytest.raises(MemoryPlanError, match=r"does not fit in 101 MiB .*estimated peak .*--batch-size.*"
                                              r"--max-memory \(at least"):
        _plan(_llama(), 101 << 20)


def test_peak_memory_of_a_process_started_by_a_large_one_is_its_own():
    """Linux carries ru_maxrss over vfork + exec: a CLI run started by a large process (a test runner, a notebook)
    took its parent's resident size as its own peak and refused --max-memory for it. VmHWM is the child's own."""
    import subprocess
    import sys

    parent = torch.ones(2**30 // 4)  # 1 GiB resident in this process when the child starts
    code = ("import torch; from fastbertology.memory_plan import peak_memory; "
            "print(peak_memory(torch.device('cpu')))")
    parent_now = current_memory(torch.device("cpu"))
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del parent
    # ru_maxrss gave at least parent_now; the child alone (torch imported) holds a few hundred MiB
    assert parent_now > 2**30 and child_peak < parent_now - 2**29, (child_peak, parent_now)


def test_plan_refuses_when_loading_already_exceeded_the_budget():
    with pytest.raises(MemoryPlanError, match=r"already reached 2\.0 GiB before the analysis .*raise --max-memory"):
        plan_memory(_llama(), _batches(), vocabulary=VOCAB, device=torch.device("cpu"), budget=1 << 30,
                    budget_source="--max-memory", in_use=100 << 20, peak_so_far=2 << 30)


# --------------------------------------------------------------------------------------------------------------
# Half-precision weights, float32 statistics
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_half_precision_head_mask_gradient_is_accumulated_in_float32(dtype, packed):
    """The CPU backend's head-mask gradient of bf16 / fp16 attention is ``sum(dO * PV)`` in float32 of the float32
    ``PV`` (neither rounded to the half type), and its statistics come in float32."""
    generator = torch.Generator().manual_seed(0)
    n, lengths = 64, [40, 24]
    shape = (1, 4, n, 16) if packed else (2, 4, n, 16)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    grad = torch.randn(shape, generator=generator).to(dtype)
    mask = torch.rand(2, 4, generator=generator, dtype=torch.float32).add_(0.5).requires_grad_(True)
    options = dict(packing=Packing.from_lengths(lengths, "cpu")) if packed else {}
    out, stats = kernels.attention(q, k, v, head_mask=mask, causal=True, backend="torch", **options)
    (got,) = torch.autograd.grad(out, mask, grad)
    plain, _ = kernels.attention(q.float(), k.float(), v.float(), causal=True, backend="torch", **options)  # P V
    product = grad.float() * plain.float()  # [B or 1, H, N, D]
    if packed:
        expected = torch.stack([part.sum((0, 2, 3)) for part in product.split(lengths, dim=2)])
    else:
        expected = product.sum((2, 3))
    assert got.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_model_statistics_and_importance_are_float64_sums():
    """A bf16 Llama: the analysis' tables are float64, close to the float32 model's (bf16 weights' precision)."""
    tables = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _llama(dtype)
        fastbertology.patch(model, backend="torch")
        tables[dtype] = analyze_heads(model, _batches(), LanguageModelingTask())
    half, full = tables[torch.bfloat16], tables[torch.float32]
    assert half.raw_importance.dtype == half.entropy.dtype == torch.float64
    torch.testing.assert_close(half.entropy, full.entropy, rtol=2e-2, atol=0)
    torch.testing.assert_close(half.raw_importance, full.raw_importance, rtol=0.1, atol=0)


def test_longest_length_search_reports_every_mode():
    """The longest-length search of the GPU case, at a tiny size on the CPU (every length survives here)."""
    from fastbertology.bench.longest import longest_rows, longest_table
    from fastbertology.bench.workloads import TINY_LLAMA

    rows = longest_rows(TINY_LLAMA, [16, 32], dtype="fp32", device="cpu")
    assert [(row["length"], row["mode"]) for row in rows] == [(n, m) for n in (16, 32)
                                                              for m in ("reference", "sdpa-forward", "fastbertology")]
    assert all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows)
    assert "Longest length survived: reference 32, sdpa-forward 32, fastbertology 32" in longest_table(rows)

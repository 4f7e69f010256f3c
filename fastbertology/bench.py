"""End-to-end benchmark: fastbertology's analyses against the run_bertology reference loop and stock SDPA.

Every case runs on a randomly initialised transformers 5 model (fixed seed) and synthetic data (fixed seed):
random token ids, key lengths uniform in ``[seq/4, seq]``, right padding. Modes, each timed as one full pass
over the data (after a warmup pass):

``reference``
    run_bertology's ``compute_heads_importance`` on transformers 5, implemented here independently of
    fastbertology's patch: an eager attention function registered with transformers' ``AttentionInterface``
    materialises the probabilities ``[B, H, N, N]``, multiplies them by the head mask and returns them;
    ``output_attentions=True``; the entropy table is computed from the returned maps; every parameter requires
    grad, so ``loss.backward()`` fills the weight gradients (accumulated over batches, never zeroed inside the
    pass, as the script does) as well as the head-mask gradient. The head mask is a fresh leaf per batch (its
    gradient is "zeroed" per batch; the script's never-zeroed cumulative gradient is a bug we do not copy).
    Importance = sum over batches of ``|dL_batch/dmask|`` / non-padding tokens; the metric is updated per batch.
``sdpa-frozen``
    the stock model with ``attn_implementation="sdpa"``, every parameter frozen, the embedding output made a
    leaf that requires grad (so a real activation backward runs); forward + task loss + backward per batch; no
    head mask, no statistics, no metric.
``fastbertology``
    :func:`fastbertology.importance.analyze_heads` (importance + entropy + max probability + metric in one
    pass) on the patched model (``backend="auto"``: Triton on CUDA, PyTorch on CPU), on the same padded batches.
``fastbertology-bucketed``
    the same on length-bucketed batches (:mod:`fastbertology.batching`: sorted by length, each batch cut at its
    longest example). Entropy, max probability, token counts and the metric are unchanged; ``per_batch``
    importance is not (batch composition changes), so only its entropy is compared with the reference.

The sweep case (single-head ablation, ``L*H`` masks) times a naive loop — one eager pass over the data per mask
with 4.x head-mask semantics, no gradients (mode ``reference``) — against
:func:`fastbertology.sweeps.ablation_sweep` (batched per-example masks, prefix reuse); passes = masks + 1
(the unmasked baseline). Without :mod:`fastbertology.sweeps` its rows say ``status="todo: ..."`` (no numbers).

Masking cases run run_bertology's ``mask_heads`` loop (reference importance, 10 % of the heads per step, stop
below 0.9 x the original metric or when no more than one step's worth of heads is left) against
:func:`fastbertology.masking.iterative_masking`; on random weights the metric means nothing, so these rows
measure cost only: the whole masking run, its number of passes, and seconds per pass.

Rows (dicts, see :func:`run_bench`) carry seconds, examples/s, peak CUDA memory (absolute
``torch.cuda.max_memory_allocated`` during the timed pass, in MiB; None on CPU), speedups computed from the
same run, and correctness columns comparing each mode with the reference loop. :func:`format_table` renders
them as markdown. ``python -m fastbertology.bench --quick`` runs tiny versions of every case on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import tasks
from .batching import bucketed_batches, padded_batches

MODES = ("reference", "sdpa-frozen", "fastbertology", "fastbertology-bucketed")
MASKING_MODES = ("reference", "fastbertology")
SWEEP_MODES = ("reference", "fastbertology")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_IMPLEMENTATION = "fastbertology_bench_reference"
MODEL_SEED, DATA_SEED = 0, 1


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    """A random-init architecture: ``kind`` is ``"bert"`` (sequence classification) or ``"gpt2"`` (LM head)."""

    kind: str
    layers: int
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    positions: int
    num_labels: int = 2


BERT_BASE = ModelSize("bert", 12, 12, 768, 3072, 30522, 512)
GPT2_SMALL = ModelSize("gpt2", 12, 12, 768, 3072, 50257, 1024)
TINY_BERT = ModelSize("bert", 2, 4, 64, 128, 512, 64)
TINY_GPT2 = ModelSize("gpt2", 2, 4, 64, 128, 512, 64)


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case. ``dtype`` is used by the SDPA and fastbertology modes, ``reference_dtype`` by the
    reference loop (they differ only where the H200 anchors did: seq 512 and GPT-2 use an fp32 reference).
    ``kind``: ``"analysis"`` (one importance + entropy pass), ``"masking"`` (iterative masking to
    ``masking_threshold``) or ``"sweep"`` (single-head ablation sweep; needs ``fastbertology.sweeps``)."""

    name: str
    model: ModelSize
    examples: int
    seq: int
    batch: int
    dtype: str = "fp32"
    reference_dtype: str | None = None
    kind: str = "analysis"
    modes: tuple[str, ...] = MODES
    masking_threshold: float = 0.9
    masking_amount: float = 0.1

    @property
    def ref_dtype(self) -> str:
        return self.reference_dtype or self.dtype

    def mode_dtype(self, mode: str) -> str:
        return self.ref_dtype if mode == "reference" else self.dtype


FULL_CASES = [  # the batch-1 case (slowest by far) last, so that a time budget cuts it first
    BenchCase("bert-408x128-b32-fp32", BERT_BASE, 408, 128, 32, "fp32"),
    BenchCase("bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16"),
    BenchCase("bert-1024x128-b128-bf16", BERT_BASE, 1024, 128, 128, "bf16"),
    BenchCase("bert-256x512-b32-bf16", BERT_BASE, 256, 512, 32, "bf16", reference_dtype="fp32"),
    BenchCase("gpt2-128x1024-b8-bf16", GPT2_SMALL, 128, 1024, 8, "bf16", reference_dtype="fp32"),
    BenchCase("masking-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="masking",
              modes=MASKING_MODES),
    BenchCase("sweep-bert-408x128-b32-bf16", BERT_BASE, 408, 128, 32, "bf16", kind="sweep", modes=SWEEP_MODES),
    BenchCase("bert-408x128-b1-fp32", BERT_BASE, 408, 128, 1, "fp32"),
]

QUICK_CASES = [  # tiny versions of every full case, in the same order (CPU, well under a minute in total)
    BenchCase("quick-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32"),
    BenchCase("quick-bert-16x16-b8-bf16", TINY_BERT, 16, 16, 8, "bf16"),
    BenchCase("quick-bert-32x16-b16-bf16", TINY_BERT, 32, 16, 16, "bf16"),
    BenchCase("quick-bert-16x32-b8-bf16", TINY_BERT, 16, 32, 8, "bf16", reference_dtype="fp32"),
    BenchCase("quick-gpt2-8x32-b4-bf16", TINY_GPT2, 8, 32, 4, "bf16", reference_dtype="fp32"),
    BenchCase("quick-masking-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="masking",
              modes=MASKING_MODES),
    BenchCase("quick-sweep-bert-16x16-b8-fp32", TINY_BERT, 16, 16, 8, "fp32", kind="sweep", modes=SWEEP_MODES),
    BenchCase("quick-bert-16x16-b1-fp32", TINY_BERT, 16, 16, 1, "fp32"),
]


def select_cases(names: Sequence[str] | None = None, *, quick: bool = False) -> list[BenchCase]:
    """The full (or quick) case list, optionally filtered by case names (exact, or a substring of one)."""
    cases = QUICK_CASES if quick else FULL_CASES
    if not names:
        return list(cases)
    chosen = [case for case in cases if any(name == case.name or name in case.name for name in names)]
    if not chosen:
        raise ValueError(f"no case matches {list(names)}; cases: {', '.join(case.name for case in cases)}")
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Models and synthetic data
# --------------------------------------------------------------------------------------------------------------
def build_model(size: ModelSize, *, seed: int = MODEL_SEED, device=None) -> torch.nn.Module:
    """A randomly initialised fp32 model in eval mode (dropout off, no KV cache), initialised on ``device``."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if size.kind == "bert":
        config = BertConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                            num_attention_heads=size.heads, intermediate_size=size.intermediate,
                            max_position_embeddings=size.positions, num_labels=size.num_labels)
        model_class = BertForSequenceClassification
    elif size.kind == "gpt2":
        config = GPT2Config(vocab_size=size.vocab, n_embd=size.hidden, n_layer=size.layers, n_head=size.heads,
                            n_inner=size.intermediate, n_positions=size.positions, use_cache=False,
                            bos_token_id=size.vocab - 1, eos_token_id=size.vocab - 1)
        model_class = GPT2LMHeadModel
    else:
        raise ValueError(f"unknown model kind {size.kind!r}")
    try:
        with torch.device(device or "cpu"):  # initialising on the GPU is much faster than on the CPU
            model = model_class(config)
    except (RuntimeError, NotImplementedError):
        torch.manual_seed(seed)
        model = model_class(config).to(device or "cpu")
    return model.eval()


def synthetic_examples(size: ModelSize, examples: int, seq: int, *, seed: int = DATA_SEED, device=None) -> dict:
    """Random examples: ``input_ids`` ``[n, S]``, right-padded ``attention_mask`` ``[n, S]`` with lengths uniform
    in ``[S/4, S]``, and for BERT random class ``labels`` ``[n]``. Padding ids: 0 (BERT), the EOS id (GPT-2)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (examples,), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # [n, S]
    pad_id = 0 if size.kind == "bert" else size.vocab - 1
    low = 1 if size.kind == "bert" else 0
    input_ids = torch.randint(low, size.vocab - (size.kind != "bert"), (examples, seq), generator=generator)
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    data = {"input_ids": input_ids, "attention_mask": attention_mask}
    if size.kind == "bert":
        data["labels"] = torch.randint(0, size.num_labels, (examples,), generator=generator)
    return {name: tensor.to(device) for name, tensor in data.items()} if device is not None else data


# --------------------------------------------------------------------------------------------------------------
# Synthetic tasks (the protocol of fastbertology.importance.analyze_heads)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    """``loss``: scalar batch loss; ``example_losses``: ``[B]``; ``logits``: the model's logits;
    ``nll_sum`` / ``tokens``: summed token NLL and predicted-token count (LM only)."""

    loss: torch.Tensor
    example_losses: torch.Tensor
    logits: torch.Tensor
    nll_sum: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits -> fp32 for the loss; fp32 / fp64 unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class _Task:
    """Shared plumbing, the same split as :class:`fastbertology.tasks.Task`: :meth:`forward` runs the model,
    ``result(output, batch)`` turns its output (or bare logits) into a :class:`TaskResult`. ``runner`` (default:
    the model itself) can be a compiled version of the model."""

    def __init__(self, runner: Callable | None = None):
        self.runner = runner

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, model, batch: dict, *, head_mask: torch.Tensor | None = None):
        """The model output on ``batch`` (``head_mask`` ``[L, H]`` or ``[B, L, H]``, patched models only)."""
        kwargs = {} if head_mask is None else {"head_mask": head_mask}
        runner = model if self.runner is None else self.runner
        return runner(**self.model_inputs(batch), **kwargs)

    def evaluate(self, model, batch: dict, head_mask: torch.Tensor | None = None) -> TaskResult:
        return self.result(self.forward(model, batch, head_mask=head_mask), batch)

    def batch_size(self, batch: dict) -> int:
        return len(batch["input_ids"])

    replicate = tasks.Task.replicate  # k copies of a batch for batched masks, and the output split k ways
    split = tasks.Task.split


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


class ClassificationTask(_Task):
    """Sequence classification with random labels: loss = mean cross-entropy over the batch, metric = accuracy.

    logits ``[B, C]`` (upcast to fp32 for the loss), ``batch["labels"]`` ``[B]``."""

    higher_is_better = True

    def result(self, output, batch: dict) -> TaskResult:
        logits = _logits(output)  # [B, C]
        losses = F.cross_entropy(_upcast(logits), batch["labels"], reduction="none")  # [B]
        return TaskResult(loss=losses.mean(), example_losses=losses, logits=logits)

    def metric_state(self) -> dict:
        return {"correct": 0, "total": 0}

    def update_metric(self, state: dict, result: TaskResult, batch: dict) -> None:
        state["correct"] += int((result.logits.detach().argmax(-1) == batch["labels"]).sum())
        state["total"] += len(batch["labels"])

    def compute_metric(self, state: dict) -> float:
        return state["correct"] / max(state["total"], 1)


class LanguageModelingTask(_Task):
    """Causal LM: position i predicts token i+1 where both are real tokens. loss = mean token NLL over the batch's
    predicted tokens; example loss = each example's mean token NLL; metric = perplexity (lower is better).

    logits ``[B, N, V]`` (upcast to fp32), ``batch["input_ids"]`` / ``batch["attention_mask"]`` ``[B, N]``."""

    higher_is_better = False

    def result(self, output, batch: dict) -> TaskResult:
        logits = _logits(output)  # [B, N, V]
        targets = batch["input_ids"][:, 1:]  # [B, N-1]
        valid = batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]  # [B, N-1]
        nll = F.cross_entropy(_upcast(logits[:, :-1]).transpose(1, 2), targets, reduction="none")  # [B, N-1]
        nll = nll * valid.to(nll.dtype)
        per_example_tokens = valid.sum(1).clamp_min(1).to(nll.dtype)
        tokens = valid.sum().to(nll.dtype)
        return TaskResult(loss=nll.sum() / tokens.clamp_min(1), example_losses=nll.sum(1) / per_example_tokens,
                          logits=logits, nll_sum=nll.sum().detach(), tokens=tokens)

    def metric_state(self) -> dict:
        return {"nll": 0.0, "tokens": 0.0}

    def update_metric(self, state: dict, result: TaskResult, batch: dict) -> None:
        state["nll"] += float(result.nll_sum)
        state["tokens"] += float(result.tokens)

    def compute_metric(self, state: dict) -> float:
        return math.exp(state["nll"] / max(state["tokens"], 1.0))


def make_task(size: ModelSize, runner: Callable | None = None) -> _Task:
    """The synthetic task of a model kind: classification for BERT, language modelling for GPT-2."""
    return ClassificationTask(runner) if size.kind == "bert" else LanguageModelingTask(runner)


# --------------------------------------------------------------------------------------------------------------
# The reference loop (run_bertology on transformers 5), independent of fastbertology's patch
# --------------------------------------------------------------------------------------------------------------
class _ReferenceState:
    head_mask: torch.Tensor | None = None  # [L, H]


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers 4.x eager attention. q, k, v ``[B, H, N, D]``; ``attention_mask`` additive ``[B, 1, N, N]``
    (padding and, for GPT-2, the causal triangle) or None. Returns ``(out [B, N, H, D], probs [B, H, N, N])``,
    the probabilities multiplied by the layer's head mask, as 4.x returned them with output_attentions."""
    state, layer = module._fastbertology_bench_reference
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, H, N, N]
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if state.head_mask is not None:
        probs = probs * state.head_mask[layer].to(probs.dtype)[None, :, None, None]
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, N, H, D]
    return out, probs


def _attention_modules(model) -> list:
    base = model.base_model
    return [layer.attention.self for layer in base.encoder.layer] if hasattr(base, "encoder") else [
        block.attn for block in base.h]


@contextlib.contextmanager
def reference_attention(model):
    """Inside the block ``model`` runs transformers 4.x eager attention with a head mask (set ``state.head_mask``,
    ``[L, H]``, on the yielded state). Registers the function and transformers' eager mask under
    ``REFERENCE_IMPLEMENTATION``; restores the previous implementation on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REFERENCE_IMPLEMENTATION, _reference_attention)
    AttentionMaskInterface.register(REFERENCE_IMPLEMENTATION, eager_mask)
    state = _ReferenceState()
    modules = _attention_modules(model)
    for layer, module in enumerate(modules):
        module._fastbertology_bench_reference = (state, layer)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE_IMPLEMENTATION)
    try:
        yield state
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            del module._fastbertology_bench_reference


def _run_bertology_entropy(probs: torch.Tensor) -> torch.Tensor:
    """run_bertology's ``entropy``: ``-sum_j p log p`` over keys with ``0 log 0 = 0``. ``[B, H, N, N] -> [B, H, N]``."""
    plogp = probs * torch.log(probs)
    plogp = torch.where(probs == 0, torch.zeros_like(plogp), plogp)
    return -plogp.sum(dim=-1)


@dataclass
class ReferenceAnalysis:
    """Tables ``[L, H]`` float64 on the CPU, as :class:`fastbertology.importance.HeadAnalysis` names them."""

    importance: torch.Tensor
    raw_importance: torch.Tensor
    entropy: torch.Tensor
    metric: float
    loss: float
    tokens: int
    examples: int


def normalize_like_run_bertology(raw: torch.Tensor) -> torch.Tensor:
    """Per-layer L2 normalisation (``x / (||x_l||_2 + 1e-20)``), then global min-max to [0, 1]. ``[L, H]``."""
    importance = raw / (raw.pow(2).sum(-1, keepdim=True).sqrt() + 1e-20)
    low, high = importance.min(), importance.max()
    return (importance - low) / (high - low) if high > low else torch.zeros_like(importance)


def reference_analysis(model, batches: Sequence[dict], task, *, head_mask: torch.Tensor | None = None
                       ) -> ReferenceAnalysis:
    """run_bertology's ``compute_heads_importance`` with 4.x eager semantics (see the module docstring).

    model: an unpatched model whose parameters require grad (weight gradients accumulate in ``.grad``).
    head_mask: ``[L, H]`` mask to evaluate under (default ones); importance is the gradient at it.
    """
    modules = _attention_modules(model)
    layers, heads = len(modules), modules[0].num_heads if hasattr(modules[0], "num_heads") else (
        modules[0].num_attention_heads)
    device = next(model.parameters()).device
    base_mask = torch.ones(layers, heads, device=device) if head_mask is None else head_mask.detach().float()
    importance = torch.zeros(layers, heads, dtype=torch.float64, device=device)
    entropy = torch.zeros(layers, heads, dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    metric_state = task.metric_state()
    loss_sum, examples = 0.0, 0
    with reference_attention(model) as state:
        for batch in batches:
            mask = base_mask.clone().requires_grad_(True)  # [L, H], a fresh leaf: its gradient is per batch
            state.head_mask = mask
            output = model(**task.model_inputs(batch), output_attentions=True)
            result = task.result(output, batch)
            result.loss.backward()
            importance += mask.grad.abs().double()
            keep = batch["attention_mask"]
            for layer, probs in enumerate(output.attentions):  # probs [B, H, N, N]
                masked = _run_bertology_entropy(probs.detach()) * keep[:, None, :].to(probs.dtype)  # [B, H, N]
                entropy[layer] += masked.sum(-1).sum(0).double()
            tokens += keep.sum().double()
            task.update_metric(metric_state, result, batch)
            loss_sum += float(result.loss.detach())
            examples += len(batch["input_ids"])
            state.head_mask = None
    token_count = int(tokens.item())
    raw = (importance / max(token_count, 1)).cpu()
    return ReferenceAnalysis(importance=normalize_like_run_bertology(raw), raw_importance=raw,
                             entropy=(entropy / max(token_count, 1)).cpu(), metric=task.compute_metric(metric_state),
                             loss=loss_sum / max(len(batches), 1), tokens=token_count, examples=examples)


def _quality(score: float, original: float, higher_is_better: bool) -> float:
    if original <= 0 or score <= 0:
        return 1.0 if (score >= original if higher_is_better else score <= original) else 0.0
    return score / original if higher_is_better else original / score


def reference_masking(model, batches: Sequence[dict], task, *, masking_amount: float = 0.1,
                      masking_threshold: float = 0.9) -> tuple[torch.Tensor, list[dict]]:
    """run_bertology's ``mask_heads`` on :func:`reference_analysis`: mask the ``masking_amount`` least important
    remaining heads (normalised importance), recompute, stop when the metric drops below ``masking_threshold`` x
    the original or when no more than one step's worth of heads is left (the script would go on "masking" already
    masked heads). Returns ``(kept head mask [L, H] on the CPU, curve)``."""
    analysis = reference_analysis(model, batches, task)
    original = analysis.metric
    layers, heads = analysis.importance.shape
    device = next(model.parameters()).device
    mask = torch.ones(layers, heads, device=device)
    kept = mask.clone()
    per_step = max(1, int(mask.numel() * masking_amount))
    curve = [{"heads_remaining": int(mask.sum()), "score": original}]
    while int(mask.sum()) > per_step:
        scores = analysis.importance.clone().flatten()
        scores[mask.cpu().flatten() == 0] = float("inf")
        chosen = torch.sort(scores, stable=True).indices[:per_step]
        mask = mask.clone()
        mask.view(-1)[chosen.to(device)] = 0.0
        analysis = reference_analysis(model, batches, task, head_mask=mask)
        curve.append({"heads_remaining": int(mask.sum()), "score": analysis.metric})
        if _quality(analysis.metric, original, bool(task.higher_is_better)) < masking_threshold:
            break
        kept = mask.clone()
    return kept.cpu(), curve


def single_head_masks(layers: int, heads: int, *, device=None) -> torch.Tensor:
    """``[L*H, L, H]`` masks of ones with head ``(i // H, i % H)`` zeroed in mask ``i``."""
    masks = torch.ones(layers * heads, layers * heads, device=device)
    masks.fill_diagonal_(0.0)
    return masks.view(layers * heads, layers, heads)


@dataclass
class ReferenceSweep:
    """``scores`` / ``losses``: ``[M]`` float64 metric and mean batch loss under each mask; the baseline's too."""

    scores: torch.Tensor
    losses: torch.Tensor
    baseline_score: float
    baseline_loss: float


def reference_sweep(model, batches: Sequence[dict], task, masks: torch.Tensor) -> ReferenceSweep:
    """The naive single-head ablation loop with 4.x semantics: one eager pass over the data without a mask, then
    one per mask ``masks [M, L, H]`` (probabilities times the head mask, no gradients)."""
    device = next(model.parameters()).device
    scores, losses = [], []
    baseline = None
    with torch.no_grad(), reference_attention(model) as state:
        for mask in [None, *masks.to(device)]:
            state.head_mask = mask
            metric_state, loss_sum = task.metric_state(), 0.0
            for batch in batches:
                result = task.evaluate(model, batch)
                task.update_metric(metric_state, result, batch)
                loss_sum += float(result.loss)
            score, loss = task.compute_metric(metric_state), loss_sum / max(len(batches), 1)
            if mask is None:
                baseline = (score, loss)
            else:
                scores.append(score)
                losses.append(loss)
        state.head_mask = None
    return ReferenceSweep(torch.tensor(scores, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64),
                          *baseline)


# --------------------------------------------------------------------------------------------------------------
# The other two modes
# --------------------------------------------------------------------------------------------------------------
def _embedding_output_module(model):
    base = model.base_model
    return base.embeddings if hasattr(base, "embeddings") else base.drop


def sdpa_frozen_pass(model, batches: Sequence[dict], task) -> None:
    """Stock SDPA forward + task loss + backward per batch; the model's parameters must be frozen. The embedding
    output ``[B, N, hidden]`` is replaced by a leaf requiring grad so that the activation backward runs."""
    hook = _embedding_output_module(model).register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True))
    try:
        for batch in batches:
            task.evaluate(model, batch).loss.backward()
    finally:
        hook.remove()


def sweeps_module():
    """:mod:`fastbertology.sweeps` with this module's task classes registered for batched masks, or None while
    that module does not exist (the sweep case then reports ``status="todo: ..."`` and no numbers)."""
    try:
        from . import sweeps
    except ImportError:
        return None
    return sweeps


# --------------------------------------------------------------------------------------------------------------
# Timing and the driver
# --------------------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Release the previous mode's CUDA memory so that peaks are per mode (a full gc takes ~0.5 s: CUDA only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def timed(run: Callable[[], object], device: torch.device, *, warmup: Callable[[], object] | None = None):
    """``(result of run(), wall seconds, peak MiB or None)``: ``warmup()`` first (untimed), synchronize, reset the
    CUDA peak statistics, run once, synchronize. Peak = ``torch.cuda.max_memory_allocated`` (absolute: weights,
    gradients and inputs included); None on CPU."""
    if warmup is not None:
        warmup()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = run()
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return result, seconds, peak


def environment(device: torch.device) -> dict:
    """Device name and library versions for the rows."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as cpuinfo:
                name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                            name)
        name = f"CPU {name}, {torch.get_num_threads()} threads"
    return {"device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _relative_max_diff(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|`` over the finite entries of two ``[L, H]`` tables."""
    scale = reference.abs().max().item()
    return float((value - reference).abs().max().item() / scale) if scale > 0 else float(
        (value - reference).abs().max().item())


@dataclass
class _ModeOutcome:
    seconds: float | None = None
    peak_mib: float | None = None
    passes: int = 1
    analysis: object = None
    mask: torch.Tensor | None = None
    sweep: object = None
    backend: str | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


def _model_for(master, dtype: torch.dtype, device: torch.device):
    return copy.deepcopy(master).to(device=device, dtype=dtype).eval()


def case_data(case: BenchCase, device) -> tuple[torch.nn.Module, dict]:
    """``(master model, examples)``: the case's random-init fp32 model, kept on the CPU (each mode copies it to
    the device in its own dtype, so peaks count one model), and its synthetic examples on ``device``."""
    device = torch.device(device)
    master = build_model(case.model, device=device).cpu()
    return master, synthetic_examples(case.model, case.examples, case.seq, device=device)


@dataclass
class PreparedMode:
    """One mode of one case, set up and ready to time.

    run():    one timed unit — a full pass over the data, or the whole masking run — returning a dict with
              ``passes`` and, where the mode computes them, ``analysis`` / ``mask`` / ``metric``.
    warmup(): an untimed pass (for masking: one importance pass, not a whole masking run).
    close():  undo the patch and drop the model.
    todo:     set (and run unusable) where the mode cannot run yet (the sweep hook).
    """

    run: Callable[[], dict]
    warmup: Callable[[], object]
    close: Callable[[], None]
    backend: str | None
    todo: str | None = None


def prepare_mode(case: BenchCase, mode: str, master, examples: dict, device, *, backend: str = "auto",
                 compile_options: dict | None = None, importance: str = "per_batch") -> PreparedMode:
    """Copy ``master`` to ``device`` in the mode's dtype, configure it (see the module docstring), build the
    mode's batches from ``examples`` and return the closures to time (see :class:`PreparedMode`)."""
    from . import patch
    from .importance import analyze_heads
    from .kernels import resolve_backend
    from .masking import iterative_masking

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    device = torch.device(device)
    model = _model_for(master, DTYPES[case.mode_dtype(mode)], device)
    batches = bucketed_batches(examples, case.batch) if mode == "fastbertology-bucketed" else padded_batches(
        examples, case.batch)
    task = make_task(case.model)
    handles = []

    def close():
        while handles:
            handles.pop().remove()
        batches.clear()
        model.to("meta")  # free the parameters now, even if a closure still refers to the module
        _free(device)

    if case.kind == "sweep":
        sweeps = sweeps_module()
        if sweeps is None:
            return PreparedMode(lambda: {"passes": 0}, lambda: None, close, None,
                                todo="todo: fastbertology.sweeps not available; single-head ablation sweep not "
                                     "benchmarked")
    if mode == "reference" and case.kind == "sweep":
        model.requires_grad_(False)
        masks = single_head_masks(case.model.layers, case.model.heads, device=device)

        def run():
            result = reference_sweep(model, batches, task, masks)
            return {"passes": len(masks) + 1, "sweep": result, "metric": result.baseline_score}

        def warmup():
            with torch.no_grad(), reference_attention(model):
                for batch in batches:
                    task.evaluate(model, batch)
        return PreparedMode(run, warmup, close, "eager")

    if mode == "reference":
        model.requires_grad_(True)

        def analysis_pass():
            model.zero_grad(set_to_none=True)  # each timed pass starts without weight gradients
            return reference_analysis(model, batches, task)

        if case.kind == "masking":
            def run():
                model.zero_grad(set_to_none=True)
                mask, curve = reference_masking(model, batches, task, masking_amount=case.masking_amount,
                                                masking_threshold=case.masking_threshold)
                return {"passes": len(curve), "mask": mask, "metric": curve[-1]["score"]}
        else:
            def run():
                analysis = analysis_pass()
                return {"passes": 1, "analysis": analysis, "metric": analysis.metric}
        return PreparedMode(run, analysis_pass, close, "eager")

    if mode == "sdpa-frozen":
        model.set_attn_implementation("sdpa")
        model.requires_grad_(False)

        def run():
            sdpa_frozen_pass(model, batches, task)
            return {"passes": 1}
        return PreparedMode(run, run, close, "sdpa")

    handles.append(patch(model, backend=backend))
    if compile_options is not None:
        task = make_task(case.model, torch.compile(model, **compile_options))
    if mode == "fastbertology-bucketed" and case.kind == "sweep":
        raise ValueError("the sweep case has modes reference and fastbertology")
    resolved = resolve_backend(backend, device)

    def analysis_pass():
        return analyze_heads(model, batches, task, importance=importance)

    if case.kind == "sweep":
        model.requires_grad_(False)

        def run():
            result = sweeps.ablation_sweep(model, batches, task, kind="heads")
            return {"passes": len(result.scores) + 1, "sweep": result, "metric": result.baseline_score}

        def warmup():
            sweeps.ablation_sweep(model, batches[:1], task, kind="layers")
        return PreparedMode(run, warmup, close, resolved)
    if case.kind == "masking":
        def run():
            result = iterative_masking(model, batches, task, masking_amount=case.masking_amount,
                                       masking_threshold=case.masking_threshold, importance=importance)
            return {"passes": len(result.curve), "mask": result.head_mask, "metric": result.curve[-1]["score"]}
    else:
        def run():
            analysis = analysis_pass()
            return {"passes": 1, "analysis": analysis, "metric": analysis.metric}
    return PreparedMode(run, analysis_pass, close, resolved)


def _run_mode(case: BenchCase, mode: str, master, examples: dict, device: torch.device, *, backend: str,
              compile_options: dict | None, warmup: bool, importance: str) -> _ModeOutcome:
    prepared = prepare_mode(case, mode, master, examples, device, backend=backend, compile_options=compile_options,
                            importance=importance)
    try:
        if prepared.todo is not None:
            return _ModeOutcome(status=prepared.todo, backend=prepared.backend)
        result, seconds, peak = timed(prepared.run, device, warmup=prepared.warmup if warmup else None)
        return _ModeOutcome(seconds, peak, passes=result["passes"], analysis=result.get("analysis"),
                            mask=result.get("mask"), sweep=result.get("sweep"), backend=prepared.backend,
                            extra={"metric": result.get("metric")})
    finally:
        prepared.close()


def run_case(case: BenchCase, *, device=None, backend: str = "auto", modes: Sequence[str] | None = None,
             compile_options: dict | None = None, warmup: bool = True, importance: str = "per_batch",
             keep_results: bool = False) -> list[dict]:
    """Run one case in every requested mode (``case.modes`` by default); one row per mode (see
    :func:`run_bench`). With ``keep_results`` each row also holds ``"result"``: the analysis object (or the
    masking run's kept mask) for tests."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    modes = [mode for mode in case.modes if modes is None or mode in modes]
    env = environment(device)
    master, examples = case_data(case, device)
    tokens = int(examples["attention_mask"].sum())
    outcomes = {}
    for mode in modes:
        try:
            outcomes[mode] = _run_mode(case, mode, master, examples, device, backend=backend,
                                       compile_options=compile_options, warmup=warmup, importance=importance)
        except torch.cuda.OutOfMemoryError:
            _free(device)
            outcomes[mode] = _ModeOutcome(status="error: out of memory")
        except Exception as error:  # a benchmark keeps going; the row says what failed
            _free(device)
            outcomes[mode] = _ModeOutcome(status=f"error: {type(error).__name__}: {error}"[:300])
    del master

    def per_pass(mode):
        outcome = outcomes.get(mode)
        if outcome is None or outcome.seconds is None:
            return None
        return outcome.seconds / outcome.passes

    reference = outcomes.get("reference")
    rows = []
    for mode, outcome in outcomes.items():
        s_per_pass = per_pass(mode)
        row = {
            "case": case.name, "kind": case.kind, "model": case.model.kind, "layers": case.model.layers,
            "heads": case.model.heads, "hidden": case.model.hidden, "mode": mode, "examples": case.examples,
            "seq": case.seq, "batch": case.batch, "dtype": case.mode_dtype(mode), "tokens": tokens,
            "device": device.type, "backend": outcome.backend, "importance": importance if mode.startswith(
                "fastbertology") else ("per_batch" if mode == "reference" else None),
            "compiled": bool(compile_options) and mode.startswith("fastbertology"),
            "passes": outcome.passes if outcome.seconds is not None else None,
            "seconds": outcome.seconds, "s_per_pass": s_per_pass,
            "ex_per_s": case.examples / s_per_pass if s_per_pass else None,
            "peak_mib": outcome.peak_mib,
            "speedup_vs_reference": (per_pass("reference") / s_per_pass) if s_per_pass and per_pass(
                "reference") else None,
            "speedup_vs_sdpa": (per_pass("sdpa-frozen") / s_per_pass) if s_per_pass and per_pass(
                "sdpa-frozen") else None,
            "importance_diff": None, "entropy_diff": None, "metric": None, "mask_mismatch": None,
            "sweep_loss_diff": None,
            "status": outcome.status, **env,
        }
        analysis = outcome.analysis
        if analysis is not None:
            row["metric"] = analysis.metric
            if mode != "reference" and reference is not None and reference.analysis is not None:
                if mode == "fastbertology":  # same batches: per_batch importance must agree
                    row["importance_diff"] = _relative_max_diff(analysis.raw_importance,
                                                                reference.analysis.raw_importance)
                row["entropy_diff"] = _relative_max_diff(analysis.entropy, reference.analysis.entropy)
        if outcome.extra.get("metric") is not None:
            row["metric"] = outcome.extra["metric"]
        if outcome.mask is not None and mode != "reference" and reference is not None and reference.mask is not None:
            row["mask_mismatch"] = int((outcome.mask.cpu() != reference.mask.cpu()).sum())
        if outcome.sweep is not None and mode != "reference" and reference is not None and (
                reference.sweep is not None):
            row["sweep_loss_diff"] = _relative_max_diff(outcome.sweep.losses, reference.sweep.losses)
        if keep_results:
            row["result"] = next((r for r in (analysis, outcome.mask, outcome.sweep) if r is not None), None)
        rows.append(row)
    return rows


def skipped_rows(case: BenchCase, device, modes: Sequence[str] | None, status: str) -> list[dict]:
    """Rows for a case that was not run: identification columns and ``status``, every number None."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    keys = ("passes", "seconds", "s_per_pass", "ex_per_s", "peak_mib", "speedup_vs_reference", "speedup_vs_sdpa",
            "importance_diff", "entropy_diff", "metric", "mask_mismatch", "sweep_loss_diff", "backend", "importance", "tokens")
    return [{"case": case.name, "kind": case.kind, "model": case.model.kind, "layers": case.model.layers,
             "heads": case.model.heads, "hidden": case.model.hidden, "mode": mode, "examples": case.examples,
             "seq": case.seq, "batch": case.batch, "dtype": case.mode_dtype(mode), "device": device.type,
             "compiled": False, **dict.fromkeys(keys), "status": status, **environment(device)}
            for mode in case.modes if modes is None or mode in modes]


def run_bench(cases: Sequence[BenchCase | str] | None = None, *, device=None, quick: bool = False,
              backend: str = "auto", modes: Sequence[str] | None = None, compile_options: dict | None = None,
              warmup: bool = True, importance: str = "per_batch", time_budget: float | None = None,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run benchmark cases; return one row (dict) per (case, mode).

    cases: :class:`BenchCase` objects or case names (default: every full case, or every quick case with
           ``quick``). device: default CUDA when available, else CPU. backend: fastbertology's attention backend.
    modes: restrict the modes (default: each case's). compile_options: keyword arguments of ``torch.compile``
           applied to the fastbertology modes' model (None = off; ``{"mode": "reduce-overhead"}`` = CUDA graphs).
    time_budget: seconds; a case that would start after this much time has passed is not run (its rows say
           ``status="skipped: time budget"``, with no numbers).
    on_row: called with each row as soon as it exists (e.g. to append it to a file).

    Row keys: case, kind, model, layers, heads, hidden, mode, examples, seq, batch, dtype, tokens, device,
    backend, importance, compiled, passes, seconds (the timed run), s_per_pass, ex_per_s (examples per pass per
    second), peak_mib (CUDA only), speedup_vs_reference / speedup_vs_sdpa (the other mode's seconds per pass
    over this one's, same run), importance_diff / entropy_diff (max relative difference of the raw importance /
    entropy tables from the reference loop's), metric, mask_mismatch (masking: heads whose kept mask differs
    from the reference's), sweep_loss_diff (sweep: max relative difference of the per-mask mean loss from the
    naive loop's), status ("ok", "error: ...", "todo: ...", "skipped: ..."), device_name, torch, transformers, triton,
    date.
    """
    if cases is None or all(isinstance(case, str) for case in cases):
        cases = select_cases(cases, quick=quick)
    rows = []
    start = time.perf_counter()
    for case in cases:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            case_rows = skipped_rows(case, device, modes, f"skipped: time budget {time_budget:g} s")
        else:
            case_rows = run_case(case, device=device, backend=backend, modes=modes, compile_options=compile_options,
                                 warmup=warmup, importance=importance)
        for row in case_rows:
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`run_bench` rows, headed by the device, versions and date of the first row."""
    if not rows:
        return "(no rows)"
    first = rows[0]
    lines = [
        f"End-to-end head analysis — {first['device_name']}, torch {first['torch']}, transformers "
        f"{first['transformers']}, triton {first['triton']}, {first['date']}",
        "×ref / ×sdpa: speedup over the reference loop / frozen SDPA (seconds per pass, same run); Δimp / ΔH: "
        "max relative difference of raw importance / entropy from the reference loop; Δmask: heads whose final "
        "masking mask differs from the reference's; Δsweep: max relative difference of the per-mask mean loss from the naive "
        "eager loop; peak: max CUDA memory allocated (MiB, absolute).",
        "",
        "| case | mode | dtype | passes | s/pass | ex/s | peak MiB | ×ref | ×sdpa | Δimp | ΔH | Δmask | Δsweep "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['mode']} | {row['dtype']} | {_fmt(row['passes'], 'd')} | "
            f"{_fmt(row['s_per_pass'], '.4g')} | {_fmt(row['ex_per_s'], '.4g')} | {_fmt(row['peak_mib'], '.0f')} | "
            f"{_fmt(row['speedup_vs_reference'], '.2f')} | {_fmt(row['speedup_vs_sdpa'], '.2f')} | "
            f"{_fmt(row['importance_diff'], '.1e')} | {_fmt(row['entropy_diff'], '.1e')} | "
            f"{_fmt(row['mask_mismatch'], 'd')} | {_fmt(row['sweep_loss_diff'], '.1e')} | {row['status']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line (``python -m fastbertology.bench``; ``fastbertology bench`` can call bench_main)
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbertology bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs of every case (CPU, under a minute)")
    parser.add_argument("--cases", default=None, help="comma-separated case names or substrings (default: all)")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--backend", default="auto", help="fastbertology attention backend (default auto)")
    parser.add_argument("--importance", default="per_batch", choices=("per_batch", "per_example"))
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile the fastbertology model with this mode (default, reduce-overhead = "
                             "CUDA graphs, max-autotune); off by default")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (e.g. eager, aot_eager)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warmup pass")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="do not start another case after this many seconds (its rows say skipped)")
    parser.add_argument("--out", default=None, help="append one JSON line per row to this file")
    return parser


def bench_main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parse ``argv``, run the benchmark, print the table last, append rows to ``--out``; return the rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # ``fastbertology bench -- --quick`` hands the separator through
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if not args.quick and device.type != "cuda":
        parser.error("the full cases (BERT-base, GPT-2 small) need a CUDA GPU; use --quick on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_options = None
    if args.compile or args.compile_backend:
        compile_options = {key: value for key, value in
                           (("mode", args.compile), ("backend", args.compile_backend)) if value}

    def on_row(row):
        summary = (f"{row['case']} {row['mode']}: {_fmt(row['s_per_pass'], '.4g')} s/pass, "
                   f"{_fmt(row['ex_per_s'], '.4g')} ex/s, {row['status']}")
        print(summary, file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps(row) + "\n")

    rows = run_bench(args.cases.split(",") if args.cases else None, device=device, quick=args.quick,
                     backend=args.backend, modes=args.modes.split(",") if args.modes else None,
                     compile_options=compile_options, warmup=not args.no_warmup, importance=args.importance,
                     time_budget=args.time_budget, on_row=on_row)
    print(format_table(rows))
    return rows


def exit_code(rows: Sequence[dict]) -> int:
    """0 when every row is ok, a TODO hook or skipped by the time budget; 1 when a mode failed."""
    return 0 if all(row["status"] == "ok" or row["status"].startswith(("todo", "skipped")) for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry for ``fastbertology bench`` and ``python -m fastbertology.bench``: :func:`bench_main`, exit status."""
    return exit_code(bench_main(argv))


if __name__ == "__main__":
    sys.exit(main())

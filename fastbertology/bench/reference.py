"""The transformers 4.x / run_bertology loops on transformers 5, independent of fastbertology's patch.

:func:`reference_model` makes a stock transformers 5 model (BERT, RoBERTa, GPT-2: those whose attention goes through
``AttentionInterface``) behave like transformers 4.x with ``head_mask`` and ``output_attentions``:

* an eager attention function, registered with ``AttentionInterface`` (and transformers' eager mask with
  ``AttentionMaskInterface``), materialises the probabilities ``[B, H, N, N]``, applies dropout, multiplies them
  by the layer's head mask (``[L, H]`` or per example ``[B, L, H]``) and returns them as 4.x did;
* it also hands every map to a capture, for every model call: a forward pre-hook on the base model notes the
  call's 2-D attention mask, and a forward hook computes run_bertology's entropy from the call's maps after the
  call, as the script did from ``output.attentions``. Tasks that run the model several times per batch
  (retrieval: queries and positives) are therefore covered, whichever task calls the model how.

:func:`reference_analysis` is run_bertology's ``compute_heads_importance``; :func:`reference_masking` its
``mask_heads``; :func:`reference_sweep` the naive single-head ablation loop (one eager pass per mask);
:func:`reference_patching` TransformerLens-style activation patching (one eager pass per head).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..activation_patching import model_inputs
from ..architectures import architecture, attention_blocks, attention_modules, heads_per_layer
from ..importance import IMPORTANCE_MODES, HeadAnalysis, examples_in, normalize_importance
from ..masking import heads_to_mask_next, relative_quality
from ..sweeps import SweepResult

IMPLEMENTATION = "fastbertology_bench_reference"


def run_bertology_entropy(probs: torch.Tensor) -> torch.Tensor:
    """run_bertology's ``entropy``: ``-sum_j p log p`` over the keys, ``0 log 0 = 0``. ``[B, H, N, N] -> [B, H, N]``."""
    plogp = probs * torch.log(probs)
    plogp = torch.where(probs == 0, torch.zeros_like(plogp), plogp)
    return -plogp.sum(dim=-1)


class Capture:
    """State shared by the registered attention function and the base-model hooks during :func:`reference_model`.

    head_mask: ``[L, H]`` or ``[B, L, H]`` (set by the caller; None = no mask).
    entropy:   ``[L, H]`` float64 sum over the non-padding query tokens of every call of the entropy (only
               with ``maps``: run_bertology's ``compute_entropy``).
    tokens:    float64 scalar, non-padding query tokens over every call.
    """

    def __init__(self, layers: int, heads: int, device, *, maps: bool):
        self.head_mask: torch.Tensor | None = None
        self.maps = maps
        self.entropy = torch.zeros(layers, heads, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.calls: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (attention mask [B, N], maps) per call

    def layer_mask(self, layer: int) -> torch.Tensor | None:
        """The head mask of ``layer`` broadcastable to ``[B, H, N, N]``."""
        if self.head_mask is None:
            return None
        if self.head_mask.dim() == 2:
            return self.head_mask[layer][None, :, None, None]
        return self.head_mask[:, layer, :, None, None]

    def add_call(self, attention_mask: torch.Tensor, maps: list[torch.Tensor]) -> None:
        """Count one call's tokens and accumulate its entropy: ``maps`` L tensors ``[B, H, N, N]`` (empty without
        ``maps``), ``attention_mask`` ``[B, N]``."""
        keep = attention_mask.to(torch.float64)
        for layer, probs in enumerate(maps):
            entropy = run_bertology_entropy(probs) * attention_mask[:, None, :].to(probs.dtype)  # [B, H, N]
            self.entropy[layer] += entropy.sum(-1).sum(0).double()
        self.tokens += keep.sum()


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers 4.x eager attention with a head mask. q, k, v ``[B, H, N, D]``; ``attention_mask`` additive
    ``[B, 1, N, N]`` or None. Returns ``(out [B, N, H, D], probs [B, H, N, N])``, the probabilities after dropout
    and the head mask, as 4.x returned them with ``output_attentions``."""
    capture, layer = module._fastbertology_bench_reference
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped key/value heads (Llama): repeated, as transformers' eager does
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, H, N, N]
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
    mask = capture.layer_mask(layer)
    if mask is not None:
        probs = probs * mask.to(probs.dtype)
    if capture.maps and capture.calls:
        capture.calls[-1][1].append(probs.detach())
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _call_attention_mask(module, args, kwargs) -> torch.Tensor:
    """The 2-D attention mask ``[B, N]`` of a base-model call (ones like ``input_ids`` when the call has none)."""
    call = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    mask = call.get("attention_mask")
    return mask if mask is not None else torch.ones_like(call["input_ids"])


@contextlib.contextmanager
def reference_model(model, *, entropy: bool = True):
    """Inside the block ``model`` runs 4.x eager attention with the head mask of the yielded :class:`Capture`
    (set ``capture.head_mask``), which counts the tokens of every call and, with ``entropy``, accumulates
    run_bertology's entropy from every call's maps. The previous attention implementation and the model's
    modules are restored on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if not architecture(model).attention_interface:
        raise ValueError(f"the reference loop needs a model whose attention goes through transformers' "
                         f"AttentionInterface (BERT, RoBERTa, GPT-2, Llama), not {model.config.model_type!r}")
    AttentionInterface.register(IMPLEMENTATION, _eager_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    counts = heads_per_layer(model)
    capture = Capture(len(counts), max(counts), next(model.parameters()).device, maps=entropy)
    modules = attention_modules(model)
    for layer, module in enumerate(modules):
        module._fastbertology_bench_reference = (capture, layer)

    def before(module, args, kwargs):
        capture.calls.append((_call_attention_mask(module, args, kwargs), []))

    def after(module, args, output):
        attention_mask, maps = capture.calls.pop()
        with torch.no_grad():
            capture.add_call(attention_mask, maps)

    hooks = [model.base_model.register_forward_pre_hook(before, with_kwargs=True),
             model.base_model.register_forward_hook(after)]
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield capture
    finally:
        model.set_attn_implementation(previous)
        for hook in hooks:
            hook.remove()
        for module in modules:
            del module._fastbertology_bench_reference


def reference_analysis(model, batches: Sequence[dict], task, *, head_mask: torch.Tensor | None = None,
                       importance: str = "per_batch", entropy: bool = True) -> HeadAnalysis:
    """run_bertology's ``compute_heads_importance`` with 4.x semantics, for any library task.

    Per batch: a fresh head-mask leaf (``[L, H]``, or ``[B, L, H]`` for ``"per_example"``), ``task.evaluate``
    (every model call of the batch sees the mask), ``loss.backward()`` (weight gradients accumulate in ``.grad``
    for every parameter that requires grad, as in the script), importance ``+= |mask.grad|``; the entropy comes
    from the captured maps (``entropy=False``: not computed, NaN, as run_bertology's masking loop runs it).
    Importance and entropy are divided by the non-padding query tokens of every call.

    model:     an unpatched BERT / RoBERTa / GPT-2. head_mask: ``[L, H]`` to evaluate under (default ones).
    Returns a :class:`~fastbertology.importance.HeadAnalysis` (``[L, H]`` float64 tables on the CPU); the 4.x loop
    computes no max probability: ``max_prob`` is NaN.
    """
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {importance!r}")
    counts = heads_per_layer(model)
    device = next(model.parameters()).device
    base = torch.ones(len(counts), max(counts), device=device) if head_mask is None else head_mask.detach().float()
    raw = torch.zeros(base.shape, dtype=torch.float64, device=device)
    metric_state, loss_sum, examples = task.metric_state(), 0.0, 0
    with reference_model(model, entropy=entropy) as capture:
        for batch in batches:
            size = examples_in(task, batch)
            mask = base.expand(size, *base.shape) if importance == "per_example" else base
            mask = mask.clone().requires_grad_(True)  # a fresh leaf: its gradient is this batch's
            capture.head_mask = mask
            result = task.evaluate(model, batch)
            (result.example_losses.sum() if importance == "per_example" else result.loss).backward()
            gradient = mask.grad.abs().double()
            raw += gradient.sum(0) if importance == "per_example" else gradient
            task.update_metric(metric_state, result, batch)
            loss_sum += float(result.loss.detach())
            examples += size
        capture.head_mask = None
    tokens = int(capture.tokens.item())
    raw = (raw / max(tokens, 1)).cpu()
    missing = torch.full(raw.shape, float("nan"), dtype=torch.float64)
    return HeadAnalysis(importance=normalize_importance(raw), raw_importance=raw,
                        entropy=(capture.entropy / max(tokens, 1)).cpu() if entropy else missing, max_prob=missing,
                        metric=task.compute_metric(metric_state), loss=loss_sum / max(len(batches), 1),
                        tokens=tokens, examples=examples)


def reference_masking(model, batches: Sequence[dict], task, *, masking_amount: float = 0.1,
                      masking_threshold: float = 0.9, importance: str = "per_batch"
                      ) -> tuple[torch.Tensor, list[dict]]:
    """run_bertology's ``mask_heads`` on :func:`reference_analysis`: mask the ``masking_amount`` least important
    remaining heads (normalised importance, the library's selection and quality rules), recompute under the new
    mask, stop when the metric falls below ``masking_threshold`` x the original or when no more than one step's
    worth of heads is left; no entropy (as the script). Returns ``(kept head mask [L, H] on the CPU, curve)``, the
    curve one ``{"heads_remaining", "score"}`` per step."""
    analysis = reference_analysis(model, batches, task, importance=importance, entropy=False)
    original = analysis.metric
    mask = torch.ones(analysis.importance.shape, device=next(model.parameters()).device)
    kept = mask.clone()
    per_step = max(1, int(mask.numel() * masking_amount))
    curve = [{"heads_remaining": int(mask.sum()), "score": original}]
    while int(mask.sum()) > per_step:
        chosen = heads_to_mask_next(analysis.importance, mask.cpu(), per_step)
        mask = mask.clone()
        mask.view(-1)[chosen.to(mask.device)] = 0.0
        analysis = reference_analysis(model, batches, task, head_mask=mask, importance=importance, entropy=False)
        curve.append({"heads_remaining": int(mask.sum()), "score": analysis.metric})
        if relative_quality(analysis.metric, original, higher_is_better=bool(task.higher_is_better)) < (
                masking_threshold):
            break
        kept = mask.clone()
    return kept.cpu(), curve


def reference_sweep(model, batches: Sequence[dict], task, masks: torch.Tensor) -> SweepResult:
    """The naive ablation loop with 4.x semantics, no gradients: one eager pass over the data without a mask (the
    baseline), then one per mask of ``masks`` ``[M, L, H]``. Scores and mean batch losses per mask."""
    device = next(model.parameters()).device
    outcomes = []
    with torch.no_grad(), reference_model(model, entropy=False) as capture:
        for mask in [None, *masks.to(device)]:
            capture.head_mask = mask
            state, loss_sum = task.metric_state(), 0.0
            for batch in batches:
                result = task.evaluate(model, batch)
                task.update_metric(state, result, batch)
                loss_sum += float(result.loss)
            outcomes.append((task.compute_metric(state), loss_sum / max(len(batches), 1)))
        capture.head_mask = None
    (baseline_score, baseline_loss), rest = outcomes[0], outcomes[1:]
    scores = torch.tensor([score for score, _ in rest], dtype=torch.float64)
    losses = torch.tensor([loss for _, loss in rest], dtype=torch.float64)
    return SweepResult(kind="masks", masks=masks.cpu(), scores=scores, losses=losses,
                       baseline_score=baseline_score, baseline_loss=baseline_loss,
                       higher_is_better=bool(task.higher_is_better), metric_name=str(task.metric_name),
                       batches=len(batches))


def _cache_hook(cache: dict, layer: int):
    def hook(module, args):
        cache[layer] = args[0]
    return hook


def _write_hook(source: torch.Tensor, head: int, heads: int):
    """A pre-hook that writes head ``head``'s slice of ``source`` (``[..., H*D]``) into the projection's input."""
    dim = source.shape[-1] // heads
    columns = slice(head * dim, (head + 1) * dim)

    def hook(module, args):
        patched = args[0].clone()
        patched[..., columns] = source[..., columns]
        return (patched, *args[1:])
    return hook


def reference_patching(model, batches: Sequence[dict], task) -> tuple[torch.Tensor, float, float]:
    """Activation patching (denoising) the TransformerLens way, on 4.x eager attention, no gradients: per batch
    (paired with ``corrupted_input_ids``), the clean run's input of every output projection is cached by forward
    pre-hooks, the corrupted run gives the baseline, then the corrupted input runs once per head with a pre-hook
    writing that head's slice of the cached clean input. Every run is scored against the clean targets. Returns
    ``(mean batch loss per head [L, H], clean loss, corrupted loss)``."""
    counts = heads_per_layer(model)
    layers, heads = len(counts), counts[0]
    projections = [operator.attrgetter(architecture(model).projections_of(model.config).output)(block)
                   for block in attention_blocks(model)]
    losses = torch.zeros(layers, heads, dtype=torch.float64)
    clean_loss = corrupted_loss = 0.0
    with torch.no_grad(), reference_model(model, entropy=False):
        for batch in batches:
            cache: dict[int, torch.Tensor] = {}
            hooks = [module.register_forward_pre_hook(_cache_hook(cache, layer))
                     for layer, module in enumerate(projections)]
            try:
                clean_loss += float(task.evaluate(model, model_inputs(batch, corrupted=False)).loss)
            finally:
                for hook in hooks:
                    hook.remove()
            corrupted = model_inputs(batch, corrupted=True)  # scored against the clean targets, as the library does
            corrupted_loss += float(task.result(task.forward(model, corrupted), batch).loss)
            for layer, module in enumerate(projections):
                for head in range(heads):
                    hook = module.register_forward_pre_hook(_write_hook(cache[layer], head, heads))
                    try:
                        losses[layer, head] += float(task.result(task.forward(model, corrupted), batch).loss)
                    finally:
                        hook.remove()
    count = max(len(batches), 1)
    return losses / count, clean_loss / count, corrupted_loss / count

"""Language modelling (the registry's causal language models): :class:`LanguageModelingTask`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..architectures import architecture
from ..packing import plan_packing, planned_on_host
from .base import Task, TaskResult, _at_least_float32, _mask_kwargs, _model_inputs

DECODER_TEXT = ("decoder_input_ids", "decoder_attention_mask")  # an encoder-decoder model's text (its decoder's)


@dataclass
class PredictedLogits:
    """Language-model logits at some positions only: ``logits [K, V]``. What :class:`LanguageModelingTask`
    computes instead of ``[B, N, V]`` when it can: no vocabulary projection for padding. ``positions [B, N]``
    (bool): the positions that predict a counted token. ``index``: None, and the logits are those of the K
    ``positions`` in row-major order (selected by the boolean mask, which reads the count back); or int64 ``[K]``,
    the row-major positions ``b * N + n`` the logits belong to, a superset of ``positions`` known without reading the
    device (:func:`_projected_rows`: the batch's real tokens), whose other rows' targets are ignored."""

    logits: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor | None = None

    def split(self, k: int) -> list[PredictedLogits]:
        """k outputs for k equal row blocks of ``positions`` (reads the blocks' row counts back)."""
        batch, length = self.positions.shape
        if batch % k:
            raise ValueError(f"output batch {batch} is not a multiple of the {k} copies")
        blocks, rows = self.positions.chunk(k, dim=0), batch // k
        if self.index is None:
            parts = self.logits.split([int(block.sum()) for block in blocks], dim=0)
            return [PredictedLogits(part, block) for part, block in zip(parts, blocks)]
        copy = torch.div(self.index, rows * length, rounding_mode="floor")  # [K] the copy each row belongs to
        return [PredictedLogits(self.logits[copy == j], block, self.index[copy == j] - j * rows * length)
                for j, block in enumerate(blocks)]


@dataclass
class PredictedLosses:
    """Token losses at some positions only: ``losses [K]`` (float32 or wider, 0 where the target is ignored), at
    the rows :class:`PredictedLogits` describes; what the chunked loss computes (no logits are kept)."""

    losses: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor | None = None

    def split(self, k: int) -> list[PredictedLosses]:
        """k outputs for k equal row blocks of ``positions``."""
        parts = PredictedLogits(self.losses, self.positions, self.index).split(k)
        return [PredictedLosses(part.logits, part.positions, part.index) for part in parts]


def _projected_rows(batch: dict, size: int, length: int, device: torch.device) -> torch.Tensor | None:
    """int64 ``[K]`` positions ``b * N + n`` (``[B, N] = [size, length]``) to project, a superset of those that
    predict a token, known without reading the device: every position without an attention mask or padding, else
    the packed tokens of the padding-free plan made on the host (:func:`~fastbertology.packing.planned_on_host`:
    the real tokens in row-major order; in a CUDA-graph bucket also its filler, on padding positions). Their
    number depends on the batch's shapes only where the batch is a bucket's, which a captured graph needs. None
    with explicit ``labels`` (they may count any position) or a mask without a plan made on the host."""
    if "labels" in batch or "input_ids" not in batch:
        return None
    mask = batch.get("attention_mask")
    if mask is not None and not planned_on_host(mask):
        return None
    plan = None if mask is None else plan_packing(mask)
    if plan is None:
        return torch.arange(size * length, device=device)
    return plan.index.to(device)


def _at(values: torch.Tensor, positions: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``values [B, N, ...]`` at ``index`` ``[K]`` (positions ``b * N + n``), or without one at the True
    ``positions [B, N]`` in row-major order: ``[K, ...]``."""
    if index is None:
        return values[positions]
    return values.reshape(-1, *values.shape[2:]).index_select(0, index)


def _chunk_losses(projection: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL ``[k]`` of ``targets [k]`` under ``projection(hidden [k, D])`` (logits ``[k, V]`` in float32 or wider)."""
    return F.cross_entropy(_at_least_float32(projection(hidden)), targets, reduction="none")


def chunked_token_losses(projection: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """NLL ``[K]`` of ``targets [K]`` given final hidden states ``hidden [K, D]``, ``chunk`` tokens at a time.

    With autograd on, each chunk runs under ``torch.utils.checkpoint``: its logits ``[chunk, V]`` are dropped after
    its losses are taken and recomputed, one chunk at a time, in the backward, so that no ``K x V`` tensor (logits,
    probabilities or their gradient) ever exists whole. The gradient of every chunk flows back to ``hidden``."""
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        rows, wanted = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_losses, projection, rows, wanted, use_reentrant=False))
        else:
            parts.append(_chunk_losses(projection, rows, wanted))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _output_projection(model) -> torch.nn.Linear | None:
    """The vocabulary projection of a causal LM whose logits are exactly ``projection(base model hidden states)``
    (the registry's ``causal_lm`` families), else None: also for a model that soft-caps its logits after the
    projection (Gemma 3's ``final_logit_softcapping``)."""
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if not isinstance(projection, torch.nn.Linear) or base is model:
        return None
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        return None
    try:
        causal_lm = architecture(model).causal_lm
    except ValueError:
        return None
    return projection if causal_lm else None


def chunkable_vocabulary(task, model) -> int | None:
    """The vocabulary size of ``model``'s LM head when ``task`` is language modelling whose loss it can compute in
    chunks (:class:`LanguageModelingTask` on a registry causal LM); else None."""
    projection = _output_projection(model) if isinstance(task, LanguageModelingTask) else None
    return None if projection is None else projection.out_features


class LanguageModelingTask(Task):
    """Causal language modelling: ``model(input_ids, attention_mask).logits [B, N, V]``; token t+1 is predicted
    from tokens <= t. For the registry's causal LMs (``causal_lm``), :meth:`forward` runs the base model and applies
    the vocabulary projection only at the positions that predict a counted token (:class:`PredictedLogits`): the
    same numbers, without the projection (the largest layer of a small LM) for padding.

    Targets: ``batch["labels"] [B, N]`` if present (ignored positions -100), else ``input_ids`` with padding
    (``attention_mask == 0``) set to -100. The shift happens here; the model is not given labels.

    Encoder-decoder models (Whisper's speech recognition; batches with ``decoder_input_ids``): the decoder's text
    is modelled given the encoder's input (the batch's model inputs: ``input_features``, or ``input_ids``), teacher
    forced: ``model(<encoder inputs>, decoder_input_ids, decoder_attention_mask).logits [B, N, V]``, token t+1 of
    ``decoder_input_ids`` predicted from its tokens <= t (padding: ``decoder_attention_mask == 0``). That is the
    sequence-to-sequence loss, without the prediction of the decoder's first (start) token.
    loss:           total NLL of the counted tokens of the batch / their number (transformers' LM loss).
    example_losses: ``[B]`` each example's mean NLL over its counted tokens (0 for an example with none).
    metric:         ``"perplexity"`` = exp(total token NLL / total counted tokens) over the whole data; lower is
                    better. Also reported: ``"nll"`` (mean per token) and ``"tokens"``.

    ``loss_chunk_tokens``: with a causal LM's projection, compute the losses this many predicted tokens at a time
    (:func:`chunked_token_losses`: no ``tokens x vocabulary`` tensor is ever whole; the same losses); None: at once.
    """

    name = "language_modeling"
    metric_name = "perplexity"
    higher_is_better = False
    # the projected rows are the packed tokens of the batch's plan (a bucket's: fixed shapes), the metric is updated
    # in place: steps replay as CUDA graphs (batches with explicit labels select by a boolean mask: eagerly)
    cuda_graph_refusal = None

    def __init__(self, loss_chunk_tokens: int | None = None):
        if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be a positive number of tokens, got {loss_chunk_tokens}")
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, model, batch, *, head_mask=None):
        if DECODER_TEXT[0] in batch:  # encoder-decoder: the encoder's inputs and the decoder's text
            inputs = _model_inputs(batch) | {key: batch[key] for key in DECODER_TEXT if key in batch}
            return model(**inputs, **_mask_kwargs(head_mask))
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
        projection = _output_projection(model)
        if projection is None:
            return model(**inputs, **_mask_kwargs(head_mask))
        hidden = model.base_model(**inputs, **_mask_kwargs(head_mask)).last_hidden_state  # [B, N, D]
        labels = self.targets(batch).to(hidden.device)
        positions = self._predicting(labels)  # [B, N]
        index = _projected_rows(batch, *labels.shape, hidden.device)
        chunk = self.loss_chunk_tokens
        if chunk is not None and positions.numel() > chunk:
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t+1
            losses = chunked_token_losses(projection, _at(hidden, positions, index), _at(shifted, positions, index),
                                          chunk)
            return PredictedLosses(losses, positions, index)
        return PredictedLogits(projection(_at(hidden, positions, index)), positions, index)

    @staticmethod
    def _predicting(labels: torch.Tensor) -> torch.Tensor:
        """bool ``[B, N]``: position t predicts a counted token t+1 (the last position predicts nothing)."""
        return F.pad(labels[:, 1:], (0, 1), value=-100) != -100

    def split(self, output, k):
        if isinstance(output, (PredictedLogits, PredictedLosses)):
            return output.split(k)
        return super().split(output, k)

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """``[B, N]`` target ids: ``batch["labels"]`` or the modelled text (``input_ids``; ``decoder_input_ids`` for
        encoder-decoder batches) with padding set to -100."""
        ids, mask = DECODER_TEXT if DECODER_TEXT[0] in batch else ("input_ids", "attention_mask")
        if "labels" in batch and batch["labels"].shape == batch[ids].shape:
            return batch["labels"]
        if mask in batch:  # (masked_fill: an index assignment by a boolean mask would read the count back)
            return batch[ids].masked_fill(batch[mask] == 0, -100)
        return batch[ids].clone()

    def result(self, output, batch):
        if isinstance(output, (PredictedLogits, PredictedLosses)):
            return self._predicted_result(output, batch)
        logits = output.logits if hasattr(output, "logits") else output  # [B, N, V]
        batch_size, length, vocab = logits.shape
        labels = self.targets(batch).to(logits.device)  # [B, N]
        # Shift the labels, not the logits (no copy of the [B, N, V] logits): position t predicts token t+1.
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, N], the last position predicts nothing
        token_losses = F.cross_entropy(_at_least_float32(logits).reshape(-1, vocab), shifted.reshape(-1),
                                       ignore_index=-100, reduction="none")
        token_losses = token_losses.view(batch_size, length)[:, :-1]  # [B, N-1], 0 where ignored
        token_mask = shifted[:, :-1] != -100  # [B, N-1]
        counts = token_mask.sum(-1)  # [B]
        example_losses = token_losses.sum(-1) / counts.clamp(min=1)
        loss = token_losses.sum() / counts.sum().clamp(min=1)
        return TaskResult(loss=loss, example_losses=example_losses, logits=logits, token_losses=token_losses,
                          token_mask=token_mask)

    def _predicted_result(self, output: PredictedLogits | PredictedLosses, batch) -> TaskResult:
        """The same losses from logits (or losses) at the predicted positions only."""
        positions = output.positions
        if isinstance(output, PredictedLosses):
            losses, logits = output.losses, None
        else:
            labels = self.targets(batch).to(output.logits.device)  # [B, N]
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, N], position t predicts token t+1
            logits = output.logits
            losses = F.cross_entropy(_at_least_float32(logits), _at(shifted, positions, output.index),
                                     ignore_index=-100, reduction="none")  # [K], 0 where nothing is predicted
        if output.index is None:
            token_losses = losses.new_zeros(positions.shape).masked_scatter(positions, losses)
        else:
            token_losses = losses.new_zeros(positions.numel()).index_copy(0, output.index, losses).view_as(positions)
        token_losses = token_losses[:, :-1]  # [B, N-1]
        token_mask = positions[:, :-1]
        counts = token_mask.sum(-1)
        return TaskResult(loss=losses.sum() / counts.sum().clamp(min=1),
                          example_losses=token_losses.sum(-1) / counts.clamp(min=1), logits=logits,
                          token_losses=token_losses, token_mask=token_mask)

    def metric_state(self):
        return {"nll": 0.0, "tokens": 0}

    def update_metric(self, state, result, batch):
        """Sums on the device (0-d tensors after the first batch, updated in place from then on): no host-device
        sync, and a CUDA graph replays the update. ``token_losses`` is 0 where nothing is predicted."""
        for key, value in (("nll", result.token_losses.detach().double().sum()), ("tokens", result.token_mask.sum())):
            current = state[key]
            if isinstance(current, torch.Tensor) and current.device == value.device and current.dtype == value.dtype:
                current.add_(value)
            else:
                state[key] = current + value

    def compute_metrics(self, state):
        tokens = int(state["tokens"])
        if tokens == 0:
            raise ValueError("no tokens were accumulated: perplexity is undefined")
        nll = float(state["nll"]) / tokens
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": float(tokens)}

"""Masked multi-head attention with per-head statistics (installed as ``fastbertology.kernels``).

torch and triton only, never transformers. One contract, several backends:

    out, stats = attention(q, k, v, head_mask=None, key_padding_mask=None, causal=False, scale=None,
                           return_probs=False, packing=None, window=None, relative_bias=None,
                           alibi_slopes=None, softcap=None, sinks=None, output_layout="bhnd", backend="auto")

* ``q``: ``[B, H, N, D]``; ``k, v``: ``[B, H_kv, N, D]`` with ``H_kv`` dividing ``H`` (``H_kv = H``: multi-head
  attention; fewer: grouped-query attention, ``H_kv = 1``: multi-query), query head ``h`` reading key/value head
  ``h // (H // H_kv)``; any strides, one floating dtype. No backend but the reference repeats K/V in memory; the
  gradients of ``k, v`` have their shape (summed over the query heads of the group). With ``packing``
  (:class:`Packing`), ``[1, H, T, D]`` / ``[1, H_kv, T, D]``: S sequences stored one after another without padding;
  attention stays within each sequence.
* ``head_mask``: ``[H]`` or ``[B, H]`` (packed: ``[S, H]``) floats, one value per *query* head; multiplies each
  head's post-softmax probabilities (so its output). Differentiable: the gradient is ``sum_i sum_d dO * (P V)``.
* ``key_padding_mask``: bool ``[B, N]``, True = keep the key (not with ``packing``).
* ``causal``: query i sees keys j <= i (of its own sequence).
* ``window``: None, or sliding-window (local) attention: query i sees keys j with ``i - window < j`` and ``j <= i``
  (causal; transformers' ``sliding_window`` of Mistral, Qwen2, Gemma2: ``window`` keys including itself) or
  ``j < i + window`` (not causal: ``|i - j| < window``, what transformers' bidirectional models such as ModernBERT
  hand the attention function as ``sliding_window``, their mask being ``|i - j| <= config.sliding_window``).
  Positions are those of the sequence (packed: from its first token).
* ``scale``: softmax scale, default ``D ** -0.5``.
* Score modifiers (:mod:`~fastbertology.kernels.modifiers`), all None by default, for query ``i`` and key ``j`` of
  one sequence: ``s_ij = cap(scale * q_i . k_j) + relative_bias[h, (j - i) + M - 1] + alibi_slopes[h] * (j - i)``
  with ``cap(x) = softcap * tanh(x / softcap)``; then the padding / causal / window masks; then the softmax, whose
  denominator holds one more logit ``sinks[h]`` (value zero) when given. ``relative_bias``: ``[H, 2M - 1]`` with
  ``M`` >= the longest sequence (T5's bucketed tables, a local window of 0 / ``-inf``); ``alibi_slopes``,
  ``sinks``: ``[H]``; ``softcap``: a float > 0. With ``sinks``, ``stats.lse`` is the log-sum-exp including the
  sink logit and ``entropy`` / ``max_prob`` describe the distribution over the keys and the sink. Frozen
  parameters in the analyses; when they require grad the reference and torch backends give their exact gradients,
  Triton those of the sinks (it refuses a bias table or slopes that require grad).
* ``out``: ``[B, H, N, D]`` in the input dtype (``output_layout="bnhd"``: ``[B, N, H, D]``, what transformers'
  attention functions return; the Triton kernels write it so, the other backends transpose a view).
* ``stats``: :class:`AttentionStats` (``lse, entropy, max_prob`` ``[B, H, N]`` float32, of the softmax before the
  head mask; ``probs`` ``[B, H, N, N]``, the probabilities times the head mask in the input dtype, only with
  ``return_probs=True`` and not with ``packing``).
* ``backend``: ``"auto"`` (Triton for CUDA tensors, PyTorch otherwise), ``"torch"``, ``"triton"`` (on CPU
  tensors it needs ``TRITON_INTERPRET=1`` set before triton is imported), or ``"reference"``.
"""

from __future__ import annotations

import torch

from .common import AttentionStats, Packing, check_output_layout
from .modifiers import ScoreModifiers
from .reference import attention_reference
from .torch_attention import attention_torch

BACKENDS = ("auto", "torch", "triton", "reference")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map ``"auto"`` to a concrete backend for tensors on ``device``; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if getattr(device, "type", str(device)) == "cuda" and triton_available() else "torch"
    return backend


def triton_available() -> bool:
    """True when the Triton kernels can be imported (triton is installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, head_mask: torch.Tensor | None = None,
              key_padding_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
              return_probs: bool = False, packing: Packing | None = None, window: int | None = None,
              relative_bias: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
              softcap: float | None = None, sinks: torch.Tensor | None = None, output_layout: str = "bhnd",
              backend: str = "auto") -> tuple[torch.Tensor, AttentionStats]:
    """Masked multi-head attention with per-head statistics; see the module docstring for the contract."""
    backend = resolve_backend(backend, q.device)
    heads_last = check_output_layout(output_layout)
    options = dict(head_mask=head_mask, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                   return_probs=return_probs, packing=packing, window=window, relative_bias=relative_bias,
                   alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks)
    if backend == "triton":
        from .triton_attention import attention_triton

        return attention_triton(q, k, v, output_layout=output_layout, **options)
    function = attention_reference if backend == "reference" else attention_torch
    out, stats = function(q, k, v, **options)
    return (out.transpose(1, 2) if heads_last else out), stats


__all__ = ["AttentionStats", "Packing", "ScoreModifiers", "attention", "attention_reference", "attention_torch",
           "resolve_backend", "triton_available", "BACKENDS"]

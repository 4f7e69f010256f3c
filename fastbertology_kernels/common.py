"""The result type, the packed-sequence description and the input checks shared by every attention backend."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch


class AttentionStats(NamedTuple):
    """Per (example, head, query) statistics of the attention distribution, all float32.

    lse:      ``[B, H, N]`` log-sum-exp of the (scaled, masked) scores.
    entropy:  ``[B, H, N]`` ``-sum_j p_j log p_j`` over keys.
    max_prob: ``[B, H, N]`` largest probability of the row.
    probs:    ``[B, H, N, N]`` in the dtype of the inputs: the softmax probabilities times the head mask (what
              transformers 4.x returned as attentions), only when asked, else None.

    Rows whose keys are all masked have zero probabilities and zero statistics. ``lse``, ``entropy`` and
    ``max_prob`` describe the head's softmax distribution before the head mask is applied; with attention
    ``sinks`` (:mod:`~fastbertology.kernels.modifiers`) that distribution includes the sink (``lse`` its logit
    too). None of them carries a
    gradient. With packed sequences ``B = 1`` and ``N`` is the total number of tokens.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    max_prob: torch.Tensor
    probs: torch.Tensor | None = None


def row_statistics(entropy: torch.Tensor, max_prob: torch.Tensor) -> torch.Tensor:
    """``entropy`` and ``max_prob`` ``[B, H, N]`` as one ``[2, B, H, N]`` tensor: a view where they are the two
    halves of one buffer, as the Triton backend returns them (so one reduction covers both), else a new tensor."""
    base = entropy._base
    if (base is not None and max_prob._base is base and base.dim() == 4 and base.shape[0] == 2
            and base.shape[1:] == entropy.shape and base.is_contiguous()
            and entropy.data_ptr() == base.data_ptr()
            and max_prob.data_ptr() == base.data_ptr() + base.stride(0) * base.element_size()):
        return base
    return torch.stack((entropy, max_prob))


class Packing(NamedTuple):
    """Sequences of different lengths stored one after another along the token axis, without padding.

    cu_seqlens: int32 ``[S + 1]`` on the device of the packed tensors; sequence ``s`` holds the tokens
                ``cu_seqlens[s] .. cu_seqlens[s + 1] - 1`` (``cu_seqlens[0] = 0``, ``cu_seqlens[S] = T``).
    lengths:    the ``S`` sequence lengths as Python ints (a host copy: backends never synchronise to read them).
    longest:    None, or a bound on the lengths that the launches are planned for (see :attr:`max_seqlen`).

    Attention over packed ``q, k, v`` ``[1, H, T, D]`` stays within each sequence (and is causal within it when
    asked), exactly as padded attention over ``[S, H, max(lengths), D]`` with a key padding mask would be at the
    real tokens; padding rows simply do not exist.
    """

    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    longest: int | None = None  # the launch grid's longest sequence when fixed in advance (>= every length)

    @classmethod
    def from_lengths(cls, lengths, device=None) -> Packing:
        """A packing of sequences with the given lengths (ints >= 0), ``cu_seqlens`` on ``device``."""
        lengths = tuple(int(n) for n in lengths)
        if any(n < 0 for n in lengths):
            raise ValueError(f"sequence lengths must be >= 0, got {lengths}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls(torch.tensor(offsets, dtype=torch.int32, device=device), lengths)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        """T, the number of packed tokens."""
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        """The longest sequence the kernels plan for: ``longest`` when given (a CUDA graph's launches are fixed
        for a bucket of batches), else the longest of ``lengths``."""
        return self.longest if self.longest is not None else max(self.lengths, default=0)

    def starts(self) -> list[int]:
        """Host-side start offset of every sequence."""
        starts, offset = [], 0
        for n in self.lengths:
            starts.append(offset)
            offset += n
        return starts


OUTPUT_LAYOUTS = ("bhnd", "bnhd")


def check_output_layout(output_layout: str) -> bool:
    """Validate ``output_layout``; True for ``"bnhd"`` (heads after the tokens: ``out [B, N, H, D]``)."""
    if output_layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"output_layout must be one of {', '.join(map(repr, OUTPUT_LAYOUTS))}; got {output_layout!r}")
    return output_layout == "bnhd"


def check_inputs(q, k, v, head_mask, key_padding_mask, causal, packing=None, return_probs=False, window=None):
    """Validate shapes, dtypes and devices; return ``(B, H, N, D)`` (with ``packing``: ``(S, H, T, D)``), ``H`` the
    number of query heads. ``k, v`` may have fewer heads than ``q`` (grouped-query attention: ``H_kv`` dividing
    ``H``; query head ``h`` reads key/value head ``h // (H // H_kv)``). Raises ValueError naming the problem and the
    fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, seq, head_dim]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [batch, kv_heads, seq, head_dim]; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            "q and k, v must have the same shape [batch, heads, seq, head_dim] except for the heads (self-attention "
            "over whole sequences; incremental decoding with a cache is not supported); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == 0 and heads != 0 or kv_heads and heads % kv_heads:
        raise ValueError(
            f"q has {heads} heads and k, v have {kv_heads}: grouped-query attention needs the query heads to be a "
            f"multiple of the key/value heads (query head h reads key/value head h // (heads // kv_heads)); pass k, v "
            "with a number of heads that divides q's (repeat them if the model groups heads differently)"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    batch, heads, seq, head_dim = q.shape
    if packing is not None:
        batch = _check_packing(packing, q, key_padding_mask, return_probs)
    if head_mask is not None:
        if not isinstance(head_mask, torch.Tensor) or not head_mask.is_floating_point():
            raise ValueError("head_mask must be a floating-point tensor of shape [heads] or [batch, heads]")
        rows = "sequences" if packing is not None else "batch"
        if tuple(head_mask.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"head_mask must have shape [heads]=({heads},) or [{rows}, heads]=({batch}, {heads}) (one value per "
                f"query head); got {tuple(head_mask.shape)}"
            )
        if head_mask.device != q.device:
            raise ValueError(f"head_mask is on {head_mask.device} but q is on {q.device}; move it with .to(q.device)")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq):
            raise ValueError(
                f"key_padding_mask must be a bool tensor [batch, seq]=({batch}, {seq}) with True = keep; got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(
            f"window must be None (no sliding window) or an int >= 1 (query i sees keys j with i - window < j, and "
            f"j <= i when causal, j < i + window otherwise); got {window!r}"
        )
    return batch, heads, seq, head_dim


def _check_packing(packing, q, key_padding_mask, return_probs) -> int:
    """Checks for packed inputs ``[1, H, T, D]``; returns the number of sequences."""
    if not isinstance(packing, Packing):
        raise ValueError(f"packing must be a fastbertology.kernels.Packing, got {type(packing).__name__}")
    if q.shape[0] != 1 or q.shape[2] != packing.total:
        raise ValueError(
            f"packed q, k, v must be [1, heads, total tokens, head_dim] with total tokens = sum(lengths) = "
            f"{packing.total}; got {tuple(q.shape)}"
        )
    cu = packing.cu_seqlens
    if cu.dim() != 1 or cu.numel() != packing.num_sequences + 1 or cu.dtype != torch.int32 or cu.device != q.device:
        raise ValueError(
            f"packing.cu_seqlens must be int32 [sequences + 1] = [{packing.num_sequences + 1}] on {q.device}; got "
            f"{cu.dtype} {tuple(cu.shape)} on {cu.device} (build it with Packing.from_lengths(lengths, device))"
        )
    if key_padding_mask is not None:
        raise ValueError("packed sequences have no padding: pass key_padding_mask=None with packing")
    if return_probs:
        raise ValueError("return_probs is not available for packed sequences (the maps are [B, H, N, N] per padded "
                         "batch): call without packing to get them")
    return packing.num_sequences

"""Validation and normalisation of model-level head masks."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

# Set inside :func:`checked_head_masks`: the masks of the calls in that block derive from one already checked
_CHECKED = contextvars.ContextVar("fastbertology_head_masks_checked", default=False)


def normalize_head_mask(head_mask, *, heads_per_layer: list[int], device: torch.device) -> torch.Tensor:
    """Check a model-level head mask and return it as ``[L, H]`` or ``[B, L, H]``.

    Accepted shapes (as transformers 4.x, plus a per-example extension): ``[H]`` (same for every layer, expanded
    as a view so gradients still reach the original), ``[L, H]``, ``[B, L, H]``. Values are floats and multiply
    each head's post-softmax probabilities and must be finite (a NaN or infinite entry would silently turn every
    output into NaN). Raises ValueError naming the problem and the fix.
    """
    checked_form(head_mask, heads_per_layer=heads_per_layer, device=device)
    _check_finite(head_mask)
    return _layer_form(head_mask, len(heads_per_layer))


def checked_form(head_mask, *, heads_per_layer: list[int], device: torch.device) -> None:
    """Everything :func:`normalize_head_mask` checks but the values (no device sync): a floating-point tensor on
    ``device``, a model whose layers have equal head counts, and an accepted shape (``[H]``, ``[L, H]``,
    ``[B, L, H]``). ValueError naming the problem and the fix."""
    if not isinstance(head_mask, torch.Tensor):
        raise ValueError(f"head_mask must be a torch.Tensor, got {type(head_mask).__name__}")
    if not head_mask.is_floating_point():
        raise ValueError(
            f"head_mask must be a floating-point tensor (e.g. torch.ones(...)); got dtype {head_mask.dtype}")
    num_layers = len(heads_per_layer)
    if len(set(heads_per_layer)) > 1:
        raise ValueError(
            f"this model's layers have different head counts {heads_per_layer} (it was pruned, or its encoder and "
            "decoder have different head counts); a head mask needs equal counts: mask heads on the unpruned model"
        )
    heads = heads_per_layer[0]
    if head_mask.device != device:
        raise ValueError(
            f"head_mask is on {head_mask.device} but the model is on {device}; pass head_mask.to({str(device)!r})")
    shape = tuple(head_mask.shape)
    if shape not in ((heads,), (num_layers, heads)) and not (len(shape) == 3 and shape[1:] == (num_layers, heads)):
        raise ValueError(
            f"head_mask has shape {shape}; this model takes [heads]=({heads},), [layers, heads]=({num_layers}, "
            f"{heads}) or [batch, layers, heads]=(B, {num_layers}, {heads})")


def pass_head_mask(head_mask, *, heads_per_layer: list[int], device: torch.device) -> torch.Tensor:
    """A caller's base mask for a whole analysis pass, as ``[L, H]`` (``[H]`` expanded as the model expands it),
    detached; its values are checked by the pass (:func:`checked_head_masks`). ValueError naming the problem and the
    fix where :func:`checked_form` finds one, and for a per-example ``[B, L, H]`` mask: one pass runs batches of
    different sizes under one mask (and its importance would be a ``[B, L, H]`` table)."""
    checked_form(head_mask, heads_per_layer=heads_per_layer, device=device)
    if head_mask.dim() == 3:
        raise ValueError(f"head_mask has shape {tuple(head_mask.shape)}; an analysis pass runs every batch under one "
                         f"[layers, heads]=({len(heads_per_layer)}, {heads_per_layer[0]}) mask (or [heads]): for "
                         "per-example masks call the patched model itself")
    return _layer_form(head_mask.detach(), len(heads_per_layer)).contiguous()


def _layer_form(head_mask: torch.Tensor, num_layers: int) -> torch.Tensor:
    """An accepted mask as ``[L, H]`` / ``[B, L, H]`` (``[H]`` expanded as a view)."""
    return head_mask.expand(num_layers, head_mask.shape[0]) if head_mask.dim() == 1 else head_mask


@contextlib.contextmanager
def checked_head_masks(head_mask: torch.Tensor) -> Iterator[None]:
    """Check ``head_mask`` for NaN / infinite entries once (one host-device sync), then skip the per-call check
    inside the block: for analyses whose every call's mask derives from ``head_mask`` (a clone of it that
    requires grad, its rows, a 0/1 mask of the analysis' own), so that no step of the pass synchronises."""
    _check_finite(head_mask)
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def _check_finite(head_mask: torch.Tensor) -> None:
    """ValueError naming the first NaN / infinite entry (one device sync per forward pass; skipped while
    torch.compile traces, where a data-dependent check would break the graph, and inside
    :func:`checked_head_masks`)."""
    if torch.compiler.is_compiling() or _CHECKED.get():
        return
    finite = torch.isfinite(head_mask.detach())
    if not bool(finite.all()):
        bad = tuple(int(i) for i in (~finite).nonzero()[0].tolist())
        value = float(head_mask.detach()[bad])
        raise ValueError(f"head_mask contains NaN or infinite values (e.g. {value} at index {bad}); a head mask "
                         "must be finite (1 = keep a head, 0 = mask it)")


def head_mask_rows(head_mask: torch.Tensor, batch: int, sequences: int | None = None) -> tuple[torch.Tensor, ...]:
    """A normalised ``[L, H]`` / ``[B, L, H]`` mask -> its ``L`` rows as the kernels take them, ``[B, H]`` each
    (contiguous, the mask's dtype): one copy per model call, so that no layer slices or copies the mask and the
    backward gathers the rows' gradients in one ``stack`` (and one sum over the batch for ``[L, H]``).
    ``sequences`` S > B: rows ``[S, H]``, ones for the packed sequences after the B examples (filler)."""
    if head_mask.dim() == 3 and head_mask.shape[0] != batch:
        raise ValueError(
            f"per-example head_mask has batch size {head_mask.shape[0]} but the inputs have batch size {batch}"
        )
    full = head_mask.expand(batch, *head_mask.shape[-2:]) if head_mask.dim() == 2 else head_mask  # [B, L, H]
    if sequences is not None and sequences > batch:
        full = torch.cat([full, full.new_ones(sequences - batch, *full.shape[1:])])  # [S, L, H]
    return full.transpose(0, 1).contiguous().unbind(0)

"""Per-layer activation checkpointing of a patched model: each transformer layer keeps only its input for the
backward and recomputes its forward there (``torch.utils.checkpoint``, non-reentrant).

The patch keeps per-call state (:class:`~fastbertology.patching.PatchState`): the call's head mask, its packing
plan and the layer application running now. The backward runs after the model call has returned, when that state
has been reset; so each checkpointed layer remembers, at its forward, the call context and its application, and
its recomputation runs with them restored (``state.replaying`` set). The recomputed forward records no statistics
(they were recorded when the layer first ran: every statistic is counted once) and the layer pre-hooks (cursor,
packing) do not run again: the wrapper replaces the layer's ``forward``, inside ``Module.__call__``, so the hooks
ran once, before the checkpointed region, and the recomputation sees the arguments they produced.

Layers are not checkpointed while attention hooks are registered (:mod:`fastbertology.attention_hooks`): a hook
would see the recomputed call a second time. Nor without autograd (nothing to keep).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from .architectures import stack_layers


@contextlib.contextmanager
def _replaying(state, context, application: int | None, stack: int) -> Iterator[None]:
    """Run a recomputation inside the call ``context`` it was made in, at layer ``application`` of ``stack``."""
    previous = state.context, state.replaying, context.application, context.stack
    state.context, state.replaying = context, True
    context.application, context.stack = application, stack
    try:
        yield
    finally:
        state.context, state.replaying, context.application, context.stack = previous


def _checkpointed_forward(state, forward):
    """``forward`` of one layer, run under ``torch.utils.checkpoint`` when gradients are being recorded."""
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled() or state.attention_hooks or state.replaying:
            return forward(*args, **kwargs)
        context = state.context
        application, stack = context.application, context.stack
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(),
                                              _replaying(state, context, application, stack)),
                          **kwargs)

    return checkpointed


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Checkpoint every transformer layer of the patched ``model`` inside the block (nothing when not ``enabled``).
    Results (outputs, head-mask gradients, statistics) are those of the plain forward; what the backward keeps per
    layer is the layer's input ``[B, N, D]`` (packed: ``[1, T, D]``) instead of its activations."""
    state = getattr(model, "_fastbertology_state", None)
    if state is None:
        raise RuntimeError("checkpointed_layers() needs a patched model: call fastbertology.patch(model) first")
    if not enabled:
        yield model
        return
    modules = {id(layer): layer for layers in stack_layers(model) for layer in layers}.values()
    undo = []
    try:
        for module in modules:
            own = vars(module).get("forward")  # an instance-level forward (e.g. a pruned layer's) is kept
            module.forward = _checkpointed_forward(state, module.forward)
            undo.append((module, own))
        yield model
    finally:
        for module, own in undo:
            if own is None:
                del module.forward
            else:
                module.forward = own

"""What happens to a patched model when it is copied, moved, pickled or compiled.

* ``copy.deepcopy`` (of the model or of any module inside it) gives an independent, correctly patched copy: every
  hook of the patch is a :class:`StateHook`, which a deep copy rebinds to the copy's patch state (``deepcopy``
  maps the state through its memo, so the model's hooks, its base model's, its layers' and its attention modules'
  all reach the same new state). The copy has no :class:`~fastbertology.PatchHandle`; removing the original's patch
  leaves it patched.
* ``.to(device)``, ``.to(dtype)``, ``.half()``, ``.double()`` change parameters in place: the patch is untouched.
* Pickling (``pickle``, ``torch.save(model)``, sending the model to another process) is refused with the reason:
  hooks are functions of this process. Save the weights instead (``save_pretrained`` / ``state_dict``) and patch
  after loading.
* ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` are refused with the reason: the patch keeps per-call
  state in Python objects that its hooks change during the call, which captured graphs do not replay (and compiling
  costs minutes on a CPU).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

PICKLE_REFUSAL = (
    "a model patched by fastbertology cannot be pickled (pickle, torch.save(model), multiprocessing): its hooks "
    "belong to this process. Remove the patch first (handle.remove()), save the weights (model.save_pretrained(...) "
    "or torch.save(model.state_dict(), ...)), and call fastbertology.patch(model) again after loading"
)

COMPILE_REFUSAL = (
    "a model patched by fastbertology cannot run under torch.compile, torch.export or torch.jit.trace: the patch "
    "keeps each call's head mask and padding plan in Python state that its hooks change during the call, which a "
    "captured graph does not replay. Call the patched model itself (not torch.compile(model)), or remove the patch "
    "(handle.remove()) before compiling"
)


class StateHook:
    """A module hook ``make(state, *args)`` bound to one patch state, that follows the model through copies.

    ``copy.deepcopy`` of a module carrying it gives a hook made again for the copied state (the same object the
    copied model and its attention modules hold); pickling raises ``TypeError`` with :data:`PICKLE_REFUSAL`.
    """

    def __init__(self, make, state, *args):
        self.make = make
        self.state = state
        self.args = args
        self.hook = make(state, *args)

    def __call__(self, *args, **kwargs):
        return self.hook(*args, **kwargs)

    def __deepcopy__(self, memo):
        return StateHook(self.make, copy.deepcopy(self.state, memo), *self.args)

    def __reduce_ex__(self, protocol):
        raise TypeError(PICKLE_REFUSAL)


def refuse_torch_compile() -> None:
    """RuntimeError (:data:`COMPILE_REFUSAL`) when the patched model is called inside ``torch.compile`` or
    ``torch.export`` (TorchDynamo), or while ``torch.jit.trace`` records it (a trace would freeze one call's
    padding plan and head mask into the graph).

    While TorchDynamo traces, a raise only breaks the graph and the code runs again eagerly; there, the frame
    evaluation callback that Dynamo installs for the compiled call is still set, which is how the eager run knows.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        raise RuntimeError(COMPILE_REFUSAL)
    if _EVAL_FRAME_CALLBACK is not None and _EVAL_FRAME_CALLBACK() not in (None, False):
        raise RuntimeError(COMPILE_REFUSAL)


# Dynamo's current frame evaluation callback (None outside compiled code); looked up once, and called directly (a
# Python function around it would be one more frame for Dynamo to trace)
_EVAL_FRAME_CALLBACK = getattr(getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None),
                               "get_eval_frame_callback", None)


def copy_state(state, memo: dict, fresh_context):
    """The deep copy of a :class:`~fastbertology.patching.PatchState`: the same architecture entry (immutable), no
    recorders (a ``record()`` block of the original does not collect the copy's passes), a fresh call context, and
    every other field deep-copied (the model through ``memo``: the copy's model). Registered in ``memo`` before
    anything is copied (the model refers back to its state)."""
    copied = object.__new__(type(state))
    memo[id(state)] = copied
    fresh = {"entry": state.entry, "recorders": [], "context": fresh_context(), "depth": 0, "step_runners": {}}
    names = [item.name for item in dataclasses.fields(state)]
    # the model last: copying it makes the copied hooks, which read the other fields of the copied state
    for name in sorted(names, key=lambda name: name == "model"):
        value = fresh[name] if name in fresh else copy.deepcopy(getattr(state, name), memo)
        object.__setattr__(copied, name, value)
    return copied

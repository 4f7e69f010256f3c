"""Loading safetensors checkpoints one shard at a time, straight into the requested dtype: :func:`load_by_shards`.

transformers' ``from_pretrained`` builds the model on the meta device and converts each weight to the requested
dtype, but it keeps every shard of the checkpoint memory-mapped until the end: the pages it read stay in the
process's resident memory, so loading a float32 checkpoint as bfloat16 peaks near the file's size plus the
weights (2.5-3x the bfloat16 weights, measured), and a bfloat16 checkpoint near twice its size. Here the model's
parameters are created on the meta device (buffers as usual: rotary frequencies, position ids), and each shard is
opened, its tensors converted to ``dtype`` and assigned to the model, and closed before the next one is opened:
the peak is the weights plus one shard (``tests/test_shard_loading.py`` checks <= 1.3x the weights).

Only checkpoints whose keys are exactly the model's own (what ``save_pretrained`` of this transformers writes; the
names Llama-class checkpoints on the hub use) take this path; :func:`load_by_shards` returns None for anything
else (renamed legacy keys, a base model's checkpoint under a task model, missing weights) and the caller falls
back to ``from_pretrained``, which knows every conversion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter a module registers is created on the meta device (no memory); buffers
    are created as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None:
            moved = module._parameters[name].to("meta")
            module._parameters[name] = type(parameter)(moved, requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _saved_keys(files: list[str]) -> dict[str, list[str]]:
    from safetensors import safe_open

    keys = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys[file] = list(handle.keys())
    return keys


def load_by_shards(model_class, config, files: list[str], *, dtype: torch.dtype) -> nn.Module | None:
    """``model_class`` built from ``config`` with the weights of the safetensors ``files`` in ``dtype``, loaded one
    file at a time (see the module docstring); None when the checkpoint's keys are not exactly the model's (the
    caller then uses ``from_pretrained``). Floating-point weights are converted to ``dtype``; others kept."""
    from safetensors import safe_open

    saved = _saved_keys(files)
    with parameters_on_meta():
        model = model_class.from_config(config, dtype=dtype)
    expected = dict(model.named_parameters(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))
    names = [key for keys in saved.values() for key in keys]
    if len(set(names)) != len(names) or not set(names) <= persistent:
        return None
    for file, keys in saved.items():
        with safe_open(file, framework="pt") as handle:
            part = {}
            for key in keys:
                tensor = handle.get_tensor(key)  # a view of the mapped file: copied, so that closing unmaps it
                part[key] = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
                del tensor
        model.load_state_dict(part, strict=False, assign=True)
        del part
    model.tie_weights()
    if any(parameter.is_meta for parameter in model.parameters()) or \
            any(name not in names and expected[name].is_meta for name in expected):
        return None
    return model.eval()

"""Loading safetensors checkpoints one shard at a time, straight into the requested dtype: :func:`load_by_shards`.

transformers' ``from_pretrained`` builds the model on the meta device and converts each weight to the requested
dtype, but it keeps every shard of the checkpoint memory-mapped until the end: the pages it read stay in the
process's resident memory, so loading a float32 checkpoint as bfloat16 peaks near the file's size plus the
weights (2.2-2.5x the bfloat16 weights, measured). Here the model's parameters are created on the meta device
(buffers as usual: rotary frequencies, position ids), and each shard is opened, its tensors read (converted to
``dtype`` where needed) and assigned to the model, and closed before the next one is opened: the peak is the
weights plus, when converting, one shard's pages (``tests/test_shard_loading.py`` checks <= 1.3x the weights).

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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _saved_keys(files: list[str], dtype: torch.dtype) -> tuple[dict[str, tuple[list[str], bool]], dict]:
    """Per file: its tensor names, and whether any floating-point one is saved in another dtype than ``dtype``; and
    every tensor's shape (read from the headers only)."""
    from safetensors import safe_open

    wanted = _SAFETENSORS_DTYPES.get(dtype)
    saved, shapes = {}, {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            keys = list(handle.keys())
            slices = {key: handle.get_slice(key) for key in keys}
            dtypes = {piece.get_dtype() for piece in slices.values()}
            shapes.update({key: tuple(piece.get_shape()) for key, piece in slices.items()})
        saved[file] = (keys, any(d in _FLOATING and d != wanted for d in dtypes))
    return saved, shapes


def _open(file: str, *, converting: bool):
    """``(handle, mapped)`` for reading the safetensors ``file``. Tensors converted to another dtype are read from
    the memory-mapped file (its pages are this process's memory only until the file is closed, and the converted
    copy is the only new allocation); tensors kept as they are with ``pread``, straight into their own memory (the
    file's pages never count as this process's). Older safetensors (no ``backend``): mapped."""
    from safetensors import safe_open

    if not converting:
        try:
            return safe_open(file, framework="pt", backend="pread"), False
        except TypeError:
            pass
    return safe_open(file, framework="pt"), True


def load_by_shards(model_class, config, files: list[str], *, dtype: torch.dtype) -> nn.Module | None:
    """``model_class`` built from ``config`` with the weights of the safetensors ``files`` in ``dtype``, loaded one
    file at a time (see the module docstring); None when the checkpoint's keys are not exactly the model's (the
    caller then uses ``from_pretrained``, which also explains a checkpoint whose shapes are not the config's).
    Floating-point weights are converted to ``dtype``; others kept."""
    saved, shapes = _saved_keys(files, dtype)
    with parameters_on_meta():
        model = model_class.from_config(config, dtype=dtype)
    expected = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict(keep_vars=True)
    names = [key for keys, _ in saved.values() for key in keys]
    if len(set(names)) != len(names) or not set(names) <= set(state):
        return None
    if any(shapes[key] != tuple(state[key].shape) for key in names):
        return None
    for file, (keys, converting) in saved.items():
        handle, mapped = _open(file, converting=converting)
        with handle:
            part = {}
            for key in keys:
                tensor = handle.get_tensor(key)  # mapped: a view of the file, copied so that closing unmaps it
                part[key] = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=mapped)
                del tensor
        model.load_state_dict(part, strict=False, assign=True)
        del part
    model.tie_weights()
    if any(parameter.is_meta for parameter in model.parameters()) or \
            any(name not in names and expected[name].is_meta for name in expected):
        return None
    return model.eval()

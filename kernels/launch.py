"""Kernel launches with less host work per call.

``kernel[grid](*args, **constexprs)`` makes Triton re-derive the specialisation of every argument, build a cache
key string and look the compiled kernel up on every call. The attention kernels take 40-50 arguments (strides
mostly), and a patched model launches four of them per layer and step: on the H200 machine (Triton 3.6) the
host side of one attention forward + backward took 1.1-1.9 ms while its kernels ran for 0.09-0.6 ms, so the GPU
mostly waited.

:func:`launch` keeps the compiled kernel of each specialisation and launches it directly through its compiled
launcher from the second call on. Its key holds what Triton specialises on (Triton 3.x): per tensor its dtype and
whether its address is 16-byte aligned; per integer whether it is 1, whether it is divisible by 16 and whether it
fits in 32 bits; the type of anything else; every keyword argument (constexprs and launch options); the device.
The first call of each key goes through Triton's own path (which compiles and launches). Set
``FASTBERTOLOGY_TRITON_FAST_LAUNCH=0`` to always take Triton's path. Interpreted kernels (``TRITON_INTERPRET=1``)
and stand-ins that are not ``JITFunction``\\ s (the recorders of the tests and the kernel report) always take it.
"""

from __future__ import annotations

import os

import torch

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - the module is only imported with triton installed
    JITFunction = ()

FAST_LAUNCH = os.environ.get("FASTBERTOLOGY_TRITON_FAST_LAUNCH", "1") != "0"
_INT32 = (-(2**31), 2**31 - 1)
_compiled: dict = {}  # launch key -> compiled kernel


def _specialisation(arg):
    """What Triton's compiled code depends on for one positional argument."""
    kind = type(arg)
    if kind is int:
        return (arg == 1, arg % 16 == 0, _INT32[0] <= arg <= _INT32[1])
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if kind is bool or kind is float:
        return kind
    return (kind, arg)


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The cache key of one launch (see the module docstring)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    return (kernel, device, tuple(map(_specialisation, args)),
            tuple((name, type(value), value) for name, value in kwargs.items()))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled launcher once this specialisation has been compiled.

    ``args`` are the kernel's leading parameters, positionally; ``kwargs`` its remaining parameters (constexprs) by
    name, plus launch options (``num_warps``, ``num_stages``, ...). ``grid`` has 1 to 3 entries."""
    if not (FAST_LAUNCH and isinstance(kernel, JITFunction)):
        kernel[grid](*args, **kwargs)
        return
    key = launch_key(kernel, args, kwargs)
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)  # compiles if needed, and launches
        if callable(getattr(compiled, "run", None)) and hasattr(compiled, "__getitem__"):
            _compiled[key] = compiled
        return
    params = (*args, *(kwargs[name] for name in kernel.arg_names[len(args):]))
    compiled[(*grid, 1, 1)[:3]](*params)

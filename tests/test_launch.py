"""kernels/launch.py: which launches reuse a compiled kernel, and with which parameters (no GPU: Triton's launch path
is replaced by a fake that records what it is asked; the real launches run in tests/test_triton_gpu.py on CUDA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastbertology.kernels import launch as launch_module  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _kernel_source(X, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr):  # noqa: F821, N803
    pass


class FakeCompiled:
    """Stands for a compiled kernel: records the launches made through its launcher."""

    def __init__(self, launches):
        self.launches = launches

    def run(self, *args):  # pragma: no cover - only its presence matters
        raise AssertionError("not called directly")

    def __getitem__(self, grid):
        return lambda *params: self.launches.append(("compiled", grid, params))


@pytest.fixture
def kernel(monkeypatch):
    """A real JITFunction whose Triton launch path is replaced by a recorder; returns (kernel, launches)."""
    monkeypatch.setattr(launch_module, "FAST_LAUNCH", True)
    monkeypatch.setattr(launch_module, "_compiled", {})
    fn = JITFunction(_kernel_source)
    launches = []

    def triton_path(grid):
        def run(*args, **kwargs):
            launches.append(("triton", grid, args, kwargs))
            return FakeCompiled(launches)
        return run

    monkeypatch.setattr(JITFunction, "__getitem__", lambda self, grid: triton_path(grid))
    return fn, launches


def test_second_launch_of_a_specialisation_goes_through_the_compiled_kernel(kernel):
    fn, launches = kernel
    x = torch.zeros(64)
    launch_module.launch(fn, (4, 2), x, 32, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    launch_module.launch(fn, (3,), x, 48, 0.25, BLOCK=16, FLAG=True, num_warps=4)
    assert launches[0] == ("triton", (4, 2), (x, 32, 0.5), {"BLOCK": 16, "FLAG": True, "num_warps": 4})
    # every parameter in signature order, the constexprs included; launch options are not parameters
    assert launches[1] == ("compiled", (3, 1, 1), (x, 48, 0.25, 16, True))


@pytest.mark.parametrize("change", ["n == 1", "n not divisible by 16", "n beyond 32 bits", "unaligned pointer",
                                    "dtype", "constexpr", "launch option", "float as int"])
def test_anything_triton_specialises_on_takes_triton_path_again(kernel, change):
    fn, launches = kernel
    x = torch.zeros(64)
    args, kwargs = [x, 32, 0.5], {"BLOCK": 16, "FLAG": True, "num_warps": 4}
    launch_module.launch(fn, (1,), *args, **kwargs)
    if change == "n == 1":
        args[1] = 1
    elif change == "n not divisible by 16":
        args[1] = 33
    elif change == "n beyond 32 bits":
        args[1] = 2**35
    elif change == "unaligned pointer":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "launch option":
        kwargs["num_warps"] = 8
    else:
        args[2] = 1
    launch_module.launch(fn, (1,), *args, **kwargs)
    assert [entry[0] for entry in launches] == ["triton", "triton"]


def test_stand_ins_and_disabled_fast_path_always_take_triton_path(kernel, monkeypatch):
    fn, launches = kernel
    recorded = []

    class Recorder:  # like the recorders of test_triton_kernels.py and benchmarks/kernel_specs.py
        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append(grid)

    for _ in range(2):
        launch_module.launch(Recorder(), (2,), torch.zeros(4), 16, BLOCK=16, FLAG=False)
    assert recorded == [(2,), (2,)]
    monkeypatch.setattr(launch_module, "FAST_LAUNCH", False)
    for _ in range(2):
        launch_module.launch(fn, (1,), torch.zeros(4), 16, 1.0, BLOCK=16, FLAG=False)
    assert [entry[0] for entry in launches] == ["triton", "triton"]

"""Host census: count what a piece of code would ask of a CUDA device, on a machine without one.

The code runs on CPU tensors, but Python sees some of them as CUDA tensors (the *pretend device*), so that it takes
its CUDA branches (the Triton backend, the sm_90 configuration table) and its host/device boundaries become
visible. Two modes cooperate while :class:`Census` is active:

* a ``TorchFunctionMode`` (every Python-level torch call) that
  - answers ``tensor.device`` with ``cuda:0`` for *device tensors* (and ``cpu`` for the others), ``is_cuda``,
    ``get_device()`` alike;
  - rewrites ``cuda`` device arguments to ``cpu`` before the real (CPU) call and remembers the call's *target*
    (``device`` for ``device=cuda``, ``.cuda()``, ``.to(cuda)``, ``.to(device_tensor)``; ``host`` for
    ``device="cpu"``, ``.cpu()``, ``.to("cpu")``);
  - records host<->device *transfers*: ``.to()`` / ``.cpu()`` / ``.cuda()`` that change a tensor's side (a copy is
    made when the CPU call returned the same storage), ``torch.tensor(data, device=cuda)`` / ``as_tensor``.
    Device to host is a sync; host to device is a sync unless ``non_blocking=True`` (pageable memory: PyTorch's
    CUDA copy synchronises the stream for a blocking copy). ``.tolist()`` / ``.numpy()`` of a device tensor: a sync;
  - remembers, for every autograd node its calls create, the region and layer that created it (for the backward).
* a ``TorchDispatchMode`` (every aten op, forward and backward, after autograd and composite decomposition) that
  classifies each op: *view* (its result aliases an input by the op's schema), *metadata* (``empty*``, ``detach``,
  ``lift_fresh``... : no kernel), *launch* (any other op that touches a device tensor: one CUDA kernel, an
  approximation: a few aten ops launch two), *host op* (only host tensors), *transfer* (a copy across the boundary);
  counts *allocations* (fresh, non-aliasing tensor results; device and host apart) and *syncs*:
  ``_local_scalar_dense`` (``.item()``, ``float()``, ``bool()``) of a device tensor, data-dependent shapes of device
  tensors (``nonzero``, ``masked_select``, ``unique``...), ``copy_`` across the boundary (blocking).

Device tensors are tracked by storage: the tensors given to :meth:`Census.track` (the model's parameters and
buffers, the batch), every fresh result of an op with a device input, every result of a call whose target is the
device, and, in the backward (run by the autograd engine, no Python call around it), every fresh tensor.
``scalar_tensor`` (a Python number wrapped for an op, a CPU tensor on CUDA as well) stays on the host.

Triton launches are recorded, not executed: every object of the ``fastbertology.kernels`` modules (all of them,
scanned by attribute) that comes from Triton and has ``__getitem__`` (a ``@triton.jit`` function, or the
interpreter's wrapper under ``TRITON_INTERPRET=1``) is replaced by a recorder for the census's duration (restored in
``finally``): ``kernel[grid](...)`` and ``kernel.run(...)`` count one launch and do nothing, so the outputs of the
kernels are whatever ``torch.empty`` left there. ``torch.cuda.get_device_capability`` answers (9, 0) (the H100/H200
table), ``current_device`` 0, streams are stream 0, and ``synchronize`` counts a sync (``_cuda_stubs``).

Every op is attributed to a *region* and a *layer*: in the forward by the innermost Python frame outside torch
(and outside this package's census modules): fastbertology's code inside a model call (the patch, its kernels'
launchers, the recording, the head mask) is ``patch``, any other code inside a model call is ``model``, and code
outside every model call (the analysis loop: loss, gradient, metric, accumulators) is ``analysis``; the layer is the
transformer layer whose forward is running (hooks). In the backward an op belongs to the region and layer that
created the running autograd node (``torch._C._current_autograd_node()``); a Python ``autograd.Function`` of
fastbertology is ``patch``. The engine's gradient accumulation counts for the node whose gradient it adds.

Limits: counts describe what the code dispatches, not what a CUDA build would run inside a kernel (an op that
launches two kernels counts one; cuBLAS workspace and caching-allocator behaviour are invisible); code that calls
CUDA runtime functions other than those above (streams, events, raw pointers) fails under the census; syncs
hidden inside the CUDA implementation of an aten op are counted only for the ops listed here (``SYNC_OPS``, and
boolean-mask ``index``/``index_put``); code outside fastbertology that runs inside a model call (a user's hook)
counts as ``model``; host time under the census is meaningless (the modes cost far more than the code): time the
code without them.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

PRETEND = torch.device("cuda", 0)
HOST = torch.device("cpu")
REGIONS = ("patch", "model", "analysis")
_DEVICE_STRING = re.compile(r"^(cpu|cuda)(:\d+)?$")
# aten ops that launch no kernel although they return fresh tensors or change metadata
METADATA_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::lift", "aten::set_", "aten::resize_",
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::requires_grad_", "aten::_has_compatible_shallow_copy_type",
})
# aten ops whose result shape depends on device data: the host waits for the device
SYNC_OPS = frozenset({
    "aten::nonzero", "aten::equal", "aten::bincount", "aten::masked_select", "aten::unique_dim", "aten::_unique",
    "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::repeat_interleave",
})
_CENSUS_MODULES = ("fastbertology.bench.census", "fastbertology.bench.census_step")


@dataclass
class Event:
    """One counted thing: an aten op, a Triton launch, a transfer or a Python-level host read.

    kind:   ``"op"`` (aten op), ``"triton"``, ``"transfer"`` (Python-level copy across the boundary), ``"read"``
            (``tolist``/``numpy``/``torch.cuda.synchronize``).
    name:   aten op name (``aten::add``), kernel name, or the Python call.
    launch: would launch a CUDA kernel; ``allocs``/``host_allocs``: fresh device / host tensors;
    sync:   the host waits for the device; ``location``: ``file:line`` of the innermost fastbertology frame (syncs).
    """

    phase: str
    region: str
    layer: int | None
    kind: str
    name: str
    launch: bool = False
    allocs: int = 0
    host_allocs: int = 0
    sync: bool = False
    view: bool = False
    host_op: bool = False
    transfer: bool = False
    location: str = ""


@dataclass
class Tally:
    """Sums over events: aten ops (every dispatched op, views included), device allocations, GPU launches (torch
    ops + Triton), of which Triton, syncs, host<->device transfers, host-only ops and host allocations."""

    ops: int = 0
    allocs: int = 0
    launches: int = 0
    triton: int = 0
    syncs: int = 0
    transfers: int = 0
    host_ops: int = 0
    host_allocs: int = 0

    def add(self, event: Event) -> None:
        self.ops += event.kind == "op"
        self.allocs += event.allocs
        self.host_allocs += event.host_allocs
        self.launches += event.launch
        self.triton += event.kind == "triton"
        self.syncs += event.sync
        self.transfers += event.transfer
        self.host_ops += event.host_op

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tally(events: Iterable[Event]) -> Tally:
    total = Tally()
    for event in events:
        total.add(event)
    return total


def _storage_key(tensor: torch.Tensor):
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse, nested... : never a device tensor here
        return None


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _device_side(value) -> str | None:
    """``"device"`` / ``"host"`` for a device-like argument (torch.device or a 'cpu'/'cuda[:i]' string), else None."""
    if isinstance(value, torch.device):
        return "device" if value.type == "cuda" else "host"
    if isinstance(value, str) and _DEVICE_STRING.match(value):
        return "device" if value.startswith("cuda") else "host"
    return None


def _to_host_device(value):
    side = _device_side(value)
    if side == "device":
        return HOST if isinstance(value, torch.device) else "cpu"
    return value


@dataclass
class _Frame:
    """What the census knows about the code running now."""

    target: list = field(default_factory=list)  # stack of call targets ("device", "host" or None)
    layer: list = field(default_factory=list)  # stack of running transformer layers
    model_calls: int = 0  # depth of model calls


class Census:
    """Counts, with the pretend device (see the module docstring). Use as a context manager, give it the device
    tensors with :meth:`track`, switch counting on with :meth:`phase`; ``events`` holds what was counted."""

    def __init__(self):
        self.events: list[Event] = []
        self.counting: str | None = None
        self.now = _Frame()
        self._device: set = set()
        self._nodes: dict = {}  # autograd node -> (region, layer), strong references for the census's duration
        self._stack = contextlib.ExitStack()

    # -- public -------------------------------------------------------------------------------------------------
    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Make ``tensors`` (and everything sharing their storage) device tensors."""
        for tensor in tensors:
            self._mark(tensor, "device")

    def is_device(self, tensor: torch.Tensor) -> bool:
        return _storage_key(tensor) in self._device

    @contextlib.contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Count events under ``name`` inside the block (None: track without counting)."""
        previous, self.counting = self.counting, name
        try:
            yield
        finally:
            self.counting = previous

    def enter_layer(self, layer: int) -> None:
        self.now.layer.append(layer)

    def exit_layer(self) -> None:
        if self.now.layer:
            self.now.layer.pop()

    def enter_model(self) -> None:
        self.now.model_calls += 1

    def exit_model(self) -> None:
        self.now.model_calls = max(0, self.now.model_calls - 1)

    def __enter__(self) -> Census:
        stack = self._stack
        stack.enter_context(_cuda_stubs(self))
        stack.enter_context(_triton_recorders(self))
        stack.enter_context(_CensusDispatch(self))  # below the function mode: sees what the calls dispatch
        stack.enter_context(_CensusFunctions(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._nodes.clear()

    # -- bookkeeping used by the modes ---------------------------------------------------------------------------
    def _mark(self, tensor: torch.Tensor, side: str) -> None:
        key = _storage_key(tensor)
        if key is None:
            return
        if side == "device":
            self._device.add(key)
        else:
            self._device.discard(key)

    def _where(self) -> tuple[str, int | None]:
        """(region, layer) of the op being dispatched now."""
        node = torch._C._current_autograd_node()
        if node is not None:
            return self._node_region(node)
        layer = self.now.layer[-1] if self.now.layer else None
        if not self.now.model_calls:
            return "analysis", layer
        return ("patch" if _innermost_owner() == "fastbertology" else "model"), layer

    def _node_region(self, node) -> tuple[str, int | None]:
        known = self._nodes.get(node)
        if known is not None:
            return known
        forward_class = getattr(node, "_forward_cls", None)
        if forward_class is not None and forward_class.__module__.startswith("fastbertology"):
            return "patch", None
        return "model", None

    def _remember_nodes(self, outputs) -> None:
        """Give every autograd node reachable from ``outputs`` and not yet seen the current region and layer."""
        if not any(t.grad_fn is not None for t in _tensors(outputs)):
            return
        region, layer = self._where()
        pending = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or node in self._nodes:
                continue
            forward_class = getattr(node, "_forward_cls", None)
            own = "patch" if forward_class is not None and forward_class.__module__.startswith("fastbertology") \
                else region
            self._nodes[node] = (own, layer)
            pending.extend(parent for parent, _ in node.next_functions)

    def _record(self, kind: str, name: str, **flags) -> None:
        if self.counting is None:
            return
        region, layer = self._where()
        location = _fastbertology_location() if flags.get("sync") else ""
        self.events.append(Event(self.counting, region, layer, kind, name, location=location, **flags))


def _module_of(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _innermost_owner() -> str:
    """``"fastbertology"`` or ``"other"``: the owner of the innermost frame outside torch, the standard library's
    helpers and the census."""
    frame = sys._getframe(2)
    while frame is not None:
        module = _module_of(frame)
        if module.startswith(_CENSUS_MODULES) or module.split(".")[0] in ("torch", "contextlib", "functools",
                                                                          "typing", "abc"):
            frame = frame.f_back
            continue
        return "fastbertology" if module.startswith("fastbertology") else "other"
    return "other"


def _fastbertology_location() -> str:
    """``file:line`` of the innermost fastbertology frame (outside the census), or of the innermost frame."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        module = _module_of(frame)
        if not module.startswith(_CENSUS_MODULES) and module.split(".")[0] != "torch":
            if module.startswith("fastbertology"):
                return f"{_short_path(frame.f_code.co_filename)}:{frame.f_lineno}"
            fallback = fallback or f"{_short_path(frame.f_code.co_filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


def _short_path(path: str) -> str:
    for marker in ("/fastbertology/", "/fastbertology_kernels/", "/transformers/", "/torch/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


class _CensusFunctions(TorchFunctionMode):
    """Python-level calls: the pretend device's face, call targets, transfers, host reads, autograd nodes."""

    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        census = self.census
        descriptor = getattr(func, "__self__", None)
        if descriptor is torch.Tensor.device or descriptor is torch._C.TensorBase.device:
            return PRETEND if census.is_device(args[0]) else HOST
        if descriptor is torch.Tensor.is_cuda or descriptor is torch._C.TensorBase.is_cuda:
            return census.is_device(args[0])
        if descriptor is torch._C.TensorBase.is_cpu:
            return not census.is_device(args[0])
        name = getattr(func, "__name__", "")
        if func is torch.device:
            return func(*args, **kwargs)
        if name == "get_device" and args and isinstance(args[0], torch.Tensor):
            return 0 if census.is_device(args[0]) else -1
        if name in ("tolist", "numpy", "__array__") and args and isinstance(args[0], torch.Tensor) \
                and census.is_device(args[0]):
            census._record("read", f"Tensor.{name}", sync=True)
        target = self._target(func, name, args, kwargs)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        moving = name in ("to", "cpu", "cuda", "type") and source is not None and target is not None
        fresh_data = target == "device" and (name == "new_tensor" or (
            func in (torch.tensor, torch.as_tensor, torch.asarray)
            and not (args and isinstance(args[0], torch.Tensor) and census.is_device(args[0]))))
        args, kwargs = tree_map(_to_host_device, (args, kwargs))
        census.now.target.append(target)
        try:
            result = func(*args, **kwargs)
        finally:
            census.now.target.pop()
        if moving or fresh_data:
            result = self._transfer(source, result, target, name, args, kwargs, fresh_data)
        elif func in (torch.tensor, torch.as_tensor, torch.asarray) and source is None \
                and isinstance(result, torch.Tensor):
            # host data (no aten op marks it): its storage may sit where a freed device tensor's did
            census._mark(result, "host")
        census._remember_nodes(result)
        return result

    def _target(self, func, name, args, kwargs) -> str | None:
        census = self.census
        if name == "cpu":
            return "host"
        if name == "cuda":
            return "device"
        if name == "new_tensor":  # data from the host, on self's side unless told otherwise
            return _device_side(kwargs.get("device")) or ("device" if census.is_device(args[0]) else "host")
        if name == "to" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return "device" if census.is_device(args[1]) else "host"
        for value in list(args[1:] if name == "to" else ()) + list(kwargs.values()):
            side = _device_side(value)
            if side is not None:
                return side
        if func in (torch.tensor, torch.as_tensor, torch.asarray) or name.endswith("_like") \
                or name.startswith("new_"):
            return _device_side(kwargs.get("device"))
        return None

    def _transfer(self, source, result, target, name, args, kwargs, fresh_data):
        census = self.census
        if not isinstance(result, torch.Tensor):
            return result
        from_device = source is not None and census.is_device(source) and not fresh_data
        if (target == "device") == from_device:  # no boundary crossed (e.g. .to(cuda) of a device tensor)
            return result
        non_blocking = bool(kwargs.get("non_blocking")) or any(value is True for value in args[1:])
        blocking = target == "host" or fresh_data or not non_blocking
        census._record("transfer", f"{'Tensor.' if not fresh_data else 'torch.'}{name} "
                       f"{'D2H' if target == 'host' else 'H2D'}", transfer=True, sync=blocking,
                       allocs=int(target == "device"), host_allocs=int(target == "host"))
        if source is not None and _storage_key(result) == _storage_key(source):
            with _disable_current_modes():  # the CPU call aliased: give each side its own storage
                result = result.clone()
        census._mark(result, target)
        return result


class _CensusDispatch(TorchDispatchMode):
    """aten ops: classification, allocations, syncs, device tracking of fresh results."""

    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        census = self.census
        inputs = _tensors((args, kwargs))
        device_inputs = [census.is_device(t) for t in inputs]
        out = func(*args, **kwargs)
        schema = func._schema
        name = schema.name
        target = census.now.target[-1] if census.now.target else None
        aliasing = [r.alias_info is not None for r in schema.returns]
        fresh = [t for t, alias in zip(_returned(out, len(schema.returns)), aliasing) if not alias]
        fresh = _tensors(fresh)
        if target is not None:
            side = target
        elif any(device_inputs):
            side = "device"
        elif not inputs and torch._C._current_autograd_node() is not None and name != "aten::scalar_tensor":
            side = "device"  # the engine's own tensors (materialised gradients, zeros of select_backward...)
        else:
            side = "host"
        for tensor in fresh:
            census._mark(tensor, side)
        if census.counting is None:
            return out
        touched = any(device_inputs) or (fresh and side == "device")
        view = bool(aliasing) and all(aliasing) and not any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        flags = dict(allocs=len(fresh) if side == "device" else 0, host_allocs=len(fresh) if side == "host" else 0,
                     view=view)
        if name == "aten::copy_" and len(inputs) >= 2 and device_inputs[0] != device_inputs[1]:
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True))
            flags.update(transfer=True, sync=not device_inputs[0] or blocking)
        elif name == "aten::_to_copy" and inputs and device_inputs[0] != (side == "device"):
            flags.update(transfer=True)  # the Python call recorded the transfer and its sync
        elif not touched:
            flags.update(host_op=True)
        elif name == "aten::_local_scalar_dense" or name in SYNC_OPS:
            flags.update(sync=True, launch=name in SYNC_OPS)
        elif name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
                t.dtype in (torch.bool, torch.uint8) and census.is_device(t) for t in inputs[1:]):
            flags.update(sync=True, launch=True)  # a boolean mask becomes indices through nonzero inside the op
        elif not view and name not in METADATA_OPS:
            flags.update(launch=True)
        census._record("op", name, **flags)
        return out


def _returned(out, count: int) -> list:
    if count == 1:
        return [out]
    return list(out) if isinstance(out, (tuple, list)) else [out]


class _LaunchRecorder:
    """Stands for a Triton kernel: ``kernel[grid](...)`` and ``kernel.run(...)`` count a launch and do nothing."""

    def __init__(self, census: Census, name: str, kernel):
        self.census, self.name, self.kernel = census, name, kernel

    def __getitem__(self, grid):
        return self._launch

    def run(self, *args, **kwargs):
        return self._launch()

    def warmup(self, *args, **kwargs):
        """A compile-ahead call (``kernel.warmup(...)``) launches nothing; its result launches through ``run``."""
        return self

    def _launch(self, *args, **kwargs):
        self.census._record("triton", self.name, launch=True)

    def __getattr__(self, attribute):
        raise AttributeError(
            f"the host census replaces the Triton kernel {self.name} by a launch recorder, which has no "
            f"{attribute!r}: extend fastbertology/bench/census.py (_LaunchRecorder) for this use of a kernel")


def kernel_modules() -> list:
    """Every module of the ``fastbertology.kernels`` package (imported)."""
    package = importlib.import_module("fastbertology.kernels")
    modules = [package]
    for info in pkgutil.walk_packages(package.__path__, prefix="fastbertology.kernels."):
        modules.append(importlib.import_module(info.name))
    return modules


def _is_triton_kernel(value) -> bool:
    """A ``@triton.jit`` kernel (compiled or under the interpreter), not the interpreter's own objects that it leaves
    in a kernel module's namespace while it runs (its builder, its semantic)."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # pragma: no cover - triton missing: nothing to record
        return False
    return isinstance(value, KernelInterface)


@contextlib.contextmanager
def _triton_recorders(census: Census) -> Iterator[None]:
    replaced = []
    try:
        for module in kernel_modules():
            for attribute, value in list(vars(module).items()):
                if _is_triton_kernel(value):
                    replaced.append((module, attribute, value))
                    setattr(module, attribute, _LaunchRecorder(census, attribute, value))
        yield
    finally:
        for module, attribute, value in replaced:
            setattr(module, attribute, value)


class _Stream:
    """``torch.cuda.current_stream()`` under the census: stream 0; ``synchronize`` counts a sync."""

    cuda_stream = 0

    def __init__(self, census: Census):
        self.census = census

    def synchronize(self) -> None:
        self.census._record("read", "Stream.synchronize", sync=True)


# what the census answers for an H100 / H200 (sm_90) device
_PROPERTIES = SimpleNamespace(name="census sm_90", major=9, minor=0, multi_processor_count=132,
                              total_memory=141 * 2**30)


@contextlib.contextmanager
def _cuda_stubs(census: Census) -> Iterator[None]:
    """The CUDA runtime queries a GPU path may make, answered for an sm_90 device (restored in ``finally``):
    ``synchronize`` counts a sync; ``torch._C._cuda_getCurrentRawStream`` (absent from CPU builds) returns 0."""
    stubs = {
        "get_device_capability": lambda device=None: (9, 0),
        "get_device_properties": lambda device=None: _PROPERTIES,
        "current_device": lambda: 0,
        "current_stream": lambda device=None: _Stream(census),
        "is_current_stream_capturing": lambda: False,
        "synchronize": lambda device=None: census._record("read", "torch.cuda.synchronize", sync=True),
    }
    saved = {name: getattr(torch.cuda, name) for name in stubs}
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    try:
        for name, stub in stubs.items():
            setattr(torch.cuda, name, stub)
        if raw_stream is None:
            torch._C._cuda_getCurrentRawStream = lambda device=None: 0
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        if raw_stream is None:
            del torch._C._cuda_getCurrentRawStream


def count_triton_launches(events: Iterable[Event]) -> Counter:
    """Triton launches by kernel name."""
    return Counter(event.name for event in events if event.kind == "triton")

"""Peak memory of a timed block.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — absolute (the weights, gradients
  and inputs on the device count), as the H200 anchors were measured. Kind ``"cuda-max-allocated"``.
* CPU (Linux): growth of the process's resident set during the block: the kernel's high-water mark ``VmHWM`` is
  reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` at the start (after ``gc.collect()`` and
  glibc's ``malloc_trim(0)``, so that memory freed by earlier modes is given back first), and
  ``VmHWM - VmRSS(start)`` is read at the end. Everything allocated inside the block counts (activations, weight
  gradients, attention maps); the model the mode copied before the block does not. Kind ``"cpu-rss-growth"``.
  No tracemalloc (it does not see PyTorch's allocations and slows Python down). Where ``/proc/self/clear_refs``
  cannot be written (not Linux), the peak is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch

from ..memory_plan import proc_status_kib

_CLEAR_REFS = "/proc/self/clear_refs"


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim(0)``; nothing elsewhere)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_memory(device: torch.device) -> None:
    """Give memory that earlier work freed back (CPU: ``gc.collect()`` and ``malloc_trim``; CUDA: nothing, the
    allocator's peak statistics do not count cached blocks)."""
    if torch.device(device).type != "cuda":
        gc.collect()
        _trim_heap()


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mib`` (float or None) and ``peak.kind`` (see the module
    docstring). ``release=False`` skips :func:`release_memory` on entry (when the caller ran it untimed)."""

    def __init__(self, device: torch.device, *, release: bool = True):
        self.device = torch.device(device)
        self.release = release
        self.mib: float | None = None
        self.kind: str | None = None
        self._start_kib: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self.release:
            release_memory(self.device)
        try:
            with open(_CLEAR_REFS, "w") as clear_refs:
                clear_refs.write("5")
            self._start_kib = proc_status_kib("VmRSS")
        except OSError:
            self._start_kib = None
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib, self.kind = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda-max-allocated"
        elif self._start_kib is not None:
            self.mib, self.kind = (proc_status_kib("VmHWM") - self._start_kib) / 1024, "cpu-rss-growth"
        return False

"""fastbertology: head masks, head importance, attention entropy and pruning for transformers 5, fast."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["PatchHandle", "HeadStatistics", "attention_modules", "heads_per_layer", "is_patched", "patch", "record"]

# Lazy (PEP 562) for --help speed: these names import torch and transformers (seconds), and the command line imports
# this package first, so they are resolved on first use. ``from fastbertology import patch`` works as always.
_PUBLIC = {"PatchHandle": "patching", "attention_modules": "patching", "heads_per_layer": "patching",
           "is_patched": "patching", "patch": "patching", "HeadStatistics": "recording", "record": "recording"}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

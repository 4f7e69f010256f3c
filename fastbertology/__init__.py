"""fastbertology: head masks, head importance, attention entropy and pruning for transformers 5, fast."""

from .patching import PatchHandle, attention_modules, heads_per_layer, is_patched, patch
from .recording import HeadStatistics, record

__version__ = "0.1.0"

__all__ = ["PatchHandle", "HeadStatistics", "attention_modules", "heads_per_layer", "is_patched", "patch", "record"]

import os
import sys

import torch

# Triton kernels run under the interpreter on machines without CUDA; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py and other test helpers

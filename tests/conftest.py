import contextlib
import os
import sys

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py and other test helpers


@contextlib.contextmanager
def single_thread():
    """Tiny models gain nothing from intra-op threads (and lose a lot on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Run the test single-threaded; files of tiny-model tests use it for every test via ``pytestmark``."""
    with single_thread():
        yield

"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported, so it is set here, before any test module
imports ``ivl_kernels``.
"""

import os
import sys

import pytest

_HAS_GPU = False
try:
    import torch

    _HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    pass
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS is deterministic only with a fixed workspace, read when it initialises (tests/ops/test_determinism.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs per test, but reproducible from the printed test id.
    import hashlib

    test_id = os.environ.get("PYTEST_CURRENT_TEST", "")
    torch.manual_seed(int(hashlib.sha1(test_id.encode()).hexdigest()[:8], 16))
    yield

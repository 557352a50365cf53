"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported, so it is set here, before any test module
imports ``ivl_kernels``.
"""

import os
import re
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


from ivl_kernels._triton import HAS_TRITON, interpreter_enabled  # noqa: E402 (after TRITON_INTERPRET is set)

if HAS_TRITON and interpreter_enabled():
    from tests import _interp_bounds

    # Every interpreted launch is checked for out-of-bounds and misaligned accesses (a device fault on a GPU).
    _interp_bounds.install()


@pytest.fixture(autouse=True)
def _no_stray_accesses():
    # A violation raises inside the kernel; this also fails a test whose code swallowed that exception.
    mod = sys.modules.get("tests._interp_bounds")
    seen = len(mod.violations) if mod else 0
    yield
    if mod and len(mod.violations) > seen:
        pytest.fail("Triton kernel accessed memory out of bounds:\n" + "\n".join(mod.violations[seen:]))


_POISON = {torch.float16: float("nan"), torch.bfloat16: float("nan"), torch.float32: float("nan"),
           torch.float64: float("nan"), torch.int32: -(2 ** 30) - 7, torch.int64: -(2 ** 62) - 7}


def _poisoned(make):
    def empty(*args, **kwargs):
        t = make(*args, **kwargs)
        value = _POISON.get(t.dtype)
        if value is not None and t.numel():
            with torch.no_grad():
                t.fill_(value)
        return t
    return empty


@pytest.fixture(autouse=True)
def _poisoned_empty(request, monkeypatch):
    # On a GPU, memory from torch.empty holds whatever was there; on CPU it is often zeros, which hides a
    # kernel or launcher that reads scratch it never wrote. The op tests get NaN (and huge negative indices) instead.
    # Not under torch.compile: Dynamo resolves torch.empty by name and cannot trace the wrapper's builtin.
    if (os.sep + "ops" + os.sep not in str(request.node.path) or "compile" in request.node.name
            or os.environ.get("IVL_TEST_NO_POISON")):
        yield
        return
    # Dynamo maps torch functions to its rules by looking their names up once, lazily: built while the wrapper is
    # in place, the map would miss the real torch.empty in a later compile test.
    from torch._dynamo import trace_rules
    trace_rules.get_torch_obj_rule_map()
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def _no_leaked_mixed_precision():
    # transformers 4.50's TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION in os.environ and nothing
    # unsets it: every later Trainer in the process (an in-process `ivl-kernels train` after a --bf16 one) ran under
    # bf16 autocast.
    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    yield
    if saved is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = saved


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs per test, but reproducible from the printed test id.
    import hashlib

    test_id = os.environ.get("PYTEST_CURRENT_TEST", "")
    torch.manual_seed(int(hashlib.sha1(test_id.encode()).hexdigest()[:8], 16))
    yield


# ``-m gpu`` selects every test that needs a CUDA GPU (the GPU machine's run), ``-m "not gpu"`` the rest. A test
# needs one when a skip condition names a GPU or CUDA as what is missing (not "a GPU or the interpreter", not
# "a machine without a GPU") or when it is parametrized onto a CUDA device.
_GPU_REASON = re.compile(r"GPU|CUDA")
_NOT_A_GPU_NEED = re.compile(r"interpreter|without a GPU|nvcc")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (set by tests/conftest.py from the test's skip "
                                       "conditions and device parameters)")


def needs_gpu(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if _GPU_REASON.search(reason) and not _NOT_A_GPU_NEED.search(reason):
            return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(str(v).startswith("cuda") for k, v in params.items() if k in ("device", "dev"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_gpu(item):
            item.add_marker(pytest.mark.gpu)

"""``torch.use_deterministic_algorithms(True)`` is honoured by the loss.

Neither backend uses atomics (the Triton path is GEMMs plus a row kernel; a many-to-one map's gradient rows are
folded with ``index_put_``, which torch makes deterministic in that mode): every backend runs in strict
deterministic mode and gives bit-identical results run after run, on the problem with colliding map rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels import _backends
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
needs_triton = pytest.mark.skipif(not (HAS_TRITON and (HAS_GPU or interpreter_enabled())),
                                  reason="needs Triton on a GPU or under the interpreter")


@pytest.fixture
def deterministic(request):
    warn_only = getattr(request, "param", False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    yield warn_only
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _problem():
    N, Hv, Vv, Vb, Hb = 45, 32, 130, 150, 24
    vh = torch.randn(N, Hv, device=DEVICE)
    vw = torch.randn(Vv, Hv, device=DEVICE) / 6
    m = torch.randint(0, Vv // 3, (Vb,), device=DEVICE)  # many-to-one: colliding gradient rows
    m[::7] = -1
    target = torch.randint(0, Vb, (N,), device=DEVICE)
    kw = dict(base_hidden=torch.randn(N, Hb, device=DEVICE), base_weight=torch.randn(Vb, Hb, device=DEVICE) / 5,
              vocab_map=m, l1_coef=0.5, label_smoothing=0.1)
    return vh, vw, target, kw


def _grads(vh, vw, target, kw, backend):
    h = vh.clone().requires_grad_()
    w = vw.clone().requires_grad_()
    loss = ivl.fused_guided_cross_entropy(h, w, target, backend=backend, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_deterministic_mode_gives_bitwise_equal_runs(deterministic, backend, monkeypatch):
    if backend == "triton" and not (HAS_TRITON and (HAS_GPU or interpreter_enabled())):
        pytest.skip("needs Triton on a GPU or under the interpreter")
    monkeypatch.delenv("IVL_KERNELS_BACKEND", raising=False)
    vh, vw, target, kw = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "not deterministic" warning (torch warns UserWarning)
        first = _grads(vh, vw, target, kw, backend)
        second = _grads(vh, vw, target, kw, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = _grads(vh.double(), vw.double(), target, {k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                       else v) for k, v in kw.items()}, "torch")
    for a, r in zip(first, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_auto_on_gpu_picks_triton():
    from ivl_kernels._validate import validate_cross_entropy
    from ivl_kernels.ops.guided_cross_entropy import _triton_supports

    vh, vw, target, kw = _problem()
    a = validate_cross_entropy(vh, vw, target, **kw)
    assert _backends.select("auto", vh.device, triton_supports=lambda: _triton_supports(a)) == "triton"

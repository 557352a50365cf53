"""``torch.use_deterministic_algorithms(True)`` is honoured by the loss.

The Triton backward adds gradients with float32 atomics (not bit-reproducible): in strict deterministic mode
``backend="auto"`` takes the torch backend (exact, chunked, deterministic) and an explicit ``backend="triton"``
raises; with ``warn_only=True`` the Triton backend runs and warns, as torch's own nondeterministic ops do.
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


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_deterministic_mode_gives_bitwise_equal_runs(deterministic, backend, monkeypatch):
    monkeypatch.delenv("IVL_KERNELS_BACKEND", raising=False)
    vh, vw, target, kw = _problem()
    first = _grads(vh, vw, target, kw, backend)
    second = _grads(vh, vw, target, kw, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # auto took the deterministic path: the torch backend's result, bit for bit.
    for a, b in zip(first, _grads(vh, vw, target, kw, "torch")):
        assert torch.equal(a, b)


@needs_triton
def test_explicit_triton_raises_in_strict_mode(deterministic):
    vh, vw, target, kw = _problem()
    with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
        ivl.fused_guided_cross_entropy(vh, vw, target, backend="triton", **kw)


@needs_triton
@pytest.mark.parametrize("deterministic", [True], indirect=True, ids=["warn_only"])
def test_explicit_triton_warns_in_warn_only_mode(deterministic):
    vh, vw, target, kw = _problem()
    with pytest.warns(UserWarning, match="not bit-reproducible"):
        loss, dh, dw = _grads(vh, vw, target, kw, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _grads(vh, vw, target, kw, "torch")
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, ref[2], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_auto_on_gpu_picks_triton_outside_deterministic_mode():
    from ivl_kernels._validate import validate_cross_entropy
    from ivl_kernels.ops.guided_cross_entropy import _triton_supports

    vh, vw, target, kw = _problem()
    a = validate_cross_entropy(vh, vw, target, **kw)
    assert _backends.select("auto", vh.device, triton_supports=lambda: _triton_supports(a)) == "triton"

"""Offsets past 2^31 elements: the Triton kernels form their addresses in 64-bit.

Scoring a long prompt writes ``[16384, 152064]`` logits (2.5e9 elements); a 256k x 8192 head is 2.1e9. An offset
computed in int32 wraps there and, on a GPU, faults or corrupts memory, and no test at small sizes can see it.
Here one operand at a time lives in a buffer whose last row starts past element 2^31 with a row stride that still
fits in int32 (so Triton passes the stride as i32 and only a 64-bit row index keeps the product exact). The buffer
is untouched virtual memory: only the rows written are committed (a few pages, not the 8 GiB). The interpreter's
bounds check (``tests/_interp_bounds.py``) turns a wrapped offset into a failure; the result is compared to the
float64 oracle and the test asserts which kernel ran. CPU only: the interpreter reads the host addresses.
"""

import math

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled
from ivl_kernels.ops import guided_logits as gl
from ivl_kernels.reference import guided_cross_entropy_naive, guided_logits_naive
from tests import _interp_bounds
from test_guided_logits import assert_guided_close, make_map

pytestmark = pytest.mark.skipif(not (HAS_TRITON and interpreter_enabled()), reason="checks the Triton interpreter")

INT32 = 2 ** 31


def _far(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[R, C]`` (R >= 3) copied into a view whose last row starts past element 2^31, row stride < 2^31
    and a multiple of 16 elements (16-byte rows, as tensor descriptors need)."""
    R, C = t.shape
    stride = -(-(INT32 // (R - 1) + C) // 16) * 16
    assert stride < INT32 <= (R - 1) * stride
    try:
        buf = torch.empty((R - 1) * stride + C, dtype=t.dtype)
    except RuntimeError as err:  # pragma: no cover - a machine that refuses the virtual reservation
        pytest.skip(f"cannot reserve {(R - 1) * stride * t.element_size() / 2**30:.1f} GiB of virtual memory: {err}")
    far = buf.as_strided((R, C), (stride, 1))
    far.copy_(t)
    return far


def _operands(rows: int, kind: str, base: str, Vb=37, Vv=29, Hv=16, Hb=24):
    """Fresh operands for ``rows`` rows (base as logits or hidden states) and the map (none for TMA)."""
    vmap = None if kind == "tma" else make_map("many_to_one", Vb, Vv, "cpu")
    t = dict(value_hidden=torch.randn(rows, Hv), value_weight=torch.randn(Vv, Hv) / math.sqrt(Hv))
    if base == "logits":
        t["base_logits"] = torch.randn(rows, Vb)
    else:
        t.update(base_hidden=torch.randn(rows, Hb), base_weight=torch.randn(Vb, Hb) / math.sqrt(Hb))
    return t, vmap


KERNEL = {"rows": "_guided_logits_kernel", "tiles": "_ce_logits_tile_kernel", "tma": "_ce_logits_tma_kernel"}


@pytest.mark.parametrize("operand", ["value_hidden", "value_weight", "base_hidden", "base_weight", "base_logits",
                                     "out"])
@pytest.mark.parametrize("kind", ["rows", "tiles", "tma"])
def test_head_addresses_past_2_31(kind, operand, monkeypatch):
    """The head's three kernels: the row-tile kernel (M < GEMM_MIN_ROWS, with a map), the tile GEMM (with a
    map) and the TMA kernel (no map), each with one operand far away."""
    if kind != "rows":
        monkeypatch.setenv("IVL_KERNELS_GEMM", kind)
    M = 3 if kind == "rows" else gl.GEMM_MIN_ROWS + 3
    t, vmap = _operands(M, kind, "logits" if operand == "base_logits" else "hidden")
    alpha = torch.rand(M) * 2 - 0.5
    ref = guided_logits_naive(vocab_map=vmap, alpha=alpha, fill=-0.5, dtype=torch.float64, **t)
    plain = guided_logits_naive(vocab_map=vmap, alpha=alpha, fill=-0.5, **t)
    out = torch.full(ref.shape, float("nan"))
    if operand == "out":
        out = _far(out)
    else:
        t[operand] = _far(t[operand])
    vh, vw = t.pop("value_hidden"), t.pop("value_weight")
    del _interp_bounds.launched[:]
    got = ivl.fused_guided_logits(vh, vw, vocab_map=vmap, alpha=alpha, fill=-0.5, out=out, backend="triton", **t)
    assert got is out
    heads = [k for k in _interp_bounds.launched if k in KERNEL.values()]
    assert heads == [KERNEL[kind]], _interp_bounds.launched
    assert_guided_close(out, ref, plain, torch.float32, f"{kind}, {operand} past 2^31")


@pytest.mark.parametrize("operand", ["value_hidden", "value_weight", "base_hidden", "base_weight", "base_logits"])
@pytest.mark.parametrize("kind", ["tiles", "tma", "cublas"])
def test_loss_addresses_past_2_31(kind, operand, monkeypatch):
    """The loss's tile kernels (logits, combine, dX, dW) and the cuBLAS path's row kernels (with IVL's L1 term),
    forward and backward, with one operand far away. The loss's own buffers (a chunk of logits, at most
    1.25 GiB) stay under 2^31 elements by construction."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", kind)
    N, Vb = 19, 37
    # Without a map the value head must cover the base vocabulary (Vv = Vb), as the TMA kernel requires.
    t, vmap = _operands(N, kind, "logits" if operand == "base_logits" else "hidden", Vb=Vb,
                        Vv=Vb if kind == "tma" else 29)
    target = torch.randint(0, Vb, (N,))
    target[4] = -100
    kw = dict(vocab_map=vmap, alpha=0.7, label_smoothing=0.1, l1_coef=0.1 if kind == "cublas" else 0.0)

    leaves = [t["value_hidden"].double().requires_grad_(), t["value_weight"].double().requires_grad_()]
    ref_kw = {k: v.double() for k, v in t.items() if not k.startswith("value")}
    ref = guided_cross_entropy_naive(*leaves, target, **ref_kw, **kw)
    ref.backward()

    t[operand] = _far(t[operand])
    vh, vw = t.pop("value_hidden").requires_grad_(), t.pop("value_weight").requires_grad_()
    del _interp_bounds.launched[:]
    loss = ivl.fused_guided_cross_entropy(vh, vw, target, backend="triton", **t, **kw)
    loss.backward()
    logits_kernel = {"tiles": "_ce_logits_tile_kernel", "tma": "_ce_logits_tma_kernel",
                     "cublas": "_ce_rows_kernel"}[kind]
    assert logits_kernel in _interp_bounds.launched, _interp_bounds.launched
    if kind == "cublas":
        assert "_l1_rows_kernel" in _interp_bounds.launched, _interp_bounds.launched
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vh.grad.double(), leaves[0].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vw.grad.double(), leaves[1].grad, rtol=1e-4, atol=1e-5)

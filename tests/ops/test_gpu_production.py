"""fused_guided_logits at DESIGN's "qwen" decode shapes on a GPU, against a chunked float64 reference.

The small shapes of test_guided_logits.py run every kernel loop once. Here Hv = 896 and Hb = 3584 (the CUDA
kernel's inner loop iterates: bf16 rows of 112 and 448 16-byte vectors over 32 lanes x 4 in flight), and
Vb > 16,896 (132 SMs x 16 blocks x 8 warps: its grid-stride loop iterates; Triton's decode tile takes 7 and 28
K steps). Inputs are bf16, so every product is exact in float32; what remains is the float32 accumulation, the
bound below, plus the rounding of the output dtype. Calibrated on CPU at these shapes (Vb 4,093): a float32
pipeline (exact products, fp32 sums) reaches 0.0004-0.004 of the bound; value or base logits rounded to bf16
before the add (what ``backend="torch"`` does in bf16: its matmuls return bf16) reach 7-30x of it.
"""

from __future__ import annotations

import math

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels import _backends
from ivl_kernels.ops.guided_logits import CUDA_MAX_ROWS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HV, HB = 896, 3584
VV, VB = 40_009, 40_093  # multiples of no block size; Vb > Vv leaves an unmapped identity tail
U32 = 2.0 ** -24
# Errors of a float32 sum of n terms grow like sqrt(n) * u * sum|terms| in practice (Higham's probabilistic
# bound); 8x that leaves room for tensor-core accumulation order and truncation, and still sits ~10x below
# what a bf16 accumulator or a bf16-rounded intermediate produces at these sizes.
LAMBDA = 8.0
ROUND_OUT = {torch.float32: U32, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    vw = (torch.randn(VV, HV, device="cuda", generator=g) / math.sqrt(HV)).to(torch.bfloat16)
    bw = (torch.randn(VB, HB, device="cuda", generator=g) / math.sqrt(HB)).to(torch.bfloat16)
    m = torch.randint(0, VV // 2, (VB,), device="cuda", generator=g)  # many-to-one
    m[torch.rand(VB, device="cuda", generator=g) < 0.15] = -1
    return vw, bw, m.to(torch.int32)


def _reference(vh, vw, m, alpha, fill, base_logits=None, bh=None, bw=None, chunk=8192):
    """``(ref, scale)`` in float64, chunked over the vocabulary: ``scale`` is the elementwise sum of the
    magnitudes of every term (what the float32 accumulation error is proportional to)."""
    M = vh.shape[0]
    Vb = base_logits.shape[1] if base_logits is not None else bw.shape[0]
    cols = torch.arange(Vb, device="cuda") if m is None else m.long()
    unmapped = (cols < 0) | (cols >= vw.shape[0])
    cols = cols.masked_fill(unmapped, 0)
    a = alpha.double().view(-1, 1) if isinstance(alpha, torch.Tensor) else torch.full((M, 1), alpha,
                                                                                     dtype=torch.float64,
                                                                                     device="cuda")
    ref = torch.empty(M, Vb, dtype=torch.float64, device="cuda")
    scale = torch.empty_like(ref)
    vh64 = vh.double()
    for c0 in range(0, Vb, chunk):
        c1 = min(Vb, c0 + chunk)
        w = vw[cols[c0:c1]].double()
        val = (vh64 @ w.T).masked_fill(unmapped[c0:c1], fill)
        mag = (vh64.abs() @ w.abs().T).masked_fill(unmapped[c0:c1], abs(fill))
        if base_logits is not None:
            base = base_logits[:, c0:c1].double()
            bmag = base.abs()
        else:
            wb = bw[c0:c1].double()
            base = bh.double() @ wb.T
            bmag = bh.double().abs() @ wb.abs().T
        ref[:, c0:c1] = base + a * val
        scale[:, c0:c1] = bmag + a.abs() * mag
    return ref, scale


def _check(out, ref, scale, K, what):
    assert not torch.isnan(out).any(), f"{what}: NaN (an element was not written)"
    err = (out.double() - ref).abs()
    bound = LAMBDA * math.sqrt(K) * U32 * scale + ROUND_OUT[out.dtype] * ref.abs() + 1e-6
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"{what}: error {err.max().item():.3e} exceeds the float32-accumulation bound "
                          f"(worst element at {worst:.2f}x its bound)")


BACKENDS = ["cuda", "triton", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_mode", ["logits-fp32", "logits-bf16", "hidden"])
@pytest.mark.parametrize("map_kind", ["identity", "many-to-one"])
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16, 64], ids=lambda m: f"M{m}")
def test_qwen_decode_shapes(weights, backend, base_mode, map_kind, M):
    if backend == "cuda":
        if _backends.cuda_extension() is None:
            pytest.skip("CUDA extension not built")
        if M > CUDA_MAX_ROWS:
            pytest.skip(f"the CUDA decode kernel handles M <= {CUDA_MAX_ROWS}")
    vw, bw, m = weights
    vmap = None if map_kind == "identity" else m
    vh = torch.randn(M, HV, device="cuda").to(torch.bfloat16)
    alpha = torch.rand(M, device="cuda") * 2 - 0.5 if M > 1 else 0.8
    fill = -0.5
    if base_mode == "hidden":
        bh = torch.randn(M, HB, device="cuda").to(torch.bfloat16)
        kw = dict(base_hidden=bh, base_weight=bw)
        ref, scale = _reference(vh, vw, vmap, alpha, fill, bh=bh, bw=bw)
        out = torch.full((M, VB), float("nan"), device="cuda")
        K = HB
    else:
        dt = torch.float32 if base_mode == "logits-fp32" else torch.bfloat16
        base = (torch.randn(M, VB, device="cuda") * 3).to(dt)
        kw = dict(base_logits=base)
        ref, scale = _reference(vh, vw, vmap, alpha, fill, base_logits=base)
        out = torch.full((M, VB), float("nan"), device="cuda", dtype=dt)
        K = HV
    got = ivl.fused_guided_logits(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, out=out, backend=backend, **kw)
    assert got is out
    _check(out, ref, scale, K, f"{backend}/{base_mode}/{map_kind}/M{M}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_in_place_on_scores(weights, backend):
    """The logits-processor call: float32 scores guided in place, -inf (masked) entries stay -inf."""
    if backend == "cuda" and _backends.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    vw, _, m = weights
    M = 4
    vh = torch.randn(M, HV, device="cuda").to(torch.bfloat16)
    scores = torch.randn(M, VB, device="cuda") * 3
    scores[:, ::97] = float("-inf")
    base0 = scores.clone()
    ref, scale = _reference(vh, vw, m, 1.0, 0.0, base_logits=base0)
    ivl.fused_guided_logits(vh, vw, base_logits=scores, out=scores, vocab_map=m, backend=backend)
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(scores), inf) and (scores[inf] < 0).all()
    fin = ~inf
    _check(scores[fin], ref[fin], scale[fin], HV, f"{backend} in place")

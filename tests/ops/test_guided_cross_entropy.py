"""``fused_guided_cross_entropy`` against the fp64 naive oracle (``reference.guided_cross_entropy_naive``).

Error rule (flash-attention's): for the loss and both gradients, ``err_ours <= 2 * err_torch_same_dtype + atol``,
where both errors are max-abs differences from the float64 reference on the same (dtype-rounded) inputs and
``err_torch_same_dtype`` is the naive expression evaluated by plain torch in the input dtype. The Triton backend
runs under ``TRITON_INTERPRET=1`` on CPU (conftest), so its cases are small.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import ivl_kernels as ivl
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled
from ivl_kernels.ops import guided_cross_entropy as gce
from ivl_kernels.reference import guided_cross_entropy_naive

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# The interpreter has no bfloat16: bf16 Triton cases run on a GPU only.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _make(N=7, Hv=24, Vv=100, Vb=None, Hb=16, base="hidden", vmap="identity", alpha="float", fill=0.0,
          l1_coef=0.0, smoothing=0.0, reduction="mean", ignore=(), dtype=torch.float32, lead=None,
          noncontig=False, device=DEVICE, l1_reduction="kept"):
    """Inputs of one case: a dict with tensors in ``dtype`` and options (Vb defaults to Vv)."""
    Vb = Vv if Vb is None else Vb
    f64 = dict(dtype=torch.float64, device=device)
    vh = torch.randn(N, Hv, **f64)
    # Scaled so logits are O(1-3): a realistic softmax, neither uniform nor one-hot.
    vw = torch.randn(Vv, Hv, **f64) / Hv ** 0.5 * 1.5
    kw = dict(fill=fill, l1_coef=l1_coef, label_smoothing=smoothing, reduction=reduction)
    if l1_reduction != "kept":
        kw["l1_reduction"] = l1_reduction
    if base == "logits":
        bl = torch.randn(N, Vb, **f64) * 2
        if noncontig:  # columns of a wider tensor: row stride != Vb
            bl = torch.randn(N, Vb + 5, **f64)[:, 3:3 + Vb] * 2
        kw["base_logits"] = bl.to(dtype)
    elif base == "hidden":
        kw["base_hidden"] = torch.randn(N, Hb, **f64).to(dtype)
        kw["base_weight"] = (torch.randn(Vb, Hb, **f64) / Hb ** 0.5 * 1.5).to(dtype)
    if vmap == "map":  # -1 entries and many-to-one entries
        m = torch.randint(0, Vv, (Vb,), device=device)
        m[torch.rand(Vb, device=device) < 0.2] = -1
        m[: min(5, Vb)] = min(3, Vv - 1)  # five base ids share one value id
        kw["vocab_map"] = m.to(torch.int32)
    elif vmap == "injective":
        kw["vocab_map"] = torch.randperm(Vv, device=device)[:Vb].to(torch.int64)
    if alpha == "tensor":
        kw["alpha"] = (torch.rand(N, **f64) + 0.5).to(dtype)
    elif alpha != "float":
        kw["alpha"] = float(alpha)
    else:
        kw["alpha"] = 0.75
    target = torch.randint(0, Vb, (N,), device=device)
    for i in ignore:
        if i < N:
            target[i] = -100
    vh, vw = vh.to(dtype), vw.to(dtype)
    if noncontig:
        vw = vw.T.contiguous().T  # column-major weight
    if lead is not None:
        vh = vh.reshape(*lead, Hv)
        target = target.reshape(*lead)
        if "base_logits" in kw:
            kw["base_logits"] = kw["base_logits"].reshape(*lead, Vb)
        if "base_hidden" in kw:
            kw["base_hidden"] = kw["base_hidden"].reshape(*lead, Hb)
        if isinstance(kw["alpha"], torch.Tensor):
            kw["alpha"] = kw["alpha"].reshape(-1)
    return vh, vw, target, kw


def _to(kw, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}


def _run(fn, vh, vw, target, kw, upstream=None):
    vh = vh.detach().clone().requires_grad_()
    vw = vw.detach().clone().requires_grad_()
    loss = fn(vh, vw, target, **kw)
    if upstream is None:
        loss.backward()
    else:
        loss.backward(upstream.to(loss.device, loss.dtype).reshape(loss.shape))
    return loss.detach(), vh.grad, vw.grad


def _err(x, ref):
    return (x.double() - ref).abs().max().item() if ref.numel() else 0.0


def _check(backend, vh, vw, target, kw, dtype):
    """Ours (``backend``) vs plain torch in ``dtype`` vs the fp64 oracle, loss and both gradients."""
    upstream = torch.rand(target.shape, dtype=torch.float64, device=vh.device) if kw["reduction"] == "none" else None
    ref = _run(lambda *a, **k: guided_cross_entropy_naive(*a, **k, dtype=torch.float64),
               vh.double(), vw.double(), target, _to(kw, torch.float64), upstream)
    same = _run(lambda *a, **k: guided_cross_entropy_naive(*a, **k, dtype=dtype), vh, vw, target, kw, upstream)
    ours = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw, target, kw,
                upstream)
    assert ours[0].dtype == vh.dtype and ours[1].dtype == vh.dtype and ours[2].dtype == vw.dtype
    assert ours[0].shape == ref[0].shape
    for name, o, s, r in zip(("loss", "d value_hidden", "d value_weight"), ours, same, ref):
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        # Relative to the magnitude of what is checked: gradients of a mean are far below 1, and an absolute floor
        # of ATOL would exceed them (a test that passes whatever the gradients).
        atol = ATOL[dtype] * r.abs().max().item()
        e_ours, e_torch = _err(o, r), _err(s, r)
        assert e_ours <= 2 * e_torch + atol, (
            f"{name}: error {e_ours:.3g} vs fp64 > 2 * torch-{dtype} error {e_torch:.3g} + atol {atol:.3g}")


def _case(id_, **kw):
    return pytest.param(kw, id=id_)


# Each case names what it covers; the Triton subset keeps interpreter time small.
CASES = [
    _case("N1-hidden-identity-mean", N=1),
    _case("N7-logits-map-alpha_tensor-fill-sum", N=7, base="logits", vmap="map", alpha="tensor", fill=-0.5,
          reduction="sum", Vb=130),
    _case("N33-hidden-map-l1-smooth-ignore-mean", N=33, vmap="map", Vb=150, l1_coef=0.8, smoothing=0.1,
          ignore=(0, 5, 32)),
    _case("N33-none-identity-l1-smooth-ignore-none", N=33, base="none", l1_coef=1.0, smoothing=0.2,
          ignore=(2, 3), reduction="none"),
    _case("N7-valueonly-map-ignore-none", N=7, base="none", vmap="map", Vb=90, ignore=(1,), reduction="none"),
    _case("N7-logits-wide_base_identity-l1-mean", N=7, base="logits", Vb=131, Vv=97, l1_coef=0.5,
          alpha="tensor"),
    _case("N33-hidden-injective-alpha2-smooth-sum", N=33, vmap="injective", Vb=80, alpha=2.0, smoothing=0.05,
          reduction="sum"),
    _case("N7-hidden-narrow_base_identity-l1-none", N=7, Vb=70, Vv=100, l1_coef=0.3, reduction="none"),
    _case("B2xT5-logits-map-l1-noncontig-none", N=10, lead=(2, 5), base="logits", vmap="map", Vb=77, l1_coef=0.5,
          noncontig=True, reduction="none", ignore=(4,)),
    _case("N33-hidden-identity-l1all-smooth-ignore-mean", N=33, l1_coef=1.0, l1_reduction="all", smoothing=0.1,
          ignore=(0, 1, 17, 32)),
    _case("N7-logits-map-l1all-ignore-sum", N=7, base="logits", vmap="map", Vb=90, l1_coef=0.6,
          l1_reduction="all", ignore=(2, 6), reduction="sum"),
]
TRITON_CASES = [c for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_reference(case, dtype):
    vh, vw, target, kw = _make(**case, dtype=dtype)
    _check("torch", vh, vw, target, kw, dtype)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_fp32_matches_reference(case):
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)


@pytest.mark.parametrize("case", [CASES[2], CASES[3]])
def test_triton_fp16_matches_reference(case):
    vh, vw, target, kw = _make(**case, dtype=torch.float16)
    _check("triton", vh, vw, target, kw, torch.float16)


needs_triton = pytest.mark.skipif(not (HAS_TRITON and (interpreter_enabled() or HAS_GPU)),
                                  reason="needs Triton on a GPU or under the interpreter")


@needs_triton
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[5], CASES[9]])
def test_triton_many_chunks_match_reference(case, monkeypatch):
    """Chunks of a few rows (odd sizes, a short last chunk): every chunk boundary, the float32 d value_weight
    accumulated across chunks, the one-pass forward (mean/sum) and the recomputing backward ("none")."""
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    vb = kw["base_logits"].shape[-1] if "base_logits" in kw else case.get("Vb", case.get("Vv", 100))
    monkeypatch.setitem(gce._chunked.CHUNK_BYTES, device, 5 * 4 * (2 * max(vb, case.get("Vv", 100)) + 200))
    monkeypatch.setattr(gce._chunked, "ROW_ALIGN", 1)
    _check("triton", vh, vw, target, kw, torch.float32)


@needs_triton
@pytest.mark.parametrize("which", ["value_hidden", "value_weight"])
def test_triton_gradient_of_one_input_only(which):
    vh, vw, target, kw = _make(N=9, base="hidden", vmap="map", Vb=120, l1_coef=0.4, dtype=torch.float32)
    ref_h, ref_w = vh.clone().requires_grad_(), vw.clone().requires_grad_()
    guided_cross_entropy_naive(ref_h, ref_w, target, **kw).backward()
    h, w = vh.clone().requires_grad_(which == "value_hidden"), vw.clone().requires_grad_(which == "value_weight")
    ivl.fused_guided_cross_entropy(h, w, target, backend="triton", **kw).backward()
    got, ref, other = (h.grad, ref_h.grad, w) if which == "value_hidden" else (w.grad, ref_w.grad, h)
    assert other.grad is None
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_GPU, reason="bf16/fp16 Triton kernels compiled for CUDA need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", [
    _case("gpu-N1000-hidden-map-l1-smooth", N=1000, Hv=128, Hb=96, Vv=3001, Vb=3500, vmap="map", l1_coef=1.0,
          smoothing=0.1, ignore=(0, 7, 999)),
    _case("gpu-N257-logits-identity-alpha_tensor-none", N=257, Hv=64, Vv=5003, Vb=5100, base="logits",
          alpha="tensor", reduction="none"),
    _case("gpu-N513-valueonly-l1", N=513, Hv=256, Vv=4099, base="none", l1_coef=0.5),
])
def test_triton_half_on_gpu(case, dtype):
    vh, vw, target, kw = _make(**case, dtype=dtype, device="cuda")
    _check("triton", vh, vw, target, kw, dtype)


# The torch backend's own paths: the value head read in base-column order (no L1 term) with the base head's GEMM
# written first and the value GEMM accumulated into it (float32/float64 base hidden states), fill columns (unmapped
# ids, or base ids past the value vocabulary), scalar and per-row alpha, a narrower base; with L1 the value logits
# gathered. Chunks of a few rows: every chunk boundary and the accumulators across chunks.
TORCH_PATH_CASES = [
    _case("N29-hidden-map-fill-alpha_tensor-mean", N=29, vmap="map", Vb=140, fill=0.4, alpha="tensor"),
    _case("N29-hidden-wide_base_identity-fill-alpha1.5-sum", N=29, Vb=131, Vv=97, fill=0.3, alpha=1.5,
          reduction="sum", ignore=(3,)),
    _case("N29-none-map-fill-smooth-ignore-mean", N=29, base="none", vmap="map", Vb=120, fill=-0.7, smoothing=0.1,
          ignore=(0, 28)),
    _case("N29-logits-narrow_base_identity-alpha_tensor-mean", N=29, base="logits", Vb=70, Vv=100,
          alpha="tensor"),
    _case("N29-hidden-map-l1all-fill-ignore-mean", N=29, vmap="map", Vb=110, l1_coef=0.7, l1_reduction="all",
          fill=0.2, ignore=(1, 2, 27)),
    _case("N29-hidden-injective-none", N=29, vmap="injective", Vb=80, reduction="none", alpha="tensor"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", TORCH_PATH_CASES)
def test_torch_backend_paths_over_many_chunks(case, dtype, monkeypatch):
    monkeypatch.setitem(gce._torch_backend.CHUNK_ELEMS, "cpu", 4 * 140)  # 4 rows a chunk, a short last one
    vh, vw, target, kw = _make(**case, dtype=dtype, device="cpu")
    _check("torch", vh, vw, target, kw, dtype)


# fill=-inf bans the unmapped base ids: they get probability 0 and the loss of the others stays finite. The torch
# backend's paths: base logits (z formed apart, fill columns added), base head fused in float32/float64 (the value
# GEMM accumulated into the base's, fill added by a rank-1 update), no base, the L1 term (z gathered from the value
# logits); a map with -1 entries and the identity with Vb > Vv (ids past the value vocabulary).
INF_FILL_CASES = [
    _case("N7-logits-map-mean", N=7, base="logits", vmap="map", Vb=90),
    _case("N29-hidden-map-alpha_tensor-sum", N=29, vmap="map", Vb=110, alpha="tensor", reduction="sum",
          ignore=(3,)),
    _case("N7-none-map-none", N=7, base="none", vmap="map", Vb=90, reduction="none"),
    _case("N7-logits-wide_base_identity-mean", N=7, base="logits", Vb=131, Vv=97),
    _case("N29-hidden-wide_base_identity-alpha_tensor-none", N=29, Vb=131, Vv=97, alpha="tensor",
          reduction="none", ignore=(0,)),
    _case("N7-hidden-map-l1-mean", N=7, vmap="map", Vb=90, l1_coef=0.5),
    _case("N7-logits-wide_base_identity-l1all-sum", N=7, base="logits", Vb=131, Vv=97, l1_coef=0.5,
          l1_reduction="all", reduction="sum"),
]


def _targets_on_mapped_ids(target, kw, Vv):
    """Targets moved onto mapped base ids (an unmapped target has probability 0 under fill=-inf: an infinite
    loss); ignored rows stay ignored."""
    m = kw.get("vocab_map")
    mapped = (m >= 0).nonzero().squeeze(1) if m is not None else torch.arange(Vv, device=target.device)
    moved = mapped[target.clamp(min=0) % mapped.numel()].to(target.dtype)
    return torch.where(target == -100, target, moved)


@pytest.mark.parametrize("backend,dtype", [
    pytest.param("torch", torch.float64, id="torch-float64"), pytest.param("torch", torch.float32, id="torch-float32"),
    pytest.param("triton", torch.float32, id="triton-float32", marks=needs_triton)])
@pytest.mark.parametrize("case", INF_FILL_CASES)
def test_neg_inf_fill_bans_unmapped_ids(case, backend, dtype):
    vh, vw, target, kw = _make(**case, fill=float("-inf"), dtype=dtype, device="cpu" if backend == "torch" else DEVICE)
    if "vocab_map" in kw:
        kw["vocab_map"][5:8] = -1  # whatever the draw, some unmapped ids
    target = _targets_on_mapped_ids(target, kw, vw.shape[0])
    _check(backend, vh, vw, target, kw, dtype)


@pytest.mark.parametrize("reduction,passes", [("mean", 1), ("sum", 1), ("none", 2)])
def test_torch_backend_computes_gradients_in_the_forward_pass(reduction, passes, monkeypatch):
    """"mean"/"sum": the row weights are known in the forward pass, so the gradients come from the forward's pass
    over the logits (one pass; the backward only scales them by the upstream gradient, here 3). "none": the
    backward needs the upstream gradient of every row and runs the chunks again."""
    calls = []
    real = gce._autograd.torch_chunks

    def spy(*a, **k):
        calls.append(k["want_stats"])
        return real(*a, **k)

    monkeypatch.setattr(gce._autograd, "torch_chunks", spy)
    vh, vw, target, kw = _make(N=9, vmap="map", Vb=90, fill=0.1, reduction=reduction, device="cpu",
                               dtype=torch.float64)
    upstream = torch.full(target.shape, 3.0, dtype=torch.float64) if reduction == "none" else torch.tensor(3.0,
                                                                                                            dtype=torch.float64)
    ours = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="torch"), vh, vw, target, kw, upstream)
    ref = _run(guided_cross_entropy_naive, vh, vw, target, kw, upstream)
    assert len(calls) == passes, calls
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_gradients_computed_under_no_grad(backend, monkeypatch):
    """An evaluation loop (torch.no_grad(), parameters that require grad) gets the loss alone: the one-pass
    forward would otherwise compute gradients no backward will read (autograd's needs_input_grad stays True
    under no_grad)."""
    asked = []
    real_torch, real_chunked = gce._autograd.torch_chunks, gce._chunked.chunked_loss

    def spy_torch(*a, **k):
        asked.append((k["need_dvh"], k["need_dvw"]))
        return real_torch(*a, **k)

    def spy_chunked(*a, **k):
        asked.append((k["need_dvh"], k["need_dvw"]))
        return real_chunked(*a, **k)

    monkeypatch.setattr(gce._autograd, "torch_chunks", spy_torch)
    monkeypatch.setattr(gce._chunked, "chunked_loss", spy_chunked)
    vh, vw, target, kw = _make(N=9, vmap="map", Vb=90, device="cpu")
    vh.requires_grad_()
    vw.requires_grad_()
    with torch.no_grad():
        loss = ivl.fused_guided_cross_entropy(vh, vw, target, backend=backend, **kw)
    ref = guided_cross_entropy_naive(vh.detach(), vw.detach(), target, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert asked and all(a == (False, False) for a in asked), asked
    ivl.fused_guided_cross_entropy(vh, vw, target, backend=backend, **kw).backward()  # with grad: one pass
    assert asked[-1] == (True, True) and vh.grad is not None and vw.grad is not None


@pytest.mark.parametrize("l1_reduction", ["kept", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_torch_backend(reduction, l1_reduction):
    vh, vw, target, kw = _make(N=5, Hv=6, Vv=11, Vb=13, Hb=4, base="logits", vmap="map", alpha="tensor",
                               fill=0.3, l1_coef=0.7, smoothing=0.1, reduction=reduction, ignore=(1,),
                               dtype=torch.float64, device="cpu", l1_reduction=l1_reduction)
    vh.requires_grad_()
    vw.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: ivl.fused_guided_cross_entropy(h, w, target, backend="torch", **kw), (vh, vw))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_derivative_raises_instead_of_a_wrong_value(backend, reduction):
    """The backward computes the gradients from saved statistics (or from gradients saved by the forward) as
    constants: it is not differentiable itself. ``create_graph=True`` still gives the right first-order gradients,
    and differentiating them (a Hessian-vector product, a gradient penalty) raises a clear error, whichever input
    it is taken with respect to, instead of a number that silently misses this op's Hessian term (or, for "none",
    an unrelated ``mm(): out=`` error)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    vh, vw, target, kw = _make(N=5, Hv=6, Vv=11, Vb=13, base="logits", vmap="map", reduction=reduction, ignore=(1,),
                               dtype=dtype, device="cpu" if backend == "torch" else DEVICE)
    upstream = torch.rand(target.shape, dtype=dtype, device=vh.device) if reduction == "none" else 1.0

    def grads(fn, create_graph):
        x, w = vh.clone().requires_grad_(), vw.clone().requires_grad_()
        loss = (fn(x.tanh(), w, target, **kw) * upstream).sum()  # value_hidden a non-linear function of x
        return (x, w) + torch.autograd.grad(loss, (x, w), create_graph=create_graph)

    x, w, gx, gw = grads(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), True)
    _, _, rx, rw = grads(guided_cross_entropy_naive, False)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    for g in (gx, gw):
        for wrt in (x, w):
            with pytest.raises(RuntimeError, match="fused_guided_cross_entropy has no second derivative"):
                torch.autograd.grad(g.pow(2).sum(), wrt, retain_graph=True)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="this torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_value_only_matches_F_linear_cross_entropy(backend):
    N, Hv, V = 33, 24, 150
    vh = torch.randn(N, Hv, device=DEVICE)
    vw = torch.randn(V, Hv, device=DEVICE) / Hv ** 0.5
    target = torch.randint(0, V, (N,), device=DEVICE)
    target[[0, 9]] = -100
    kw = dict(ignore_index=-100, label_smoothing=0.1, reduction="mean")
    theirs = _run(F.linear_cross_entropy, vh, vw, target, kw)
    ours = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw, target, kw)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_and_finite_grads(backend, reduction):
    vh, vw, target, kw = _make(N=7, Vv=70, base="logits", l1_coef=1.0, smoothing=0.1, reduction=reduction)
    target.fill_(-100)
    upstream = torch.ones(7, dtype=torch.float64) if reduction == "none" else None
    loss, dvh, dvw = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw,
                          target, kw, upstream)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dvh, torch.zeros_like(dvh)) and torch.equal(dvw, torch.zeros_like(dvw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    vh, vw, target, kw = _make(N=0, Vv=70, base="hidden")
    loss, dvh, dvw = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw,
                          target, kw)
    assert loss.item() == 0.0 and dvh.shape == (0, 24) and torch.equal(dvw, torch.zeros_like(dvw))


def test_int32_target_and_masked_base_logits():
    """int32 targets are accepted; a -inf base logit (masked token) is never predicted and keeps grads finite."""
    vh, vw, target, kw = _make(N=7, Vv=90, base="logits", vmap="map")
    bl = kw["base_logits"].clone()
    bl[:, 10:20] = float("-inf")
    target[(target >= 10) & (target < 20)] = 0
    kw["base_logits"] = bl
    for backend in ("torch", "triton"):
        ours = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw,
                    target.to(torch.int32), kw)
        ref = _run(lambda *a, **k: guided_cross_entropy_naive(*a, **k, dtype=torch.float64), vh.double(),
                   vw.double(), target, _to(kw, torch.float64))
        for o, r in zip(ours, ref):
            assert torch.isfinite(o).all()
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)


def _l1_reduction_reference(vh, vw, target, *, base_logits=None, base_hidden=None, base_weight=None, vocab_map=None,
                            alpha=1.0, fill=0.0, l1_coef=0.0, l1_reduction="kept", reduction="mean",
                            ignore_index=-100):
    """fp64, materialised: ``ce_n = lse(z_n) - z_n[t_n]`` (0 for ignored rows), ``l1_n = l1_coef * |vl_n|_1 / Vv``;
    "kept": ``loss_n = [kept] (ce_n + l1_n)``, mean = sum / K; "all": ``loss_n = ce_n + l1_n`` for every row,
    mean = sum ce / K + sum l1 / N. Counts of 0 give 0."""
    vh, vw = vh.double(), vw.double()
    vl = vh @ vw.T                                                           # [N, Vv]
    N, Vv = vl.shape
    if base_logits is not None:
        base = base_logits.double()
    elif base_hidden is not None:
        base = base_hidden.double() @ base_weight.double().T
    else:
        base = None
    Vb = base.shape[1] if base is not None else (vocab_map.shape[0] if vocab_map is not None else Vv)
    m = (vocab_map.long() if vocab_map is not None
         else torch.where(torch.arange(Vb) < Vv, torch.arange(Vb), -1).to(vh.device))
    remapped = torch.where(m >= 0, vl[:, m.clamp(min=0)], torch.full_like(vl[:, :1], fill))
    a = alpha.double().unsqueeze(1) if isinstance(alpha, torch.Tensor) else alpha
    z = a * remapped + (base if base is not None else 0.0)
    kept = target != ignore_index
    t = torch.where(kept, target, torch.zeros_like(target)).long()
    ce = torch.where(kept, torch.logsumexp(z, 1) - z.gather(1, t.unsqueeze(1)).squeeze(1), torch.zeros(()).double())
    l1 = l1_coef * vl.abs().sum(1) / Vv
    K = max(int(kept.sum()), 1)
    if l1_reduction == "kept":
        rows = torch.where(kept, ce + l1, torch.zeros(()).double())
        return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / K}[reduction]
    return {"none": ce + l1, "sum": ce.sum() + l1.sum(), "mean": ce.sum() / K + l1.sum() / max(N, 1)}[reduction]


L1_CASES = [
    # identity map (the L1 sum fused into the column loop), base head fused, odd sizes, ignored rows first/last
    _case("N37-hidden-identity-mean", N=37, Hv=20, Vv=101, base="hidden", ignore=(0, 4, 5, 36)),
    # a map (the L1 term's own value-vocabulary pass), base logits, per-row alpha, fill
    _case("N37-logits-map-alpha_tensor-sum", N=37, Hv=20, Vv=101, Vb=131, base="logits", vmap="map",
          alpha="tensor", fill=-0.4, ignore=(1, 2, 30), reduction="sum"),
    # value-only, map, per-row upstream gradient
    _case("N9-valueonly-map-none", N=9, Vv=61, Vb=70, base="none", vmap="map", ignore=(3, 8), reduction="none"),
    # base vocabulary wider than the value head (identity with an unmapped tail)
    _case("N5-logits-wide_base-mean", N=5, Vv=67, Vb=83, base="logits", ignore=(2,)),
    # every row ignored: "kept" gives 0, "all" the L1 term alone (with gradients)
    _case("N7-hidden-map-all_ignored-mean", N=7, Vv=50, Vb=64, vmap="map", ignore=tuple(range(7))),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("l1_reduction", ["kept", "all"])
@pytest.mark.parametrize("case", L1_CASES)
def test_l1_reduction_matches_definition(case, l1_reduction, backend):
    vh, vw, target, kw = _make(**case, l1_coef=0.9, dtype=torch.float32, l1_reduction=l1_reduction)
    kw.pop("label_smoothing")
    kw["l1_reduction"] = l1_reduction
    upstream = torch.rand(target.shape, dtype=torch.float64, device=vh.device) if kw["reduction"] == "none" else None
    ref = _run(_l1_reduction_reference, vh.double(), vw.double(), target, _to(kw, torch.float64), upstream)
    ours = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw, target, kw,
                upstream)
    for name, o, r in zip(("loss", "d value_hidden", "d value_weight"), ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")
    if case["ignore"] and l1_reduction == "all":
        # Ignored rows carry the L1 term's gradient under "all" (and none under "kept").
        ignored = torch.tensor(case["ignore"])
        assert (ours[1][ignored].abs().sum(1) > 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_l1_reduction_all_equals_kept_without_ignored_rows(backend):
    """Without ignored rows K = N: "all" and "kept" are the same loss, for every reduction."""
    for reduction in ("mean", "sum", "none"):
        vh, vw, target, kw = _make(N=9, Vv=70, base="logits", vmap="map", Vb=80, l1_coef=1.0, reduction=reduction)
        a = _run(lambda *x, **k: ivl.fused_guided_cross_entropy(*x, **k, backend=backend, l1_reduction="all"),
                 vh, vw, target, kw, torch.ones(9) if reduction == "none" else None)
        b = _run(lambda *x, **k: ivl.fused_guided_cross_entropy(*x, **k, backend=backend), vh, vw, target, kw,
                 torch.ones(9) if reduction == "none" else None)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs: each raises before anything is computed, naming the argument
# ------------------------------------------------------------------------------------------------------------
def _bad(id_, exc, match, **over):
    return pytest.param(exc, match, over, id=id_)


BAD = [
    _bad("target-wrong-length", ValueError, "target must have shape", target=lambda t: t[:-1]),
    _bad("target-float", TypeError, "target must have dtype", target=lambda t: t.float()),
    _bad("target-int16", TypeError, "target must have dtype", target=lambda t: t.to(torch.int16)),
    _bad("target-too-large", ValueError, r"target entries must lie in \[0, 90\)", target=lambda t: t.fill_(90)),
    _bad("target-negative", ValueError, "target entries", target=lambda t: t.fill_(-1)),
    _bad("target-not-tensor", TypeError, "target must be a torch.Tensor", target=lambda t: t.tolist()),
    _bad("base_logits-requires-grad", ValueError, r"base_logits requires grad.*detach",
         base_logits=lambda b: b.requires_grad_()),
    _bad("alpha-requires-grad", ValueError, r"alpha requires grad.*detach",
         alpha=lambda a: torch.ones(7, requires_grad=True)),
    _bad("label_smoothing-1", ValueError, r"label_smoothing must lie in \[0, 1\)", label_smoothing=lambda _: 1.0),
    _bad("label_smoothing-negative", ValueError, "label_smoothing", label_smoothing=lambda _: -0.1),
    _bad("reduction-unknown", ValueError, "reduction must be one of", reduction=lambda _: "avg"),
    _bad("l1_coef-nan", ValueError, "l1_coef must be a finite float >= 0", l1_coef=lambda _: float("nan")),
    _bad("l1_coef-inf", ValueError, "l1_coef must be a finite float >= 0", l1_coef=lambda _: float("inf")),
    _bad("l1_coef-negative", ValueError, "l1_coef must be a finite float >= 0", l1_coef=lambda _: -1.0),
    _bad("l1_coef-beyond-float32", ValueError, r"l1_coef must be a finite float >= 0, and finite in float32",
         l1_coef=lambda _: 1e39),
    _bad("l1_coef-int-beyond-float", ValueError, "l1_coef.*got an int of 1329 bits", l1_coef=lambda _: 10 ** 400),
    _bad("fill-beyond-float32", ValueError, r"fill must be finite in float32 \(\|fill\| <= 3.403e\+38\) or \+-inf",
         fill=lambda _: 1e39),
    _bad("fill-int-beyond-float", ValueError, "fill must be finite in float32", fill=lambda _: 10 ** 400),
    _bad("fill-nan", ValueError, r"fill must be a float \(not NaN\)", fill=lambda _: float("nan")),
    _bad("alpha-int-beyond-float", ValueError, "alpha must be finite in float32", alpha=lambda _: 10 ** 400),
    _bad("label_smoothing-int-beyond-float", ValueError, r"label_smoothing must lie in \[0, 1\)",
         label_smoothing=lambda _: 10 ** 400),
    _bad("ignore_index-beyond-int64", ValueError, r"ignore_index must be an int64", ignore_index=lambda _: 2 ** 70),
    _bad("ignore_index-below-int64", ValueError, r"ignore_index must be an int64", ignore_index=lambda _: -2 ** 63 - 1),
    _bad("l1_reduction-unknown", ValueError, r"l1_reduction must be one of \('kept', 'all'\).*got 'mean'",
         l1_reduction=lambda _: "mean"),
    _bad("l1_reduction-not-str", ValueError, r"l1_reduction must be one of", l1_reduction=lambda _: None),
    _bad("ignore_index-float", TypeError, "ignore_index must be a Python int", ignore_index=lambda _: -100.0),
    _bad("backend-cuda", RuntimeError, "not implemented for this op", backend=lambda _: "cuda"),
    _bad("backend-unknown", ValueError, "backend must be one of", backend=lambda _: "fast"),
    _bad("value_weight-dtype", TypeError, "value_weight dtype", value_weight=lambda w: w.double()),
    _bad("vocab_map-out-of-range", ValueError, "vocab_map entries must lie in",
         vocab_map=lambda _: torch.full((90,), 70)),
    _bad("both-base-forms", ValueError, "not both", base_hidden=lambda _: torch.randn(7, 4),
         base_weight=lambda _: torch.randn(90, 4)),
]


@pytest.mark.parametrize("exc,match,over", BAD)
def test_bad_inputs_raise_before_computing(exc, match, over, monkeypatch):
    vh, vw, target, kw = _make(N=7, Vv=70, Vb=90, base="logits", vmap="map", device="cpu")
    kw.pop("fill")

    def boom(*a, **k):
        raise AssertionError("computed before validation")

    monkeypatch.setattr(gce._autograd, "torch_chunks", boom)
    monkeypatch.setattr(gce._chunked, "chunked_loss", boom)
    args = dict(value_hidden=vh, value_weight=vw, target=target, **kw)
    for k, f in over.items():
        args[k] = f(args.get(k))
    vh0 = vh.clone()
    with pytest.raises(exc, match=match):
        ivl.fused_guided_cross_entropy(**args)
    assert torch.equal(vh, vh0)


# ------------------------------------------------------------------------------------------------------------
# Memory: the torch backend never holds [N, V]
# ------------------------------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent("""
    import sys, torch
    import ivl_kernels as ivl
    from ivl_kernels.reference import guided_cross_entropy_naive
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.manual_seed(0)
    N, V, H = 4096, 32000, 64
    vh = torch.randn(N, H, requires_grad=True); vw = (torch.randn(V, H) / 8).requires_grad_()
    bh = torch.randn(N, H); bw = torch.randn(V, H) / 8; t = torch.randint(0, V, (N,))
    torch.set_num_threads(2)
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    if sys.argv[1] == "naive":
        loss = guided_cross_entropy_naive(vh, vw, t, base_hidden=bh, base_weight=bw, l1_coef=1.0)
    else:
        loss = ivl.fused_guided_cross_entropy(vh, vw, t, base_hidden=bh, base_weight=bw, l1_coef=1.0,
                                              backend="torch")
    loss.backward()
    print(status("VmHWM") - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-RSS reset needs Linux /proc")
def test_torch_backend_memory_is_a_chunk_not_N_by_V():
    """Peak RSS growth (Linux VmHWM after resetting it via /proc/self/clear_refs) of forward+backward in a fresh
    process, N=4096, V=32000, H=64, fp32, base as hidden+weight: ours <= 10% of the naive loss's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    peaks = {}
    for which in ("naive", "ours"):
        out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, which], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        peaks[which] = int(out.stdout.strip().splitlines()[-1])
    # Analytic: naive holds several [N, V] fp32 tensors; ours one chunk (a few buffers of CHUNK_ELEMS["cpu"] logits).
    assert peaks["naive"] > 4096 * 32000 * 4, peaks
    print(f"peak RSS growth: naive {peaks['naive'] / 2**20:.0f} MiB, torch backend {peaks['ours'] / 2**20:.0f} MiB")
    assert peaks["ours"] <= 0.10 * peaks["naive"], peaks


def guided_loss_extra_memory(N: int) -> tuple:
    """``(extra, bound)``: the CUDA memory a bf16 guided loss forward + backward (V = 32000, H = 256, base as hidden
    states) takes beyond its inputs, and what it may take: one chunk of logits (base + value buffers, one when
    combined; with tiles ``P``, the partials, dX's float32 splits), the fp32 d value_weight accumulator, the
    gradients themselves (bf16, saved for backward and returned), O(N) row statistics: independent of N * V."""
    V, H = 32000, 256
    vh = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    vw = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / 16).requires_grad_()
    bh = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    bw = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / 16
    t = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ivl.fused_guided_cross_entropy(vh, vw, t, base_hidden=bh, base_weight=bw, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = gce._chunked.CHUNK_BYTES["cuda"] + V * H * 4 + 3 * (N * H + V * H) * 2 + 64 * N * 4 + (8 << 20)
    return extra, bound


@pytest.mark.skipif(not HAS_GPU, reason="CUDA memory statistics need a GPU")
@pytest.mark.parametrize("N", [8192, 32768])
def test_triton_memory_on_gpu_is_a_chunk_plus_accumulators(N):
    extra, bound = guided_loss_extra_memory(N)
    assert extra <= bound, (extra, bound)


@pytest.mark.parametrize("case", [
    _case("l1_kept", l1_coef=0.5),
    _case("l1_all", l1_coef=0.5, l1_reduction="all"),
    # No L1: the value head's GEMM written into the first Vv columns of the chunk's logits (a strided view)
    _case("wide_base_identity-no_l1-mean", Vb=60),
    _case("wide_base_identity-no_l1-none", Vb=60, reduction="none"),
    _case("map-no_l1-sum", Vb=60, vmap="map", fill=-0.5, reduction="sum"),
    # float16: the gradients' scale (the largest row weight) without a host read
    _case("fp16-map-l1-mean", Vb=60, vmap="map", l1_coef=0.5, dtype=torch.float16),
    _case("fp16-wide_base_identity-no_l1-none", Vb=60, reduction="none", dtype=torch.float16),
])
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON and (interpreter_enabled() or HAS_GPU) else []))
def test_traced_whole_by_torch_compile(backend, case):
    """torch.compile(fullgraph=True) traces the loss and its backward (no graph break); results equal eager.
    aot_eager runs dynamo + AOTAutograd (functionalisation, the custom ops' fakes) without a C++ toolchain."""
    torch._dynamo.reset()  # each case recompiles the same lambda: stay under dynamo's recompile limit
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(**dict(dict(N=7, Vv=50, base="logits", ignore=(2,)), **case), device=device)
    upstream = torch.rand(target.shape, dtype=torch.float64) if kw["reduction"] == "none" else None
    fn = torch.compile(lambda h, w: ivl.fused_guided_cross_entropy(h, w, target, backend=backend, **kw),
                       fullgraph=True, backend="aot_eager")
    compiled = _run(lambda h, w, t, **k: fn(h, w), vh, vw, target, {}, upstream)
    eager = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend), vh, vw, target, kw,
                 upstream)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


AUTOCAST_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and (interpreter_enabled() or HAS_GPU) else [])


@pytest.mark.parametrize("case", [
    # base hidden states without L1: the base GEMM then the value GEMM accumulated into it (addmm_)
    _case("hidden-identity-mean"),
    _case("hidden-map-l1-smooth-mean", vmap="map", Vb=60, l1_coef=0.5, smoothing=0.1),
    _case("logits-map-alpha_tensor-sum", base="logits", vmap="map", Vb=60, alpha="tensor", reduction="sum"),
    # "none": the gradients in the backward pass (logits recomputed there)
    _case("valueonly-l1-none", base="none", l1_coef=0.5, reduction="none"),
])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_autocast_region_changes_nothing(backend, compiled, case):
    """Inside ``torch.autocast(dtype=torch.bfloat16)`` (HF Trainer's ``bf16=True``) with float32 inputs, the loss
    and both gradients equal those outside it: the op computes in its inputs' dtypes with float32 accumulation
    (it used to crash, the torch backend on an in-place GEMM, the Triton one on an ``out=`` GEMM). The backward
    runs inside the region too; eager and compiled (aot_eager, fullgraph)."""
    torch._dynamo.reset()
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(**dict(dict(N=7, Vv=50, ignore=(2,)), **case), device=device)
    upstream = torch.rand(target.shape, dtype=torch.float64) if kw["reduction"] == "none" else None

    def loss(h, w):
        return ivl.fused_guided_cross_entropy(h, w, target, backend=backend, **kw)

    fn = torch.compile(loss, fullgraph=True, backend="aot_eager") if compiled else loss
    plain = _run(lambda h, w, t: loss(h, w), vh, vw, target, {}, upstream)
    with torch.autocast(device, dtype=torch.bfloat16):
        amp = _run(lambda h, w, t: fn(h, w), vh, vw, target, {}, upstream)
    for name, a, p in zip(("loss", "d value_hidden", "d value_weight"), amp, plain):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, p, msg=name)


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_compiled_loss_rejects_bad_targets_and_map_entries(backend):
    """Under torch.compile the range checks cannot read values while tracing: they are asserted on the device
    (``torch._assert_async``, in the graph: fullgraph still traces) and raise a RuntimeError when the compiled
    loss runs, instead of a loss in which a bad target's row counts with a target logit of 0. The Triton op
    checks the map itself (a ValueError). A good call still equals eager."""
    torch._dynamo.reset()
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(N=7, Vv=50, Vb=60, base="logits", vmap="map", ignore=(2,), device=device)
    vocab_map = kw.pop("vocab_map")

    def loss(h, w, t, m):
        return ivl.fused_guided_cross_entropy(h, w, t, vocab_map=m, backend=backend, **kw)

    fn = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled = _run(lambda h, w, t: fn(h, w, t, vocab_map), vh, vw, target, {})
    eager = _run(lambda h, w, t: loss(h, w, t, vocab_map), vh, vw, target, {})
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)
    for bad in (60, -1, -101):
        t = target.clone()
        t[4] = bad
        with pytest.raises(ValueError, match="target entries"):
            loss(vh, vw, t, vocab_map)
        with pytest.raises(RuntimeError, match="target entries must lie in"):
            fn(vh, vw, t, vocab_map)
    for bad in (50, -2):
        m = vocab_map.clone()
        m[7] = bad
        with pytest.raises(ValueError, match="vocab_map entries"):
            loss(vh, vw, target, m)
        with pytest.raises(ValueError if backend == "triton" else RuntimeError, match="vocab_map entries must lie in"):
            fn(vh, vw, target, m)


@pytest.mark.parametrize("arg,values", [
    ("fill", (0.5, -0.25, 1.5, float("-inf"))), ("l1_coef", (0.5, 0.7, 0.0, 1.25)), ("alpha", (0.5, 0.7, -1.25)),
    ("label_smoothing", (0.1, 0.2, 0.0))], ids=["fill", "l1_coef", "alpha", "label_smoothing"])
def test_torch_compile_traces_a_float_argument_that_changes(arg, values):
    """A float argument that changes between calls of a compiled step is traced as a symbolic float from its
    second value on: its validation must trace too (comparisons, not ``math.isnan`` / ``math.isfinite``), so
    fullgraph works for every value, and loss and gradients equal eager (torch backend)."""
    torch._dynamo.reset()
    vh, vw, target, kw = _make(N=7, Vv=50, Vb=60, base="logits", vmap="map", ignore=(2,), device="cpu")
    target = _targets_on_mapped_ids(target, kw, 50)  # fill=-inf: a target on an unmapped id has an infinite loss
    kw.pop(arg, None)
    fn = torch.compile(lambda h, w, x: ivl.fused_guided_cross_entropy(h, w, target, backend="torch", **{arg: x}, **kw),
                       fullgraph=True, backend="aot_eager")
    for x in values:
        compiled = _run(lambda h, w, t, **k: fn(h, w, x), vh, vw, target, {})
        eager = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="torch", **{arg: x}), vh, vw,
                     target, kw)
        for c, e in zip(compiled, eager):
            torch.testing.assert_close(c, e)


@pytest.mark.parametrize("backend,arg,l1_coef", [(b, "alpha", 0.5) for b in AUTOCAST_BACKENDS]
                         + [("torch", "fill", 0.0), ("torch", "fill", 0.5)])
def test_torch_compile_a_changing_float_compiles_at_most_twice(backend, arg, l1_coef):
    """A float alpha that changes every step (an annealed guidance strength): the first value is traced as a
    constant, the second on as a symbolic float; the op takes it as its per-row alpha tensor while tracing, so
    no op specialises the graph on its value again (the Triton op's float argument did: one compile per value,
    then dynamo's recompile limit). The torch backend's fill likewise (a 0-d tensor where ``masked_fill_`` /
    ``add_(alpha=)`` took the number). 10 values: at most 2 compiled frames, every value equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(N=7, Vv=50, Vb=60, base="logits", vmap="map", fill=-0.5, l1_coef=l1_coef,
                               ignore=(2,), device=device)
    kw.pop(arg)
    fn = torch.compile(lambda h, w, x: ivl.fused_guided_cross_entropy(h, w, target, backend=backend, **{arg: x}, **kw),
                       fullgraph=True, backend=cnt)
    for i in range(10):
        x = 0.3 + 0.07 * i if arg == "alpha" else -0.1 - 0.2 * i
        compiled = _run(lambda h, w, t: fn(h, w, x), vh, vw, target, {})
        eager = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend=backend, **{arg: x}), vh, vw,
                     target, kw)
        for c, e in zip(compiled, eager):
            torch.testing.assert_close(c, e)
    assert cnt.frame_count <= 2, cnt.frame_count


_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@needs_triton
@pytest.mark.parametrize("arg,values,reduction", [
    pytest.param("fill", (-0.5, 0.25, -1.5, 0.75), "mean", id="fill-mean"),
    pytest.param("l1_coef", (0.5, 0.25, 1.25, 0.75), "mean", id="l1_coef-mean"),
    pytest.param("label_smoothing", (0.1, 0.2, 0.05, 0.3), "mean", id="label_smoothing-mean"),
    # "none": the op runs again in the backward pass (logits recomputed), with the same floats
    pytest.param("label_smoothing", (0.1, 0.2, 0.05, 0.3), "none", id="label_smoothing-none"),
])
def test_torch_compile_triton_changing_float_does_not_recompile(arg, values, reduction):
    if arg != "fill" and _TORCH_VERSION < (2, 13):
        # Measured on torch 2.11 (the GPU image's), both backends, before and after host_scalars: a guard
        # ``as_tensor(x).item() == value`` from dynamo itself, 9 frames for 12 values (README says so).
        pytest.skip(f"torch {torch.__version__}'s dynamo specialises a changing {arg} (2 frames on torch 2.14)")
    """The Triton backend's ``fill``, ``l1_coef`` and ``label_smoothing`` (IVL's annealed schedules): the op's
    ``float`` arguments specialised the graph on each value (one compile per value, then dynamo's recompile
    limit); while tracing they reach it as a CPU tensor (``_traced.host_scalars``). After the first two values
    (a constant, then a symbolic float) no value recompiles, and every value's loss and gradients equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(N=7, Vv=50, Vb=60, base="logits", vmap="map", fill=-0.5, l1_coef=0.5,
                               smoothing=0.1, reduction=reduction, ignore=(2,), device=device)
    kw.pop(arg)
    upstream = torch.rand(target.shape, dtype=torch.float64) if reduction == "none" else None
    fn = torch.compile(lambda h, w, x: ivl.fused_guided_cross_entropy(h, w, target, backend="triton", **{arg: x}, **kw),
                       fullgraph=True, backend=cnt)
    for i, x in enumerate(values):
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):  # the first two values are the warm-up
            compiled = _run(lambda h, w, t: fn(h, w, x), vh, vw, target, {}, upstream)
        eager = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton", **{arg: x}), vh, vw,
                     target, kw, upstream)
        for name, c, e in zip(("loss", "d value_hidden", "d value_weight"), compiled, eager):
            torch.testing.assert_close(c, e, msg=f"{arg}={x}: {name}")
    assert cnt.frame_count == 2, cnt.frame_count


@pytest.mark.parametrize("chunk_rows", [None, 25], ids=["one_chunk", "chunks_of_25_rows"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_torch_backend_new_row_counts_do_not_recompile(reduction, chunk_rows, monkeypatch):
    """The torch backend under dynamic shapes: the loop over chunks of rows (``range(0, N, rows)``) specialised the
    graph on ``N`` (one compile per batch shape, though dynamo had marked the dimension dynamic); while tracing the
    chunks are ``row_chunks``' even split over a power of two of them. After N = 37 (static) and 53 (dynamic), the
    row counts 71 and 90 reuse the graph (one chunk by default; with 25-row chunks 53..90 all run 4), and every
    call's loss and gradients equal eager. "none": the backward pass loops over the chunks too."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if chunk_rows is not None:
        monkeypatch.setitem(gce._torch_backend.CHUNK_ELEMS, "cpu", chunk_rows * 60)  # rows = CHUNK_ELEMS // Vb
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")

    def loss(h, w, t, base_logits, vocab_map):
        return ivl.fused_guided_cross_entropy(h, w, t, base_logits=base_logits, vocab_map=vocab_map, fill=-0.5,
                                              l1_coef=0.5, label_smoothing=0.1, reduction=reduction, backend="torch")

    fn = torch.compile(loss, fullgraph=True, backend=cnt)
    for i, N in enumerate((37, 53, 71, 90)):
        vh, vw, target, kw = _make(N=N, Vv=50, Vb=60, base="logits", vmap="map", ignore=(2,), device="cpu")
        upstream = torch.rand(target.shape, dtype=torch.float64) if reduction == "none" else None
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):  # 37 and 53 are the warm-up
            compiled = _run(lambda h, w, t: fn(h, w, t, kw["base_logits"], kw["vocab_map"]), vh, vw, target, {},
                            upstream)
        eager = _run(lambda h, w, t: loss(h, w, t, kw["base_logits"], kw["vocab_map"]), vh, vw, target, {},
                     upstream)
        for name, c, e in zip(("loss", "d value_hidden", "d value_weight"), compiled, eager):
            torch.testing.assert_close(c, e, msg=f"N={N}: {name}")
    assert cnt.frame_count == 2, cnt.frame_count


@needs_triton
def test_guided_ce_chunked_opcheck():
    """``torch.library.opcheck`` of the Triton op (schema, fake registration, autograd registration, AOT dispatch
    with static and dynamic shapes), with its float arguments and with the CPU ``scalars`` tensor that replaces
    them while tracing; the tensor gives the op the same results as the floats."""
    vh, vw, target, kw = _make(N=5, Hv=16, Vv=20, Vb=24, base="logits", vmap="map", ignore=(1,), device="cpu")
    N, Vb, Vv = 5, 24, 20
    tl = torch.where(target >= 0, target, torch.full_like(target, -1))
    g, h = torch.full((N,), 0.25), torch.full((N,), 0.125)
    floats = (-0.5, 0.9, 0.1 / Vb, 0.5 / Vv)  # fill, smooth_self, smooth_all, l1_scale
    scalars = torch.tensor(floats, dtype=torch.float64)
    op = torch.ops.ivl_kernels.guided_ce_chunked.default

    def args(fill, smooth_self, smooth_all, l1_scale, lse=None, grads=True):
        return (vh, vw, kw["base_logits"], None, None, kw["vocab_map"], None, 1.3, fill, tl, lse,
                g if grads else None, h if grads else None, Vb, True, smooth_self, smooth_all, l1_scale, grads, grads)

    stats = op(*args(*floats, grads=False))[0]
    for lse in (None, stats[0].contiguous()):
        for grads in (False, True) if lse is None else (True,):
            torch.library.opcheck(op, args(*floats, lse=lse, grads=grads))
            torch.library.opcheck(op, args(0.0, 1.0, 0.0, 0.0, lse=lse, grads=grads) + (scalars,))
            for a, b in zip(op(*args(*floats, lse=lse, grads=grads)),
                            op(*args(0.0, 1.0, 0.0, 0.0, lse=lse, grads=grads), scalars)):
                assert torch.equal(a, b)


@needs_triton
def test_triton_strided_alpha_tensor():
    """A per-row alpha that is a strided view (every other element) reads the right element per row."""
    vh, vw, target, kw = _make(N=11, base="logits", vmap="map", Vb=90, alpha="tensor", dtype=torch.float32,
                               reduction="none")
    kw["alpha"] = torch.stack([kw["alpha"], torch.full_like(kw["alpha"], 100.0)], 1).reshape(-1)[::2]
    assert kw["alpha"].stride(0) == 2
    _check("triton", vh, vw, target, kw, torch.float32)


@needs_triton
@pytest.mark.parametrize("case", [
    _case("N33-hidden-identity-ignore-mean", N=33, ignore=(0, 7)),
    _case("N33-hidden-wide_base-alpha_tensor-smooth-sum", N=33, Vb=131, Vv=97, alpha="tensor", smoothing=0.1,
          fill=-0.5, reduction="sum"),
    _case("N7-hidden-narrow_base-alpha2-none", N=7, Vb=70, Vv=100, alpha=2.0, reduction="none"),
])
def test_triton_packed_heads_match_reference(case, monkeypatch):
    """Packed heads (``pack_head_weights``, the value head a trainable view of the shared buffer): one GEMM per
    chunk over ``[X_b | alpha X_v]``; loss and gradients as the fp64 oracle's, over several chunks."""
    device = "cuda" if HAS_GPU else "cpu"
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    Vb = kw["base_weight"].shape[0]
    monkeypatch.setitem(gce._chunked.CHUNK_BYTES, device, 5 * 4 * (2 * max(Vb, vw.shape[0]) + 200))
    monkeypatch.setattr(gce._chunked, "ROW_ALIGN", 1)
    seen = []
    real = gce._chunked.packed_view
    monkeypatch.setattr(gce._chunked, "packed_view", lambda *a: seen.append(real(*a)) or seen[-1])
    pb, pv = ivl.pack_head_weights(kw["base_weight"], vw)
    pv = torch.nn.Parameter(pv)
    assert pv.untyped_storage().data_ptr() == pb.untyped_storage().data_ptr()
    upstream = torch.rand(target.shape, dtype=torch.float64) if kw["reduction"] == "none" else None
    h = vh.clone().requires_grad_()
    loss = ivl.fused_guided_cross_entropy(h, pv, target, backend="triton", **dict(kw, base_weight=pb))
    loss.backward(None if upstream is None else upstream.to(loss.dtype))
    assert seen and all(v is not None for v in seen), "packed heads did not take the one-GEMM path"
    ref = _run(lambda *a, **k: guided_cross_entropy_naive(*a, **k, dtype=torch.float64),
               vh.double(), vw.double(), target, _to(kw, torch.float64), upstream)
    same = _run(lambda *a, **k: guided_cross_entropy_naive(*a, **k, dtype=torch.float32), vh, vw, target, kw,
                upstream)
    for name, o, s, r in zip(("loss", "d value_hidden", "d value_weight"), (loss.detach(), h.grad, pv.grad), same,
                             ref):
        atol = ATOL[torch.float32] * r.abs().max().item()
        assert _err(o, r) <= 2 * _err(s, r) + atol, f"{name}: {_err(o, r):.3g} vs torch {_err(s, r):.3g}"

"""No map content can make a kernel address memory outside the value head, and bad maps still raise eagerly.

The host range check of ``vocab_map`` can be bypassed: it is skipped while a CUDA graph is captured or a graph is
traced, cached per CUDA tensor, and blind to writes behind torch's version counter (a NumPy view, DLPack). Every
backend therefore treats an entry outside ``[-1, Vv)`` as unmapped (``fill``, no gradient). These tests call the
bare launchers (the host check is not on that path) with such entries and a value head that is the head of a
larger tensor poisoned with huge values past row ``Vv``: any out-of-range read would show in the result.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels import _backends, _checked_values, _validate
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled
from ivl_kernels._validate import validate_guided
from ivl_kernels.ops import guided_cross_entropy as gce
from ivl_kernels.ops import guided_logits as gl
from ivl_kernels.ops.guided_logits import guided_logits_torch
from ivl_kernels.reference import guided_logits_naive

HAS_GPU = torch.cuda.is_available()
POISON = 1e30  # clamped to the dtype's largest finite value for half precision (1e30 overflows float16)


def _launchers():
    params = [pytest.param("torch", "cpu", id="torch-cpu")]
    if HAS_TRITON and interpreter_enabled():
        params.append(pytest.param("triton", "cpu", id="triton-interp"))
    gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
    params += [pytest.param("torch", "cuda", id="torch-cuda", marks=gpu),
               pytest.param("triton", "cuda", id="triton-cuda", marks=gpu),
               pytest.param("cuda", "cuda", id="cuda-ext", marks=[gpu, pytest.mark.skipif(
                   HAS_GPU and _backends.cuda_extension() is None, reason="CUDA extension not built")])]
    return params


def _poisoned_head(Vv, Hv, device, dtype=torch.float32):
    """``[Vv, Hv]`` view of a ``[Vv + 64, Hv]`` tensor whose extra rows hold ``POISON``."""
    big = torch.full((Vv + 64, Hv), min(POISON, torch.finfo(dtype).max), device=device, dtype=dtype)
    big[:Vv] = (torch.randn(Vv, Hv, device=device) / math.sqrt(Hv)).to(dtype)
    return big[:Vv]


def _bad_map(Vb, Vv, dtype, device):
    """A valid many-to-one map with -1 holes, then entries no check would accept; and its sanitised twin."""
    m = torch.randint(0, Vv, (Vb,))
    m[torch.rand(Vb) < 0.1] = -1
    bad = [Vv, Vv + 1, Vv + 99999, -2, -7, torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min]
    if dtype == torch.int64:
        bad += [2 ** 40, -(2 ** 40), torch.iinfo(torch.int64).max]
    pos = torch.randperm(Vb)[: len(bad)]
    m[pos] = torch.tensor(bad)
    clean = torch.where((m >= -1) & (m < Vv), m, -1)
    return m.to(device=device, dtype=dtype), clean.to(device=device, dtype=dtype)


def _logits_bare(backend, a, out):
    """The kernel launch without the public function's (and the custom op's) host check."""
    alpha_t = a.alpha if isinstance(a.alpha, torch.Tensor) else None
    alpha_s = 0.0 if alpha_t is not None else a.alpha
    if backend == "torch":
        guided_logits_torch(a, out)
    elif backend == "triton":
        gl.launch_triton(a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map,
                         alpha_t, alpha_s, a.fill, out)
    else:
        torch.ops.ivl_kernels.guided_logits_decode_(
            a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map,
            alpha_t.float().contiguous() if alpha_t is not None else None, alpha_s, a.fill, out)
    return out


@pytest.mark.parametrize("backend,device", _launchers())
@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("base_mode", ["logits", "hidden"])
def test_guided_logits_out_of_range_entries_read_nothing(backend, device, map_dtype, base_mode):
    M, Hv, Vv, Vb, Hb = 3, 64, 211, 300, 32
    vw = _poisoned_head(Vv, Hv, device)
    vh = torch.randn(M, Hv, device=device)
    kw = (dict(base_logits=torch.randn(M, Vb, device=device)) if base_mode == "logits" else
          dict(base_hidden=torch.randn(M, Hb, device=device), base_weight=torch.randn(Vb, Hb, device=device) / 6))
    bad, clean = _bad_map(Vb, Vv, map_dtype, device)
    alpha = torch.rand(M, device=device) + 0.5
    results = {}
    for name, m in (("bad", bad), ("clean", clean)):
        # The clean twin goes through validation; the bad map is handed to the kernel as it is.
        a = validate_guided(vh, vw, vocab_map=clean, alpha=alpha, fill=-0.5, **kw)
        a.vocab_map = m
        out = torch.full((M, Vb), float("nan"), device=device)
        results[name] = _logits_bare(backend, a, out)
    assert results["bad"].abs().max() < 1e3, "a poisoned row past Vv was read"
    assert torch.equal(results["bad"], results["clean"])
    ref = guided_logits_naive(vh, vw, vocab_map=clean, alpha=alpha, fill=-0.5, dtype=torch.float64, **kw)
    torch.testing.assert_close(results["bad"].double(), ref, rtol=1e-4, atol=1e-4)


def _loss_bare(backend, vh, vw, m, target, base_logits, g):
    """Forward statistics and both gradients from the loss launchers, bypassing the custom ops' map check."""
    N = vh.shape[0]
    if backend == "triton":
        st = gce.launch_fwd(vh, vw, base_logits, None, None, m, None, 0.7, -0.5, target, base_logits.shape[1], True)
        grads = gce.launch_bwd(vh, vw, base_logits, None, None, m, None, 0.7, -0.5, target, st[0].contiguous(), g,
                               base_logits.shape[1], 0.9, 0.1 / base_logits.shape[1], 0.3 / vw.shape[0])
    else:
        st = gce.torch_fwd(vh, vw, base_logits, None, None, m, None, 0.7, -0.5, target, base_logits.shape[1], True,
                           torch.float32)
        grads = gce.torch_bwd(vh, vw, base_logits, None, None, m, None, 0.7, -0.5, target, st[0], g,
                              base_logits.shape[1], 0.9, 0.1 / base_logits.shape[1], 0.3 / vw.shape[0],
                              torch.float32)
    assert st.shape[1] == N
    return st, grads


@pytest.mark.parametrize("backend,device", [p for p in _launchers() if p.values[0] != "cuda"])
@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_loss_out_of_range_entries_read_and_write_nothing(backend, device, map_dtype):
    N, Hv, Vv, Vb = 37, 32, 150, 190
    vw = _poisoned_head(Vv, Hv, device)
    vh = torch.randn(N, Hv, device=device)
    base_logits = torch.randn(N, Vb, device=device)
    target = torch.randint(0, Vb, (N,), device=device)
    target[::5] = -1
    g = torch.full((N,), 1.0 / N, device=device)
    bad, clean = _bad_map(Vb, Vv, map_dtype, device)
    st_bad, (dvh_bad, dvw_bad) = _loss_bare(backend, vh, vw, bad, target, base_logits, g)
    st_clean, (dvh_clean, dvw_clean) = _loss_bare(backend, vh, vw, clean, target, base_logits, g)
    for got in (st_bad, dvh_bad, dvw_bad):
        assert torch.isfinite(got).all() and got.abs().max() < 1e6, "a poisoned row past Vv was read"
    assert torch.equal(st_bad, st_clean)
    if device == "cpu":
        assert torch.equal(dvh_bad, dvh_clean)
        assert torch.equal(dvw_bad, dvw_clean)
    else:
        # CUDA gradients are summed with atomics (Triton) or index_add_ (torch) in no fixed order: equal up to
        # float32 reassociation, which a poisoned read (1e30 x hidden) would exceed by ~30 orders of magnitude.
        torch.testing.assert_close(dvh_bad, dvh_clean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dvw_bad, dvw_clean, rtol=1e-5, atol=1e-7)


def test_numpy_mutated_map_still_raises_eagerly():
    """The FINDINGS case: a map checked once, then written through a NumPy view (no version bump)."""
    M, Hv, Vv, Vb = 2, 16, 40, 50
    vh, vw, base = torch.randn(M, Hv), torch.randn(Vv, Hv), torch.randn(M, Vb)
    m = torch.randint(-1, Vv, (Vb,), dtype=torch.int32)
    ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m)
    version = m._version
    m.numpy()[7] = Vv + 99999
    assert m._version == version
    with pytest.raises(ValueError, match=rf"\[-1, {Vv}\)"):
        ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m)
    with pytest.raises(ValueError, match=rf"\[-1, {Vv}\)"):
        ivl.fused_guided_cross_entropy(vh, vw, torch.zeros(M, dtype=torch.long), base_logits=base, vocab_map=m)


def test_checked_map_cache_holds_tensors_not_addresses():
    """The CUDA-map cache: a hit needs the same live tensor object at the same version and value vocabulary."""
    m = torch.zeros(10, dtype=torch.int32)
    _checked_values.remember_checked(m, ("map", 5))
    assert _checked_values.already_checked(m, ("map", 5))
    assert not _checked_values.already_checked(m, ("map", 4))
    assert not _checked_values.already_checked(m.clone(), ("map", 5))
    m.add_(1)  # in-place through torch: version bump
    assert not _checked_values.already_checked(m, ("map", 5))
    _checked_values.remember_checked(m, ("map", 5))
    key = id(m)
    del m
    gc.collect()
    # A new tensor that reuses the freed object's id (and possibly its storage) is not taken as checked.
    for _ in range(64):
        n = torch.full((10,), 99, dtype=torch.int32)
        if id(n) == key:
            break
    assert not _checked_values.already_checked(n, ("map", 5))


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_cuda_map_written_behind_torchs_back_gives_fill(backend):
    """A cached CUDA map edited through DLPack (no version bump) is not re-checked: the kernel treats the entry as
    unmapped, the result is ``fill`` there, and the CUDA context stays usable."""
    if backend == "cuda" and _backends.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    M, Hv, Vv, Vb = 2, 64, 300, 320
    vw = _poisoned_head(Vv, Hv, "cuda", torch.float16)
    vh = torch.randn(M, Hv, device="cuda", dtype=torch.float16)
    base = torch.randn(M, Vb, device="cuda")
    m = torch.randint(0, Vv, (Vb,), device="cuda", dtype=torch.int32)
    ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m, backend=backend)
    alias = torch.from_dlpack(m.__dlpack__())
    alias[11] = Vv + 99999
    assert m._version == 0 or int(m[11]) == Vv + 99999
    out = ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m, alpha=1.0, fill=-3.0, backend=backend)
    torch.cuda.synchronize()
    torch.testing.assert_close(out[:, 11], base[:, 11] - 3.0)
    assert out.abs().max() < 1e3


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: the decode step has no host sync, so it can be captured and replayed
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("base_mode", ["logits-in-place", "hidden"])
def test_decode_step_captures_in_cuda_graph(backend, base_mode):
    if backend == "cuda" and _backends.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    M, Hv, Vv, Vb, Hb = 4, 128, 3001, 3203, 256
    dt = torch.bfloat16
    vh = torch.randn(M, Hv, device="cuda", dtype=dt)
    vw = (torch.randn(Vv, Hv, device="cuda") / math.sqrt(Hv)).to(dt)
    bw = (torch.randn(Vb, Hb, device="cuda") / math.sqrt(Hb)).to(dt)
    bh = torch.randn(M, Hb, device="cuda", dtype=dt)
    scores = torch.randn(M, Vb, device="cuda")
    alpha = torch.rand(M, device="cuda") + 0.5
    m = torch.randint(-1, Vv, (Vb,), device="cuda", dtype=torch.int64)
    out = torch.empty(M, Vb, device="cuda")

    def step():
        if base_mode == "hidden":
            return ivl.fused_guided_logits(vh, vw, base_hidden=bh, base_weight=bw, vocab_map=m, alpha=alpha,
                                           out=out, backend=backend)
        return ivl.fused_guided_logits(vh, vw, base_logits=scores, vocab_map=m, alpha=alpha, out=scores,
                                       backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile / autotune / check the map outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        vh.copy_(torch.randn(M, Hv, device="cuda"))
        bh.copy_(torch.randn(M, Hb, device="cuda"))
        alpha.copy_(torch.rand(M, device="cuda"))
        base0 = torch.randn(M, Vb, device="cuda")
        scores.copy_(base0)
        graph.replay()
        kw = dict(base_hidden=bh, base_weight=bw) if base_mode == "hidden" else dict(base_logits=base0)
        ref = guided_logits_naive(vh, vw, vocab_map=m, alpha=alpha, dtype=torch.float64, **kw)
        got = out if base_mode == "hidden" else scores
        torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_unchecked_map_during_capture_is_guarded():
    """A map first seen inside a capture is not range-checked (that would sync): a bad entry gives fill."""
    M, Hv, Vv, Vb = 2, 64, 500, 512
    vh = torch.randn(M, Hv, device="cuda", dtype=torch.float16)
    vw = _poisoned_head(Vv, Hv, "cuda", torch.float16)
    base = torch.randn(M, Vb, device="cuda")
    warm = torch.randint(0, Vv, (Vb,), device="cuda", dtype=torch.int32)
    ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=warm)  # compile outside the capture
    fresh = torch.randint(0, Vv, (Vb,), device="cuda", dtype=torch.int32)
    fresh[5] = Vv + 12345
    out = torch.empty(M, Vb, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=fresh, fill=2.0, out=out)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out[:, 5], base[:, 5] + 2.0)
    assert out.abs().max() < 1e3
    # Outside a capture the same map is rejected eagerly.
    with pytest.raises(ValueError, match="vocab_map"):
        ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=fresh)


def test_vocab_map_object_hands_the_kernels_one_tensor_per_device():
    """A VocabMap passed every decode step is copied to the device once, so its range check stays cached."""
    from ivl_kernels import VocabMap

    vm = VocabMap(torch.randint(-1, 40, (50,)), value_vocab_size=40)
    assert vm.on("cpu") is vm.index
    meta = vm.on("meta")
    assert meta.device.type == "meta" and vm.on(torch.device("meta")) is meta
    assert _validate.check_vocab_map(vm, 50, 40, torch.device("meta"), check_values=False) is meta

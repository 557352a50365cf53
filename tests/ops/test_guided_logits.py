"""fused_guided_logits on every backend against an fp64 plain-torch reference.

Error rule (flash-attention's): ``err_backend <= 2 * err_plain_torch_same_dtype + atol``, where both errors are
measured against the formula evaluated in float64 on the same inputs. Outputs are poisoned with NaN before the
call so an element the kernel never writes cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels import _backends
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled
from ivl_kernels.ops._measured import Measured
from ivl_kernels.ops.guided_logits import CUDA_MAX_ROWS
from ivl_kernels.reference import guided_logits_naive

HAS_GPU = torch.cuda.is_available()
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _backend_params():
    """(backend, device) pairs that can run here: torch on CPU always; Triton under the interpreter on CPU or
    on a GPU; CUDA and the GPU variants only with a GPU."""
    params = [pytest.param("torch", "cpu", id="torch-cpu")]
    if HAS_TRITON and interpreter_enabled():
        params.append(pytest.param("triton", "cpu", id="triton-interp"))
    gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
    params += [
        pytest.param("torch", "cuda", id="torch-cuda", marks=gpu),
        pytest.param("triton", "cuda", id="triton-cuda", marks=gpu),
        pytest.param("cuda", "cuda", id="cuda-ext", marks=[gpu, pytest.mark.skipif(
            HAS_GPU and _backends.cuda_extension() is None, reason="CUDA extension not built")]),
    ]
    return params


BACKENDS = _backend_params()


def _dtypes_for(backend, device):
    if backend == "torch":
        return [torch.float32, torch.float16, torch.bfloat16]
    if device == "cpu":  # the Triton interpreter has no bfloat16
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _skip_unsupported(backend, device, dtype):
    if dtype not in _dtypes_for(backend, device):
        pytest.skip(f"{backend} on {device} does not run {dtype}")


def make_map(kind: str, Vb: int, Vv: int, device) -> torch.Tensor | None:
    """Vocabulary maps: identity (None), a permutation-like injective map with -1 holes, many-to-one."""
    if kind == "identity":
        return None
    if kind == "injective":
        perm = torch.randperm(max(Vb, Vv))[:Vb]
        m = torch.where(perm < Vv, perm, torch.full_like(perm, -1))
        m[torch.rand(Vb) < 0.1] = -1
        return m.to(device=device, dtype=torch.int32)
    if kind == "many_to_one":
        m = torch.randint(0, max(1, Vv // 4), (Vb,))
        m[torch.rand(Vb) < 0.2] = -1
        return m.to(device=device, dtype=torch.int64)
    raise ValueError(kind)


def assert_guided_close(out, ref64, plain_same_dtype, dtype, what=""):
    """``|out - ref| <= 2 |plain - ref| + atol`` elementwise-max, and identical -inf/+inf positions."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    out64 = out.double()
    assert not torch.isnan(out64).any(), f"{what}: NaN in output (an element was not written?)"
    inf_ref = torch.isinf(ref64)
    assert torch.equal(torch.isinf(out64), inf_ref), f"{what}: infinite entries differ from the reference"
    if inf_ref.any():
        assert torch.equal(out64[inf_ref], ref64[inf_ref]), f"{what}: sign of infinite entries differs"
    fin = ~inf_ref
    err = (out64[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0
    err_plain = (plain_same_dtype.double()[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0
    bound = 2 * err_plain + ATOL[dtype] * max(1.0, ref64[fin].abs().max().item() if fin.any() else 1.0)
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (plain torch {err_plain:.3e})"


def _inputs(M, Hv, Vv, Vb, Hb, dtype, device, base_mode, lead=None):
    lead = lead or (M,)
    vh = torch.randn(*lead, Hv, device=device).to(dtype)
    vw = (torch.randn(Vv, Hv, device=device) / math.sqrt(Hv)).to(dtype)
    kw = {}
    if base_mode == "logits":
        kw["base_logits"] = torch.randn(*lead, Vb, device=device).to(dtype)
    else:
        kw["base_hidden"] = torch.randn(*lead, Hb, device=device).to(dtype)
        kw["base_weight"] = (torch.randn(Vb, Hb, device=device) / math.sqrt(Hb)).to(dtype)
    return vh, vw, kw


def _run_and_check(backend, device, dtype, vh, vw, kw, vocab_map, alpha, fill, what, in_place=False):
    ref = guided_logits_naive(vh, vw, vocab_map=vocab_map, alpha=alpha, fill=fill, dtype=torch.float64, **kw)
    plain = guided_logits_naive(vh, vw, vocab_map=vocab_map, alpha=alpha, fill=fill, dtype=dtype, **kw)
    Vb = ref.shape[1]
    if in_place:
        base = kw["base_logits"]
        result = ivl.fused_guided_logits(vh, vw, vocab_map=vocab_map, alpha=alpha, fill=fill, out=base,
                                         backend=backend, **kw)
        assert result is base
        out = base.reshape(-1, Vb)
    else:
        out_dtype = kw["base_logits"].dtype if "base_logits" in kw else torch.float32
        out = torch.full((ref.shape[0], Vb), float("nan"), dtype=out_dtype, device=device)
        result = ivl.fused_guided_logits(vh, vw, vocab_map=vocab_map, alpha=alpha, fill=fill, out=out,
                                         backend=backend, **kw)
        assert result is out
    assert_guided_close(out, ref, plain, dtype, what)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("base_mode", ["logits", "hidden"])
@pytest.mark.parametrize("map_kind", ["identity", "injective", "many_to_one"])
@pytest.mark.parametrize("M", [1, 7, 123], ids=lambda m: f"M{m}")
def test_matches_reference(backend, device, dtype, base_mode, map_kind, M):
    _skip_unsupported(backend, device, dtype)
    if backend == "cuda" and M > CUDA_MAX_ROWS:
        pytest.skip(f"the CUDA decode kernel handles M <= {CUDA_MAX_ROWS} (larger M: test_cuda_rejects_large_m)")
    # Vocab sizes that are multiples of no block size; Vb > Vv so the identity map has an unmapped tail.
    # Hidden sizes divisible by 8 so the CUDA kernel's 16-byte loads apply (odd sizes: test_odd_hidden_sizes).
    Hv, Vv, Vb, Hb = 40, 1001, 1031, 56
    vh, vw, kw = _inputs(M, Hv, Vv, Vb, Hb, dtype, device, base_mode)
    vocab_map = make_map(map_kind, Vb, Vv, device)
    alpha = torch.rand(M, device=device, dtype=torch.float32) * 2 - 0.5 if M > 1 else 0.75
    _run_and_check(backend, device, dtype, vh, vw, kw, vocab_map, alpha, fill=-0.25,
                   what=f"{backend}/{device}/{dtype}/{base_mode}/{map_kind}/M{M}")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "cuda-ext"])
@pytest.mark.parametrize("Hv,Hb", [(1, 3), (33, 17), (130, 65)], ids=lambda v: str(v))
def test_odd_hidden_sizes(backend, device, Hv, Hb):
    vh, vw, kw = _inputs(5, Hv, 77, 95, Hb, torch.float32, device, "hidden")
    _run_and_check(backend, device, torch.float32, vh, vw, kw, make_map("injective", 95, 77, device), 1.5, 0.0,
                   what=f"Hv={Hv}, Hb={Hb}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_in_place_on_base_logits_with_neg_inf(backend, device, dtype):
    """A logits processor writes into ``scores``: masked (-inf) tokens stay -inf, the rest are guided."""
    _skip_unsupported(backend, device, dtype)
    M, Hv, Vv, Vb = 6, 48, 300, 333
    vh, vw, kw = _inputs(M, Hv, Vv, Vb, 0, dtype, device, "logits")
    kw["base_logits"][torch.rand(M, Vb, device=device) < 0.3] = float("-inf")
    _run_and_check(backend, device, dtype, vh, vw, kw, make_map("many_to_one", Vb, Vv, device), 2.0, 0.5,
                   what="in place", in_place=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float32_scores_with_half_value_network(backend, device):
    """generate() hands fp32 scores to processors while the value network runs in half precision."""
    dtype = torch.float16
    M, Hv, Vv, Vb = 3, 64, 500, 512
    vh = torch.randn(M, Hv, device=device).to(dtype)
    vw = (torch.randn(Vv, Hv, device=device) / 8).to(dtype)
    base = torch.randn(M, Vb, device=device)
    ref = guided_logits_naive(vh, vw, base_logits=base, alpha=0.5, dtype=torch.float64)
    plain = guided_logits_naive(vh, vw, base_logits=base, alpha=0.5, dtype=dtype)
    out = ivl.fused_guided_logits(vh, vw, base_logits=base, alpha=0.5, backend=backend)
    assert out.dtype == torch.float32
    assert_guided_close(out, ref, plain, dtype, "fp32 scores")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "cuda-ext"])
def test_non_contiguous_inputs(backend, device):
    """Strided hidden states, a column-major LM head, a strided map and base/out slices of bigger tensors."""
    M, Hv, Vv, Vb, Hb = 9, 24, 211, 257, 20
    vh = torch.randn(M, 2 * Hv, device=device)[:, ::2]
    vw = (torch.randn(Hv, Vv, device=device) / 5).T  # stride(-1) != 1
    bh = torch.randn(2 * M, Hb, device=device)[::2]
    bw = torch.randn(Vb, Hb + 3, device=device)[:, :Hb]
    vocab_map = make_map("injective", 2 * Vb, Vv, device)[::2].contiguous()[: Vb]
    vocab_map = torch.stack([vocab_map, vocab_map], 1)[:, 0]  # strided view, stride 2
    assert not vw.is_contiguous() and vocab_map.stride(0) == 2
    kw = dict(base_hidden=bh, base_weight=bw)
    _run_and_check(backend, device, torch.float32, vh, vw, kw, vocab_map, 0.3, 1.0, what="strided hidden")
    base_big = torch.randn(M, Vb + 11, device=device)
    base = base_big[:, 5: 5 + Vb]
    _run_and_check(backend, device, torch.float32, vh, vw, {"base_logits": base}, vocab_map, -1.0, 0.0,
                   what="strided base, in place", in_place=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_leading_dims_are_flattened(backend, device):
    B, T, Hv, Vv, Vb = 2, 3, 32, 100, 120
    vh, vw, kw = _inputs(None, Hv, Vv, Vb, 0, torch.float32, device, "logits", lead=(B, T))
    out = ivl.fused_guided_logits(vh, vw, alpha=0.5, backend=backend, **kw)
    assert out.shape == (B * T, Vb)
    ref = guided_logits_naive(vh, vw, alpha=0.5, dtype=torch.float64, **kw)
    assert_guided_close(out, ref, guided_logits_naive(vh, vw, alpha=0.5, **kw), torch.float32, "3-D")
    # out= with the leading dims of value_hidden also works, and the result lands in the caller's tensor.
    out3 = torch.full((B, T, Vb), float("nan"), device=device)
    assert ivl.fused_guided_logits(vh, vw, alpha=0.5, out=out3, backend=backend, **kw) is out3
    assert_guided_close(out3.reshape(-1, Vb), ref, guided_logits_naive(vh, vw, alpha=0.5, **kw), torch.float32, "3-D out")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_alpha_zero_and_empty_rows(backend, device):
    vh, vw, kw = _inputs(4, 32, 50, 64, 0, torch.float32, device, "logits")
    out = ivl.fused_guided_logits(vh, vw, alpha=0.0, backend=backend, **kw)
    # alpha = 0 leaves the base logits exactly as they were (to the last bit).
    assert torch.equal(out, kw["base_logits"])
    vh0 = vh[:0]
    out0 = ivl.fused_guided_logits(vh0, vw, base_logits=kw["base_logits"][:0], backend=backend)
    assert out0.shape == (0, 64)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accepts_vocab_map_object(backend, device):
    """Anything with an ``.index`` tensor (a VocabMap) is accepted as vocab_map."""

    class FakeMap:
        def __init__(self, index):
            self.index = index

    vh, vw, kw = _inputs(2, 32, 60, 70, 0, torch.float32, device, "logits")
    m = make_map("injective", 70, 60, device)
    a = ivl.fused_guided_logits(vh, vw, vocab_map=FakeMap(m), backend=backend, **kw)
    b = ivl.fused_guided_logits(vh, vw, vocab_map=m, backend=backend, **kw)
    assert torch.equal(a, b)


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("IVL_KERNELS_BACKEND", raising=False)
    assert _backends.select("auto", torch.device("cpu"), triton_supports=lambda: "") == "torch"


@pytest.fixture
def fake_route(monkeypatch):
    """The router without a GPU: both backends usable, timings faked per backend, capture state settable."""
    from ivl_kernels.ops import guided_logits as gl

    monkeypatch.delenv("IVL_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backends, "cuda_usable", lambda d: (True, ""))
    monkeypatch.setattr(_backends, "triton_usable", lambda d: (True, ""))
    monkeypatch.setattr(gl._route, "ROUTE", Measured(fallback="triton"))
    state = dict(capturing=False, ms={"cuda": 0.3, "triton": 0.2}, measured=[])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def measure(a):
        state["measured"].append(a.M)
        return min(state["ms"], key=state["ms"].get)

    monkeypatch.setattr(gl._route, "_measure_route", measure)

    def pick(M, base="logits"):
        from ivl_kernels._validate import validate_guided

        vh, vw, kw = _inputs(M, 64, 100, 128, 16, torch.float16, "cpu", base)
        a = validate_guided(vh, vw, **kw)
        a.device = torch.device("cuda", 0)
        return _backends.select("auto", torch.device("cuda"), cuda_supports=lambda: "", triton_supports=lambda: "",
                                cuda_preferred=lambda: gl._cuda_preferred(a))

    state["pick"] = pick
    return state


def test_auto_measures_once_per_shape_class_and_caches(fake_route):
    pick = fake_route["pick"]
    fake_route["ms"] = {"cuda": 0.1, "triton": 0.2}
    assert pick(1) == "cuda" and fake_route["measured"] == [1]
    fake_route["ms"] = {"cuda": 0.9, "triton": 0.2}   # a later measurement would differ: none is made
    assert pick(1) == "cuda" and fake_route["measured"] == [1]
    assert pick(2) == "triton" and fake_route["measured"] == [1, 2]
    assert pick(1, base="hidden") == "triton" and fake_route["measured"] == [1, 2, 1]


def test_auto_never_measures_in_a_capture_and_keeps_eager_and_graph_identical(fake_route):
    pick = fake_route["pick"]
    fake_route["ms"] = {"cuda": 0.1, "triton": 0.2}
    fake_route["capturing"] = True
    assert pick(3) == "triton" and fake_route["measured"] == []   # first seen in a capture: Triton, recorded
    fake_route["capturing"] = False
    assert pick(3) == "triton" and fake_route["measured"] == []   # eager calls of that shape follow the capture
    assert pick(1) == "cuda" and fake_route["measured"] == [1]    # measured in eager first ...
    fake_route["capturing"] = True
    assert pick(1) == "cuda" and fake_route["measured"] == [1]    # ... and the capture follows eager


def test_auto_falls_back_to_cuda_when_triton_cannot_run(fake_route, monkeypatch):
    monkeypatch.setattr(_backends, "triton_usable", lambda d: (False, "no triton"))
    fake_route["ms"] = {"cuda": 0.9, "triton": 0.2}
    assert fake_route["pick"](1) == "cuda"


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_auto_backend_on_gpu_picks_fused():
    dev = torch.device("cuda")
    vh, vw, kw = _inputs(1, 64, 100, 128, 0, torch.float16, "cuda", "logits")
    from ivl_kernels.ops.guided_logits import _cuda_supports, _triton_supports
    from ivl_kernels._validate import validate_guided

    from ivl_kernels.ops import guided_logits as gl

    a = validate_guided(vh, vw, **kw)
    picks = [_backends.select("auto", dev, cuda_supports=lambda: _cuda_supports(a, None),
                              triton_supports=lambda: _triton_supports(a),
                              cuda_preferred=lambda: gl._cuda_preferred(a)) for _ in range(3)]
    # A fused kernel, the measured one, the same on every call (cached for this shape on this device).
    assert picks[0] in ("cuda", "triton") and picks == picks[:1] * 3
    if _backends.cuda_extension() is None:
        assert picks[0] == "triton"
    else:
        assert gl._route.ROUTE.choices[gl._route._route_key(a)] == picks[0]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_fullgraph(backend):
    if backend == "cuda" and _backends.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    vh, vw, kw = _inputs(4, 64, 300, 320, 0, torch.float16, "cuda", "logits")
    vocab_map = make_map("injective", 320, 300, "cuda")

    def step(vh, vw, base, m):
        return ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m, alpha=0.5, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(vh, vw, kw["base_logits"], vocab_map)
    want = step(vh, vw, kw["base_logits"], vocab_map)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not (HAS_TRITON and interpreter_enabled()), reason="needs the Triton interpreter")
def test_triton_interpreter_rejects_bf16_explicitly():
    vh, vw, kw = _inputs(2, 32, 40, 40, 0, torch.bfloat16, "cpu", "logits")
    with pytest.raises(RuntimeError, match="bfloat16"):
        ivl.fused_guided_logits(vh, vw, backend="triton", **kw)


@pytest.mark.parametrize("backend", ["cuda"] + ([] if HAS_GPU else ["triton"]))
def test_unavailable_backend_names_what_is_missing(backend, monkeypatch):
    vh, vw, kw = _inputs(2, 32, 40, 40, 0, torch.float32, "cpu", "logits")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors" if backend == "cuda" else "TRITON_INTERPRET"):
        ivl.fused_guided_logits(vh, vw, backend=backend, **kw)


def test_env_backend_override(monkeypatch):
    vh, vw, kw = _inputs(2, 32, 40, 40, 0, torch.float32, "cpu", "logits")
    monkeypatch.setenv("IVL_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ivl.fused_guided_logits(vh, vw, **kw)
    monkeypatch.setenv("IVL_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="IVL_KERNELS_BACKEND"):
        ivl.fused_guided_logits(vh, vw, **kw)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cpu"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_torch_compile_fullgraph_cpu(backend, device, in_place):
    """Traced with fullgraph=True through the custom op (aot_eager: functionalization without a C++ toolchain
    in the loop); the map range is checked at run time inside the op, not read while tracing."""
    vh, vw, kw = _inputs(4, 32, 100, 120, 0, torch.float32, device, "logits")
    vocab_map = make_map("many_to_one", 120, 100, device)

    def step(vh, vw, base, m):
        out = ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m, alpha=0.5,
                                      out=base if in_place else None, backend=backend)
        return out.softmax(-1)

    b_compiled, b_eager = kw["base_logits"].clone(), kw["base_logits"].clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(vh, vw, b_compiled, vocab_map)
    want = step(vh, vw, b_eager, vocab_map)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(b_compiled, b_eager)
    # A bad entry raises when the compiled step runs: the Triton op checks the map (a ValueError), the torch
    # backend's range is asserted on the device in the graph (torch._assert_async: a RuntimeError).
    for entry in (100, -2):
        bad = vocab_map.clone()
        bad[0] = entry
        with pytest.raises(ValueError if backend == "triton" else RuntimeError, match="vocab_map entries"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(vh, vw, kw["base_logits"].clone(), bad)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cpu"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("base_mode", ["logits", "hidden"])
@pytest.mark.parametrize("M", [4, 40], ids=lambda m: f"M{m}")  # both sides of the torch backend's M = Hv switch
def test_autocast_region_changes_nothing(backend, device, compiled, base_mode, M):
    """Inside ``torch.autocast(dtype=torch.bfloat16)`` with float32 inputs the logits equal those outside it (the
    op computes in its inputs' dtypes, float32 accumulation; the torch backend's value GEMM was cast to
    bfloat16 under autocast), eager and compiled (aot_eager, fullgraph)."""
    torch._dynamo.reset()
    vh, vw, kw = _inputs(M, 24, 100, 120, 16, torch.float32, device, base_mode)
    vocab_map = make_map("many_to_one", 120, 100, device)

    def step(vh, vw, m):
        return ivl.fused_guided_logits(vh, vw, vocab_map=m, alpha=0.7, fill=-0.5, backend=backend, **kw)

    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    want = step(vh, vw, vocab_map)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = fn(vh, vw, vocab_map)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_with_a_float_alpha_that_changes():
    """A float alpha passed to a compiled step: from its second value on, dynamo traces it as a symbolic float,
    and the validation must trace too (comparisons, not ``math.isnan``): fullgraph works for every value."""
    vh, vw, kw = _inputs(4, 32, 100, 120, 0, torch.float32, "cpu", "logits")

    def step(vh, vw, base, alpha):
        return ivl.fused_guided_logits(vh, vw, base_logits=base, alpha=alpha, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for alpha in (0.5, 0.7, -1.25):
        torch.testing.assert_close(compiled(vh, vw, kw["base_logits"], alpha), step(vh, vw, kw["base_logits"], alpha))


@pytest.mark.parametrize("backend,device,arg", [pytest.param(*p.values, "alpha", id=f"{p.id}-alpha")
                                                 for p in BACKENDS if p.values[1] == "cpu"]
                         + [pytest.param("torch", "cpu", "fill", id="torch-cpu-fill")])
@pytest.mark.parametrize("map_kind", ["identity", "many_to_one"])  # identity: Vb > Vv, the ids past Vv get fill
@pytest.mark.parametrize("M", [4, 40], ids=lambda m: f"M{m}")  # both sides of the torch backend's M = Hv switch
def test_torch_compile_a_changing_float_compiles_at_most_twice(backend, device, arg, map_kind, M):
    """A float alpha that changes every call: traced as the per-row alpha tensor while compiling, so no op
    specialises the graph on its value (the torch backend's scalar GEMM argument and the Triton op's float
    argument did: one compile per value, then dynamo's recompile limit); the torch backend's fill likewise (a
    0-d tensor where ``masked_fill_`` / ``add_(alpha=)`` took the number). 10 values: at most 2 compiled
    frames, every value equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    vh, vw, kw = _inputs(M, 24, 100, 120, 16, torch.float32, device, "hidden")
    m = make_map(map_kind, 120, 100, device)
    fixed = {"alpha": 0.7, "fill": -0.5}

    def step(vh, vw, x):
        return ivl.fused_guided_logits(vh, vw, vocab_map=m, backend=backend, **{**fixed, arg: x}, **kw)

    compiled = torch.compile(step, fullgraph=True, backend=cnt)
    for i in range(10):
        x = 0.3 + 0.07 * i if arg == "alpha" else -0.1 - 0.2 * i
        torch.testing.assert_close(compiled(vh, vw, x), step(vh, vw, x))
    assert cnt.frame_count <= 2, cnt.frame_count


@pytest.mark.parametrize("map_kind", ["identity", "many_to_one"])  # identity: Vb > Vv, the ids past Vv get fill
@pytest.mark.parametrize("M", [4, 40], ids=lambda m: f"M{m}")  # both sides of the torch backend's M = Hv switch
def test_torch_compile_fullgraph_with_a_float_fill_that_changes(M, map_kind):
    """As alpha: a float fill that changes between calls of a compiled step is traced as a symbolic float, and
    its validation traces too (comparisons, not ``math.isnan``), down to ``-inf``; every value equals eager."""
    torch._dynamo.reset()
    Hv, Vv, Vb = 24, 100, 120
    vh, vw, kw = _inputs(M, Hv, Vv, Vb, 0, torch.float32, "cpu", "logits")
    m = make_map(map_kind, Vb, Vv, "cpu")

    def step(vh, vw, base, fill):
        return ivl.fused_guided_logits(vh, vw, base_logits=base, vocab_map=m, alpha=0.7, fill=fill, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fill in (0.5, -0.25, 1.5, float("-inf")):
        torch.testing.assert_close(compiled(vh, vw, kw["base_logits"], fill), step(vh, vw, kw["base_logits"], fill))


@pytest.mark.parametrize("alpha", ["scalar", "per_row"])
@pytest.mark.parametrize("map_kind", ["injective", "many_to_one"])
@pytest.mark.parametrize("base_mode", ["logits-in-place", "hidden"])
@pytest.mark.parametrize("M", [23, 24, 77], ids=lambda m: f"M{m}")
def test_torch_backend_with_a_map_around_the_gathered_head_switch(M, base_mode, map_kind, alpha):
    """With a map, the torch backend gathers value logits below ``M = Hv`` rows and the value head's rows from
    ``M = Hv`` on (one GEMM accumulated into ``out``; unmapped columns get ``alpha * fill`` by a rank-1 update):
    both sides of the switch, scalar and per-row alpha, in place on base logits and with the base head fused."""
    Hv, Vv, Vb, Hb = 24, 301, 333, 16
    vh, vw, kw = _inputs(M, Hv, Vv, Vb, Hb, torch.float32, "cpu", base_mode.split("-")[0])
    a = 1.7 if alpha == "scalar" else torch.rand(M) * 2 - 0.5
    _run_and_check("torch", "cpu", torch.float32, vh, vw, kw, make_map(map_kind, Vb, Vv, "cpu"), a, 0.3,
                   what=f"M{M}/{base_mode}/{map_kind}/{alpha}", in_place=base_mode == "logits-in-place")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fill", [float("-inf"), float("inf")], ids=["fill_neg_inf", "fill_pos_inf"])
@pytest.mark.parametrize("map_kind", ["identity", "many_to_one"])
@pytest.mark.parametrize("base_mode", ["logits-in-place", "hidden"])
@pytest.mark.parametrize("M,alpha", [(3, "scalar"), (3, "per_row"), (40, "scalar"), (40, "per_row")],
                         ids=lambda v: f"M{v}" if isinstance(v, int) else v)
def test_infinite_fill_leaves_mapped_columns_finite(backend, device, fill, map_kind, base_mode, M, alpha):
    """``fill=-inf`` bans the unmapped base ids (``+inf`` forces them): exactly those columns are infinite and every
    mapped column is the finite guided logit (``fill * unmapped`` would be ``inf * 0 = NaN`` there). A map with
    ``-1`` entries, and the identity with ``Vb > Vv`` (ids past the value vocabulary); both sides of the torch
    backend's gathered-head switch (``M = Hv``), in place on base logits and with the base head fused, float32 and a
    half-precision ``out`` (summed in float32, then rounded)."""
    if backend == "cuda" and M > CUDA_MAX_ROWS:
        pytest.skip(f"the CUDA decode kernel handles M <= {CUDA_MAX_ROWS}")
    Hv, Vv, Vb, Hb = 24, 97, 131, 16
    for dtype in ([torch.float32, torch.float16] if base_mode != "hidden" else [torch.float32]):
        vh, vw, kw = _inputs(M, Hv, Vv, Vb, Hb, dtype, device, base_mode.split("-")[0])
        vocab_map = make_map(map_kind, Vb, Vv, device)
        if vocab_map is not None:
            vocab_map[:3] = -1  # whatever the draw, some unmapped ids
        a = 1.7 if alpha == "scalar" else torch.rand(M, device=device) + 0.25  # nonzero: 0 * inf is NaN
        _run_and_check(backend, device, dtype, vh, vw, kw, vocab_map, a, fill,
                       what=f"{backend}/{dtype}/fill={fill}/{map_kind}/{base_mode}/M{M}/{alpha}",
                       in_place=base_mode == "logits-in-place")


@pytest.mark.parametrize("alpha", ["scalar", "per_row"])
def test_torch_compile_fullgraph_of_the_gathered_head_path(alpha):
    """The torch backend's gathered-head path (a map, ``M >= Hv``) traced by ``torch.compile(fullgraph=True)``
    (plain user code there, no custom op): equal to eager."""
    M, Hv, Vv, Vb, Hb = 40, 24, 301, 333, 16
    vh, vw, kw = _inputs(M, Hv, Vv, Vb, Hb, torch.float32, "cpu", "hidden")
    a = 1.7 if alpha == "scalar" else torch.rand(M) * 2 - 0.5
    m = make_map("many_to_one", Vb, Vv, "cpu")

    def step(vh, vw, bh, bw, m):
        return ivl.fused_guided_logits(vh, vw, base_hidden=bh, base_weight=bw, vocab_map=m, alpha=a, fill=0.3,
                                       backend="torch")

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(vh, vw, kw["base_hidden"], kw["base_weight"], m)
    torch.testing.assert_close(got, step(vh, vw, kw["base_hidden"], kw["base_weight"], m))


@pytest.mark.skipif(HAS_GPU or not HAS_TRITON, reason="the interpreter's self-test: a machine without a GPU")
@pytest.mark.parametrize("problem", ["unprobed", "broken"])
def test_compiled_first_call_probes_the_interpreter_in_the_op(problem, monkeypatch):
    """The process's first Triton call may come under torch.compile, where the interpreter's self-test cannot be
    traced: the backend choice then trusts it, and the custom op runs the self-test (or reports its failure)."""
    from ivl_kernels import _triton

    monkeypatch.setattr(_triton, "_INTERPRETER_PROBLEM", None)
    vh, vw, kw = _inputs(3, 16, 30, 30, 0, torch.float32, "cpu", "logits")

    def step(vh, vw, base):
        return ivl.fused_guided_logits(vh, vw, base_logits=base, alpha=0.5, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    if problem == "broken":
        def broken(*args, **kwargs):
            raise IndexError("planted interpreter failure")
        monkeypatch.setattr(_triton._interpreter_probe_kernel, "run", broken)
        with pytest.raises(RuntimeError, match="cannot run: .*planted interpreter failure"):
            compiled(vh, vw, kw["base_logits"])
        return
    got = compiled(vh, vw, kw["base_logits"])
    assert _triton._INTERPRETER_PROBLEM == ""  # probed, by the op, at run time
    torch.testing.assert_close(got, step(vh, vw, kw["base_logits"]))


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_rejects_large_m_and_auto_uses_triton():
    if _backends.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    vh, vw, kw = _inputs(CUDA_MAX_ROWS + 1, 64, 100, 128, 0, torch.float16, "cuda", "logits")
    with pytest.raises(RuntimeError, match=f"M <= {CUDA_MAX_ROWS}"):
        ivl.fused_guided_logits(vh, vw, backend="cuda", **kw)
    ref = guided_logits_naive(vh, vw, dtype=torch.float64, **kw)
    assert_guided_close(ivl.fused_guided_logits(vh, vw, **kw), ref, guided_logits_naive(vh, vw, **kw),
                        torch.float16, "auto, M = 17")

"""``IVL_KERNELS_GEMM=auto`` (the default): per shape class on the user's GPU, the fastest of the cuBLAS path, the
tile GEMMs and (no map) the tile GEMMs with the TMA logits kernel, on its wide tiles where they apply
(``_tile_launch.wide_applies``) and, for the loss's one-pass gradients, ``hybrid`` (that logits kernel, the
products in cuBLAS), among those that agree with cuBLAS, measured once and cached
(``ops/_measured.py``, ``_gemm.py``).

Without a GPU the choice is exercised with the kernels running for real (the interpreter) and the clock faked:
``fake_gpu`` makes the device timeable and reports, per candidate run, the milliseconds set for the kind that ran
(told apart by which launcher ran, and with which tile ``kind``). What is checked: the faster kind is chosen and
then runs; the choice is cached per shape class; a candidate that raises, or disagrees with cuBLAS, is never
chosen however fast; nothing is measured in a CUDA-graph capture, while tracing, or under deterministic algorithms
(cuBLAS, recorded); the measurement writes nothing the caller owns (an in-place head is guided once).
"""

from __future__ import annotations

import math

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels.ops import _gemm, _measured
from ivl_kernels.ops import guided_logits as gl
from ivl_kernels.ops.guided_cross_entropy import _chunked
from ivl_kernels.ops._measured import Measured, fastest, tensors_agree
from ivl_kernels.reference import guided_logits_naive

from test_guided_cross_entropy import DEVICE, HAS_GPU, _check, _make, _run, needs_triton
from test_guided_logits import assert_guided_close, make_map


# --------------------------------------------------------------------------------------------------------------
# The measuring rule alone
# --------------------------------------------------------------------------------------------------------------
def _fake_clock(monkeypatch, ms: dict):
    """``time_ms`` answering ``ms[name]`` for the candidate named by its ``name`` attribute; timed names listed."""
    timed = []

    def time_ms(fn, calls):
        timed.append(fn.name)
        return ms[fn.name]

    monkeypatch.setattr(_measured, "time_ms", time_ms)
    return timed


def _candidate(name, result=None, error=None, log=None):
    def fn():
        if log is not None:
            log.append(name)
        if error is not None:
            raise error
        return result
    fn.name = name
    return fn


def test_fastest_picks_the_fastest_that_runs_and_agrees(monkeypatch):
    timed = _fake_clock(monkeypatch, {"a": 2.0, "b": 1.0, "c": 0.5, "d": 0.1})
    ref = torch.tensor([1.0, 2.0])
    cands = {"a": _candidate("a", ref), "b": _candidate("b", ref + 1e-6),
             "c": _candidate("c", ref * 3),                                 # fast and wrong
             "d": _candidate("d", error=RuntimeError("out of resources"))}  # fastest and cannot run
    agree = lambda x, y: tensors_agree(x, y, 1e-3)  # noqa: E731
    assert fastest(cands, "a", agree=agree) == "b"
    assert timed == ["a", "b"]


def test_fastest_compares_every_result_before_timing_anything(monkeypatch):
    """A candidate updating its scratch in place (an in-place head) is compared as its first run left it."""
    log = []
    _fake_clock(monkeypatch, {"a": 1.0, "b": 0.5})
    state = {"a": torch.zeros(3), "b": torch.zeros(3)}

    def bump(name):
        def fn():
            log.append(name)
            state[name] += 1.0
            return state[name]
        fn.name = name
        return fn

    assert fastest({"a": bump("a"), "b": bump("b")}, "a", agree=lambda x, y: torch.equal(x, y)) == "b"
    assert log == ["a", "b"]


def test_fastest_skips_a_kernel_triton_cannot_build_here(monkeypatch):
    """Triton's own errors (too much shared memory for this GPU, a refused layout) are not RuntimeErrors: a
    candidate raising one is not chosen, and the call goes on with the others."""
    errors = pytest.importorskip("triton.runtime.errors")
    from triton.compiler.errors import CompilationError

    timed = _fake_clock(monkeypatch, {"a": 1.0, "b": 0.1, "c": 0.2, "d": 0.5})
    ref = torch.ones(2)
    cands = {"a": _candidate("a", ref), "b": _candidate("b", error=errors.OutOfResources(98304, 65536, "shared memory")),
             "c": _candidate("c", error=CompilationError("src", None, "unsupported layout")),
             "d": _candidate("d", ref)}
    assert fastest(cands, "a", agree=lambda x, y: torch.equal(x, y)) == "d" and timed == ["a", "d"]


def test_fastest_falls_back_when_the_reference_cannot_run(monkeypatch):
    timed = _fake_clock(monkeypatch, {"a": 1.0, "b": 0.5})
    cands = {"a": _candidate("a", error=RuntimeError("no")), "b": _candidate("b", torch.ones(1))}
    assert fastest(cands, "a", agree=lambda x, y: True) == "a" and timed == []


@pytest.mark.parametrize("case", ["close", "scaled", "inf_same", "inf_moved", "nan_same", "shape", "none"])
def test_tensors_agree(case):
    b = torch.tensor([[1.0, -4.0, float("-inf")], [0.5, 2.0, 3.0]])
    a = {"close": b + 1e-5, "scaled": b * 1.1, "inf_same": b.clone(), "inf_moved": b.roll(1, 1),
         "nan_same": b.clone(), "shape": b[:1], "none": None}[case]
    if case == "nan_same":
        a[1, 1] = b[1, 1] = float("nan")
    assert tensors_agree(a, b, 1e-3) == (case in ("close", "inf_same", "nan_same"))
    assert tensors_agree(None, None, 1e-3)


@pytest.mark.parametrize("why", ["capture", "tracing", "deterministic"])
def test_nothing_is_measured_where_it_must_not_be(why, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: why == "capture")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: why == "tracing")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: why == "deterministic")
    choice = Measured(fallback="cublas")
    measured = []
    assert choice.choose("k", lambda: measured.append(1) or "tiles") == "cublas" and measured == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    # Recorded: later eager calls of the class follow the fallback (identical numbers), a new class is measured.
    assert choice.choose("k", lambda: measured.append(1) or "tiles") == "cublas" and measured == []
    assert choice.choose("k2", lambda: measured.append(1) or "tiles") == "tiles" and measured == [1]


@needs_triton
@pytest.mark.parametrize("forced", ["cublas", "tiles"])
def test_a_forced_kind_that_cannot_compute_the_call_gives_way(forced, monkeypatch):
    """A map with a nonzero fill from ``GEMM_MIN_ROWS`` rows: cuBLAS takes it (the fill by a rank-1 update, not
    the row-tile kernel); the tiles need unit-stride operands (a strided value head: cuBLAS runs). Never a wrong
    path."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", forced)
    M, Vb, Vv, Hv = gl.GEMM_MIN_ROWS, 50, 40, 16
    vh = torch.randn(M, Hv, device=DEVICE)
    vw = torch.randn(Hv, Vv, device=DEVICE).T / 4 if forced == "tiles" else torch.randn(Vv, Hv, device=DEVICE) / 4
    bl = torch.randn(M, Vb, device=DEVICE)
    kw = dict(base_logits=bl, vocab_map=make_map("many_to_one", Vb, Vv, DEVICE), fill=-1.5)
    ran = []
    for name in ("_launch_cublas", "_launch_tiles", "_launch_rows"):
        monkeypatch.setattr(gl._launch, name, lambda *a, _n=name, _f=getattr(gl._launch, name): (ran.append(_n), _f(*a)))
    out = ivl.fused_guided_logits(vh, vw, backend="triton", **kw)
    ref = guided_logits_naive(vh, vw, dtype=torch.float64, **kw)
    assert_guided_close(out, ref, guided_logits_naive(vh, vw, **kw), torch.float32, forced)
    assert ran == ["_launch_cublas"]


def test_auto_is_cublas_off_a_gpu(monkeypatch):
    monkeypatch.delenv("IVL_KERNELS_GEMM", raising=False)
    assert _gemm.gemm_kind() == "auto"
    assert _gemm.measured_kind(torch.device("cpu"), ("k",), {}, agree=None) == "cublas"


# --------------------------------------------------------------------------------------------------------------
# The loss and the head, kernels run for real (interpreter), clock faked
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """``auto`` measuring on this CPU: ``state["ms"][kind]`` per candidate run, ``state["timed"]`` the kinds timed,
    ``state["ran"]`` the kind of every loss / head run in the order they finish (the measured candidates, their
    timed runs, then the call itself); ``state["corrupt"]`` plants a wrong result in every tile run."""
    monkeypatch.delenv("IVL_KERNELS_GEMM", raising=False)
    monkeypatch.setattr(_gemm, "can_time", lambda device: True)
    monkeypatch.setattr(_gemm, "GEMM", Measured(fallback="cublas"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    state = dict(ms={"cublas": 1.0, "rows": 3.0, "tiles": 0.5, "tma": 0.7, "hybrid": 0.8}, timed=[], ran=[],
                 corrupt=False)
    frames = []
    real_loss, real_chunks = _chunked.chunked_loss, _chunked.tile_chunks
    real_cublas, real_tiles, real_rows = gl._launch._launch_cublas, gl._launch._launch_tiles, gl._launch._launch_rows

    def chunked_loss(*a, **k):
        frames.append("cublas")
        try:
            return real_loss(*a, **k)
        finally:
            state["ran"].append(frames.pop())

    def tile_chunks(*a, **k):
        frames[-1] = k.get("kind", "tiles")
        real_chunks(*a, **k)
        if state["corrupt"]:
            k["dvh"].mul_(1.5)

    def launch(kind, real):
        def run(*a, **k):
            real(*a, **k)
            ran = k.get("kind", kind)
            if ran in _gemm.TILE_KINDS and state["corrupt"]:
                a[-1][:, 0] += 1.0
            state["ran"].append(ran)
        return run

    def time_ms(fn, calls):
        fn()
        state["timed"].append(state["ran"][-1])
        return state["ms"][state["ran"][-1]]

    monkeypatch.setattr(_chunked, "chunked_loss", chunked_loss)
    monkeypatch.setattr(_chunked, "tile_chunks", tile_chunks)
    monkeypatch.setattr(gl._launch, "_launch_cublas", launch("cublas", real_cublas))
    monkeypatch.setattr(gl._launch, "_launch_tiles", launch("tiles", real_tiles))
    monkeypatch.setattr(gl._launch, "_launch_rows", launch("rows", real_rows))
    monkeypatch.setattr(_measured, "time_ms", time_ms)
    return state


@needs_triton
@pytest.mark.parametrize("faster", ["tiles", "cublas"])
def test_loss_runs_the_faster_kind_and_measures_once(fake_gpu, faster):
    fake_gpu["ms"] = {"cublas": 1.0, "tiles": 2.0} if faster == "cublas" else {"cublas": 1.0, "tiles": 0.5}
    vh, vw, target, kw = _make(N=23, base="hidden", vmap="map", Vb=90, alpha="tensor", smoothing=0.1,
                               dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert fake_gpu["timed"] == ["cublas", "tiles"]
    # The candidates, their timed runs, then the call itself, in the faster kind.
    assert fake_gpu["ran"] == ["cublas", "tiles", "cublas", "tiles", faster], fake_gpu["ran"]
    fake_gpu["ms"] = {"cublas": 0.1, "tiles": 9.0}  # a new measurement would flip it: none is made
    n = len(fake_gpu["ran"])
    got = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target, kw)
    assert fake_gpu["timed"] == ["cublas", "tiles"] and fake_gpu["ran"][n:] == [faster]
    forced = {"tiles": "tiles", "cublas": "cublas"}[faster]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("IVL_KERNELS_GEMM", forced)
        again = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target, kw)
    for x, y in zip(got, again):
        assert torch.equal(x, y)  # auto's run is the chosen kind's run, bit for bit


@needs_triton
def test_loss_never_chooses_a_wrong_fast_kind(fake_gpu):
    fake_gpu["corrupt"] = True
    fake_gpu["ms"] = {"cublas": 1.0, "tiles": 0.01, "tma": 0.01, "hybrid": 0.01}
    vh, vw, target, kw = _make(N=19, base="logits", dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert fake_gpu["timed"] == ["cublas"]
    assert fake_gpu["ran"] == ["cublas", "tiles", "tma", "hybrid", "cublas", "cublas"], fake_gpu["ran"]


@needs_triton
def test_loss_measures_on_its_first_rows_and_keys_the_row_bucket(fake_gpu, monkeypatch):
    monkeypatch.setattr(_chunked, "LOSS_MEASURE_ROWS", 8)
    rows = []
    real = _chunked.chunked_loss

    def spy(vh, *a, **k):
        rows.append(vh.shape[0])
        return real(vh, *a, **k)

    monkeypatch.setattr(_chunked, "chunked_loss", spy)
    vh, vw, target, kw = _make(N=21, base="none", dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert rows == [21] + [8] * 8  # the call, then the four candidates on its first 8 rows (run, then timed)
    assert len(_gemm.GEMM.choices) == 1 and next(iter(_gemm.GEMM.choices))[2] == 8


@needs_triton
@pytest.mark.parametrize("base_mode", ["logits", "logits-in-place", "hidden"])
@pytest.mark.parametrize("fill", [0.0, -1.5], ids=["fill0", "fill-1.5"])
@pytest.mark.parametrize("faster", ["tiles", "reference"])
def test_head_runs_the_faster_kind_and_writes_once(fake_gpu, base_mode, fill, faster):
    """With a map and either fill, cuBLAS is measured against the tiles (the row-tile kernel never is)."""
    reference = "cublas"
    fake_gpu["ms"] = {reference: 1.0, "tiles": 2.0 if faster == "reference" else 0.5}
    faster = reference if faster == "reference" else faster
    M, Vb, Vv, Hv, Hb = gl.GEMM_MIN_ROWS + 5, 70, 60, 24, 40
    d = dict(device=DEVICE)
    vh = torch.randn(M, Hv, **d)
    vw = torch.randn(Vv, Hv, **d) / math.sqrt(Hv)
    vmap = make_map("many_to_one", Vb, Vv, DEVICE)
    kw = dict(vocab_map=vmap, alpha=torch.rand(M, **d) * 2 - 0.5, fill=fill)
    if base_mode.startswith("logits"):
        kw["base_logits"] = torch.randn(M, Vb, **d)
    else:
        kw.update(base_hidden=torch.randn(M, Hb, **d), base_weight=torch.randn(Vb, Hb, **d) / math.sqrt(Hb))
    ref = guided_logits_naive(vh, vw, dtype=torch.float64, **kw)
    plain = guided_logits_naive(vh, vw, dtype=torch.float32, **kw)
    out = kw["base_logits"] if base_mode == "logits-in-place" else torch.full((M, Vb), float("nan"), **d)
    assert ivl.fused_guided_logits(vh, vw, out=out, backend="triton", **kw) is out
    # Guided once: the measurement ran on copies, in place on them for an in-place call.
    assert_guided_close(out, ref, plain, torch.float32, f"auto {base_mode}")
    assert fake_gpu["timed"] == [reference, "tiles"], fake_gpu["timed"]
    assert fake_gpu["ran"] == [reference, "tiles", reference, "tiles", faster], fake_gpu["ran"]
    key = next(iter(_gemm.GEMM.choices))
    assert key[1:3] == ("head", 256) and key[10] == (base_mode == "logits-in-place") and key[13] == (fill != 0)


@needs_triton
def test_head_never_chooses_a_wrong_fast_kind(fake_gpu):
    fake_gpu["corrupt"] = True
    fake_gpu["ms"] = {"cublas": 1.0, "tiles": 0.01, "tma": 0.01}
    M, Vb, Vv, Hv = gl.GEMM_MIN_ROWS, 50, 50, 16
    vh, vw, bl = (torch.randn(M, Hv, device=DEVICE), torch.randn(Vv, Hv, device=DEVICE) / 4,
                  torch.randn(M, Vb, device=DEVICE))
    out = ivl.fused_guided_logits(vh, vw, base_logits=bl, backend="triton")
    ref = guided_logits_naive(vh, vw, base_logits=bl, dtype=torch.float64)
    assert_guided_close(out, ref, guided_logits_naive(vh, vw, base_logits=bl), torch.float32, "auto")
    assert fake_gpu["timed"] == ["cublas"] and fake_gpu["ran"] == ["cublas", "tiles", "tma", "cublas", "cublas"]


@pytest.fixture
def tma_kernel_runs(monkeypatch):
    """Every launch of the TMA logits kernel, as its ``(BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)``."""
    from ivl_kernels.ops import _tile_launch

    launches = []
    real = _tile_launch._ce_logits_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                launches.append((k["BLOCK_M"], k["BLOCK_N"], k["EPILOGUE_SPLIT"]))
                return real[grid](*a, **k)
            return launch

    monkeypatch.setattr(_tile_launch, "_ce_logits_tma_kernel", Spy())
    return launches


@needs_triton
@pytest.mark.parametrize("faster", ["tma", "tiles", "hybrid"])
def test_loss_measures_the_tma_kernel_where_it_takes_the_call(fake_gpu, tma_kernel_runs, faster):
    """No map: the TMA logits kernel is a third candidate, and with it ``hybrid`` (its logits kernel, then the
    gradient products in cuBLAS); chosen when fastest, and then it runs (bit for bit the forced kind); with a map
    neither is a candidate (the next test above)."""
    fake_gpu["ms"] = {"cublas": 1.0, "tiles": 0.5 if faster == "tiles" else 0.6,
                      "tma": 0.4 if faster == "tma" else 0.7, "hybrid": 0.3 if faster == "hybrid" else 0.8}
    vh, vw, target, kw = _make(N=23, base="hidden", alpha="tensor", smoothing=0.1, dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert fake_gpu["timed"] == ["cublas", "tiles", "tma", "hybrid"]
    assert fake_gpu["ran"] == ["cublas", "tiles", "tma", "hybrid"] * 2 + [faster], fake_gpu["ran"]
    # Each TMA candidate's two runs, then the call's.
    assert len(tma_kernel_runs) == 4 + (faster in ("tma", "hybrid"))
    got = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target, kw)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("IVL_KERNELS_GEMM", faster)
        again = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target, kw)
    assert fake_gpu["ran"][-2:] == [faster, faster] and fake_gpu["timed"] == ["cublas", "tiles", "tma", "hybrid"]
    for x, y in zip(got, again):
        assert torch.equal(x, y)


@needs_triton
@pytest.mark.parametrize("base_mode", ["logits-in-place", "hidden"])
def test_head_measures_the_tma_kernel_where_it_takes_the_call(fake_gpu, tma_kernel_runs, base_mode):
    fake_gpu["ms"] = {"cublas": 1.0, "tiles": 0.5, "tma": 0.3}
    M, Vb, Vv, Hv, Hb = gl.GEMM_MIN_ROWS + 3, 70, 60, 24, 40
    d = dict(device=DEVICE)
    vh, vw = torch.randn(M, Hv, **d), torch.randn(Vv, Hv, **d) / math.sqrt(Hv)
    kw = dict(alpha=0.8, fill=-1.0)
    if base_mode == "hidden":
        kw.update(base_hidden=torch.randn(M, Hb, **d), base_weight=torch.randn(Vb, Hb, **d) / math.sqrt(Hb))
    else:
        kw["base_logits"] = torch.randn(M, Vb, **d)
    ref = guided_logits_naive(vh, vw, dtype=torch.float64, **kw)
    plain = guided_logits_naive(vh, vw, dtype=torch.float32, **kw)
    out = kw["base_logits"] if base_mode == "logits-in-place" else None
    got = ivl.fused_guided_logits(vh, vw, out=out, backend="triton", **kw)
    assert_guided_close(got, ref, plain, torch.float32, f"auto tma {base_mode}")
    assert fake_gpu["timed"] == ["cublas", "tiles", "tma"]
    assert fake_gpu["ran"] == ["cublas", "tiles", "tma"] * 2 + ["tma"] and len(tma_kernel_runs) == 3


@needs_triton
@pytest.mark.parametrize("what,faster", [("loss", "wide"), ("head", "wide"), ("head", "tma")])
def test_half_precision_also_measures_the_wide_tiles(fake_gpu, tma_kernel_runs, what, faster):
    """float16 without a map: a fourth candidate, ``wide`` (the TMA kernel on 128 x 256 tiles, its epilogue in
    two column halves; here a last tile whose second half holds no column); chosen when fastest, then it runs,
    and its result is the oracle's (the interpreter runs the real tiles). float32 has no such candidate (the
    tests above). The loss's ``hybrid`` candidate runs the same wide logits kernel."""
    fake_gpu["ms"] = {"cublas": 1.0, "tiles": 0.6, "tma": 0.5 if faster == "tma" else 0.55,
                      "wide": 0.4 if faster == "wide" else 0.7, "hybrid": 0.8}
    if what == "loss":
        vh, vw, target, kw = _make(N=23, Hv=32, Hb=16, Vv=300, Vb=333, base="hidden", smoothing=0.1,
                                   dtype=torch.float16)
        _check("triton", vh, vw, target, kw, torch.float16)
    else:
        M, Vb, Vv, Hv, Hb = gl.GEMM_MIN_ROWS + 3, 333, 300, 24, 40
        d = dict(device=DEVICE)
        vh, vw = torch.randn(M, Hv, **d).half(), (torch.randn(Vv, Hv, **d) / math.sqrt(Hv)).half()
        kw = dict(alpha=0.8, fill=-1.0, base_hidden=torch.randn(M, Hb, **d).half(),
                  base_weight=(torch.randn(Vb, Hb, **d) / math.sqrt(Hb)).half())
        got = ivl.fused_guided_logits(vh, vw, backend="triton", **kw)
        assert_guided_close(got, guided_logits_naive(vh, vw, dtype=torch.float64, **kw),
                            guided_logits_naive(vh, vw, dtype=torch.float16, **kw), torch.float16, "auto wide")
    kinds = ["cublas", "tiles", "tma", "wide"] + (["hybrid"] if what == "loss" else [])
    assert fake_gpu["timed"] == kinds and fake_gpu["ran"] == kinds * 2 + [faster], fake_gpu["ran"]
    wide = [t for t in tma_kernel_runs if t[1] == 256]
    narrow = [t for t in tma_kernel_runs if t[1] != 256]  # the tma candidate's interpreter tiles
    assert wide and set(wide) == {(128, 256, 2)} and narrow and all(t[2] == 1 for t in narrow)
    # Runs on each tile size (the same launches per run): two measuring per candidate, one more for the chosen.
    wide_runs = 2 + 2 * (what == "loss") + (faster == "wide")
    assert len(wide) * (2 + (faster == "tma")) == len(narrow) * wide_runs


# --------------------------------------------------------------------------------------------------------------
# On a GPU: the real clock
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_GPU, reason="times kernels with CUDA events: needs a CUDA GPU")
@pytest.mark.parametrize("what", ["head", "loss"])
def test_auto_on_gpu_chooses_once_and_equals_the_chosen_kind(what, monkeypatch):
    """bf16, DESIGN's kind of shapes scaled down: ``auto`` measures once, records a kind, and its results are the
    forced kind's, bit for bit (the same kernels, chosen, not blended)."""
    monkeypatch.delenv("IVL_KERNELS_GEMM", raising=False)
    monkeypatch.setattr(_gemm, "GEMM", Measured(fallback="cublas"))
    bf = dict(device="cuda", dtype=torch.bfloat16)
    N, Vb, Vv, Hv, Hb = 512, 8192 + 64, 8192, 256, 512
    vh, vw = torch.randn(N, Hv, **bf), torch.randn(Vv, Hv, **bf) / 16
    bh, bw = torch.randn(N, Hb, **bf), torch.randn(Vb, Hb, **bf) / 22
    target = torch.randint(0, Vb, (N,), device="cuda")

    def run():
        if what == "head":
            return (ivl.fused_guided_logits(vh, vw, base_hidden=bh, base_weight=bw, alpha=0.7, backend="triton"),)
        return _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target,
                    dict(base_hidden=bh, base_weight=bw, alpha=0.7))

    got = run()
    assert len(_gemm.GEMM.choices) == 1
    (kind,) = _gemm.GEMM.choices.values()
    assert kind in _gemm.GEMM_KINDS and kind != "auto"
    assert [torch.equal(a, b) for a, b in zip(run(), got)] == [True] * len(got)  # cached: the same kernels
    monkeypatch.setenv("IVL_KERNELS_GEMM", kind)
    assert [torch.equal(a, b) for a, b in zip(run(), got)] == [True] * len(got)

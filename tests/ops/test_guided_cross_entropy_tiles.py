"""The loss's tile GEMMs (``IVL_KERNELS_GEMM=tiles``, ``_tile_kernels.py``) against the fp64 oracle.

Same error rule as ``test_guided_cross_entropy.py`` (ours within twice plain torch's error in the same dtype, plus
a tolerance relative to the checked values). Each test asserts the tile path ran, in the modes it must: 1 (one
pass: ``P``, factors, the dX / dW tile kernels) for "mean"/"sum" with gradients, 0 (statistics only, no
``[rows, V]`` buffer) then 2 (``G`` from the known lse, then GEMMs) for "none". Under the interpreter the tiles
are 16 x 32 (logits) and 16 x 16 (gradients), so the odd sizes below leave partial tiles on every edge, several
logits column tiles per row (the factors), and ``dX`` split over the vocabulary (``dx_splits``).
"""

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels.ops import guided_cross_entropy as gce
from ivl_kernels.ops import _tile_launch
from ivl_kernels.ops.guided_cross_entropy import _tiles
from ivl_kernels.reference import guided_cross_entropy_naive
from _kernel_spy import KernelSpy
from test_guided_cross_entropy import (ATOL, CASES, HAS_GPU, _case, _check, _err, _make, _run, _to,
                                      guided_loss_extra_memory, needs_triton)

pytestmark = needs_triton
DEVICE = "cuda" if HAS_GPU else "cpu"


@pytest.fixture
def tile_kernels():
    """The names of the logits kernels launched (filled by ``tiles``)."""
    return []


@pytest.fixture
def tiles(monkeypatch, tile_kernels):
    """The tile path on; yields the list of logits-kernel modes launched (either logits kernel)."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", "tiles")
    modes = []
    for name in ("_ce_logits_tile_kernel", "_ce_logits_tma_kernel"):
        monkeypatch.setattr(_tile_launch, name, KernelSpy(getattr(_tile_launch, name), tile_kernels, modes))
    return modes


def _small_chunks(monkeypatch, kw, vw):
    vb = kw["base_logits"].shape[-1] if "base_logits" in kw else (
        kw["base_weight"].shape[0] if "base_weight" in kw else (
            kw["vocab_map"].shape[0] if "vocab_map" in kw else vw.shape[0]))
    # About 6 rows a chunk: chunk edges inside row tiles, dW accumulated across chunks.
    monkeypatch.setitem(gce._chunked.CHUNK_BYTES, DEVICE, 6 * (4 * vb + 3 * 4 * ((vb + 31) // 32) + 8 * 4 * 32))
    monkeypatch.setattr(gce._chunked, "ROW_ALIGN", 1)


def _expected_modes(kw, grads=True):
    if not grads:
        return {0}
    return {0, 2} if kw["reduction"] == "none" else {1}


TILE_CASES = [pytest.param(c.values[0], id=c.id) for c in CASES if not c.values[0].get("l1_coef")] + [
    _case("N40-valueonly-identity-evenK-mean", N=40, base="none", Hv=32),
    _case("N21-hidden-evenK-wide_base-alpha_tensor-smooth-ignore-none", N=21, Hv=32, Hb=16, Vb=131, Vv=97,
          alpha="tensor", smoothing=0.1, reduction="none", ignore=(3,)),
    _case("N19-logits-strided-narrow_base-fill-mean", N=19, base="logits", noncontig=False, Vb=70, Vv=100, fill=0.7),
    _case("N17-hidden-map-negative_alpha-smooth-sum", N=17, vmap="map", Vb=99, alpha=-1.5, smoothing=0.2,
          reduction="sum", ignore=(0, 16)),
    _case("N9-valueonly-map-wide_value-mean", N=9, base="none", vmap="map", Vb=45, Vv=120),
]


@pytest.mark.parametrize("chunks", ["one_chunk", "many_chunks"])
@pytest.mark.parametrize("case", TILE_CASES)
def test_tiles_fp32_match_reference(case, chunks, tiles, monkeypatch):
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    if "base_logits" in kw and case["N"] == 19:
        # Base logits as a column slice of a wider, transposed buffer: both strides not 1.
        wide = torch.empty(kw["base_logits"].shape[1] + 7, case["N"], dtype=torch.float32, device=vh.device)
        wide[2:2 + kw["base_logits"].shape[1]] = kw["base_logits"].T
        kw["base_logits"] = wide[2:2 + kw["base_logits"].shape[1]].T
    if chunks == "many_chunks":
        _small_chunks(monkeypatch, kw, vw)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert tiles and set(tiles) == _expected_modes(kw), f"tile modes {tiles}"


TMA_CASES = [c for c in TILE_CASES if c.values[0].get("vmap", "identity") == "identity"]


@pytest.mark.parametrize("chunks", ["one_chunk", "many_chunks"])
@pytest.mark.parametrize("case", TMA_CASES)
def test_tma_kernel_matches_reference(case, chunks, tiles, tile_kernels, monkeypatch):
    """The logits kernel reading through tensor descriptors on a persistent grid (``IVL_KERNELS_GEMM=tma``; the
    interpreter runs it): every mode, base term and row chunking of the pointer kernel's cases without a map;
    each operand a descriptor can address (the strided base logits are read by pointer in both kernels)."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", "tma")
    monkeypatch.setattr(_tile_launch, "sm_count", lambda device: 3)  # a few programs, each walking several tiles
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    if chunks == "many_chunks":
        _small_chunks(monkeypatch, kw, vw)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert set(tiles) == _expected_modes(kw) and set(tile_kernels) == {"_ce_logits_tma_kernel"}, tile_kernels


# A 64-column logits tile finished as two 32-column halves: partials and factors at 32 columns, which the
# interpreter's gradient tiles (16) divide.
SPLIT_LOGITS = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, EPILOGUE_SPLIT=2)
SPLIT_CASES = [c for c in TILE_CASES if c.id in (
    "N40-valueonly-identity-evenK-mean", "N21-hidden-evenK-wide_base-alpha_tensor-smooth-ignore-none",
    "N19-logits-strided-narrow_base-fill-mean", "N17-hidden-map-negative_alpha-smooth-sum")]


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_epilogue_matches_reference(case, kernel, tiles, tile_kernels, monkeypatch):
    """``EPILOGUE_SPLIT=2`` (the 128 x 256 candidate's epilogue): each logits tile finishes as its two column
    halves, each a tile of its own for the row partials, the factors and the target logit; dX and dW read the
    factors at the half width. Every mode (one pass; statistics then ``G`` for "none"), both logits kernels (a
    map sends the TMA request to the pointer kernel), a last tile whose second half holds no base column."""
    monkeypatch.setitem(_tiles.CONFIG_OVERRIDE, "logits", {**SPLIT_LOGITS, "tma": kernel == "tma"})
    monkeypatch.setattr(_tile_launch, "sm_count", lambda device: 3)
    halves = []
    real = _tile_launch.partial_tile_n
    monkeypatch.setattr(_tiles, "partial_tile_n", lambda cfg: halves.append(real(cfg)) or halves[-1])
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    want = "_ce_logits_tma_kernel" if kernel == "tma" and "vocab_map" not in kw else "_ce_logits_tile_kernel"
    assert set(tiles) == _expected_modes(kw) and set(tile_kernels) == {want}, tile_kernels
    assert halves and set(halves) == {32}


@pytest.mark.parametrize("dtype,base", [(torch.float16, "hidden"), (torch.float32, "hidden"),
                                        (torch.float16, "logits")], ids=["float16", "float32", "float16-base_logits"])
def test_wide_kind_runs_wide_tiles_where_they_apply(dtype, base, tiles, tile_kernels, monkeypatch):
    """``IVL_KERNELS_GEMM=wide``: the TMA logits kernel on ``WIDE_TILES`` (128 x 256, the epilogue in halves) in
    half precision; float32 (128 x 256 tiles would not fit in shared memory) and the loss with base logits (its
    epilogue spilled on sm_90) run the ``tma`` kind's tiles (``_tile_launch.wide_applies``)."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", "wide")
    seen = []
    real = _tiles.launch_logits
    monkeypatch.setattr(_tiles, "launch_logits", lambda cfg, *a, **k: seen.append(dict(cfg)) or real(cfg, *a, **k))
    vh, vw, target, kw = _make(N=21, Hv=32, Vv=140, Vb=150, base=base, smoothing=0.1, alpha="tensor", dtype=dtype)
    _check("triton", vh, vw, target, kw, dtype)
    wide = dtype == torch.float16 and base == "hidden"
    want = _tile_launch.WIDE_TILES if wide else _tile_launch.logits_config(dtype)
    assert seen and all(c == {**want, "tma": True} for c in seen), seen
    assert set(tiles) == {1} and set(tile_kernels) == {"_ce_logits_tma_kernel"}


HYBRID_CASES = [c for c in TILE_CASES if c.id in (
    "N40-valueonly-identity-evenK-mean", "N19-logits-strided-narrow_base-fill-mean",
    "N17-hidden-map-negative_alpha-smooth-sum", "N9-valueonly-map-wide_value-mean")]


@pytest.fixture
def grad_kernels(monkeypatch):
    """The names of the gradient-side kernels launched: the in-place finish, the dX / dW tile GEMMs."""
    names = []
    for name in ("_ce_finish_grad_kernel", "_ce_dx_tile_kernel", "_ce_dw_tile_kernel"):
        monkeypatch.setattr(_tiles, name, KernelSpy(getattr(_tiles, name), names))
    return names


@pytest.mark.parametrize("chunks", ["one_chunk", "many_chunks"])
@pytest.mark.parametrize("case", HYBRID_CASES)
def test_hybrid_finishes_g_in_place_then_multiplies_in_cublas(case, chunks, tiles, tile_kernels, grad_kernels,
                                                              monkeypatch):
    """``IVL_KERNELS_GEMM=hybrid``: the one-pass logits kernel (``P``, partials), the factors, then ``G`` written
    over ``P`` in place (``_ce_finish_grad_kernel``) and ``dX = G W``, ``dW += G^T X`` as ordinary GEMMs (no dX /
    dW tile kernel); maps (the value head gathered for the dX GEMM, as the two-pass backward does), smoothing,
    negative alpha, fill, strided base logits, several chunks (dW accumulated across them)."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", "hybrid")
    monkeypatch.setattr(_tile_launch, "sm_count", lambda device: 3)
    vh, vw, target, kw = _make(**case, dtype=torch.float32)
    if chunks == "many_chunks":
        _small_chunks(monkeypatch, kw, vw)
    _check("triton", vh, vw, target, kw, torch.float32)
    want = "_ce_logits_tile_kernel" if "vocab_map" in kw else "_ce_logits_tma_kernel"
    assert set(tiles) == {1} and set(tile_kernels) == {want}, tile_kernels
    assert grad_kernels and set(grad_kernels) == {"_ce_finish_grad_kernel"}, grad_kernels


def test_chunk_plan_counts_dx_split_scratch_only_where_the_dx_tile_kernel_runs(tiles, monkeypatch):
    """Rows per chunk come from the bytes a row needs: ``tiles``' one-pass dX ("mean") may split the vocabulary
    into up to 8 float32 ``[rows, Hv]`` slices, so it plans ``8 Hv 4`` more bytes a row than ``hybrid``, whose dX
    is one cuBLAS GEMM, and than the two-pass gradient pass ("none"), whose products are cuBLAS under either kind."""
    planned = {}
    plan = gce._chunked.chunk_rows

    def recording(bytes_per_row, n, device, fixed=0):
        planned.setdefault(key, []).append(bytes_per_row)
        return plan(bytes_per_row, n, device, fixed)

    monkeypatch.setattr(gce._chunked, "chunk_rows", recording)
    for reduction in ("mean", "none"):
        vh, vw, target, kw = _make(N=13, Hv=32, Vv=70, Vb=70, base="none", reduction=reduction, dtype=torch.float32)
        upstream = torch.ones(target.shape) if reduction == "none" else None
        for kind in ("tiles", "hybrid"):
            key = (kind, reduction)
            monkeypatch.setenv("IVL_KERNELS_GEMM", kind)
            _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target, kw,
                 upstream)
    # The last plan of each call is the gradient pass's tile launcher (the first, the caller's cuBLAS-sized one).
    last = {key: calls[-1] for key, calls in planned.items()}
    assert last[("tiles", "mean")] - last[("hybrid", "mean")] == 8 * 32 * 4, planned
    assert last[("hybrid", "mean")] == last[("tiles", "none")] == last[("hybrid", "none")], planned


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hybrid_float16_scaled_gradient(reduction, tiles, grad_kernels, monkeypatch):
    """float16: ``G`` is stored divided by the largest row weight (no subnormals) and the GEMM results multiplied
    back; on the wide tiles (half precision). ``"none"`` runs two passes, whose products are cuBLAS already: no
    finish pass."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", "hybrid")
    vh, vw, target, kw = _make(N=21, Hv=32, Vv=140, Vb=150, base="hidden", smoothing=0.1, alpha="tensor",
                               reduction=reduction, dtype=torch.float16)
    _check("triton", vh, vw, target, kw, torch.float16)
    assert set(tiles) == _expected_modes(kw)
    assert set(grad_kernels) == (set() if reduction == "none" else {"_ce_finish_grad_kernel"}), grad_kernels


@pytest.mark.parametrize("split", [0, 3])
def test_epilogue_split_other_than_1_or_2_is_refused(split, tiles, monkeypatch):
    monkeypatch.setitem(_tiles.CONFIG_OVERRIDE, "logits", {**SPLIT_LOGITS, "EPILOGUE_SPLIT": split})
    vh, vw, target, kw = _make(N=5, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"EPILOGUE_SPLIT must be 1 or 2, got {split}"):
        ivl.fused_guided_cross_entropy(vh, vw, target, **kw, backend="triton")
    assert not tiles


def test_partial_width_must_hold_whole_gradient_tiles(tiles, monkeypatch):
    # 48 / 2 = 24 columns of partials: the 16-column dW tiles would straddle two factors.
    monkeypatch.setitem(_tiles.CONFIG_OVERRIDE, "logits", {**SPLIT_LOGITS, "BLOCK_N": 48})
    vh, vw, target, kw = _make(N=5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"partial width \(BLOCK_N / EPILOGUE_SPLIT = 24\) must be a multiple"):
        ivl.fused_guided_cross_entropy(vh, vw, target, **kw, backend="triton")
    assert not tiles


@pytest.mark.parametrize("case", [TILE_CASES[0], TILE_CASES[-4], TILE_CASES[-2]])
def test_tiles_fp16_match_reference(case, tiles):
    vh, vw, target, kw = _make(**case, dtype=torch.float16)
    _check("triton", vh, vw, target, kw, torch.float16)
    assert set(tiles) == _expected_modes(kw)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_tiles_dx_vocabulary_splits(splits, tiles, monkeypatch):
    """``dX`` in one program per tile (written straight into the gradient) or split over the vocabulary (float32
    slices added in order): both equal the oracle; a split count that does not divide the column tiles."""
    seen = []
    monkeypatch.setattr(_tiles, "dx_splits", lambda *a: seen.append(splits) or splits)
    vh, vw, target, kw = _make(N=23, Hv=24, Vv=150, base="hidden", smoothing=0.1, alpha="tensor", ignore=(4,),
                               dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert seen and set(tiles) == {1}


@pytest.mark.skipif(HAS_GPU, reason="the GPU runs these tile sizes natively (test_tiles_half_on_gpu)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_tiles_gpu_tile_sizes_under_interpreter(dtype, tiles, monkeypatch):
    """The GPU's tile configuration (128 x 128 x 64 for half precision, its vocabulary splits and factor tiles)
    run by the interpreter: partial tiles on every edge, two logits column tiles per row, dX split in three."""
    monkeypatch.setattr(_tiles, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_tiles, "dx_splits", lambda *a: 3)
    vh, vw, target, kw = _make(N=150, Hv=72, Hb=64, Vv=300, Vb=333, smoothing=0.1, alpha="tensor", ignore=(5,),
                               dtype=dtype)
    _check("triton", vh, vw, target, kw, dtype)
    assert set(tiles) == {1}


def test_tiles_statistics_only_when_nothing_needs_a_gradient(tiles):
    """A forward without gradients (scoring, evaluation) writes no ``[rows, V]`` buffer: mode 0 only."""
    vh, vw, target, kw = _make(N=13, base="hidden", vmap="map", Vb=111, reduction="none", dtype=torch.float32)
    with torch.no_grad():
        got = ivl.fused_guided_cross_entropy(vh, vw, target, backend="triton", **kw)
    ref = guided_cross_entropy_naive(vh.double(), vw.double(), target, **_to(kw, torch.float64),
                                     dtype=torch.float64)
    assert _err(got, ref) <= ATOL[torch.float32] * ref.abs().max().item() * 10
    assert set(tiles) == {0}


@pytest.mark.parametrize("which", ["value_hidden", "value_weight"])
def test_tiles_gradient_of_one_input_only(which, tiles):
    vh, vw, target, kw = _make(N=11, base="hidden", vmap="map", Vb=120, dtype=torch.float32)
    ref_h, ref_w = vh.clone().requires_grad_(), vw.clone().requires_grad_()
    guided_cross_entropy_naive(ref_h, ref_w, target, **kw).backward()
    h, w = vh.clone().requires_grad_(which == "value_hidden"), vw.clone().requires_grad_(which == "value_weight")
    ivl.fused_guided_cross_entropy(h, w, target, backend="triton", **kw).backward()
    got, ref, other = (h.grad, ref_h.grad, w) if which == "value_hidden" else (w.grad, ref_w.grad, h)
    assert other.grad is None
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert set(tiles) == {1}


def test_tiles_packed_heads(tiles):
    """Heads packed into one buffer (views with a row stride of Hb + Hv) go through the tiles as strided heads."""
    vh, vw, target, kw = _make(N=15, Vb=97, Vv=97, base="hidden", dtype=torch.float32)
    pb, pv = ivl.pack_head_weights(kw["base_weight"], vw)
    ref = _run(lambda *a, **k: guided_cross_entropy_naive(*a, **k, dtype=torch.float64), vh.double(), vw.double(),
               target, _to(kw, torch.float64))
    got = _run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, pv, target,
               dict(kw, base_weight=pb))
    for o, r in zip(got, ref):
        assert _err(o, r) <= 1e-5 * r.abs().max().item() + 1e-6
    assert set(tiles) == {1}


@pytest.mark.parametrize("why", ["l1_term", "column_major_value_head"])
def test_tiles_fall_back_to_cublas_path(why, tiles):
    """IVL's L1 term and a value head without unit stride along Hv stay on the cuBLAS path, still correct."""
    if why == "l1_term":
        vh, vw, target, kw = _make(N=9, base="hidden", l1_coef=0.5, dtype=torch.float32)
    else:
        vh, vw, target, kw = _make(N=9, base="logits", noncontig=True, dtype=torch.float32)
    _check("triton", vh, vw, target, kw, torch.float32)
    assert tiles == []


def test_unknown_loss_gemm_is_refused(monkeypatch):
    monkeypatch.setenv("IVL_KERNELS_GEMM", "cutlass")
    vh, vw, target, kw = _make(N=5, base="hidden", dtype=torch.float32)
    before = [t.clone() for t in (vh, vw, kw["base_hidden"], kw["base_weight"])]
    with pytest.raises(ValueError,
                       match="IVL_KERNELS_GEMM must be one of auto, cublas, tiles, tma, wide, hybrid; got 'cutlass'"):
        ivl.fused_guided_cross_entropy(vh, vw, target, backend="triton", **kw)
    for b, a in zip(before, (vh, vw, kw["base_hidden"], kw["base_weight"])):
        assert torch.equal(b, a)


needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="the compiled tile kernels (bf16/fp16, wgmma) need a GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", [
    _case("gpu-N1000-hidden-map-smooth-ignore-mean", N=1000, Hv=128, Hb=96, Vv=3001, Vb=3500, vmap="map",
          smoothing=0.1, ignore=(0, 7, 999)),
    _case("gpu-N257-logits-identity-alpha_tensor-none", N=257, Hv=64, Vv=5003, Vb=5100, base="logits",
          alpha="tensor", reduction="none"),
    _case("gpu-N4133-valueonly-oddK-sum", N=4133, Hv=200, Vv=4099, base="none", reduction="sum"),
])
def test_tiles_half_on_gpu(case, dtype, tiles):
    vh, vw, target, kw = _make(**case, dtype=dtype, device="cuda")
    _check("triton", vh, vw, target, kw, dtype)
    assert set(tiles) == _expected_modes(kw)


@needs_gpu
@pytest.mark.parametrize("case", [
    _case("gpu-N1000-hidden-identity-smooth-ignore-mean", N=1000, Hv=128, Hb=96, Vv=3001, Vb=3500,
          smoothing=0.1, ignore=(0, 7, 999)),
    _case("gpu-N4133-valueonly-map-oddK-sum", N=4133, Hv=200, Vv=4099, Vb=4200, base="none", vmap="map",
          reduction="sum"),
])
def test_hybrid_bf16_on_gpu(case, tiles, grad_kernels, monkeypatch):
    """``hybrid`` compiled: the wide (sm_90) or tma / pointer logits kernel, ``G`` finished in place, cuBLAS
    products; against the oracle in bf16."""
    monkeypatch.setenv("IVL_KERNELS_GEMM", "hybrid")
    vh, vw, target, kw = _make(**case, dtype=torch.bfloat16, device="cuda")
    _check("triton", vh, vw, target, kw, torch.bfloat16)
    assert set(tiles) == {1} and set(grad_kernels) == {"_ce_finish_grad_kernel"}, grad_kernels


@needs_gpu
def test_tiles_bit_reproducible_on_gpu(tiles):
    vh, vw, target, kw = _make(N=3000, Hv=256, Hb=128, Vv=8000, Vb=8000, smoothing=0.1, dtype=torch.bfloat16,
                               device="cuda")
    runs = [_run(lambda *a, **k: ivl.fused_guided_cross_entropy(*a, **k, backend="triton"), vh, vw, target, kw)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("N", [8192, 32768])
def test_tiles_memory_on_gpu_is_a_chunk_plus_accumulators(N, tiles):
    extra, bound = guided_loss_extra_memory(N)
    assert extra <= bound, (extra, bound)
    assert set(tiles) == {1}


def test_dx_splits_fill_the_waves():
    cpu = torch.device("cpu")  # planned for 132 SMs (an H100's) off a GPU
    assert _tiles.dx_splits(30, 7, 1188, cpu) == 5      # qwen chunk: 210 programs -> 1050 of 1056 slots
    assert _tiles.dx_splits(264, 1, 1188, cpu) == 1     # two full waves already
    assert _tiles.dx_splits(1, 1, 3, cpu) == 3          # at most one split per column tile
    assert _tiles.dx_splits(1, 1, 0, cpu) == 1


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the script times the kernels (gpu_session.sh bench-tiles)")
def test_tuning_benchmark_checks_every_variant_under_the_interpreter(tmp_path):
    """benchmarks/bench_loss_tiles.py without a GPU: every candidate tile configuration (the GPU's sizes) run by
    the interpreter on a small chunk, equal to the cuBLAS path; nothing timed; CSV written."""
    import csv
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", "bench_loss_tiles.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("loss_tiles_cpu_interpreter_*.csv")
    rows = list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))
    sys.path.insert(0, os.path.dirname(script))
    try:
        from bench_loss_tiles import VARIANTS
    finally:
        sys.path.remove(os.path.dirname(script))
    assert {r["variant"] for r in rows if r["case"] == "value-only"} == set(VARIANTS)
    for r in rows:
        assert r["status"] == "interpreter: correctness only, not timed" and r["ms"] == "", r
        assert float(r["rel_err"]) < 3e-3, r

"""The CUDA decode kernel (csrc/guided_logits_kernel.cuh), executed on CPU through the host SIMT emulation.

The text nvcc compiles into the extension is compiled here by the host C++ compiler under
csrc/emulation/simt_emu.h (tests/ops/_cuda_emu.py builds it in a few seconds): the 32 lanes of each warp run as
fibers that meet at every shuffle (lockstep), every 16-byte load is checked for alignment and for lying inside
the tensors the kernel may read, and the launch is the extension's (256 threads, the same ROWS and base/out
type instantiations, the same grid formula) with a small grid cap, so the grid-stride loop iterates.

Cases follow the GPU tests (benchmarks/sanitize_cuda.py, tests/ops/test_gpu_production.py): every dtype (bf16
included), every ROWS instantiation (M = 1, 2, 3, 4, 8, 16), base logits in the value dtype or float32 and the
fused base head, maps with -1 and many-to-one entries in int32 and int64 and maps with out-of-range entries (which
must read as unmapped), hidden sizes whose inner loop runs several rounds of unrolled loads plus a tail, in-place
output, -inf base logits. Inputs sit inside NaN-poisoned buffers with padded rows: a read of a wrong element
shows in the result, a write outside the output shows in its guard zone. Results are checked against float64
with the float32-accumulation bound of the GPU tests, and the launch's shuffle and load counts against what the
kernel must do (each weight row read exactly once, one warp reduction per row and vocabulary id).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from ivl_kernels.reference import guided_logits_naive

from _cuda_emu import EmulationError, load

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
ROW_COUNTS = [1, 2, 3, 4, 8, 16]
# Grid cap of 3 blocks = 24 warps for Vb = 203 ids: each warp runs the grid-stride loop 8 or 9 times.
MAX_BLOCKS = 3
VB, VV = 203, 181  # Vb > Vv: the identity map leaves an unmapped tail
# 16-byte vectors per row: Hv 1096 -> 274 (fp32: two rounds of 32 lanes x 4 loads + 18) or 137 (half: one round
# + 9); Hb 520 -> 130 (two rounds, the second with 2 lanes) / 65.
HV, HB = 1096, 520
U32 = 2.0 ** -24
LAMBDA = 8.0  # as tests/ops/test_gpu_production.py
ROUND_OUT = {torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FILL = -0.25


@pytest.fixture(scope="module")
def emu():
    try:
        return load()
    except LookupError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------------------------------------------
# Inputs inside poisoned buffers
# ---------------------------------------------------------------------------------------------------------------
def _poison(dtype):
    return float("nan") if dtype.is_floating_point else -(2 ** 31)


def _embed(t: torch.Tensor, pad_cols: int = 8, guard_rows: int = 2, poison=None) -> torch.Tensor:
    """``t`` (2-D) copied into the middle of a bigger buffer filled with ``poison``: rows padded by ``pad_cols``
    elements (a multiple of 8, so 16-byte alignment holds for every dtype) and ``guard_rows`` rows on each side."""
    rows, cols = t.shape
    poison = _poison(t.dtype) if poison is None else poison
    big = torch.full((rows + 2 * guard_rows, cols + pad_cols), poison, dtype=t.dtype)
    view = big[guard_rows:guard_rows + rows, :cols]
    view.copy_(t)
    view._ivl_buffer = big  # noqa: SLF001  (kept for the guard check)
    return view


def _embed_1d(t: torch.Tensor, guard: int = 16, poison=None) -> torch.Tensor:
    poison = _poison(t.dtype) if poison is None else poison
    big = torch.full((t.numel() + 2 * guard,), poison, dtype=t.dtype)
    view = big[guard:guard + t.numel()]
    view.copy_(t)
    return view


def _guard_intact(view: torch.Tensor, before: torch.Tensor) -> bool:
    """The buffer around ``view`` holds exactly what it held before the launch (compared bit for bit)."""
    big = view._ivl_buffer  # noqa: SLF001
    inside = torch.zeros(big.shape, dtype=torch.bool)
    g = (big.shape[0] - view.shape[0]) // 2
    inside[g:g + view.shape[0], :view.shape[1]] = True
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[big.element_size()]
    return torch.equal(big.view(bits)[~inside], before.view(bits)[~inside])


def _map(kind: str, Vb: int, Vv: int, g: torch.Generator):
    if kind == "identity":
        return None
    m = torch.randint(0, Vv, (Vb,), generator=g)  # duplicates: many-to-one
    if kind.startswith("injective"):
        m = torch.randperm(Vv, generator=g)[:Vb] if Vb <= Vv else torch.randperm(Vb, generator=g)
        m = torch.where(m < Vv, m, -1)
    m[torch.rand(Vb, generator=g) < 0.15] = -1
    m[0], m[-1] = Vv - 1, -1
    dtype = torch.int64 if kind.endswith("int64") else torch.int32
    if kind.startswith("out-of-range"):
        info = torch.iinfo(dtype)
        bad = torch.tensor([Vv, Vv + 1, Vv + 99999, -2, -7, info.max, info.min], dtype=torch.int64)
        pos = torch.randperm(Vb, generator=g)[: Vb // 6]
        m[pos] = bad[torch.arange(len(pos)) % len(bad)]
        m[1], m[-2] = info.max, info.min
    return m.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Error bound (tests/ops/test_gpu_production.py's float32-accumulation bound)
# ---------------------------------------------------------------------------------------------------------------
def _check(out, ref, scale, K, what):
    out64 = out.double()
    assert not torch.isnan(out64).any(), f"{what}: NaN in the output (an element not written, or a poisoned read)"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out64), inf), f"{what}: infinite entries differ from the reference"
    assert torch.equal(out64[inf], ref[inf]), f"{what}: sign of infinite entries differs"
    fin = ~inf
    err = (out64[fin] - ref[fin]).abs()
    bound = LAMBDA * math.sqrt(K) * U32 * scale[fin] + ROUND_OUT[out.dtype] * ref[fin].abs() + 1e-6
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"{what}: error {err.max().item():.3e} exceeds the float32-accumulation bound "
                          f"(worst element at {worst:.2f}x its bound)")


def _expected_counts(M, Vb, Vv, vocab_map, dtype, hidden):
    """(shuffle rounds, 16-byte loads) the kernel must perform: per vocabulary id, one 5-step butterfly per row
    and accumulator; per mapped id, its weight row (n16 loads) and the M hidden rows (M * n16 loads)."""
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    cols = torch.arange(Vb) if vocab_map is None else vocab_map.long()
    mapped = int(((cols >= 0) & (cols < Vv)).sum())
    rounds = Vb * M * 5 * (2 if hidden else 1)
    loads = mapped * (1 + M) * (HV // vec) + (Vb * (1 + M) * (HB // vec) if hidden else 0)
    return rounds, loads


_DATA: dict = {}


def _data(dtype, Vb, Vv):
    """Weights and activations per dtype and shape, made once: the value/base heads, 16 rows of hidden states and
    base logits, their float64 forms, and the same embedded in poisoned buffers (the kernel only reads them)."""
    key = (dtype, Vb, Vv)
    if key not in _DATA:
        g = torch.Generator().manual_seed(zlib.crc32(str(key).encode()))
        d = dict(vh=torch.randn(16, HV, generator=g).to(dtype),
                 vw=(torch.randn(Vv, HV, generator=g) / math.sqrt(HV)).to(dtype),
                 bh=torch.randn(16, HB, generator=g).to(dtype),
                 bw=(torch.randn(Vb, HB, generator=g) / math.sqrt(HB)).to(dtype),
                 base=4 * torch.randn(16, Vb, generator=g))
        d["base"][:, 3::37] = float("-inf")  # masked tokens stay -inf
        d64 = {k: v.double() for k, v in d.items()}
        d["value64"], d["value_mag"] = d64["vh"] @ d64["vw"].T, d64["vh"].abs() @ d64["vw"].abs().T
        d["base64"], d["base_mag"] = d64["bh"] @ d64["bw"].T, d64["bh"].abs() @ d64["bw"].abs().T
        for k in ("vh", "vw", "bh", "bw"):
            d[k + "_buf"] = _embed(d[k])
        _DATA[key] = d
    return _DATA[key]


def _run_case(emu, dtype, M, base_mode, map_kind, *, seed, max_blocks=MAX_BLOCKS, Vb=VB, Vv=VV, in_place=False,
              workers=1):
    d = _data(dtype, Vb, Vv)
    g = torch.Generator().manual_seed(seed)
    vocab_map = _map(map_kind, Vb, Vv, g)
    alpha = torch.rand(M, generator=g) * 2 - 0.5 if map_kind in ("many-to-one-int32", "out-of-range-int32") else 0.7
    a = alpha.double().view(-1, 1) if isinstance(alpha, torch.Tensor) else alpha
    # float64 reference and the magnitude scale of its terms; map entries outside [0, Vv) are unmapped.
    cols = torch.arange(Vb) if vocab_map is None else vocab_map.long()
    unmapped = (cols < 0) | (cols >= Vv)
    cols = cols.masked_fill(unmapped, 0)
    value = d["value64"][:M, cols].masked_fill(unmapped, FILL)
    value_mag = d["value_mag"][:M, cols].masked_fill(unmapped, abs(FILL))
    base_logits = None
    if base_mode == "hidden":
        out_dtype, K = torch.float32, max(HV, HB)
        base, base_mag = d["base64"][:M], d["base_mag"][:M]
        kw = dict(base_hidden=d["bh"][:M], base_weight=d["bw"])
    else:
        base_logits = d["base"][:M].to(dtype if base_mode == "logits" else torch.float32)
        out_dtype, K = base_logits.dtype, HV
        base, base_mag = base_logits.double(), base_logits.double().abs()
        kw = dict(base_logits=base_logits)
    ref = base + a * value
    scale = base_mag + (a.abs() if isinstance(a, torch.Tensor) else abs(a)) * value_mag
    if M <= 2:  # the same formula through ivl_kernels.reference, the oracle of the other backend tests
        oracle = guided_logits_naive(d["vh"][:M], d["vw"], vocab_map=vocab_map, alpha=alpha, fill=FILL,
                                     dtype=torch.float64, **kw)
        assert torch.allclose(oracle, ref, rtol=1e-12, atol=1e-12)
    # Poisoned buffers, padded rows (row strides != row lengths), guard zones.
    base_arg = _embed(base_logits) if base_logits is not None else None
    out = base_arg if in_place else _embed(torch.full((M, Vb), float("nan"), dtype=out_dtype))
    before = out._ivl_buffer.clone()  # noqa: SLF001
    hidden = base_mode == "hidden"
    info = emu.guided_logits(d["vh_buf"][:M], d["vw_buf"], base_arg, d["bh_buf"][:M] if hidden else None,
                             d["bw_buf"] if hidden else None,
                             _embed_1d(vocab_map) if vocab_map is not None else None,
                             _embed_1d(alpha) if isinstance(alpha, torch.Tensor) else None,
                             0.0 if isinstance(alpha, torch.Tensor) else alpha, FILL, out,
                             max_blocks=max_blocks, workers=workers)
    what = f"emulated/{dtype}/M{M}/{base_mode}/{map_kind}"
    _check(out, ref, scale, K, what)
    assert _guard_intact(out, before), f"{what}: the kernel wrote outside the output"
    assert info.rows == next(r for r in (1, 2, 4, 8, 16) if M <= r), (info.rows, M)  # guided_logits.cu's choice
    assert info.blocks == min(max_blocks, -(-Vb // (emu.threads_per_block // 32)))
    assert info.warps == info.blocks * emu.threads_per_block // 32
    rounds, loads = _expected_counts(M, Vb, Vv, vocab_map, dtype, hidden)
    assert info.shuffle_rounds == rounds, f"{what}: {info.shuffle_rounds} warp shuffles, expected {rounds}"
    assert info.vector_loads == loads, f"{what}: {info.vector_loads} 16-byte loads, expected {loads}"
    return out, info


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------
MAP_KINDS = ["identity", "many-to-one-int32", "injective-int64", "out-of-range-int32", "out-of-range-int64"]
# Base logits in the value dtype, in float32 (the same instantiation as the first for float32 values: left out),
# or the base head fused (base_hidden + base_weight).
CASES = [pytest.param(dtype, M, base_mode, map_kind, id=f"{dtype_id}-M{M}-{base_mode}-{map_kind}")
         for dtype, dtype_id in zip(DTYPES, DTYPE_IDS) for M in ROW_COUNTS
         for base_mode in ("logits", "logits-fp32", "hidden") for map_kind in MAP_KINDS
         if not (dtype == torch.float32 and base_mode == "logits-fp32")]


@pytest.mark.parametrize("dtype,M,base_mode,map_kind", CASES)
def test_kernel_matches_reference(emu, dtype, M, base_mode, map_kind):
    _, info = _run_case(emu, dtype, M, base_mode, map_kind, seed=zlib.crc32(f"{dtype}/{M}/{base_mode}/{map_kind}".encode()))
    assert info.warps < VB  # the grid is smaller than the vocabulary: warps stride over it


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 5, 16], ids=lambda m: f"M{m}")
def test_full_grid_one_id_per_warp(emu, dtype, M):
    """Uncapped grid (the extension's launch for small Vb): one vocabulary id per warp, and the last block's
    surplus warps (Vb = 203 is not a multiple of 8) do nothing."""
    _, info = _run_case(emu, dtype, M, "hidden", "many-to-one-int32", seed=M, max_blocks=1 << 20)
    assert info.blocks == -(-VB // 8) and info.warps > VB


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_in_place_on_base_logits(emu, dtype):
    """out is base_logits (a logits processor's call): each element is read, then written, by the same lane."""
    _run_case(emu, dtype, 6, "logits", "many-to-one-int32", seed=7, in_place=True)


# (fill, base, map). +inf and per-row alpha (which may be negative: the out-of-range maps) only with the base head
# fused: base logits hold -inf entries, and -inf + inf is NaN there in every implementation.
INF_FILL_CASES = [(fill, base_mode, map_kind) for fill in (float("-inf"), float("inf"))
                  for base_mode in ("logits", "hidden")
                  for map_kind in ("identity", "injective-int64", "out-of-range-int32")
                  if base_mode == "hidden" or (fill < 0 and map_kind != "out-of-range-int32")]


@pytest.mark.parametrize("fill,base_mode,map_kind", INF_FILL_CASES,
                         ids=[f"fill_{'neg' if f < 0 else 'pos'}_inf-{b}-{m}" for f, b, m in INF_FILL_CASES])
def test_infinite_fill(emu, fill, base_mode, map_kind, monkeypatch):
    """``fill=-inf`` (ban the unmapped ids) or ``+inf``: the kernel selects ``fill`` for an unmapped id rather than
    multiplying a mask by it, so exactly the unmapped columns are infinite and the mapped ones finite and within
    the bound, as in the float64 reference (and the torch and Triton backends)."""
    monkeypatch.setitem(globals(), "FILL", fill)
    _run_case(emu, torch.float32, 3, base_mode, map_kind,
              seed=zlib.crc32(f"inf/{fill}/{base_mode}/{map_kind}".encode()))


def test_several_worker_threads_give_the_same_bits(emu):
    a, _ = _run_case(emu, torch.bfloat16, 8, "hidden", "out-of-range-int64", seed=3, workers=1)
    b, _ = _run_case(emu, torch.bfloat16, 8, "hidden", "out-of-range-int64", seed=3, workers=2)
    assert torch.equal(a, b)


def test_portable_lane_switch_gives_the_same_bits(emu):
    """The ucontext lane switch (used where the x86-64 one is not available) runs the same schedule."""
    a, _ = _run_case(emu, torch.float16, 3, "logits", "many-to-one-int32", seed=11, Vb=45)
    was = emu.portable_switch()
    try:
        assert emu.set_portable_switch(True)
        b, _ = _run_case(emu, torch.float16, 3, "logits", "many-to-one-int32", seed=11, Vb=45)
    finally:
        emu.set_portable_switch(was)
    assert torch.equal(a, b)


def test_misaligned_input_is_refused(emu):
    vh = torch.randn(2, HV + 8)[:, 1:HV + 1]  # rows start 4 bytes past a 16-byte boundary
    vw = torch.randn(VV, HV)
    with pytest.raises(ValueError, match="16-byte aligned"):
        emu.guided_logits(vh, vw, torch.randn(2, VB), None, None, None, None, 1.0, 0.0, torch.empty(2, VB),
                          max_blocks=2)


def test_kernel_has_one_source():
    """guided_logits.cu includes the kernel header and defines no device code of its own."""
    import os

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    with open(os.path.join(csrc, "guided_logits.cu")) as f:
        cu = f.read()
    assert '#include "guided_logits_kernel.cuh"' in cu
    assert "__global__" not in cu and "__device__" not in cu and "__shfl" not in cu


# ---------------------------------------------------------------------------------------------------------------
# The emulation itself
# ---------------------------------------------------------------------------------------------------------------
def test_shuffle_xor_semantics(emu):
    blocks, threads = 2, 96
    table = emu.shuffle_table(blocks, threads)
    t = torch.arange(blocks * threads)
    mine = (1000 * (t // threads) + t).double()
    lane = t % 32
    for k in range(32):
        src = t - lane + (lane ^ k)
        assert torch.equal(table[:, k].double(), mine[src]), k
    # width 8, laneMask 12: the source lane is in a later segment of 8 for lanes with bit 3 clear (own value),
    # an earlier one for the others (their value).
    src = torch.where((lane ^ 12) < (lane & ~7) + 8, t - lane + (lane ^ 12), t)
    assert torch.equal(table[:, 32].double(), mine[src])


def test_lanes_meet_at_every_shuffle(emu):
    """Each lane counts itself in before a shuffle and reads the count after it: all 32, every time."""
    seen = emu.lockstep(3, 128)
    assert (seen == 32).all(), seen


@pytest.mark.parametrize("which,match", [(0, "misaligned 16-byte load"), (1, "out-of-bounds 16-byte load"),
                                         (2, "divergent warp")], ids=["misaligned", "out-of-bounds", "divergent"])
def test_emulation_reports_faults(emu, which, match):
    with pytest.raises(EmulationError, match=match):
        emu.faulty(which)


def test_half_conversions_match_torch(emu):
    every = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    for name, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        # 16-bit -> float: exact for every bit pattern.
        want = every.view(dt).float()
        got = emu.convert(f"{name}_to_f32", every)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan]), name
        # float -> 16-bit, round to nearest even: every representable value, the midpoints between neighbours
        # (ties) and one float32 ulp either side, random floats over the whole exponent range, subnormals,
        # the overflow threshold, infinities.
        vals = want[~nan].unique()
        mid = (vals[:-1].double() + vals[1:].double()) / 2
        mid32 = mid.float()
        probes = [vals, mid32, torch.nextafter(mid32, torch.tensor(float("inf"))),
                  torch.nextafter(mid32, torch.tensor(float("-inf"))),
                  torch.randn(20000) * torch.exp2(torch.randint(-140, 128, (20000,)).float()),
                  torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.0 ** -25, 2.0 ** -24,
                                3 * 2.0 ** -26, 5.96e-8, -5.96e-8, 6.1e-5, 3.4e38, float("inf"), float("-inf"),
                                1.0e-40, -1.0e-45])]
        x = torch.cat([p.float() for p in probes])
        x = x[torch.isfinite(x) | torch.isinf(x)]
        want_bits = x.to(dt).view(torch.int16)
        got_bits = emu.convert(f"f32_to_{name}", x)
        bad = got_bits != want_bits
        assert not bad.any(), (name, x[bad][:8].tolist(), got_bits[bad][:8].tolist(), want_bits[bad][:8].tolist())
        # NaN stays NaN.
        assert torch.isnan(emu.convert(f"f32_to_{name}", torch.tensor([float("nan")])).view(dt).float()).all()

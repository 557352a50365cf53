"""The compute-bound head (``GEMM_MIN_ROWS`` rows and more): the heads as GEMMs accumulated into ``out``, and
packed heads (``pack_head_weights``) as one GEMM over the concatenated hidden states, against the fp64 oracle.

On CPU the ``triton`` backend takes the same route as on a GPU from ``GEMM_MIN_ROWS`` rows (the GEMMs are
torch's; the Triton tiles serve the rest, under the interpreter), so these run everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels.ops import _tile_launch
from ivl_kernels.ops import guided_logits as gl
from ivl_kernels.ops.packed_heads import adjacent_columns, pack_head_weights, packed_view
from ivl_kernels.reference import guided_logits_naive

from _kernel_spy import KernelSpy
from test_guided_logits import BACKENDS, _skip_unsupported, assert_guided_close, make_map

TRITON = [p for p in BACKENDS if p.values[0] == "triton"]
M_GEMM = gl.GEMM_MIN_ROWS + 3


def _heads(Vb, Hb, Vv, Hv, dtype, device):
    bw = (torch.randn(Vb, Hb, device=device) / math.sqrt(Hb)).to(dtype)
    vw = (torch.randn(Vv, Hv, device=device) / math.sqrt(Hv)).to(dtype)
    return bw, vw


def _check(backend, device, dtype, vh, vw, bh, bw, vocab_map=None, alpha=1.0, fill=0.0, what=""):
    kw = dict(base_hidden=bh, base_weight=bw, vocab_map=vocab_map, alpha=alpha, fill=fill)
    # The oracle sees contiguous copies: whatever the packed views' strides, the formula is the same.
    ref_kw = dict(kw, base_weight=bw.contiguous())
    ref = guided_logits_naive(vh, vw.contiguous(), dtype=torch.float64, **ref_kw)
    plain = guided_logits_naive(vh, vw.contiguous(), dtype=dtype, **ref_kw)
    out = torch.full(ref.shape, float("nan"), dtype=torch.float32, device=device)
    assert ivl.fused_guided_logits(vh, vw, out=out, backend=backend, **kw) is out
    assert_guided_close(out, ref, plain, dtype, what)
    return out


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("base_mode", ["logits", "hidden"])
@pytest.mark.parametrize("map_kind", ["identity", "injective", "many_to_one"])
@pytest.mark.parametrize("fill", [0.0, -1.5], ids=["fill0", "fill-1.5"])
@pytest.mark.parametrize("alpha_kind", ["scalar", "per-row"])
def test_gemm_rows_match_reference(backend, device, dtype, base_mode, map_kind, fill, alpha_kind, monkeypatch):
    """From ``GEMM_MIN_ROWS`` rows off a GPU ``auto`` is the cuBLAS path for every map and fill (the fill of a
    map's unmapped ids by a rank-1 update): no Triton kernel runs."""
    _skip_unsupported(backend, device, dtype)
    launched = []
    if device == "cpu":
        monkeypatch.setattr(gl._launch, "_guided_logits_kernel", KernelSpy(gl._launch._guided_logits_kernel, launched))
    Vb, Vv, Hv, Hb = 97, 80, 24, 40
    vh = torch.randn(M_GEMM, Hv, device=device).to(dtype)
    vw = (torch.randn(Vv, Hv, device=device) / math.sqrt(Hv)).to(dtype)
    vmap = make_map(map_kind, Vb, Vv, device)
    alpha = torch.rand(M_GEMM, device=device) * 2 - 0.5 if alpha_kind == "per-row" else -0.7
    kw = {}
    if base_mode == "logits":
        kw["base_logits"] = torch.randn(M_GEMM, Vb, device=device).to(dtype)
    else:
        kw["base_hidden"] = torch.randn(M_GEMM, Hb, device=device).to(dtype)
        kw["base_weight"] = (torch.randn(Vb, Hb, device=device) / math.sqrt(Hb)).to(dtype)
    ref = guided_logits_naive(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, dtype=torch.float64, **kw)
    plain = guided_logits_naive(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, dtype=dtype, **kw)
    out_dtype = kw["base_logits"].dtype if "base_logits" in kw else torch.float32
    out = torch.full(ref.shape, float("nan"), dtype=out_dtype, device=device)
    ivl.fused_guided_logits(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, out=out, backend=backend, **kw)
    assert_guided_close(out, ref, plain, dtype, f"M={M_GEMM} {base_mode} {map_kind} fill={fill} {alpha_kind}")
    assert launched == []


def test_pack_head_weights_layout():
    bw, vw = _heads(10, 6, 7, 4, torch.float32, "cpu")
    pb, pv = pack_head_weights(bw, vw)
    assert torch.equal(pb, bw) and torch.equal(pv, vw)
    assert pb.stride() == (10, 1) and pv.stride() == (10, 1)
    assert pv.untyped_storage().data_ptr() == pb.untyped_storage().data_ptr()
    cat = packed_view(pb, pv, 7)
    assert cat is not None and torch.equal(cat, torch.cat([bw[:7], vw], dim=1))
    # A value vocabulary larger than the base's: the buffer has its rows, the base block is zero there.
    pb2, pv2 = pack_head_weights(vw, bw)
    assert torch.equal(pb2, vw) and torch.equal(pv2, bw)
    assert packed_view(pb2, pv2, 7) is not None and packed_view(pb2, pv2, 8) is None


def test_packed_view_refuses_what_is_not_packed():
    bw, vw = _heads(10, 6, 7, 4, torch.float32, "cpu")
    assert packed_view(bw, vw, 7) is None  # separate tensors
    buf = torch.randn(10, 12)
    assert packed_view(buf[:, :6], buf[:7, 7:11], 7) is None  # a gap between the blocks
    assert packed_view(buf[:, 6:10], buf[:7, :6], 7) is None  # value block before the base block
    assert packed_view(buf[:, :6], buf[:7, 6:10], 7) is not None  # row stride 12 >= 10: fine
    pb, pv = pack_head_weights(bw, vw)
    assert packed_view(pb, pv.to(torch.float64), 7) is None
    assert packed_view(pb, pv, 0) is None


@pytest.mark.parametrize("what", ["base-dtype", "device", "rank"])
def test_pack_head_weights_refuses_mismatched_weights(what):
    bw, vw = _heads(10, 6, 7, 4, torch.float32, "cpu")
    if what == "base-dtype":
        with pytest.raises(TypeError, match="value_weight must have base_weight's dtype"):
            pack_head_weights(bw, vw.double())
    elif what == "device":
        with pytest.raises(ValueError, match="value_weight must be on base_weight's device"):
            pack_head_weights(bw, vw.to("meta"))
    else:
        with pytest.raises(ValueError, match="base_weight must be a 2-D tensor"):
            pack_head_weights(bw[0], vw)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab", ["Vv<Vb", "Vv=Vb", "Vv>Vb"])
@pytest.mark.parametrize("alpha_kind", ["scalar", "per-row"])
def test_packed_heads_match_reference_and_unpacked(backend, device, dtype, vocab, alpha_kind, monkeypatch):
    _skip_unsupported(backend, device, dtype)
    Vb = 97
    Vv = {"Vv<Vb": 80, "Vv=Vb": 97, "Vv>Vb": 110}[vocab]
    Hb, Hv = 40, 24
    bw, vw = _heads(Vb, Hb, Vv, Hv, dtype, device)
    pb, pv = pack_head_weights(bw, vw)
    bh = torch.randn(M_GEMM, Hb, device=device).to(dtype)
    vh = torch.randn(M_GEMM, Hv, device=device).to(dtype)
    alpha = 0.75 if alpha_kind == "scalar" else torch.rand(M_GEMM, device=device) * 2 - 0.5
    calls = []
    real = gl._launch._launch_packed
    monkeypatch.setattr(gl._launch, "_launch_packed", lambda *a, **k: (calls.append(1), real(*a, **k)))
    packed = _check(backend, device, dtype, vh, pv, bh, pb, alpha=alpha, fill=-2.0, what=f"packed {vocab}")
    assert calls, "packed heads did not take the one-GEMM path"
    calls.clear()
    unpacked = _check(backend, device, dtype, vh, vw, bh, bw, alpha=alpha, fill=-2.0, what=f"unpacked {vocab}")
    assert not calls, "separate heads took the packed path"
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(packed, unpacked, atol=tol, rtol=tol)


def test_adjacent_columns_recognises_column_blocks_of_one_tensor():
    hs = torch.randn(9, 6 + 4 + 3)  # [X_b | X_v | X_v2], as vLLM's forward returns them
    b, v, v2 = torch.split(hs, [6, 4, 3], dim=-1)
    cat = adjacent_columns(b, v)
    assert cat is not None and cat.data_ptr() == hs.data_ptr() and torch.equal(cat, hs[:, :10])
    assert torch.equal(adjacent_columns(v, v2), hs[:, 6:])
    assert adjacent_columns(v, b) is None                      # wrong order
    assert adjacent_columns(b, v2) is None                     # a gap between the blocks
    assert adjacent_columns(b, v.clone()) is None              # separate storage
    assert adjacent_columns(b[:5], v[1:6]) is None             # rows shifted: offset is not b's + 6
    assert adjacent_columns(b, v.double()) is None
    t = torch.randn(13, 9).T                                   # column-major: stride(1) != 1
    assert adjacent_columns(t[:, :4], t[:, 4:]) is None
    assert adjacent_columns(hs[:, :0], hs) is None
    one = torch.randn(1, 10)
    assert torch.equal(adjacent_columns(one[:, :6], one[:, 6:]), one)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [1.0, 0.75], ids=["alpha1", "alpha0.75"])
def test_packed_heads_read_adjacent_hidden_states_in_place(backend, device, dtype, alpha, monkeypatch):
    """Hidden states that are column blocks of one tensor (vLLM's ``[X_b | X_v | ...]``): with alpha 1 the GEMM
    reads them in place (nothing concatenated); another alpha scales a copy. Both give the reference."""
    _skip_unsupported(backend, device, dtype)
    Vb, Vv, Hb, Hv = 97, 80, 40, 24
    bw, vw = _heads(Vb, Hb, Vv, Hv, dtype, device)
    pb, pv = pack_head_weights(bw, vw)
    hs = torch.randn(M_GEMM, Hb + Hv + 8, device=device).to(dtype)  # a second term's columns after them
    bh, vh = hs[:, :Hb], hs[:, Hb:Hb + Hv]
    seen = []
    real_mm = gl._launch.addmm_into
    monkeypatch.setattr(gl._launch, "addmm_into", lambda c, a, *r, **k: (seen.append(a), real_mm(c, a, *r, **k))[1])
    _check(backend, device, dtype, vh, pv, bh, pb, alpha=alpha, fill=-2.0, what=f"adjacent, alpha={alpha}")
    packed_gemm = [a for a in seen if a.shape[1] == Hb + Hv]  # (the other GEMM: base ids past the value vocab)
    assert len(packed_gemm) == 1, [tuple(a.shape) for a in seen]
    in_place = packed_gemm[0].data_ptr() == hs.data_ptr()
    assert in_place == (alpha == 1.0), (alpha, in_place)


@pytest.mark.parametrize("backend,device", TRITON)
def test_packed_heads_below_gemm_rows_and_with_a_map(backend, device):
    """Packed views are ordinary strided weights elsewhere: the Triton tiles (decode rows), and a map (the
    gathered path) give the reference too."""
    Vb, Vv, Hb, Hv = 97, 80, 40, 24
    bw, vw = _heads(Vb, Hb, Vv, Hv, torch.float32, device)
    pb, pv = pack_head_weights(bw, vw)
    for M, vmap in ((5, None), (M_GEMM, make_map("injective", Vb, Vv, device))):
        vh, bh = torch.randn(M, Hv, device=device), torch.randn(M, Hb, device=device)
        _check(backend, device, torch.float32, vh, pv, bh, pb, vocab_map=vmap, alpha=1.25, what=f"M={M}")


@pytest.mark.parametrize("backend,device", TRITON)
def test_packed_heads_under_torch_compile(backend, device):
    """The recognition reads only tensor metadata: it holds when the op runs from a compiled graph."""
    Vb, Vv, Hb, Hv = 97, 80, 40, 24
    bw, vw = _heads(Vb, Hb, Vv, Hv, torch.float32, device)
    pb, pv = pack_head_weights(bw, vw)
    bh, vh = torch.randn(M_GEMM, Hb, device=device), torch.randn(M_GEMM, Hv, device=device)

    def head(vh, bh):
        return ivl.fused_guided_logits(vh, pv, base_hidden=bh, base_weight=pb, alpha=0.5, backend=backend)

    torch._dynamo.reset()
    got = torch.compile(head, fullgraph=True)(vh, bh)
    ref = guided_logits_naive(vh, vw, base_hidden=bh, base_weight=bw, alpha=0.5, dtype=torch.float64)
    assert_guided_close(got, ref, guided_logits_naive(vh, vw, base_hidden=bh, base_weight=bw, alpha=0.5),
                        torch.float32, "compiled, packed")


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("base_mode", ["logits", "logits-in-place", "hidden"])
@pytest.mark.parametrize("map_kind,Vv", [("identity", 80), ("identity", 110), ("injective", 80),
                                         ("many_to_one", 80)], ids=["identity-Vv<Vb", "identity-Vv>Vb",
                                                                    "injective", "many_to_one"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_tile_gemm_head_matches_reference(backend, device, dtype, base_mode, map_kind, Vv, tma, monkeypatch):
    """``IVL_KERNELS_GEMM=tiles``: the head from ``GEMM_MIN_ROWS`` rows as one tile GEMM (both heads as K
    segments, base logits in the epilogue, the map in the loads, a nonzero fill with a map), written once; in
    place on the base logits too. ``tma``: through tensor descriptors on a persistent grid where there is no map
    (``IVL_KERNELS_GEMM=tma``; with a map the pointer kernel runs)."""
    _skip_unsupported(backend, device, dtype)
    monkeypatch.setenv("IVL_KERNELS_GEMM", "tma" if tma else "tiles")
    monkeypatch.setattr(_tile_launch, "sm_count", lambda device: 5)
    calls = []
    for name in ("_ce_logits_tile_kernel", "_ce_logits_tma_kernel"):
        real = getattr(_tile_launch, name)
        monkeypatch.setattr(_tile_launch, name, KernelSpy(real, calls))
    Vb, Hv, Hb = 97, 24, 40
    vh = torch.randn(M_GEMM, Hv, device=device).to(dtype)
    vw = (torch.randn(Vv, Hv, device=device) / math.sqrt(Hv)).to(dtype)
    vmap = make_map(map_kind, Vb, Vv, device)
    alpha = torch.rand(M_GEMM, device=device) * 2 - 0.5
    fill = -1.5
    kw = {}
    if base_mode.startswith("logits"):
        kw["base_logits"] = torch.randn(M_GEMM, Vb, device=device).to(dtype)
    elif base_mode == "hidden":
        kw["base_hidden"] = torch.randn(M_GEMM, Hb, device=device).to(dtype)
        kw["base_weight"] = (torch.randn(Vb, Hb, device=device) / math.sqrt(Hb)).to(dtype)
    ref = guided_logits_naive(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, dtype=torch.float64, **kw)
    plain = guided_logits_naive(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, dtype=dtype, **kw)
    if base_mode == "logits-in-place":
        out = kw["base_logits"]
        got = ivl.fused_guided_logits(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, out=out, backend=backend,
                                      **kw)
        assert got is out
    else:
        out_dtype = kw["base_logits"].dtype if "base_logits" in kw else torch.float32
        out = torch.full(ref.shape, float("nan"), dtype=out_dtype, device=device)
        ivl.fused_guided_logits(vh, vw, vocab_map=vmap, alpha=alpha, fill=fill, out=out, backend=backend, **kw)
    want = "_ce_logits_tma_kernel" if tma and map_kind == "identity" else "_ce_logits_tile_kernel"
    assert calls == [want], calls
    assert_guided_close(out, ref, plain, dtype, f"tiles {base_mode} {map_kind} Vv={Vv}")



@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("base_mode,map_kind,kind", [("hidden", "identity", "wide"),
                                                     ("logits-in-place", "identity", "wide"),
                                                     ("hidden", "many_to_one", "wide"),
                                                     ("hidden", "identity", "hybrid")])
def test_wide_kind_head_matches_reference(backend, device, base_mode, map_kind, kind, monkeypatch):
    """``IVL_KERNELS_GEMM=wide``, float16: the head's tile GEMM on ``WIDE_TILES`` (128 x 256, the epilogue in two
    column halves; here a last tile whose second half is past ``Vb``) through TMA descriptors, written once, in
    place too; with a map (no TMA) the pointer kernel on the default tiles (``_tile_launch.wide_applies``).
    ``hybrid`` (a loss kind: the gradient products in cuBLAS) runs the head as ``wide``."""
    _skip_unsupported(backend, device, torch.float16)
    monkeypatch.setenv("IVL_KERNELS_GEMM", kind)
    monkeypatch.setattr(_tile_launch, "sm_count", lambda device: 2)
    calls, tiles = [], []
    for name in ("_ce_logits_tile_kernel", "_ce_logits_tma_kernel"):
        real = getattr(_tile_launch, name)
        spy = KernelSpy(real, calls)

        class Recording:
            def __getitem__(self, grid, spy=spy):
                def launch(*a, **k):
                    tiles.append((k["BLOCK_M"], k["BLOCK_N"], k["EPILOGUE_SPLIT"]))
                    return spy[grid](*a, **k)
                return launch

        monkeypatch.setattr(_tile_launch, name, Recording())
    Vb, Vv, Hv, Hb = 300, 280, 24, 40
    h = dict(device=device, dtype=torch.float16)
    vh = torch.randn(M_GEMM, Hv, device=device).to(torch.float16)
    vw = (torch.randn(Vv, Hv, device=device) / math.sqrt(Hv)).to(torch.float16)
    vmap = make_map(map_kind, Vb, Vv, device)
    kw = dict(vocab_map=vmap, alpha=torch.rand(M_GEMM, device=device) + 0.5, fill=-1.0)
    if base_mode == "hidden":
        kw.update(base_hidden=torch.randn(M_GEMM, Hb, **h),
                  base_weight=(torch.randn(Vb, Hb, device=device) / math.sqrt(Hb)).to(torch.float16))
        out = torch.full((M_GEMM, Vb), float("nan"), device=device)
    else:
        kw["base_logits"] = torch.randn(M_GEMM, Vb, **h)
    ref = guided_logits_naive(vh, vw, dtype=torch.float64, **kw)
    plain = guided_logits_naive(vh, vw, dtype=torch.float16, **kw)
    if base_mode != "hidden":
        out = kw["base_logits"]
    assert ivl.fused_guided_logits(vh, vw, out=out, backend=backend, **kw) is out
    assert calls == ["_ce_logits_tma_kernel" if map_kind == "identity" else "_ce_logits_tile_kernel"], calls
    narrow = _tile_launch.logits_config(torch.float16)
    assert tiles == [(128, 256, 2) if map_kind == "identity" else (narrow["BLOCK_M"], narrow["BLOCK_N"], 1)]
    assert_guided_close(out, ref, plain, torch.float16, f"wide {base_mode} {map_kind}")

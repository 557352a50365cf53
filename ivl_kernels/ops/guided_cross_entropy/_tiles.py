"""Launchers of the loss's tile GEMMs (``ops/_tile_kernels.py``): the same chunks and results as the cuBLAS path
of ``_chunked.py``, three passes over each chunk of logits instead of six.

Chosen by ``IVL_KERNELS_GEMM`` (``ops/_gemm.gemm_kind``): ``tiles`` forces them, ``tma`` them with the logits
kernel through TMA descriptors (``_tile_launch``), ``wide`` that on 128 x 256 tiles (``_tile_launch.WIDE_TILES``,
half precision), ``hybrid`` ``wide``'s logits kernel with ``G`` finished in place (``_ce_finish_grad_kernel``)
and the gradient products in cuBLAS, ``cublas`` the cuBLAS GEMMs + row kernel, ``auto`` (the
default) measures the kinds per shape class on the GPU and keeps the fastest of those that agree with cuBLAS
(``_chunked._measured_kind``).
Covers every case of the cuBLAS path except IVL's L1 term (``with_l1`` stays on cuBLAS) and operands whose last
dimension is strided. A map is applied in the kernels' loads (no gathered copy of the value head); ``d value
weight`` accumulates per base column and is folded through the map once, at the end, as on the cuBLAS path.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..._triton import interpreter_enabled, triton
from .._columns import gathered_head
from .._gemm import addmm_into
from .._tile_kernels import _ce_combine_kernel, _ce_dw_tile_kernel, _ce_dx_tile_kernel, _ce_finish_grad_kernel
from .._tile_launch import kind_logits_config, launch_logits, logits_config, partial_tile_n, sm_count, tiles_fit


def tiles_take(with_l1: bool, *operands: Optional[torch.Tensor]) -> bool:
    """Whether the tile kernels take this call: no L1 term, unit stride along every GEMM operand's last dim."""
    return not with_l1 and tiles_fit(*operands)


# Tile configurations replacing the defaults below, by kernel ("logits", "dx", "dw", "combine"): for
# benchmarks/bench_loss_tiles.py, which times candidates on a GPU. Empty in normal use.
CONFIG_OVERRIDE: dict = {}


def _config(dtype: torch.dtype, kind: str = "tiles", operands: tuple = (),
            loss_with_base_logits: bool = False) -> dict:
    """The tiles (``_default_config`` under ``CONFIG_OVERRIDE``), the logits kernel's as ``kind`` has them over
    ``operands`` (``(vocab_map, xv, wv, xb, wb)``: ``_tile_launch.kind_logits_config``)."""
    cfg = {**_default_config(dtype), **CONFIG_OVERRIDE}
    cfg["logits"] = kind_logits_config(cfg["logits"], kind, *operands, loss_with_base_logits=loss_with_base_logits)
    n = partial_tile_n(cfg["logits"])
    if n % cfg["dx"]["BLOCK_K"] or n % cfg["dw"]["BLOCK_M"]:
        raise ValueError(f"tile configuration: the logits tile's partial width (BLOCK_N / EPILOGUE_SPLIT = {n}) "
                         f"must be a multiple of dx's BLOCK_K ({cfg['dx']['BLOCK_K']}) and dw's BLOCK_M "
                         f"({cfg['dw']['BLOCK_M']})")
    return cfg


def _default_config(dtype: torch.dtype, interpret: Optional[bool] = None) -> dict:
    """Tiles per kernel: ``logits`` (``_tile_launch.logits_config``, shared with the head), then ``dx`` / ``dw``
    (same sizes in half precision, float32 with ``maxnreg=255`` on dX, as the logits tile) and ``combine``.
    ``n`` (the logits kernel's columns, over ``EPILOGUE_SPLIT`` where given) is a multiple of ``dx``'s ``k`` and
    ``dw``'s ``m``, so that each of their steps uses one factor per row."""
    interpret = interpreter_enabled() if interpret is None else interpret
    logits = logits_config(dtype, interpret)
    if interpret:
        return dict(logits=logits, dx=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4),
                    dw=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4), combine=dict(BLOCK_R=16, BLOCK_T=4),
                    finish=dict(BLOCK_R=4, num_warps=4))
    if dtype == torch.float32:
        return dict(logits=logits,
                    dx=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2, maxnreg=255),
                    dw=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
                    combine=dict(BLOCK_R=64, BLOCK_T=16), finish=dict(BLOCK_R=8, num_warps=4))
    return dict(logits=logits, dx=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                dw=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                combine=dict(BLOCK_R=64, BLOCK_T=16), finish=dict(BLOCK_R=8, num_warps=4))


def dx_splits(row_tiles: int, h_tiles: int, col_tiles: int, device: torch.device) -> int:
    """Vocabulary splits of ``dX``: a chunk has few row tiles and ``Hv`` few hidden tiles (30 x 7 = 210 programs
    at the qwen shapes, 1.6 waves on 132 SMs: the last wave 60 % idle). The split count (1..8, at most one per
    logits column tile) whose programs fill their waves best; the smallest of equals (each split adds a float32
    ``[rows, Hv]`` slice)."""
    tiles, sms = max(1, row_tiles * h_tiles), sm_count(device)

    def filled(s: int) -> float:
        return tiles * s / (-(-tiles * s // sms) * sms)

    return max(range(1, max(1, min(8, col_tiles)) + 1), key=lambda s: (round(filled(s), 3), -s))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for half operands


def tile_chunks(vh, vw, v_val: int, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                alpha_scalar: float, fill: float, target_local, Vb: int, Vv: int, smooth_self: float,
                smooth_all: float, *, stats, lse, g, dvh, acc, scale: float, chunk_rows, kind: str = "tiles") -> None:
    """Runs every chunk of rows: fills ``stats [4, N]`` (when given: lse, target logit, sum z), writes
    ``dvh [N, Hv]`` already multiplied by ``scale`` and accumulates ``acc [*, Hv]`` (float32, zeros on entry;
    rows ``[0, Vg)``, one per value column: with a map, one per base column) when they are given, from the row
    weights ``g`` (``lse`` given: the two-pass backward). ``v_val``: the value columns (``Vv``, or ``Vb`` with a
    map, whose entries pick the rows of ``vw``). ``kind`` (``tiles``, ``tma``, ``wide``, ``hybrid``): the logits
    kernel's configuration (``_tile_launch.kind_logits_config``, ``wide_applies``; TMA descriptors where that
    kernel can take the chunk, ``_tile_launch.tma_takes``); ``hybrid``: the one-pass gradient products in cuBLAS
    (``G`` finished in place first), as the two-pass backward's."""
    N, Hv = vh.shape
    dt, dev = vh.dtype, vh.device
    grads = dvh is not None or acc is not None
    Vg = min(v_val, Vb)
    cfg = _config(dt, kind, (vocab_map, vh, vw, base_hidden, base_weight), base_logits is not None)
    tile_n = partial_tile_n(cfg["logits"])
    T = triton.cdiv(Vb, tile_n)
    mode = 0 if not grads else (1 if lse is None else 2)
    hybrid = kind == "hybrid"
    esize = vh.element_size()
    # dX's vocabulary-split scratch (float32 [splits <= 8, rows, Hv]) exists only where the dX tile kernel runs.
    dx_scratch = 8 * Hv * 4 if dvh is not None and mode == 1 and not hybrid else 0
    rows = chunk_rows((Vg * esize if mode else 0) + 3 * T * 4 + dx_scratch)
    dummy = target_local
    smooth = smooth_all != 0.0
    flags = dict(HAS_MAP=vocab_map is not None, ALPHA_IS_TENSOR=alpha_tensor is not None, SMOOTH=smooth)
    smap = vocab_map.stride(0) if vocab_map is not None else 0
    vmap = vocab_map if vocab_map is not None else dummy
    stats_arg = stats if stats is not None else torch.zeros((4, 1), dtype=torch.float32, device=dev)

    @functools.lru_cache(maxsize=None)
    def w_cols():
        # The two-pass backward's dX is a cuBLAS GEMM: it needs the value head in column order (gathered once).
        return vw if vocab_map is None else gathered_head(vw, vocab_map)[0]
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        R = r1 - r0
        xv = vh[r0:r1]
        tgt = target_local[r0:r1]
        alpha_c = alpha_tensor[r0:r1] if alpha_tensor is not None else dummy
        g_c = g[r0:r1] if grads else dummy
        part = torch.empty((3, T, R), dtype=torch.float32, device=dev) if mode != 2 else stats_arg
        buf = torch.empty((R, Vg), dtype=dt, device=dev) if mode else stats_arg
        st = stats_arg[:, r0:r1] if stats is not None else stats_arg
        base_c = base_logits[r0:r1] if base_logits is not None else None
        launch_logits(cfg["logits"], xv, vw, base_hidden[r0:r1] if base_hidden is not None else None, base_weight,
                      base_c, vocab_map, alpha_tensor[r0:r1] if alpha_tensor is not None else None, tgt, g_c,
                      lse[r0:r1] if mode == 2 else dummy, buf, part, st, R=R, Vb=Vb, Vval=v_val, Vv=Vv, Vg=Vg,
                      ld_out=buf.stride(0) if mode else 0, alpha_scalar=alpha_scalar, fill=fill,
                      smooth_self=smooth_self, smooth_all=smooth_all, inv_scale=1.0 / scale, mode=mode,
                      v_prec=_prec(dt), b_prec=_prec(base_hidden.dtype if base_hidden is not None else dt))
        if mode != 2:
            cc = cfg["combine"]
            _ce_combine_kernel[(triton.cdiv(R, cc["BLOCK_R"]),)](
                part, st, R, T, part.stride(0), part.stride(1), st.stride(0), SMOOTH=smooth, FACTORS=mode == 1,
                **cc)
        if mode == 1 and hybrid and Vg > 0:
            cf = cfg["finish"]
            _ce_finish_grad_kernel[(triton.cdiv(R, cf["BLOCK_R"]), triton.cdiv(Vg, tile_n))](
                buf, part, vmap, alpha_c, tgt, g_c, R, Vg, Vv, buf.stride(0), part.stride(1), smap, alpha_scalar,
                smooth_self, smooth_all, 1.0 / scale, TILE_N=tile_n, **flags, **cf)
        if mode == 2 or (mode == 1 and hybrid):
            # G is in buf (lse known, the logits kernel finished it; or finished in place above): the products
            # are ordinary GEMMs.
            if dvh is not None:
                torch.mm(buf, w_cols()[:Vg], out=dvh[r0:r1])
                if scale != 1.0:
                    dvh[r0:r1].mul_(scale)
            if acc is not None:
                addmm_into(acc[:Vg], buf.T, xv, alpha=scale)
            continue
        if mode == 0 or Vg == 0:
            continue
        args = (alpha_scalar, smooth_self, smooth_all, 1.0 / scale, scale)
        if dvh is not None:
            c = cfg["dx"]
            row_tiles, h_tiles = triton.cdiv(R, c["BLOCK_M"]), triton.cdiv(Hv, c["BLOCK_N"])
            splits = dx_splits(row_tiles, h_tiles, triton.cdiv(Vg, tile_n), dev)
            per_split = triton.cdiv(triton.cdiv(Vg, splits), tile_n) * tile_n
            splits = triton.cdiv(Vg, per_split) if Vg > 0 else 1
            out = dvh[r0:r1] if splits == 1 else torch.empty((splits, R, Hv), dtype=torch.float32, device=dev)
            _ce_dx_tile_kernel[(row_tiles * h_tiles, splits)](
                buf, part, vw, vmap, alpha_c, tgt, g_c, out,
                R, Vg, Vv, Hv, buf.stride(0), part.stride(1), vw.stride(0), smap,
                out.stride(0) if splits > 1 else 0, out.stride(-2), per_split, *args,
                PREC=_prec(dt), TILE_N=tile_n, **flags, **c)
            if splits > 1:
                dvh[r0:r1].copy_(out.sum(0))  # a fixed-order reduction: deterministic
        if acc is not None:
            c = cfg["dw"]
            grid = (triton.cdiv(Vg, c["BLOCK_M"]) * triton.cdiv(Hv, c["BLOCK_N"]),)
            _ce_dw_tile_kernel[grid](
                buf, part, xv, vmap, alpha_c, tgt, g_c, acc,
                R, Vg, Vv, Hv, buf.stride(0), part.stride(1), xv.stride(0), smap, acc.stride(0), *args,
                ACCUMULATE=r0 > 0, PREC=_prec(dt), TILE_N=tile_n, **flags, **c)

"""The row-tile Triton kernel of ``fused_guided_logits`` (below ``GEMM_MIN_ROWS`` rows: decode, small batches),
memory-bound: one program per (vocabulary tile, row tile) streams its weight rows once, gathered through the map,
and writes its guided logits. ``dot_into`` / ``tile_dot`` are the LM-head projection of a row tile."""

from __future__ import annotations

from typing import Optional

import torch

from ..._triton import interpreter_enabled, tl, triton


@triton.jit
def dot_into(acc, h_ptr, stride_h_m, stride_h_k, offs_m, mask_m, w_ptr, stride_w_v, stride_w_k, rows_w, mask_w, K,
             BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + h[offs_m] . w[rows_w]^T`` over ``K`` into the fp32 tile ``acc`` (the LM-head projection of a row
    tile onto a tile of (possibly gathered) weight rows). Masked-out rows contribute zeros; shared by every op."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        h = tl.load(h_ptr + offs_m[:, None] * stride_h_m + offs_k[None, :] * stride_h_k,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + rows_w[:, None] * stride_w_v + offs_k[None, :] * stride_w_k,
                    mask=mask_w[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def tile_dot(h_ptr, stride_h_m, stride_h_k, offs_m, mask_m, w_ptr, stride_w_v, stride_w_k, rows_w, mask_w, K,
             BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``[BLOCK_M, BLOCK_V]`` fp32 tile of ``h[offs_m] . w[rows_w]^T`` over ``K`` (``dot_into`` from zeros)."""
    return dot_into(tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32), h_ptr, stride_h_m, stride_h_k, offs_m, mask_m,
                    w_ptr, stride_w_v, stride_w_k, rows_w, mask_w, K, BLOCK_K, DOT_PRECISION)


@triton.jit
def _guided_logits_kernel(
    vh_ptr, vw_ptr, map_ptr, base_ptr, bh_ptr, bw_ptr, alpha_ptr, out_ptr,
    M, Vb, Vv, Hv, Hb,
    stride_vh_m, stride_vh_k, stride_vw_v, stride_vw_k,
    stride_base_m, stride_base_v,
    stride_bh_m, stride_bh_k, stride_bw_v, stride_bw_k,
    stride_out_m, stride_out_v, stride_alpha, stride_map,
    alpha_scalar, fill,
    HAS_MAP: tl.constexpr, BASE_MODE: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Axis 0 walks the vocabulary (up to 2^31 tiles), axis 1 the rows (decode has a single row tile).
    pid_v = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_v = offs_v < Vb
    mask_m = offs_m < M

    if HAS_MAP:
        idx = tl.load(map_ptr + offs_v * stride_map, mask=mask_v, other=-1).to(tl.int64)
    else:
        idx = tl.where(offs_v < Vv, offs_v, -1)
    # Entries outside [-1, Vv) (a map mutated after its host check) count as unmapped: the kernel never forms
    # an address from an unchecked entry, whatever the map holds.
    mapped = (idx >= 0) & (idx < Vv) & mask_v
    # Unmapped ids read row 0 under a false mask: no out-of-range address is ever formed.
    rows_w = tl.where(mapped, idx, 0)

    acc = tile_dot(vh_ptr, stride_vh_m, stride_vh_k, offs_m, mask_m, vw_ptr, stride_vw_v, stride_vw_k, rows_w,
                   mapped, Hv, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)

    value = tl.where(mapped[None, :], acc, fill)
    if ALPHA_IS_TENSOR:
        alpha = tl.load(alpha_ptr + offs_m * stride_alpha, mask=mask_m, other=0.0).to(tl.float32)
        result = value * alpha[:, None]
    else:
        result = value * alpha_scalar

    mask_out = mask_m[:, None] & mask_v[None, :]
    if BASE_MODE == 1:
        base = tl.load(base_ptr + offs_m[:, None] * stride_base_m + offs_v[None, :] * stride_base_v,
                       mask=mask_out, other=0.0).to(tl.float32)
        result = base + result
    elif BASE_MODE == 2:
        bacc = tile_dot(bh_ptr, stride_bh_m, stride_bh_k, offs_m, mask_m, bw_ptr, stride_bw_v, stride_bw_k,
                        offs_v, mask_v, Hb, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        result = bacc + result

    tl.store(out_ptr + offs_m[:, None] * stride_out_m + offs_v[None, :] * stride_out_v,
             result.to(out_ptr.dtype.element_ty), mask=mask_out)


def _triton_config(M: int, dtype: Optional[torch.dtype] = None) -> dict:
    """Tile sizes by row count and dtype: decode streams weights (thin row tile, narrow vocab tile for many
    programs); scoring/prefill is a gathered GEMM (square tiles). fp32 uses the ``"ieee"`` dot, an FMA loop
    whose operands sit in registers: narrower K slices, or it spills. Every configuration is compiled, as
    launched, for sm_80 and sm_90 (bf16 also sm_100) by ``tests/ops/test_triton_gpu_compile.py`` (no spills,
    shared memory within the limit)."""
    if interpreter_enabled():
        # The interpreter's cost is per program and per op: few, large programs run fastest.
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_V=64, BLOCK_K=32, num_warps=4)
    if dtype == torch.float32:
        if M <= 16:
            return dict(BLOCK_M=16, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=4)
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=4, num_stages=3)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_V=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=64, num_warps=4, num_stages=4)
    # maxnreg: without it ptxas caps some variants at 128 registers (two programs per SM) and spills (sm_80).
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3, maxnreg=255)

"""Tile GEMMs with the row work in their epilogue and prologue (``IVL_KERNELS_GEMM``): the loss's matrix
kernels, and its logits kernel alone (``MODE`` 3) for the guided head from ``GEMM_MIN_ROWS`` rows.

The cuBLAS path (``_chunked.py``) makes six passes over each chunk of ``[rows, V]`` logits: the GEMM writes them,
the row kernel reads them twice and writes ``G`` over them, the two gradient GEMMs read ``G``. These kernels make
three: the logits kernel writes, the two gradient kernels read.

1. ``_ce_logits_tile_kernel`` (one program per ``[BLOCK_M, BLOCK_N]`` tile of logits):
   ``z = alpha[n] * (valid ? X_v W_cols^T : fill) (+ X_b W_b^T) (+ base logits)`` in float32 (the value and the
   base heads as two K segments of one accumulator: the base head is never stored and read back). Its epilogue
   writes per-tile partials of each row: ``m = max z``, ``s = sum exp(z - m)``, ``sum z`` (label smoothing) and,
   from the one tile that holds it, the target logit. Then, by ``MODE``:

   - 0: nothing else (statistics only: scoring, the forward of ``"none"``: no ``[rows, V]`` buffer at all);
   - 1: ``P = exp(z - m_tile)`` in the input dtype (values in ``(0, 1]``: rounded like the final ``G``, better
     than rounding ``z``, whose absolute error the exponential would multiply);
   - 2 (``lse`` known: the backward of the two-pass losses): the finished gradient ``G`` (then ordinary GEMMs);
   - 3 (the guided head, ``fused_guided_logits``): ``z`` itself into ``out [M, Vb]``, written once (no beta = 1
     read-back of a first GEMM's output), no partials.

   With a map, the value-head rows are gathered through it in the loads (``W[map[b]]``; an entry outside
   ``[0, Vv)`` loads nothing and reads as unmapped): no gathered copy of the head.

2. ``_ce_combine_kernel``: the partials of a row into its log-sum-exp, and each tile's factor
   ``f = exp(m_tile - lse)`` (written over ``m``), so that ``softmax = P * f``.

3. ``_ce_dx_tile_kernel`` (``dX = G @ W_cols``, split over the vocabulary when there are few row tiles) and
   ``_ce_dw_tile_kernel`` (``dW_cols (+)= G^T @ X_v``, float32): both form ``G`` from ``P`` in registers
   before the dot (one multiply per element, no exponential) and never store it:

       G[n, b] = g[n] * alpha[n] * (P[n, b] * f[n, tile(b)] - (1 - eps) [b == t_n] - eps / Vb) / scale
                 (0 on unmapped columns and columns b >= Vb)

   The vocabulary step of ``dX`` and the column tile of ``dW`` divide the logits kernel's ``BLOCK_N``, so each
   step reads one factor per row.

   Or (the ``hybrid`` GEMM kind) ``_ce_finish_grad_kernel`` turns ``P`` into that ``G`` in place, one pass over
   the chunk, and the two products run in cuBLAS (``G @ W_cols``, and ``G^T @ X_v`` into the float32 ``dW``): a
   memory pass traded for the library's GEMM rate, where that is faster (``auto`` measures it).

No atomics: every output element is written by one program (``dX``'s vocabulary splits go to separate float32
slices, added in a fixed order), so results are bit-reproducible like the cuBLAS path's.
"""

from __future__ import annotations

from .._triton import tl, triton


@triton.jit
def _valid_cols(map_ptr, cols, Vval, Vv, stride_map, HAS_MAP: tl.constexpr):
    """Columns that carry a value logit: below ``Vval`` and, with a map, mapped to a value id in ``[0, Vv)``
    (``-1``, or an entry changed after its range check, reads as unmapped)."""
    valid, _row = _mapped_cols(map_ptr, cols, Vval, Vv, stride_map, HAS_MAP)
    return valid


@triton.jit
def _mapped_cols(map_ptr, cols, Vval, Vv, stride_map, HAS_MAP: tl.constexpr):
    """``(valid, row)``: which columns carry a value logit (``_valid_cols``) and the value-head row of each
    (``map[b]``, or ``b``; 0 where not valid, never outside the head), int64."""
    in_v = cols < Vval
    if HAS_MAP:
        idx = tl.load(map_ptr + cols.to(tl.int64) * stride_map, mask=in_v, other=-1)
        valid = in_v & (idx >= 0) & (idx < Vv)
        row = tl.where(valid, idx, 0).to(tl.int64)
    else:
        valid = in_v
        row = tl.where(valid, cols, 0).to(tl.int64)
    return valid, row


@triton.jit
def _row_alpha(alpha_ptr, rows, ok, alpha_scalar, ALPHA_IS_TENSOR: tl.constexpr):
    if ALPHA_IS_TENSOR:
        return tl.load(alpha_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    return tl.zeros_like(rows.to(tl.float32)) + alpha_scalar


@triton.jit
def _k_segment(acc, x_ptr, stride_x, rows64, row_ok, w_ptr, stride_w, w_row, w_ok, K, PREC: tl.constexpr,
               EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + X[rows, :K] . W[w_row, :K]^T``: one K segment of the logits accumulator (rows not ``row_ok`` and
    columns not ``w_ok`` load zeros). ``EVEN_K`` (``BLOCK_K`` divides ``K``): no mask along K."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows64[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + w_row[None, :] * stride_w + ks[:, None]
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=w_ok[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_ok[:, None] & (ks[None, :] + k0 < K), other=0.0)
            w = tl.load(w_ptrs, mask=w_ok[None, :] & (ks[:, None] + k0 < K), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _ce_logits_tile_kernel(
    xv_ptr, wv_ptr, xb_ptr, wb_ptr, base_ptr, map_ptr, alpha_ptr, tgt_ptr, g_ptr, lse_ptr, out_ptr, part_ptr,
    stats_ptr,
    R, Vb, Vval, Vv, Vg, Hv, Hb,
    stride_xv, stride_wv, stride_xb, stride_wb, stride_base_m, stride_base_v, stride_map, ld_out, stride_part_k,
    stride_part_t, stride_stats,
    alpha_scalar, fill, smooth_self, smooth_all, inv_scale,
    HAS_BASE_LOGITS: tl.constexpr, HAS_BASE_HIDDEN: tl.constexpr, HAS_MAP: tl.constexpr,
    ALPHA_IS_TENSOR: tl.constexpr, SMOOTH: tl.constexpr, MODE: tl.constexpr, V_PREC: tl.constexpr,
    B_PREC: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of guided logits over rows ``[0, R)`` and base columns ``[0, Vb)``.

    Row tiles are the fastest grid index: the programs running together share one column strip of the heads
    (read from memory once) while the chunk's hidden states stay in L2. ``part [3, T, R]`` fp32 (``m``, ``s``,
    ``sum z``), ``stats [4, R]`` (row 1: target logit); ``out [R, Vg]`` (``MODE`` 1: ``P``; 2: ``G``)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(R, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    valid, w_row = _mapped_cols(map_ptr, cols, Vval, Vv, stride_map, HAS_MAP)
    acc = _k_segment(acc, xv_ptr, stride_xv, rows64, row_ok, wv_ptr, stride_wv, w_row, valid, Hv, V_PREC, EVEN_K,
                     BLOCK_K)
    alpha = _row_alpha(alpha_ptr, rows, row_ok, alpha_scalar, ALPHA_IS_TENSOR)
    # One accumulator for both heads: the value part scaled first, the base GEMM accumulates on top of it.
    acc = tl.where(valid[None, :], acc, fill) * alpha[:, None]
    if HAS_BASE_HIDDEN:
        acc = _k_segment(acc, xb_ptr, stride_xb, rows64, row_ok, wb_ptr, stride_wb, cols64, cols < Vb, Hb, B_PREC,
                         EVEN_K, BLOCK_K)
    _ce_logits_finish(acc, rows, cols, row_ok, valid, alpha, pid_n, base_ptr, tgt_ptr, g_ptr, lse_ptr, out_ptr,
                      part_ptr, stats_ptr, Vb, Vg, stride_base_m, stride_base_v, ld_out, stride_part_k, stride_part_t,
                      stride_stats, smooth_self, smooth_all, inv_scale, HAS_BASE_LOGITS, SMOOTH, MODE, BLOCK_N,
                      EPILOGUE_SPLIT)


@triton.jit
def _ce_logits_tma_kernel(
    xv_desc, wv_desc, xb_desc, wb_desc, base_ptr, alpha_ptr, tgt_ptr, g_ptr, lse_ptr, out_ptr, part_ptr, stats_ptr,
    R, Vb, Vval, Vg, Hv, Hb, stride_base_m, stride_base_v, ld_out, stride_part_k, stride_part_t, stride_stats,
    alpha_scalar, fill, smooth_self, smooth_all, inv_scale,
    HAS_BASE_LOGITS: tl.constexpr, HAS_BASE_HIDDEN: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr,
    SMOOTH: tl.constexpr, MODE: tl.constexpr, V_PREC: tl.constexpr, B_PREC: tl.constexpr, FLATTEN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    """``_ce_logits_tile_kernel`` without a map, for Hopper: the operands come through tensor descriptors (TMA:
    no address arithmetic or masks in registers, out-of-range rows and K read as zeros) and the grid is
    persistent, ``NUM_PROGRAMS`` programs (one per SM) walking the tiles in the same order (row tiles fastest).
    ``FLATTEN`` (one K segment: no base hidden states): the tile loop and the K loop are one pipelined loop, so
    the next tile's first loads are in flight during this tile's epilogue. A candidate (``_tile_launch``): bf16
    on sm_90 it compiles to TMA loads and wgmma, 126-254 registers, no spills, 98-131 KB of shared memory (the
    ahead-of-time compile test checks it); not yet timed on a GPU."""
    num_m = tl.cdiv(R, BLOCK_M)
    num_tiles = num_m * tl.cdiv(Vb, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m = tile % num_m
        pid_n = tile // num_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(tl.cdiv(Hv, BLOCK_K)):
            x = xv_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = wv_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(x, w.T, acc, input_precision=V_PREC)
        valid = cols < Vval
        alpha = _row_alpha(alpha_ptr, rows, row_ok, alpha_scalar, ALPHA_IS_TENSOR)
        acc = tl.where(valid[None, :], acc, fill) * alpha[:, None]
        if HAS_BASE_HIDDEN:
            for ki in range(tl.cdiv(Hb, BLOCK_K)):
                x = xb_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
                w = wb_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
                acc = tl.dot(x, w.T, acc, input_precision=B_PREC)
        _ce_logits_finish(acc, rows, cols, row_ok, valid, alpha, pid_n, base_ptr, tgt_ptr, g_ptr, lse_ptr, out_ptr,
                          part_ptr, stats_ptr, Vb, Vg, stride_base_m, stride_base_v, ld_out, stride_part_k,
                          stride_part_t, stride_stats, smooth_self, smooth_all, inv_scale, HAS_BASE_LOGITS, SMOOTH,
                          MODE, BLOCK_N, EPILOGUE_SPLIT)


@triton.jit
def _split_cols(x):
    """``[R, C]`` -> its column halves ``[R, C/2]``, ``[R, C/2]`` (a register relabelling: no data moves)."""
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _ce_logits_finish(acc, rows, cols, row_ok, valid, alpha, pid_n, base_ptr, tgt_ptr, g_ptr, lse_ptr, out_ptr,
                      part_ptr, stats_ptr, Vb, Vg, stride_base_m, stride_base_v, ld_out, stride_part_k,
                      stride_part_t, stride_stats, smooth_self, smooth_all, inv_scale, HAS_BASE_LOGITS: tl.constexpr,
                      SMOOTH: tl.constexpr, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                      EPILOGUE_SPLIT: tl.constexpr):
    """A logits tile's end, shared by both logits kernels: the base logits added, then the head's store
    (``MODE`` 3) or the loss's epilogue. ``EPILOGUE_SPLIT`` 2: the epilogue runs on the tile's two column halves
    one after the other, each a tile of its own for the partials (index ``2 pid_n + h``, ``BLOCK_N / 2`` wide):
    its float32 temporaries are half the size, which lets a 128 x 256 accumulator (128 registers a thread at 8
    warps) finish without spilling."""
    if EPILOGUE_SPLIT == 2:
        half: tl.constexpr = BLOCK_N // 2
        acc0, acc1 = _split_cols(acc)
        valid0, valid1 = tl.split(tl.permute(tl.reshape(valid.to(tl.int8), (2, half)), (1, 0)))
        cols0 = pid_n * BLOCK_N + tl.arange(0, half)
        _ce_logits_finish_tile(acc0, rows, cols0, row_ok, valid0 != 0, alpha, 2 * pid_n, base_ptr, tgt_ptr, g_ptr,
                               lse_ptr, out_ptr, part_ptr, stats_ptr, Vb, Vg, stride_base_m, stride_base_v, ld_out,
                               stride_part_k, stride_part_t, stride_stats, smooth_self, smooth_all, inv_scale,
                               HAS_BASE_LOGITS, SMOOTH, MODE, half, True)
        # The last tile's second half may hold no base column: it has no partials slot (T counts half tiles), so
        # none of its rows store (a mask, not a branch: Triton 3.8 fails to flatten the TMA kernel's loops around
        # an scf.if).
        _ce_logits_finish_tile(acc1, rows, cols0 + half, row_ok & (pid_n * BLOCK_N + half < Vb), valid1 != 0,
                               alpha, 2 * pid_n + 1, base_ptr, tgt_ptr, g_ptr, lse_ptr, out_ptr, part_ptr, stats_ptr,
                               Vb, Vg, stride_base_m, stride_base_v, ld_out, stride_part_k, stride_part_t,
                               stride_stats, smooth_self, smooth_all, inv_scale, HAS_BASE_LOGITS, SMOOTH, MODE, half,
                               True)
    else:
        _ce_logits_finish_tile(acc, rows, cols, row_ok, valid, alpha, pid_n, base_ptr, tgt_ptr, g_ptr, lse_ptr,
                               out_ptr, part_ptr, stats_ptr, Vb, Vg, stride_base_m, stride_base_v, ld_out,
                               stride_part_k, stride_part_t, stride_stats, smooth_self, smooth_all, inv_scale,
                               HAS_BASE_LOGITS, SMOOTH, MODE, BLOCK_N, False)


@triton.jit
def _ce_logits_finish_tile(acc, rows, cols, row_ok, valid, alpha, pid_n, base_ptr, tgt_ptr, g_ptr, lse_ptr,
                           out_ptr, part_ptr, stats_ptr, Vb, Vg, stride_base_m, stride_base_v, ld_out, stride_part_k,
                           stride_part_t, stride_stats, smooth_self, smooth_all, inv_scale,
                           HAS_BASE_LOGITS: tl.constexpr, SMOOTH: tl.constexpr, MODE: tl.constexpr,
                           BLOCK_N: tl.constexpr, Z_SUMS_FIRST: tl.constexpr):
    """``_ce_logits_finish`` of one ``[BLOCK_M, BLOCK_N]`` (sub)tile, the ``pid_n``-th of its row."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    in_b = cols < Vb
    if HAS_BASE_LOGITS:
        acc += tl.load(base_ptr + rows64[:, None] * stride_base_m + cols64[None, :] * stride_base_v,
                       mask=row_ok[:, None] & in_b[None, :], other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows64[:, None] * ld_out + cols64[None, :]
    if MODE == 3:
        # The guided head: out may be the base logits themselves (this program read its tile above).
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & in_b[None, :])
    else:
        _ce_logits_epilogue(acc, rows, cols, row_ok, in_b, valid, alpha, pid_n, tgt_ptr, g_ptr, lse_ptr, out_ptrs,
                            part_ptr, stats_ptr, Vg, stride_part_k, stride_part_t, stride_stats, smooth_self,
                            smooth_all, inv_scale, SMOOTH, MODE, BLOCK_N, Z_SUMS_FIRST)


@triton.jit
def _z_row_sums(z, hit, rows, row_ok, in_b, t, pid_n, part, stats_ptr, stride_part_k, stride_stats,
                SMOOTH: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's ``sum z`` per row (label smoothing) and, from the one tile that holds the target column, the
    target logit (rows without one keep 0)."""
    if SMOOTH:
        tl.store(part + 2 * stride_part_k, tl.sum(tl.where(in_b[None, :], z, 0.0), axis=1), mask=row_ok)
    here = row_ok & (t >= pid_n * BLOCK_N) & (t < pid_n * BLOCK_N + BLOCK_N)
    tl.store(stats_ptr + stride_stats + rows, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=here)


@triton.jit
def _ce_logits_epilogue(acc, rows, cols, row_ok, in_b, valid, alpha, pid_n, tgt_ptr, g_ptr, lse_ptr, out_ptrs,
                        part_ptr, stats_ptr, Vg, stride_part_k, stride_part_t, stride_stats, smooth_self,
                        smooth_all, inv_scale, SMOOTH: tl.constexpr, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                        Z_SUMS_FIRST: tl.constexpr):
    """The loss's epilogue of one logits tile (``MODE`` 0, 1, 2; see the module docstring). ``Z_SUMS_FIRST``:
    the reductions of ``z`` before ``P`` is formed (the split epilogue: without it, the 128 x 256 tiles spilled a
    few registers on sm_90; with it, the default 128 x 128 TMA tiles spilled on sm_100)."""
    t = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    hit = cols[None, :] == t[:, None]
    out_mask = row_ok[:, None] & (cols < Vg)[None, :]
    if MODE == 2:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        ga = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * alpha * inv_scale
        # Columns past Vb need no -inf here: the select below zeroes them.
        dz = tl.exp(acc - lse[:, None]) - tl.where(hit, smooth_self, 0.0)
        if SMOOTH:
            dz -= smooth_all
        grad = tl.where(valid[None, :] & in_b[None, :], ga[:, None] * dz, 0.0)
        tl.store(out_ptrs, grad.to(out_ptrs.dtype.element_ty), mask=out_mask)
    else:
        z = tl.where(in_b[None, :], acc, float("-inf"))
        m = tl.max(z, axis=1)
        part = part_ptr + pid_n.to(tl.int64) * stride_part_t + rows
        tl.store(part, m, mask=row_ok)
        if Z_SUMS_FIRST:
            _z_row_sums(z, hit, rows, row_ok, in_b, t, pid_n, part, stats_ptr, stride_part_k, stride_stats, SMOOTH,
                        BLOCK_N)
        # A row that has only -inf here (no base column) keeps sum 0: subtracting 0 avoids -inf - -inf.
        m_ref = tl.where(m > float("-inf"), m, 0.0)
        p = tl.exp(z - m_ref[:, None])
        tl.store(part + stride_part_k, tl.sum(p, axis=1), mask=row_ok)
        if not Z_SUMS_FIRST:
            _z_row_sums(z, hit, rows, row_ok, in_b, t, pid_n, part, stats_ptr, stride_part_k, stride_stats, SMOOTH,
                        BLOCK_N)
        if MODE == 1:
            tl.store(out_ptrs, p.to(out_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def _ce_combine_kernel(part_ptr, stats_ptr, R, T, stride_part_k, stride_part_t, stride_stats,
                       SMOOTH: tl.constexpr, FACTORS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per row: ``lse = m + log(sum_t s_t exp(m_t - m))`` and ``sum z`` into ``stats[0]`` / ``stats[2]``;
    ``FACTORS``: ``part[0, t, r] = exp(m_t - lse)`` (0 where the row has no column)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    ts = tl.arange(0, BLOCK_T)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = (t0 + ts).to(tl.int64)
        mask = (t0 + ts < T)[:, None] & ok[None, :]
        mt = tl.load(part_ptr + tt[:, None] * stride_part_t + rows[None, :], mask=mask, other=float("-inf"))
        m = tl.maximum(m, tl.max(mt, axis=0))
    m_ref = tl.where(m > float("-inf"), m, 0.0)
    s = tl.zeros((BLOCK_R,), tl.float32)
    zs = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = (t0 + ts).to(tl.int64)
        mask = (t0 + ts < T)[:, None] & ok[None, :]
        at = part_ptr + tt[:, None] * stride_part_t + rows[None, :]
        mt = tl.load(at, mask=mask, other=float("-inf"))
        s += tl.sum(tl.load(at + stride_part_k, mask=mask, other=0.0) * tl.exp(mt - m_ref[None, :]), axis=0)
        if SMOOTH:
            zs += tl.sum(tl.load(at + 2 * stride_part_k, mask=mask, other=0.0), axis=0)
    lse = m_ref + tl.log(s)
    tl.store(stats_ptr + rows, lse, mask=ok)
    if SMOOTH:
        tl.store(stats_ptr + 2 * stride_stats + rows, zs, mask=ok)
    if FACTORS:
        has = lse > float("-inf")
        for t0 in range(0, T, BLOCK_T):
            tt = (t0 + ts).to(tl.int64)
            mask = (t0 + ts < T)[:, None] & ok[None, :]
            at = part_ptr + tt[:, None] * stride_part_t + rows[None, :]
            mt = tl.load(at, mask=mask, other=float("-inf"))
            tl.store(at, tl.where(has[None, :], tl.exp(mt - lse[None, :]), 0.0), mask=mask)


@triton.jit
def _grad_from_p(p, f, ga, t, cols, valid, smooth_self, smooth_all, SMOOTH: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """``G`` of a tile of ``P`` (``ROWS_FIRST``: ``[rows, cols]``, else ``[cols, rows]``) from the row vectors
    ``f``, ``ga`` (``g * alpha / scale``), ``t`` and the column vectors ``cols``, ``valid``."""
    if ROWS_FIRST:
        dz = p.to(tl.float32) * f[:, None] - tl.where(cols[None, :] == t[:, None], smooth_self, 0.0)
        if SMOOTH:
            dz -= smooth_all
        grad = tl.where(valid[None, :], ga[:, None] * dz, 0.0)
    else:
        dz = p.to(tl.float32) * f[None, :] - tl.where(cols[:, None] == t[None, :], smooth_self, 0.0)
        if SMOOTH:
            dz -= smooth_all
        grad = tl.where(valid[:, None], ga[None, :] * dz, 0.0)
    return grad


@triton.jit
def _ce_dx_tile_kernel(
    p_ptr, fac_ptr, w_ptr, map_ptr, alpha_ptr, tgt_ptr, g_ptr, out_ptr,
    R, Vg, Vv, Hv, ld_p, stride_fac_t, stride_w, stride_map, stride_out_s, ld_out, cols_per_split,
    alpha_scalar, smooth_self, smooth_all, inv_scale, out_scale,
    HAS_MAP: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr, SMOOTH: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr,
):
    """``out[s, rows, h] = out_scale * sum_{b in split s} G[rows, b] W_cols[b, h]`` (grid: tiles x splits).

    Hidden tiles are the fastest grid index: the programs of one row tile run together and share its ``P``
    rows in L2."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_h = tl.cdiv(Hv, BLOCK_N)
    pid_h = pid % num_h
    pid_m = pid // num_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = pid_h * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    ga = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv_scale * _row_alpha(
        alpha_ptr, rows, row_ok, alpha_scalar, ALPHA_IS_TENSOR)
    t = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(Vg, c_lo + cols_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_K):
        cols = c0 + ks
        in_c = cols < c_hi
        cols64 = cols.to(tl.int64)
        p = tl.load(p_ptr + rows64[:, None] * ld_p + cols64[None, :], mask=row_ok[:, None] & in_c[None, :],
                    other=0.0)
        f = tl.load(fac_ptr + (c0 // TILE_N) * stride_fac_t + rows, mask=row_ok, other=0.0)
        valid, w_row = _mapped_cols(map_ptr, cols, c_hi, Vv, stride_map, HAS_MAP)
        grad = _grad_from_p(p, f, ga, t, cols, valid, smooth_self, smooth_all, SMOOTH, True)
        w = tl.load(w_ptr + w_row[:, None] * stride_w + hs[None, :], mask=valid[:, None] & (hs < Hv)[None, :],
                    other=0.0)
        acc = tl.dot(grad.to(w_ptr.dtype.element_ty), w, acc, input_precision=PREC)
    out = out_ptr + split.to(tl.int64) * stride_out_s + rows64[:, None] * ld_out + hs[None, :]
    tl.store(out, (acc * out_scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (hs < Hv)[None, :])


@triton.jit
def _ce_dw_tile_kernel(
    p_ptr, fac_ptr, x_ptr, map_ptr, alpha_ptr, tgt_ptr, g_ptr, acc_ptr,
    R, Vg, Vv, Hv, ld_p, stride_fac_t, stride_x, stride_map, ld_acc,
    alpha_scalar, smooth_self, smooth_all, inv_scale, out_scale,
    HAS_MAP: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr, SMOOTH: tl.constexpr, ACCUMULATE: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_N: tl.constexpr,
):
    """``acc[b, h] (+)= out_scale * sum_rows G[rows, b] X_v[rows, h]`` over the chunk's rows, float32.

    Hidden tiles are the fastest grid index: the programs of one column strip run together and share its
    ``P`` columns in L2; the chunk's ``X_v`` stays there too."""
    pid = tl.program_id(0)
    num_h = tl.cdiv(Hv, BLOCK_N)
    pid_h = pid % num_h
    pid_c = pid // num_h
    cols = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = pid_h * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    cols64 = cols.to(tl.int64)
    valid = _valid_cols(map_ptr, cols, Vg, Vv, stride_map, HAS_MAP)
    fac = fac_ptr + ((pid_c * BLOCK_M) // TILE_N).to(tl.int64) * stride_fac_t
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + ks
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        p = tl.load(p_ptr + rows64[None, :] * ld_p + cols64[:, None], mask=(cols < Vg)[:, None] & row_ok[None, :],
                    other=0.0)
        f = tl.load(fac + rows, mask=row_ok, other=0.0)
        ga = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv_scale * _row_alpha(
            alpha_ptr, rows, row_ok, alpha_scalar, ALPHA_IS_TENSOR)
        t = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        grad = _grad_from_p(p, f, ga, t, cols, valid, smooth_self, smooth_all, SMOOTH, False)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + hs[None, :], mask=row_ok[:, None] & (hs < Hv)[None, :],
                    other=0.0)
        acc = tl.dot(grad.to(x_ptr.dtype.element_ty), x, acc, input_precision=PREC)
    acc *= out_scale
    at = acc_ptr + cols64[:, None] * ld_acc + hs[None, :]
    mask = (cols < Vg)[:, None] & (hs < Hv)[None, :]
    if ACCUMULATE:
        acc += tl.load(at, mask=mask, other=0.0)
    tl.store(at, acc, mask=mask)


@triton.jit
def _ce_finish_grad_kernel(
    p_ptr, fac_ptr, map_ptr, alpha_ptr, tgt_ptr, g_ptr,
    R, Vg, Vv, ld_p, stride_fac_t, stride_map, alpha_scalar, smooth_self, smooth_all, inv_scale,
    HAS_MAP: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_R: tl.constexpr,
    TILE_N: tl.constexpr,
):
    """``P [R, Vg]`` (the logits kernel's ``MODE`` 1 output) overwritten by ``G`` (the formula above, ``/ scale``
    included), in the input dtype: the same values the dX / dW tile kernels form before their dots. One program
    per ``[BLOCK_R, TILE_N]`` block: one logits partial tile, so one factor per row."""
    pid_c = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * TILE_N + tl.arange(0, TILE_N)
    row_ok = rows < R
    ga = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv_scale * _row_alpha(
        alpha_ptr, rows, row_ok, alpha_scalar, ALPHA_IS_TENSOR)
    t = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    f = tl.load(fac_ptr + pid_c * stride_fac_t + rows, mask=row_ok, other=0.0)
    valid = _valid_cols(map_ptr, cols, Vg, Vv, stride_map, HAS_MAP)
    at = p_ptr + rows[:, None] * ld_p + cols[None, :]
    mask = row_ok[:, None] & (cols < Vg)[None, :]
    p = tl.load(at, mask=mask, other=0.0)
    grad = _grad_from_p(p, f, ga, t, cols, valid, smooth_self, smooth_all, SMOOTH, True)
    tl.store(at, grad.to(p_ptr.dtype.element_ty), mask=mask)

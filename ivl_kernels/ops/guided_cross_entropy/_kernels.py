"""The loss's Triton kernel: one program per row of a chunk of logits that cuBLAS has already computed.

The matrix work of the loss (the base head, the value head, ``dX = G @ W``, ``dW += G^T @ X``) runs as ordinary
cuBLAS GEMMs at the chip's matrix rate (see ``_chunked.py``); what is left is row-wise and memory-bound: the
log-sum-exp over the vocabulary, the target logit, the smoothing and L1 sums, and the value-logit gradient
``G``, which this kernel writes over the value logits it read (no second ``[rows, V]`` buffer).

Per row ``n`` of the chunk, over base columns ``b < Vb`` (value columns ``b < Vval``, aligned with them):

    v[b]  = buf[n, b]                                   (value logit; ``fill`` where the column is unmapped)
    z[b]  = base[n, b] + alpha[n] * v[b]                 (``COMBINED``: buf already holds base + alpha * v)
    stats = (logsumexp_b z, z[t_n], sum_b z, sum_{b < Vv} |v[b]|)
    G[b]  = (alpha[n] * g[n] * (exp(z[b] - lse) - (1 - eps) [b == t_n] - eps / Vb)
             + h[n] * l1_scale * sign(v[b])) / scale     (0 on unmapped columns)

``scale`` (a Python float) keeps float16 gradients out of the subnormal range: the caller multiplies the GEMM
results by it again.
"""

from __future__ import annotations

from ..._triton import tl, triton


@triton.jit
def _z_block(buf_row, base_row, map_ptr, cols, Vb, Vval, Vv, stride_base_v, stride_map, alpha, fill,
             HAS_BASE: tl.constexpr, COMBINED: tl.constexpr, HAS_MAP: tl.constexpr):
    """``(z, v, in_b, valid)`` of the columns ``cols`` of one row: guided logit (``-inf`` outside the base
    vocabulary), value logit (0 where not a value column), which columns are base columns and which carry a
    (mapped) value logit."""
    in_b = cols < Vb
    in_v = cols < Vval
    if HAS_MAP:
        # The value columns were gathered through the clamped map: a column whose entry is outside [0, Vv) (-1,
        # or a map changed after its range check) is unmapped, its gathered value logit never used.
        idx = tl.load(map_ptr + cols.to(tl.int64) * stride_map, mask=in_b, other=-1)
        valid = in_v & (idx >= 0) & (idx < Vv)
    else:
        valid = in_v
    if COMBINED:
        # The chunk buffer holds base + alpha * value over every base column (value added where mapped).
        z = tl.load(buf_row + cols, mask=in_b, other=0.0).to(tl.float32) + tl.where(valid, 0.0, alpha * fill)
        v = tl.zeros_like(z)
    else:
        v = tl.load(buf_row + cols, mask=in_v, other=0.0).to(tl.float32)
        z = alpha * tl.where(valid, v, fill)
        if HAS_BASE:
            z += tl.load(base_row + cols.to(tl.int64) * stride_base_v, mask=in_b, other=0.0).to(tl.float32)
    z = tl.where(in_b, z, float("-inf"))
    return z, v, in_b, valid


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def _ce_rows_kernel(
    buf_ptr, base_ptr, map_ptr, alpha_ptr, tgt_ptr, g_ptr, h_ptr, lse_ptr, stats_ptr,
    Vb, Vval, Vv, Vl1, Vcols, ld_buf, stride_base_m, stride_base_v, stride_map, stride_stats,
    alpha_scalar, fill, smooth_self, smooth_all, l1_scale, inv_scale,
    HAS_BASE: tl.constexpr, COMBINED: tl.constexpr, HAS_MAP: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr,
    WITH_L1: tl.constexpr, SMOOTH: tl.constexpr, STATS: tl.constexpr, GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row. ``STATS``: write ``stats[:, n]`` (pass 1). ``GRAD``: write ``G`` into ``buf`` (pass
    2; with ``STATS`` the lse of pass 1, else ``lse[n]``). ``Vcols`` = the columns the loops cover,
    ``Vl1`` = the value columns the L1 term covers (0: none)."""
    row = tl.program_id(0).to(tl.int64)
    buf_row = buf_ptr + row * ld_buf
    base_row = base_ptr + row * stride_base_m
    if ALPHA_IS_TENSOR:
        alpha = tl.load(alpha_ptr + row).to(tl.float32)
    else:
        alpha = alpha_scalar
    t = tl.load(tgt_ptr + row)
    lanes = tl.arange(0, BLOCK)
    if STATS:
        m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
        s_vec = tl.zeros((BLOCK,), tl.float32)
        zs_vec = tl.zeros((BLOCK,), tl.float32)
        l1_vec = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, Vcols, BLOCK):
            cols = c0 + lanes
            z, v, in_b, valid = _z_block(buf_row, base_row, map_ptr, cols, Vb, Vval, Vv, stride_base_v,
                                         stride_map, alpha, fill, HAS_BASE, COMBINED, HAS_MAP)
            m_new = tl.maximum(m_vec, z)
            # A lane that has seen only -inf keeps sum 0: subtracting 0 instead of -inf avoids -inf - -inf.
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            s_vec = s_vec * tl.exp(m_vec - m_ref) + tl.exp(z - m_ref)
            m_vec = m_new
            if SMOOTH:
                zs_vec += tl.where(in_b, z, 0.0)
            if WITH_L1:
                l1_vec += tl.where(cols < Vl1, tl.abs(v), 0.0)
        m = tl.max(m_vec, axis=0)
        # All -inf (no column): the sum is 0 and lse = -inf + log(0) = -inf.
        m_ref = tl.where(m > float("-inf"), m, 0.0)
        lse = m_ref + tl.log(tl.sum(s_vec * tl.exp(m_vec - m_ref), axis=0))
        tl.store(stats_ptr + row, lse)
        # The target logit: one scalar column, not a [BLOCK] accumulator in the loop (registers: ptxas caps this
        # kernel at 64 per thread with Triton 3.6, and a fourth vector there spilled).
        t_col = tl.maximum(t, 0)
        zt, _v, _b, _ok = _z_block(buf_row, base_row, map_ptr, t_col, Vb, Vval, Vv, stride_base_v, stride_map,
                                   alpha, fill, HAS_BASE, COMBINED, HAS_MAP)
        tl.store(stats_ptr + stride_stats + row, tl.where(t >= 0, zt, 0.0))
        tl.store(stats_ptr + 2 * stride_stats + row, tl.sum(zs_vec, axis=0))
        tl.store(stats_ptr + 3 * stride_stats + row, tl.sum(l1_vec, axis=0))
    else:
        lse = tl.load(lse_ptr + row)
    if GRAD:
        g = tl.load(g_ptr + row) * alpha * inv_scale
        h = tl.load(h_ptr + row) * l1_scale * inv_scale
        for c0 in range(0, Vcols, BLOCK):
            cols = c0 + lanes
            z, v, in_b, valid = _z_block(buf_row, base_row, map_ptr, cols, Vb, Vval, Vv, stride_base_v,
                                         stride_map, alpha, fill, HAS_BASE, COMBINED, HAS_MAP)
            dz = tl.exp(z - lse) - tl.where(cols == t, smooth_self, 0.0)
            if SMOOTH:
                dz -= smooth_all
            grad = tl.where(valid & in_b, g * dz, 0.0)
            if WITH_L1:
                grad += tl.where(cols < Vl1, h * _sign(v), 0.0)
            tl.store(buf_row + cols, grad.to(buf_ptr.dtype.element_ty), mask=cols < Vval)


@triton.jit
def _l1_rows_kernel(buf_ptr, h_ptr, stats_ptr, Vv, ld_buf, stride_stats, l1_scale, inv_scale,
                    STATS: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """IVL's L1 term over the value vocabulary when the map is not the identity (the guided columns then are
    gathered value rows, not the value vocabulary): ``stats[3, n] = sum_j |v[n, j]|`` and
    ``buf[n, j] = h[n] * l1_scale * sign(v[n, j]) / scale``."""
    row = tl.program_id(0).to(tl.int64)
    buf_row = buf_ptr + row * ld_buf
    lanes = tl.arange(0, BLOCK)
    if STATS:
        acc = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, Vv, BLOCK):
            cols = c0 + lanes
            acc += tl.abs(tl.load(buf_row + cols, mask=cols < Vv, other=0.0).to(tl.float32))
        tl.store(stats_ptr + 3 * stride_stats + row, tl.sum(acc, axis=0))
    if GRAD:
        h = tl.load(h_ptr + row) * l1_scale * inv_scale
        for c0 in range(0, Vv, BLOCK):
            cols = c0 + lanes
            v = tl.load(buf_row + cols, mask=cols < Vv, other=0.0).to(tl.float32)
            tl.store(buf_row + cols, (h * _sign(v)).to(buf_ptr.dtype.element_ty), mask=cols < Vv)

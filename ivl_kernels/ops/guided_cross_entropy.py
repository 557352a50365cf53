"""``fused_guided_cross_entropy``: the IVL training loss without materialising ``[N, V]`` logits.

    z[n, b]  = base[n, b] + alpha[n] * (value_hidden[n] . value_weight[map[b]])   (fill where map[b] == -1)
    ce_n     = logsumexp_b z[n, :] - (1 - eps) * z[n, t_n] - (eps / Vb) * sum_b z[n, b]        (eps = label_smoothing)
    l1_n     = l1_coef * sum_j |value_hidden[n] . value_weight[j]| / Vv                       (value vocabulary)

``ce_n`` for kept rows (``t_n != ignore_index``), 0 for ignored rows. With ``eps = 0`` this is
``lse - z[n, t_n]``; the smoothing term is ``torch.nn.functional.cross_entropy``'s. ``l1_reduction`` says which
rows carry ``l1_n``: ``"kept"`` the kept rows (``loss_n = ce_n + l1_n``, reduced like the cross-entropy),
``"all"`` every row (IVL's released code: ``"mean"`` is ``sum ce_n / kept_rows + sum_{all n} l1_n / N``).
Gradients: with ``p = softmax(z[n])``,

    dz[n, b]   = g_n * (p[n, b] - (1 - eps) * [b == t_n] - eps / Vb)
    dvl[n, v]  = alpha[n] * sum_{b: map[b] = v} dz[n, b] + h_n * l1_coef / Vv * sign(value_logit[n, v])
    d value_hidden = dvl @ value_weight,     d value_weight = dvl^T @ value_hidden

with ``g_n`` the cross-entropy weight of row n (the upstream gradient, ``/ kept_rows`` for "mean"; 0 for
ignored rows) and ``h_n`` its L1 weight: ``g_n`` for ``"kept"``; for ``"all"`` the upstream gradient (``/ N``
for "mean"), nonzero for ignored rows too. ``dvl`` is never stored: both backends recompute logits (per chunk of
rows, or per tile) in the backward pass.

Backends: ``triton`` (blockwise, like cut-cross-entropy: a forward kernel keeps per-row online log-sum-exp,
smoothing sum and L1 sum over vocabulary tiles, and takes the target logit as one gathered row dot per row; a
backward kernel recomputes each [rows x vocab] tile and atomically accumulates d value_hidden / d value_weight in
float32, the target column's term added row by row), ``torch`` (an
``autograd.Function`` chunked over rows; extra memory is one chunk of logits, not ``[N, V]``). There is no
``cuda`` backend for this op.

Distributed (``process_group=`` a ``ProcessGroup`` or a 1-D ``DeviceMesh`` such as ``mesh["tp"]``,
tensor-parallel LM heads): each rank holds a contiguous shard of the base
vocabulary (``base_logits [N, Vb_r]`` columns / ``base_weight [Vb_r, Hb]`` rows, shards in rank order) and a
shard of the value head ``value_weight [Vv_r, Hv]``; ``vocab_map`` (if given) is rank-local: ``[Vb_r]`` entries
index this rank's ``value_weight`` shard (``None`` = local identity). Targets are global base ids;
``value_hidden``, ``target``, ``alpha`` are replicated. Partial log-sum-exps, target logits, smoothing and L1
sums are combined with two ``all_reduce``s; the loss is the same on every rank; ``d value_weight`` is the
rank's shard, ``d value_hidden`` is all-reduced (the full gradient, identical on every rank). The L1 term
divides by the global ``Vv = sum_r Vv_r``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _backends
from .._triton import interpreter_enabled, tl, triton
from .._validate import (CrossEntropyArgs, check_backend, check_finite_float, check_vocab_map,
                         validate_cross_entropy)
from ..reference import gather_columns
from .guided_logits import dot_into, tile_dot

# The torch backend processes rows in chunks of about this many logits per [rows, V] temporary (16 MiB in
# fp32); it holds about six such temporaries at a time, so its extra memory is ~100 MiB whatever N is.
CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_columns(map_ptr, v0, Vb, Vv, stride_map, HAS_MAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(offs_v, rows_w, valid_w, mask_b)`` of the column tile ``[v0, v0 + BLOCK_V)``: the column ids, the value
    row each column reads (valid where ``valid_w``; without a map, column c is value row c, valid for c < Vv even
    past Vb so the fused L1 term can use it) and the columns inside the base vocabulary (``mask_b``).

    The masks compare int32 column ids relative to the tile: a ``[BLOCK_V]`` vector is replicated over the
    rows of the MMA layout (a quarter of the tile's columns in every thread), and int64 ones cost twice the
    registers.
    """
    cols = tl.arange(0, BLOCK_V)
    offs_v = v0 + cols.to(tl.int64)
    mask_b = cols < (Vb - v0).to(tl.int32)
    if HAS_MAP:
        idx = tl.load(map_ptr + offs_v * stride_map, mask=mask_b, other=-1).to(tl.int64)
        # Entries outside [-1, Vv) count as unmapped (fill, no gradient): no address from an unchecked entry.
        valid_w = (idx >= 0) & (idx < Vv) & mask_b
    else:
        idx = offs_v
        valid_w = cols < (Vv - v0).to(tl.int32)
    # Unmapped ids read row 0 under a false mask: no out-of-range address is ever formed.
    rows_w = tl.where(valid_w, idx, 0)
    return offs_v, rows_w, valid_w, mask_b


@triton.jit
def _guided_z(acc, valid_w, offs_m, mask_m, offs_v, mask_b, alpha_row, alpha_scalar, fill, base_ptr, bh_ptr, bw_ptr,
              Hb, stride_base_m, stride_base_v, stride_bh_m, stride_bh_k, stride_bw_v, stride_bw_k,
              BASE_MODE: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Guided logits ``z`` of a tile from its value logits ``acc``: ``alpha * value`` (``fill`` on unmapped
    columns) plus the base term, ``-inf`` outside the base vocabulary (``mask_b``).

    The base LM head accumulates straight into the scaled value tile, so one ``[BLOCK_M, BLOCK_V]`` fp32 tile is
    live while it runs: a separate base tile beside ``z`` and the value tile made the loss kernels spill.
    """
    value = tl.where(valid_w[None, :], acc, fill)
    if ALPHA_IS_TENSOR:
        z = value * alpha_row[:, None]
    else:
        z = value * alpha_scalar
    if BASE_MODE == 1:
        z = z + tl.load(base_ptr + offs_m[:, None] * stride_base_m + offs_v[None, :] * stride_base_v,
                        mask=mask_m[:, None] & mask_b[None, :], other=0.0).to(tl.float32)
    elif BASE_MODE == 2:
        z = dot_into(z, bh_ptr, stride_bh_m, stride_bh_k, offs_m, mask_m, bw_ptr, stride_bw_v, stride_bw_k, offs_v,
                     mask_b, Hb, BLOCK_K, DOT_PRECISION)
    return tl.where(mask_b[None, :], z, float("-inf"))


@triton.jit
def _target_rows(map_ptr, tgt, mask_m, Vb, Vv, stride_map, HAS_MAP: tl.constexpr):
    """``(t, has_t, row_w, valid)`` of each row's target column: the column (0 where ``has_t`` is false: no
    target in this shard) and the value row it reads (valid where ``valid``, an entry in ``[0, Vv)`` as in
    ``_tile_columns``; ``row_w`` is clamped into ``[0, Vv)``, so no entry forms an out-of-range address. A clamp,
    not ``tl.where(valid, idx, 0)``: Triton 3.6's layout pass fails on that select in the backward kernel)."""
    has_t = (tgt >= 0) & (tgt < Vb) & mask_m
    t = tl.where(has_t, tgt, 0)
    if HAS_MAP:
        idx = tl.load(map_ptr + t * stride_map, mask=has_t, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < Vv) & has_t
    else:
        idx = t
        valid = (t < Vv) & has_t
    return t, has_t, tl.maximum(tl.minimum(idx, Vv - 1), 0), valid


@triton.jit
def _row_dot(h_ptr, stride_h_m, stride_h_k, offs_m, w_ptr, stride_w_v, stride_w_k, rows_w, mask, K,
             BLOCK_K: tl.constexpr):
    """``h[offs_m[i]] . w[rows_w[i]]`` for each i (0 where ``mask`` is false), fp32 accumulation."""
    acc = tl.zeros(offs_m.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_hk = mask[:, None] & (offs_k < K)[None, :]
        h = tl.load(h_ptr + offs_m[:, None] * stride_h_m + offs_k[None, :] * stride_h_k, mask=mask_hk, other=0.0)
        w = tl.load(w_ptr + rows_w[:, None] * stride_w_v + offs_k[None, :] * stride_w_k, mask=mask_hk, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
    return acc


@triton.jit
def _target_logit(vh_ptr, vw_ptr, map_ptr, base_ptr, bh_ptr, bw_ptr, offs_m, mask_m, tgt, alpha_row,
                  alpha_scalar, fill, Vb, Vv, Hv, Hb, stride_vh_m, stride_vh_k, stride_vw_v, stride_vw_k, stride_map,
                  stride_base_m, stride_base_v, stride_bh_m, stride_bh_k, stride_bw_v, stride_bw_k,
                  HAS_MAP: tl.constexpr, BASE_MODE: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """``z[n, t_n]`` of rows ``offs_m`` (0 where the target is not a column of this shard), fp32.

    Computed row by row (one gathered weight row per row) rather than picked out of every logit tile: a
    ``[BLOCK_M, BLOCK_V]`` compare against the targets in each tile cost the forward kernel ~100 registers
    and made it spill.
    """
    t, has_t, row_w, valid = _target_rows(map_ptr, tgt, mask_m, Vb, Vv, stride_map, HAS_MAP)
    acc = _row_dot(vh_ptr, stride_vh_m, stride_vh_k, offs_m, vw_ptr, stride_vw_v, stride_vw_k, row_w, valid, Hv,
                   BLOCK_K)
    value = tl.where(valid, acc, fill)
    if ALPHA_IS_TENSOR:
        z = value * alpha_row
    else:
        z = value * alpha_scalar
    if BASE_MODE == 1:
        z = z + tl.load(base_ptr + offs_m * stride_base_m + t * stride_base_v, mask=has_t,
                        other=0.0).to(tl.float32)
    elif BASE_MODE == 2:
        z = z + _row_dot(bh_ptr, stride_bh_m, stride_bh_k, offs_m, bw_ptr, stride_bw_v, stride_bw_k, t, has_t, Hb,
                         BLOCK_K)
    return tl.where(has_t, z, 0.0)


@triton.jit
def _target_grad(vh_ptr, vw_ptr, map_ptr, dvh_ptr, dvw_ptr, offs_m, mask_m, tgt, coef, Vb, Vv, Hv,
                 stride_vh_m, stride_vh_k, stride_vw_v, stride_vw_k, stride_map,
                 HAS_MAP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Adds ``coef[n]`` at each row's target column to the value-logit gradient: ``coef[n] * value_weight[v]``
    into ``dvh[n]`` and ``coef[n] * value_hidden[n]`` into ``dvw[v]`` (``v`` the target's value row; nothing
    when it is unmapped or not in this shard), fp32. Keeps the target term out of the backward's tiles (see
    ``_target_logit``)."""
    t, has_t, row_w, valid = _target_rows(map_ptr, tgt, mask_m, Vb, Vv, stride_map, HAS_MAP)
    for k0 in range(0, Hv, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = valid[:, None] & (offs_k < Hv)[None, :]
        w = tl.load(vw_ptr + row_w[:, None] * stride_vw_v + offs_k[None, :] * stride_vw_k, mask=mask, other=0.0)
        tl.atomic_add(dvh_ptr + offs_m[:, None] * Hv + offs_k[None, :], coef[:, None] * w.to(tl.float32),
                      mask=mask, sem="relaxed")
        h = tl.load(vh_ptr + offs_m[:, None] * stride_vh_m + offs_k[None, :] * stride_vh_k, mask=mask, other=0.0)
        tl.atomic_add(dvw_ptr + row_w[:, None] * Hv + offs_k[None, :], coef[:, None] * h.to(tl.float32),
                      mask=mask, sem="relaxed")


@triton.jit
def _ce_fwd_kernel(
    vh_ptr, vw_ptr, map_ptr, base_ptr, bh_ptr, bw_ptr, alpha_ptr, tgt_ptr, st_ptr,
    N, Vb, Vv, Vloop, Hv, Hb,
    stride_vh_m, stride_vh_k, stride_vw_v, stride_vw_k, stride_map,
    stride_base_m, stride_base_v, stride_bh_m, stride_bh_k, stride_bw_v, stride_bw_k,
    stride_alpha, stride_tgt,
    alpha_scalar, fill,
    HAS_MAP: tl.constexpr, BASE_MODE: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr, FUSE_L1: tl.constexpr,
    L1_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per-row partial statistics over the column tiles ``pid_s, pid_s + SPLIT, ...`` of ``[0, Vloop)``.

    Writes ``st[j, pid_s, n]`` (fp32, ``[5, SPLIT, N]``) for j = running max m, sum exp(z - m), target logit
    z[n, t_n] (0 if t_n is not in this shard), sum_b z[n, b], sum_v |value_logit[n, v]|. ``L1_ONLY``: columns
    are value rows ``[0, Vv)`` and only the L1 sum is written (the separate L1 pass used with a map).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < N

    # A finite start for the running max keeps exp(m_old - m_new) defined when a tile is all -inf.
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if not L1_ONLY:
        if ALPHA_IS_TENSOR:
            alpha_row = tl.load(alpha_ptr + offs_m * stride_alpha, mask=mask_m, other=0.0).to(tl.float32)
        else:
            alpha_row = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for v0 in range(pid_s * BLOCK_V, Vloop, n_split * BLOCK_V):
        if L1_ONLY:
            offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            valid_w = offs_v < Vv
            acc = tile_dot(vh_ptr, stride_vh_m, stride_vh_k, offs_m, mask_m, vw_ptr, stride_vw_v, stride_vw_k,
                           offs_v, valid_w, Hv, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            l1 += tl.sum(tl.abs(acc), axis=1)
        else:
            offs_v, rows_w, valid_w, mask_b = _tile_columns(map_ptr, v0, Vb, Vv, stride_map, HAS_MAP, BLOCK_V)
            acc = tile_dot(vh_ptr, stride_vh_m, stride_vh_k, offs_m, mask_m, vw_ptr, stride_vw_v, stride_vw_k,
                           rows_w, valid_w, Hv, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            if FUSE_L1:
                # Identity map: column c is also value row c, so the L1 sum over [0, Vv) rides along. Taken
                # before z is formed, so the value tile is dead by the time the base head runs.
                l1 += tl.sum(tl.where(valid_w[None, :], tl.abs(acc), 0.0), axis=1)
            z = _guided_z(acc, valid_w, offs_m, mask_m, offs_v, mask_b, alpha_row, alpha_scalar, fill, base_ptr,
                          bh_ptr, bw_ptr, Hb, stride_base_m, stride_base_v, stride_bh_m, stride_bh_k, stride_bw_v,
                          stride_bw_k, BASE_MODE, ALPHA_IS_TENSOR, BLOCK_K, DOT_PRECISION)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            zs += tl.sum(tl.where(mask_b[None, :], z, 0.0), axis=1)

    if not L1_ONLY:
        # The target logit once per row, by the first split (the splits' statistics are summed).
        zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if pid_s == 0:
            tgt = tl.load(tgt_ptr + offs_m * stride_tgt, mask=mask_m, other=-1).to(tl.int64)
            zt = _target_logit(vh_ptr, vw_ptr, map_ptr, base_ptr, bh_ptr, bw_ptr, offs_m, mask_m, tgt, alpha_row,
                               alpha_scalar, fill, Vb, Vv, Hv, Hb, stride_vh_m, stride_vh_k, stride_vw_v,
                               stride_vw_k, stride_map, stride_base_m, stride_base_v, stride_bh_m, stride_bh_k,
                               stride_bw_v, stride_bw_k, HAS_MAP, BASE_MODE, ALPHA_IS_TENSOR, BLOCK_K)
    plane = n_split.to(tl.int64) * N
    base_off = pid_s.to(tl.int64) * N + offs_m
    if not L1_ONLY:
        tl.store(st_ptr + base_off, m, mask=mask_m)
        tl.store(st_ptr + plane + base_off, s, mask=mask_m)
        tl.store(st_ptr + 2 * plane + base_off, zt, mask=mask_m)
        tl.store(st_ptr + 3 * plane + base_off, zs, mask=mask_m)
    tl.store(st_ptr + 4 * plane + base_off, l1, mask=mask_m)


@triton.jit
def _ce_bwd_kernel(
    vh_ptr, vw_ptr, map_ptr, base_ptr, bh_ptr, bw_ptr, alpha_ptr, tgt_ptr, lse_ptr, g_ptr, gl1_ptr, dvh_ptr,
    dvw_ptr, N, Vb, Vv, Vloop, Hv, Hb,
    stride_vh_m, stride_vh_k, stride_vw_v, stride_vw_k, stride_map,
    stride_base_m, stride_base_v, stride_bh_m, stride_bh_k, stride_bw_v, stride_bw_k,
    stride_alpha, stride_tgt,
    alpha_scalar, fill, smooth_self, smooth_all, l1_scale, skip_threshold,
    HAS_MAP: tl.constexpr, BASE_MODE: tl.constexpr, ALPHA_IS_TENSOR: tl.constexpr, FUSE_L1: tl.constexpr,
    L1_ONLY: tl.constexpr, GRAD_SKIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One ``[BLOCK_M rows x BLOCK_V columns]`` tile of the backward pass.

    Recomputes the tile's logits, forms ``dvl`` (the value-logit gradient, see the module docstring; with
    ``smooth_self = 1 - eps``, ``smooth_all = eps / Vb``, ``l1_scale = l1_coef / Vv``, ``g`` the rows'
    cross-entropy weights and ``gl1`` their L1 weights, fp32 ``[N]``), and atomically adds
    ``dvl @ value_weight[rows]`` into ``dvh [N, Hv]`` and ``dvl^T @ value_hidden`` into ``dvw[rows] [Vv, Hv]``
    (both fp32, contiguous). Atomics make many-to-one maps (several columns -> one value row) correct.
    """
    pid_v = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < N

    if L1_ONLY:
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        valid_w = offs_v < Vv
        rows_w = tl.where(valid_w, offs_v, 0)
        acc = tile_dot(vh_ptr, stride_vh_m, stride_vh_k, offs_m, mask_m, vw_ptr, stride_vw_v, stride_vw_k,
                       rows_w, valid_w, Hv, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        sgn = tl.where(acc > 0, 1.0, tl.where(acc < 0, -1.0, 0.0))
        gl1 = tl.load(gl1_ptr + offs_m, mask=mask_m, other=0.0)
        dvl = tl.where(valid_w[None, :], sgn * (gl1 * l1_scale)[:, None], 0.0)
    else:
        g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        if ALPHA_IS_TENSOR:
            alpha_row = tl.load(alpha_ptr + offs_m * stride_alpha, mask=mask_m, other=0.0).to(tl.float32)
        else:
            alpha_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
        offs_v, rows_w, valid_w, mask_b = _tile_columns(map_ptr, pid_v * BLOCK_V, Vb, Vv, stride_map, HAS_MAP,
                                                        BLOCK_V)
        acc = tile_dot(vh_ptr, stride_vh_m, stride_vh_k, offs_m, mask_m, vw_ptr, stride_vw_v, stride_vw_k,
                       rows_w, valid_w, Hv, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        if FUSE_L1:
            # sign(value logit) is needed after the base term: held as fp16 (exact for -1, 0, 1), half the
            # registers of an fp32 tile.
            sgn = tl.where(valid_w[None, :], tl.where(acc > 0, 1.0, tl.where(acc < 0, -1.0, 0.0)), 0.0)
            sgn = sgn.to(tl.float16)
        z = _guided_z(acc, valid_w, offs_m, mask_m, offs_v, mask_b, alpha_row, alpha_scalar, fill, base_ptr,
                      bh_ptr, bw_ptr, Hb, stride_base_m, stride_base_v, stride_bh_m, stride_bh_k, stride_bw_v,
                      stride_bw_k, BASE_MODE, ALPHA_IS_TENSOR, BLOCK_K, DOT_PRECISION)
        # The target column's -(1 - eps) is added row by row at the end (_target_grad), not in the tile.
        dz = tl.exp(z - lse[:, None]) - smooth_all
        dz = tl.where(mask_b[None, :] & mask_m[:, None], dz * g[:, None], 0.0)
        if ALPHA_IS_TENSOR:
            dz = dz * alpha_row[:, None]
        else:
            dz = dz * alpha_scalar
        # Unmapped columns carry the constant fill: no gradient.
        dvl = tl.where(valid_w[None, :] & mask_b[None, :], dz, 0.0)
        if FUSE_L1:
            # The L1 weight is read here, where it is used (ignored rows have g = 0 but may have gl1 != 0).
            gl1 = tl.load(gl1_ptr + offs_m, mask=mask_m, other=0.0)
            dvl += sgn.to(tl.float32) * (gl1 * l1_scale)[:, None]

    dvl_in = dvl.to(vh_ptr.dtype.element_ty)
    do_tile = True
    if GRAD_SKIP:
        # Whole-tile skip: every dropped entry has |dvl| < skip_threshold (error bound in the public docstring).
        do_tile = tl.max(tl.max(tl.abs(dvl), axis=1), axis=0) >= skip_threshold
    if do_tile:
        # Two loops, one per gradient: dvl is an operand of each dot in a different layout (dvl, dvl^T), and
        # only one of the two is held in registers at a time.
        for k0 in range(0, Hv, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < Hv
            w = tl.load(vw_ptr + rows_w[:, None] * stride_vw_v + offs_k[None, :] * stride_vw_k,
                        mask=valid_w[:, None] & mask_k[None, :], other=0.0)
            d_h = tl.dot(dvl_in, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dvh_ptr + offs_m[:, None] * Hv + offs_k[None, :], d_h,
                          mask=mask_m[:, None] & mask_k[None, :], sem="relaxed")
        dvl_t = tl.trans(dvl_in)
        for k0 in range(0, Hv, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < Hv
            h = tl.load(vh_ptr + offs_m[:, None] * stride_vh_m + offs_k[None, :] * stride_vh_k,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            d_w = tl.dot(dvl_t, h, input_precision=DOT_PRECISION)
            tl.atomic_add(dvw_ptr + rows_w[:, None] * Hv + offs_k[None, :], d_w,
                          mask=valid_w[:, None] & mask_k[None, :], sem="relaxed")
    if not L1_ONLY:
        if pid_v == 0:
            # After the tiles' loops (the dvl tile is dead by then); its row inputs are read here, not kept live
            # through the whole kernel.
            tgt = tl.load(tgt_ptr + offs_m * stride_tgt, mask=mask_m, other=-1).to(tl.int64)
            coef = -smooth_self * tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
            if ALPHA_IS_TENSOR:
                coef = coef * tl.load(alpha_ptr + offs_m * stride_alpha, mask=mask_m, other=0.0).to(tl.float32)
            else:
                coef = coef * alpha_scalar
            _target_grad(vh_ptr, vw_ptr, map_ptr, dvh_ptr, dvw_ptr, offs_m, mask_m, tgt, coef, Vb, Vv, Hv,
                         stride_vh_m, stride_vh_k, stride_vw_v, stride_vw_k, stride_map, HAS_MAP, BLOCK_K)


def _tile_config(N: int, dtype: Optional[torch.dtype] = None) -> dict:
    """Tile sizes of both loss kernels (forward statistics and backward recompute) for ``N`` rows of ``dtype``.

    bf16/fp16 run on tensor cores: ``[128 x 128]`` fp32 tiles over 8 warps (64 accumulator registers a thread);
    a single row tile (N <= 64) keeps 8 warps on ``[64 x 128]`` tiles with wider K slices. fp32 uses the
    ``"ieee"`` dot, an FMA loop whose operands sit in registers: small tiles and K slices. Every
    configuration is compiled, as launched, for sm_80 and sm_90 by ``tests/ops/test_triton_gpu_compile.py``
    (no register spills, shared memory within the limit).
    """
    if interpreter_enabled():
        # The interpreter's cost is per program and per op: few, large programs run fastest.
        return dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4)
    # maxnreg=255 where ptxas would otherwise cap a variant at 128 registers (two programs per SM) and spill.
    if dtype == torch.float32:
        # BLOCK_K >= 16: Triton 3.6 rejects a narrower dot.
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=3, maxnreg=255)
    if N <= 64:
        return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3, maxnreg=255)
    return dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3)


def _strides(value_hidden, value_weight, vocab_map, base_logits, base_hidden, base_weight, alpha_tensor, target):
    def s(t, i):
        return t.stride(i) if t is not None else 0

    return (value_hidden.stride(0), value_hidden.stride(1), value_weight.stride(0), value_weight.stride(1),
            s(vocab_map, 0), s(base_logits, 0), s(base_logits, 1), s(base_hidden, 0), s(base_hidden, 1),
            s(base_weight, 0), s(base_weight, 1), s(alpha_tensor, 0), target.stride(0))


def _loop_shape(value_weight, vocab_map, base_logits, base_weight, Vb_hint: int) -> tuple:
    """``(Vb, Vv, Vloop, fuse_l1)``: without a map the column loop covers max(Vb, Vv) and carries L1 along."""
    Vv = value_weight.shape[0]
    if base_logits is not None:
        Vb = base_logits.shape[1]
    elif base_weight is not None:
        Vb = base_weight.shape[0]
    else:
        Vb = Vb_hint
    fuse = vocab_map is None
    return Vb, Vv, (max(Vb, Vv) if fuse else Vb), fuse


def _kernel_inputs(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                   target_local) -> tuple:
    """What both loss kernels take: ``(tensors, strides, Hb, flags)``; absent optional inputs are replaced by a
    dummy pointer that their ``tl.constexpr`` flag keeps from being read."""
    N = value_hidden.shape[0]
    dummy = value_hidden
    tensors = (value_hidden, value_weight,
               vocab_map if vocab_map is not None else dummy,
               base_logits if base_logits is not None else dummy,
               base_hidden if base_hidden is not None else dummy,
               base_weight if base_weight is not None else dummy,
               alpha_tensor if alpha_tensor is not None else dummy,
               target_local)
    strides = _strides(value_hidden, value_weight, vocab_map, base_logits, base_hidden, base_weight,
                       alpha_tensor, target_local)
    Hb = base_hidden.shape[1] if base_hidden is not None else 0
    flags = dict(HAS_MAP=vocab_map is not None,
                 BASE_MODE=1 if base_logits is not None else (2 if base_hidden is not None else 0),
                 ALPHA_IS_TENSOR=alpha_tensor is not None,
                 DOT_PRECISION="ieee" if value_hidden.dtype == torch.float32 else None,
                 **_tile_config(N, value_hidden.dtype))
    return tensors, strides, Hb, flags


def launch_fwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
               alpha_scalar: float, fill: float, target_local: torch.Tensor, Vb: int, with_l1: bool) -> torch.Tensor:
    """Forward statistics ``[4, N]`` fp32: this shard's lse, target logit, sum_b z, sum_v |value logit|."""
    N, Hv = value_hidden.shape
    Vb, Vv, Vloop, fuse = _loop_shape(value_weight, vocab_map, base_logits, base_weight, Vb)
    out = torch.zeros((4, N), dtype=torch.float32, device=value_hidden.device)
    out[0].fill_(float("-inf"))
    if N == 0 or Vloop == 0:
        return out
    args, strides, Hb, common = _kernel_inputs(value_hidden, value_weight, base_logits, base_hidden, base_weight,
                                               vocab_map, alpha_tensor, target_local)
    row_tiles = triton.cdiv(N, common["BLOCK_M"])
    col_tiles = triton.cdiv(Vloop, common["BLOCK_V"])
    # Split the vocabulary over several programs per row tile when there are few row tiles (fills the GPU;
    # under the interpreter a split of 2 exercises the combine at little cost).
    target_programs = 2 if interpreter_enabled() else 4 * _sm_count(value_hidden.device)
    split = max(1, min(col_tiles, triton.cdiv(target_programs, row_tiles)))
    st = torch.empty((5, split, N), dtype=torch.float32, device=value_hidden.device)
    _ce_fwd_kernel[(row_tiles, split)](*args, st, N, Vb, Vv, Vloop, Hv, Hb, *strides, alpha_scalar, fill,
                                       FUSE_L1=fuse and with_l1, L1_ONLY=False, **common)
    m, s = st[0], st[1]
    mx = m.max(0).values
    out[0] = mx + torch.log((s * torch.exp(m - mx)).sum(0))
    out[1] = st[2].sum(0)
    out[2] = st[3].sum(0)
    if with_l1:
        if fuse:
            out[3] = st[4].sum(0)
        elif Vv > 0:
            l1_split = max(1, min(triton.cdiv(Vv, common["BLOCK_V"]), triton.cdiv(target_programs, row_tiles)))
            st1 = torch.empty((5, l1_split, N), dtype=torch.float32, device=value_hidden.device)
            # The L1 pass reads the value head alone: launched as the value-only variant (no map, base or alpha
            # tensor), one compiled kernel whatever the guided configuration.
            l1_args, l1_strides, _, l1_common = _kernel_inputs(value_hidden, value_weight, None, None, None, None,
                                                               None, target_local)
            _ce_fwd_kernel[(row_tiles, l1_split)](*l1_args, st1, N, Vb, Vv, Vv, Hv, 0, *l1_strides, alpha_scalar,
                                                  fill, FUSE_L1=False, L1_ONLY=True, **l1_common)
            out[3] = st1[4].sum(0)
    return out


def launch_bwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
               alpha_scalar: float, fill: float, target_local: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
               Vb: int, smooth_self: float, smooth_all: float, l1_scale: float,
               skip_threshold: float, g_l1: Optional[torch.Tensor] = None) -> tuple:
    """``(d value_hidden [N, Hv], d value_weight [Vv, Hv])`` in the input dtype (fp32 accumulation).

    ``g [N]`` fp32: each row's cross-entropy weight; ``g_l1 [N]`` fp32: each row's L1 weight (``None``: ``g``).
    """
    N, Hv = value_hidden.shape
    Vb, Vv, Vloop, fuse = _loop_shape(value_weight, vocab_map, base_logits, base_weight, Vb)
    dvh = torch.zeros((N, Hv), dtype=torch.float32, device=value_hidden.device)
    dvw = torch.zeros((Vv, Hv), dtype=torch.float32, device=value_hidden.device)
    if N > 0 and Vloop > 0:
        tensors, strides, Hb, common = _kernel_inputs(value_hidden, value_weight, base_logits, base_hidden,
                                                      base_weight, vocab_map, alpha_tensor, target_local)
        row_tiles = triton.cdiv(N, common["BLOCK_M"])
        common = dict(common, GRAD_SKIP=skip_threshold > 0)
        gl1 = g if g_l1 is None else g_l1
        args = tensors + (lse, g, gl1, dvh, dvw)
        scalars = (alpha_scalar, fill, smooth_self, smooth_all, l1_scale, skip_threshold)
        with_l1 = l1_scale != 0.0
        _ce_bwd_kernel[(triton.cdiv(Vloop, common["BLOCK_V"]), row_tiles)](
            *args, N, Vb, Vv, Vloop, Hv, Hb, *strides, *scalars,
            FUSE_L1=fuse and with_l1, L1_ONLY=False, **common)
        if with_l1 and not fuse and Vv > 0:
            # With a map the L1 term runs over the value vocabulary, not over mapped ids: its own pass, launched
            # as the value-only variant (one compiled kernel whatever the map, base or alpha).
            l1_tensors, l1_strides, _, l1_common = _kernel_inputs(value_hidden, value_weight, None, None, None,
                                                                  None, None, target_local)
            _ce_bwd_kernel[(triton.cdiv(Vv, common["BLOCK_V"]), row_tiles)](
                *l1_tensors, lse, g, gl1, dvh, dvw, N, Vb, Vv, Vv, Hv, 0, *l1_strides, *scalars, FUSE_L1=False,
                L1_ONLY=True, **dict(l1_common, GRAD_SKIP=common["GRAD_SKIP"]))
    return dvh.to(value_hidden.dtype), dvw.to(value_weight.dtype)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


@torch.library.custom_op("ivl_kernels::guided_ce_fwd_triton", mutates_args=())
def _guided_ce_fwd_op(value_hidden: torch.Tensor, value_weight: torch.Tensor, base_logits: Optional[torch.Tensor],
                      base_hidden: Optional[torch.Tensor], base_weight: Optional[torch.Tensor],
                      vocab_map: Optional[torch.Tensor], alpha_tensor: Optional[torch.Tensor], alpha_scalar: float,
                      fill: float, target_local: torch.Tensor, Vb: int, with_l1: bool) -> torch.Tensor:
    if vocab_map is not None:
        # Under torch.compile the public function cannot read map values; check them here (cached per map).
        check_vocab_map(vocab_map, vocab_map.shape[0], value_weight.shape[0], value_hidden.device)
    return launch_fwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                      alpha_scalar, fill, target_local, Vb, with_l1)


@_guided_ce_fwd_op.register_fake
def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, alpha_scalar,
      fill, target_local, Vb, with_l1):
    return value_hidden.new_empty((4, value_hidden.shape[0]), dtype=torch.float32)


@torch.library.custom_op("ivl_kernels::guided_ce_bwd_triton", mutates_args=())
def _guided_ce_bwd_op(value_hidden: torch.Tensor, value_weight: torch.Tensor, base_logits: Optional[torch.Tensor],
                      base_hidden: Optional[torch.Tensor], base_weight: Optional[torch.Tensor],
                      vocab_map: Optional[torch.Tensor], alpha_tensor: Optional[torch.Tensor], alpha_scalar: float,
                      fill: float, target_local: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                      g_l1: Optional[torch.Tensor], Vb: int, smooth_self: float, smooth_all: float, l1_scale: float,
                      skip_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.are_deterministic_algorithms_enabled():
        # warn_only=True (strict mode never selects this backend): warn as torch's own nondeterministic ops do.
        warnings.warn(f"fused_guided_cross_entropy(backend='triton'): {_NONDETERMINISTIC}", UserWarning,
                      stacklevel=2)
    return launch_bwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                      alpha_scalar, fill, target_local, lse, g, Vb, smooth_self, smooth_all, l1_scale,
                      skip_threshold, g_l1)


@_guided_ce_bwd_op.register_fake
def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, alpha_scalar,
      fill, target_local, lse, g, g_l1, Vb, smooth_self, smooth_all, l1_scale, skip_threshold):
    return torch.empty_like(value_hidden), torch.empty_like(value_weight)


_NONDETERMINISTIC = ("its backward adds gradients with float32 atomics, so they are not bit-reproducible, and "
                     "torch.use_deterministic_algorithms(True) is set; backend='torch' is the deterministic path "
                     "(exact, chunked over rows) and backend='auto' picks it in that mode")


def _triton_supports(a: CrossEntropyArgs) -> str:
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return _NONDETERMINISTIC
    g = a.g
    dtypes = {g.value_hidden.dtype}
    for t in (g.base_logits, g.base_hidden):
        if t is not None:
            dtypes.add(t.dtype)
    if torch.float64 in dtypes:
        return "float64 inputs are handled by backend='torch'"
    if interpreter_enabled() and torch.bfloat16 in dtypes:
        return "the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16"
    return ""


# --------------------------------------------------------------------------------------------------------------
# torch backend: chunked over rows, logits recomputed in backward
# --------------------------------------------------------------------------------------------------------------
def _torch_chunk(vh, vw, base_logits, base_hidden, base_weight, cols, unmapped, identity_view, Vb, alpha_c,
                 fill, compute):
    """``(value_logits [r, Vv], z [r, Vb])`` of one chunk of rows, in ``compute`` dtype."""
    vl = torch.matmul(vh, vw.T).to(compute)
    rem = vl[:, :Vb] if identity_view else vl.index_select(1, cols)
    if unmapped is not None:
        rem = rem.masked_fill(unmapped, fill)
    z = rem * alpha_c
    if base_logits is not None:
        z = z + base_logits.to(compute)
    elif base_hidden is not None:
        z = z + torch.matmul(base_hidden, base_weight.T).to(compute)
    return vl, z


def _torch_setup(value_weight, vocab_map, base_logits, base_weight, Vb_hint, device):
    Vb, Vv, _, _ = _loop_shape(value_weight, vocab_map, base_logits, base_weight, Vb_hint)
    identity_view = vocab_map is None and Vb <= Vv
    cols, unmapped = (None, None) if identity_view else gather_columns(vocab_map, Vb, Vv, device)
    rows = max(1, CHUNK_ELEMS // max(Vb, Vv, 1))
    return Vb, Vv, identity_view, cols, unmapped, rows


def torch_fwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
              alpha_scalar, fill, target_local, Vb, with_l1, compute) -> torch.Tensor:
    """Same contract as ``launch_fwd``: ``[4, N]`` (lse, target logit, sum z, L1 sum) in ``compute`` dtype."""
    N = value_hidden.shape[0]
    Vb, Vv, identity_view, cols, unmapped, rows = _torch_setup(value_weight, vocab_map, base_logits, base_weight,
                                                               Vb, value_hidden.device)
    out = torch.zeros((4, N), dtype=compute, device=value_hidden.device)
    out[0].fill_(float("-inf"))
    if Vb == 0 and not with_l1:
        return out
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        alpha_c = alpha_tensor[r0:r1].to(compute).unsqueeze(1) if alpha_tensor is not None else alpha_scalar
        vl, z = _torch_chunk(value_hidden[r0:r1], value_weight,
                             base_logits[r0:r1] if base_logits is not None else None,
                             base_hidden[r0:r1] if base_hidden is not None else None, base_weight,
                             cols, unmapped, identity_view, Vb, alpha_c, fill, compute)
        if Vb > 0:
            t = target_local[r0:r1]
            has_t = (t >= 0) & (t < Vb)
            out[0, r0:r1] = torch.logsumexp(z, 1)
            out[1, r0:r1] = z.gather(1, t.clamp(0, Vb - 1).long().unsqueeze(1)).squeeze(1) * has_t
            out[2, r0:r1] = z.sum(1)
        if with_l1:
            out[3, r0:r1] = vl.abs().sum(1)
    return out


def torch_bwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
              alpha_scalar, fill, target_local, lse, g, Vb, smooth_self, smooth_all, l1_scale, compute,
              need_dvh=True, need_dvw=True, g_l1=None) -> tuple:
    """Same contract as ``launch_bwd``; logits are recomputed chunk by chunk (extra memory: one chunk)."""
    if g_l1 is None:
        g_l1 = g
    N, Hv = value_hidden.shape
    Vb, Vv, identity_view, cols, unmapped, rows = _torch_setup(value_weight, vocab_map, base_logits, base_weight,
                                                               Vb, value_hidden.device)
    dt = value_hidden.dtype
    dvh = torch.empty((N, Hv), dtype=dt, device=value_hidden.device) if need_dvh else None
    dvw_acc = torch.zeros((Vv, Hv), dtype=compute, device=value_hidden.device) if need_dvw else None
    if not identity_view:
        keep = (~unmapped).nonzero().squeeze(1) if unmapped is not None else None
        keep_cols = cols[keep] if keep is not None else cols
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        vh = value_hidden[r0:r1]
        alpha_c = alpha_tensor[r0:r1].to(compute).unsqueeze(1) if alpha_tensor is not None else alpha_scalar
        vl, z = _torch_chunk(vh, value_weight,
                             base_logits[r0:r1] if base_logits is not None else None,
                             base_hidden[r0:r1] if base_hidden is not None else None, base_weight,
                             cols, unmapped, identity_view, Vb, alpha_c, fill, compute)
        g_c = g[r0:r1].to(compute).unsqueeze(1)
        dz = torch.exp(z.sub_(lse[r0:r1].to(compute).unsqueeze(1)))
        del z
        if smooth_all:
            dz.sub_(smooth_all)
        t = target_local[r0:r1]
        has_t = ((t >= 0) & (t < Vb)).to(compute)
        # One target per row: an indexed subtract writes distinct elements, deterministic on every device
        # (scatter_add_ on a 2-D CUDA tensor is not, under torch.use_deterministic_algorithms).
        rows_c = torch.arange(r1 - r0, device=dz.device)
        dz[rows_c, t.clamp(0, max(Vb - 1, 0)).long()] -= smooth_self * has_t
        dz.mul_(g_c * alpha_c)
        if identity_view and Vb == Vv:
            dvl = dz
        else:
            dvl = torch.zeros((r1 - r0, Vv), dtype=compute, device=vh.device)
            if identity_view:
                dvl[:, :Vb] = dz
            else:
                dvl.index_add_(1, keep_cols, dz if keep is None else dz.index_select(1, keep))
            del dz
        if l1_scale:
            dvl.add_(torch.sign(vl).mul_(g_l1[r0:r1].to(compute).unsqueeze(1) * l1_scale))
        del vl
        dvl = dvl.to(dt)
        if need_dvh:
            dvh[r0:r1] = torch.matmul(dvl, value_weight)
        if need_dvw:
            dvw_acc += torch.matmul(dvl.T, vh).to(compute)
    return dvh, (dvw_acc.to(value_weight.dtype) if need_dvw else None)


# --------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    backend: str
    alpha_scalar: float
    fill: float
    Vb: int              # this rank's base vocabulary
    Vb_global: int
    Vv_global: int
    smoothing: float
    l1_coef: float
    l1_all: bool         # l1_reduction == "all": the L1 term over every row, not only the kept ones
    reduction: str
    skip_threshold: float
    process_group: object
    compute: torch.dtype


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=op, group=group)
    return t


class _GuidedCrossEntropy(torch.autograd.Function):
    """Loss from per-row statistics; only ``value_hidden`` and ``value_weight`` get gradients."""

    @staticmethod
    def forward(ctx, value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                target_local, kept, cfg: _Config):
        with_l1 = cfg.l1_coef != 0.0
        if cfg.backend == "triton":
            st = torch.ops.ivl_kernels.guided_ce_fwd_triton(
                value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                cfg.alpha_scalar, cfg.fill, target_local, cfg.Vb, with_l1)
        else:
            st = torch_fwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                           alpha_tensor, cfg.alpha_scalar, cfg.fill, target_local, cfg.Vb, with_l1, cfg.compute)
        lse, zt, zs, l1 = st[0], st[1], st[2], st[3]
        if cfg.process_group is not None:
            import torch.distributed as dist

            # Global lse = gmax + log(sum_r exp(lse_r - gmax)); one MAX and one SUM all_reduce.
            gmax = _all_reduce(lse.clone(), dist.ReduceOp.MAX, cfg.process_group)
            gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
            packed = torch.stack([torch.exp(lse - gmax), zt, zs, l1])
            _all_reduce(packed, dist.ReduceOp.SUM, cfg.process_group)
            lse = gmax + torch.log(packed[0])
            zt, zs, l1 = packed[1], packed[2], packed[3]
        row = lse - (1.0 - cfg.smoothing) * zt
        if cfg.smoothing:  # skipped at 0: 0 * (-inf) from masked base logits would poison the row
            row = row - (cfg.smoothing / cfg.Vb_global) * zs
        l1_all = with_l1 and cfg.l1_all
        if with_l1:
            l1_row = (cfg.l1_coef / cfg.Vv_global) * l1
            if not l1_all:
                row = row + l1_row
        row = torch.where(kept, row, torch.zeros_like(row))
        n_kept = kept.sum()
        if cfg.reduction == "none":
            loss = row + l1_row if l1_all else row
        elif cfg.reduction == "sum":
            loss = (row + l1_row).sum() if l1_all else row.sum()
        else:
            loss = row.sum() / n_kept.clamp(min=1).to(row.dtype)
            if l1_all:
                # IVL's released normaliser: every row passed (N), not the kept ones.
                loss = loss + l1_row.sum() / max(row.shape[0], 1)
        ctx.save_for_backward(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                              alpha_tensor, target_local, kept, lse)
        ctx.cfg = cfg
        ctx.n_kept = n_kept
        # Returned in the compute dtype; the public function casts outside this Function. A cast here is a no-op
        # for float32 inputs that returns the *same* tensor object as ``loss``, and torch 2.11's dynamo
        # (pytorch/pytorch#180642, fixed in 2.12) also returns that intermediate as an extra output of the traced
        # forward: autograd then gives the user's tensor the extra output's slot, so under torch.compile this
        # backward got a zero grad_out and returned all-zero gradients. The output must alias nothing else here.
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, target_local,
         kept, lse) = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        gf = grad_out.to(torch.float32 if cfg.compute != torch.float64 else torch.float64)
        g_l1 = None  # the L1 weight of each row; None: g (the L1 term rides on the kept rows)
        if cfg.l1_all and cfg.l1_coef != 0.0:
            g_l1 = grad_out.to(gf.dtype)
            if cfg.reduction == "mean":
                g_l1 = g_l1 / max(kept.shape[0], 1)
            g_l1 = g_l1.expand(kept.shape)
        if cfg.reduction == "mean":
            gf = gf / ctx.n_kept.clamp(min=1).to(gf.dtype)
        g = torch.where(kept, gf.expand(kept.shape), torch.zeros((), dtype=gf.dtype, device=gf.device))
        smooth_self = 1.0 - cfg.smoothing
        smooth_all = cfg.smoothing / cfg.Vb_global if cfg.Vb_global else 0.0
        l1_scale = cfg.l1_coef / cfg.Vv_global if cfg.Vv_global else 0.0
        need_dvh, need_dvw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if cfg.process_group is not None:
            need_dvh = True  # every rank must join the all_reduce below
        if cfg.backend == "triton":
            dvh, dvw = torch.ops.ivl_kernels.guided_ce_bwd_triton(
                value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                cfg.alpha_scalar, cfg.fill, target_local, lse.float().contiguous(), g.float().contiguous(),
                g_l1.float().contiguous() if g_l1 is not None else None, cfg.Vb, smooth_self, smooth_all, l1_scale,
                cfg.skip_threshold)
        else:
            dvh, dvw = torch_bwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                                 alpha_tensor, cfg.alpha_scalar, cfg.fill, target_local, lse, g, cfg.Vb,
                                 smooth_self, smooth_all, l1_scale, cfg.compute, need_dvh, need_dvw, g_l1)
        if cfg.process_group is not None:
            import torch.distributed as dist

            # value_hidden is replicated and every shard's logits depend on it: its gradient is the sum.
            dvh32 = _all_reduce(dvh.to(cfg.compute), dist.ReduceOp.SUM, cfg.process_group)
            dvh = dvh32.to(value_hidden.dtype)
        return (dvh if ctx.needs_input_grad[0] else None, dvw if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def fused_guided_cross_entropy(value_hidden, value_weight, target, *, base_logits=None, base_hidden=None,
                               base_weight=None, vocab_map=None, alpha=1.0, fill=0.0, l1_coef=0.0,
                               l1_reduction="kept", ignore_index=-100, label_smoothing=0.0, reduction="mean",
                               backend="auto", process_group=None, grad_skip_threshold=0.0) -> torch.Tensor:
    """Cross-entropy of guided logits (IVL training loss) without materialising ``[N, V]`` logits.

    ``z[n, b] = base[n, b] + alpha[n] * (value_hidden[n] . value_weight[map[b]])`` (``alpha[n] * fill`` where
    ``map[b] == -1``), ``ce_n = logsumexp_b z[n] - z[n, target_n]`` (label smoothing exactly as
    ``F.cross_entropy``, over the ``Vb`` classes; 0 for ignored rows) and IVL's regulariser
    ``l1_n = l1_coef * sum_j |value_hidden[n] . value_weight[j]| / Vv`` (over the value vocabulary before
    remapping, not scaled by alpha). With ``K`` the number of kept rows and ``N`` the number of rows:

    - ``l1_reduction="kept"`` (default): ``loss_n = ce_n + l1_n`` for kept rows, 0 for ignored rows;
      ``"mean"`` = ``sum_n loss_n / K``, ``"sum"`` = ``sum_n loss_n``, ``"none"`` = ``loss_n``.
    - ``l1_reduction="all"``: the L1 term of every row, ignored rows included;
      ``"mean"`` = ``sum_{n kept} ce_n / K + sum_{all n} l1_n / N``, ``"sum"`` = ``sum_n (ce_n + l1_n)``,
      ``"none"`` = ``ce_n + l1_n`` (``l1_n`` alone for ignored rows).

    (a count of 0 makes its term 0). ``"all"`` is IVL's released training, which averages the L1 term over every
    position of the padded batch: its L1 term is normalised by ``N``, not ``K``, and includes the ignored rows, so
    its weight relative to the cross-entropy depends on how many rows (padding, prompt tokens) are ignored.

    Args:
        value_hidden: ``[..., Hv]`` value-network hidden states (leading dims flattened to ``N``).
        value_weight: ``[Vv, Hv]`` value LM head, same dtype (float16, bfloat16, float32, float64).
        target: int64/int32 ``[N]`` (or the leading dims of ``value_hidden``): base-vocabulary ids in ``[0, Vb)``
            or ``ignore_index``.
        base_logits: ``[..., Vb]`` frozen base logits; or ``base_hidden [..., Hb]`` with ``base_weight [Vb, Hb]``
            (the base LM head fused into the same pass); or neither: value-only fused linear cross-entropy over
            the remapped value head (``Vb = len(vocab_map)``, or ``Vv``). Base tensors must not require grad.
        vocab_map: int32/int64 ``[Vb]`` (or a ``VocabMap``), entries in ``[-1, Vv)``; ``None`` = identity.
            Many-to-one maps are allowed (their gradients add up).
        alpha: float or ``[N]`` tensor; a constant (no gradient; a tensor that requires grad is an error).
        fill: value logit of unmapped base ids.
        l1_coef: weight (>= 0) of the L1 regulariser.
        l1_reduction: ``"kept"`` (default: the L1 term of the kept rows, normalised like the cross-entropy) or
            ``"all"`` (the L1 term of every row, ignored ones included, averaged over ``N`` for ``"mean"``); see
            above. With ``"all"`` (and ``l1_coef > 0``) ignored rows get the L1 term's gradient.
        ignore_index: rows whose target equals it get no cross-entropy (and, with ``l1_reduction="kept"``, no L1
            term): loss 0, gradient 0.
        label_smoothing: in ``[0, 1)``, as ``F.cross_entropy``.
        reduction: ``"mean"`` (sum over kept rows / number of kept rows; **0 when no row is kept**, where
            ``F.cross_entropy`` gives NaN), ``"sum"`` (0 when no row is kept) or ``"none"`` (``[N]``, 0 for
            ignored rows); with ``l1_reduction="all"`` the L1 term is added as above (a batch with no kept row
            then gives the L1 term alone).
        backend: ``"auto" | "triton" | "torch"`` (``"cuda"`` is not implemented for this op and raises).
        process_group: a ``torch.distributed`` ``ProcessGroup`` over which the vocabulary is sharded, or a
            one-dimensional ``DeviceMesh`` (``mesh["tp"]`` of a larger mesh, or a 1-D mesh: its group is used; a
            mesh with several dimensions is a ``ValueError``). See the module docstring: contiguous
            base-vocabulary shards in rank order, rank-local ``vocab_map``, global target ids; ``d value_hidden``
            is all-reduced. Every rank must call with the same ``target``/``alpha``.
        grad_skip_threshold: Triton backend only (the torch backend is always exact): backward skips a
            ``[BLOCK_M x BLOCK_V]`` tile whose value-logit gradients are all below this in magnitude. Off (0) by
            default. Error bound: a skipped entry changes ``d value_hidden[n, k]`` by at most
            ``threshold * |value_weight[v, k]|`` and ``d value_weight[v, k]`` by at most
            ``threshold * |value_hidden[n, k]|``, so ``|error(d value_hidden[n])|_inf <= threshold * Vb *
            max|value_weight|`` and ``|error(d value_weight[v])|_inf <= threshold * N * c_v * max|value_hidden|``
            (``c_v`` = base ids mapped to ``v``). Note the L1 gradient has magnitude ``h * l1_coef / Vv`` per
            entry (``h`` the row's L1 weight: ``1 / K`` or ``1 / N`` for "mean"): a threshold above it drops the
            regulariser's gradient in tiles where softmax is negligible.

    Returns:
        The loss in ``value_hidden.dtype`` (a scalar, or ``[N]`` for ``"none"``), computed in float32 (float64
        for float64 inputs). Gradients flow to ``value_hidden`` and ``value_weight`` (input dtype, float32
        accumulation). Memory: the Triton backend holds ``O(N * Hv + Vv * Hv)`` float32 (gradient
        accumulators), never ``[N, V]``; the torch backend adds one chunk of ``~2**22`` logits.
    """
    check_backend(backend)
    a = validate_cross_entropy(value_hidden, value_weight, target, base_logits=base_logits,
                               base_hidden=base_hidden, base_weight=base_weight, vocab_map=vocab_map, alpha=alpha,
                               fill=fill, l1_coef=l1_coef, l1_reduction=l1_reduction, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction, process_group=process_group,
                               check_values=not torch.compiler.is_compiling())
    skip = check_finite_float("grad_skip_threshold", grad_skip_threshold)
    if skip < 0:
        raise ValueError(f"grad_skip_threshold must be >= 0 (0 = off), got {skip}")
    which = _backends.select(backend, a.g.device, cuda_supports=None, triton_supports=lambda: _triton_supports(a))
    g = a.g
    fp64 = any(t is not None and t.dtype == torch.float64
               for t in (g.value_hidden, g.base_logits, g.base_hidden))
    compute = torch.float64 if fp64 else torch.float32
    alpha_tensor = g.alpha if isinstance(g.alpha, torch.Tensor) else None
    alpha_scalar = 0.0 if alpha_tensor is not None else g.alpha
    kept = a.target != a.ignore_index
    # Rows that are ignored, or whose target lies in another rank's shard, get -1 (matches no column).
    local = a.target.long() - a.vocab_offset
    target_local = torch.where(kept & (local >= 0) & (local < g.Vb), local, torch.full_like(local, -1))
    cfg = _Config(backend=which, alpha_scalar=float(alpha_scalar), fill=g.fill, Vb=g.Vb, Vb_global=a.Vb_global,
                  Vv_global=a.Vv_global, smoothing=a.label_smoothing, l1_coef=a.l1_coef,
                  l1_all=a.l1_reduction == "all", reduction=a.reduction,
                  skip_threshold=skip, process_group=a.process_group, compute=compute)
    loss = _GuidedCrossEntropy.apply(g.value_hidden, g.value_weight, g.base_logits, g.base_hidden, g.base_weight,
                                     g.vocab_map, alpha_tensor, target_local, kept, cfg)
    loss = loss.to(g.value_hidden.dtype)
    if a.reduction == "none" and len(g.lead_shape) != 1:
        loss = loss.view(g.lead_shape)
    return loss

"""``fused_guided_logits``: value LM head + vocabulary remap + base logits (or base LM head) in one pass.

    out[m, b] = base[m, b] + alpha[m] * (value_hidden[m] . value_weight[map[b]])     (map[b] >= 0)
    out[m, b] = base[m, b] + alpha[m] * fill                                          (map[b] == -1)

with ``base`` either loaded from ``base_logits [M, Vb]`` or computed as ``base_hidden[m] . base_weight[b]``
in the same loop. No ``[M, Vv]`` intermediate exists on the fused backends.

Backends: ``triton`` (any M: below ``GEMM_MIN_ROWS`` rows one launch over a grid of vocabulary tiles x row tiles,
memory-bound like decoding; from ``GEMM_MIN_ROWS`` rows, where the work is compute-bound, the heads as cuBLAS
GEMMs accumulated into ``out`` or as one tile GEMM, whichever ``_head_kind`` picks), ``cuda`` (the compiled
decode kernel of ``csrc/``, M <= 16; ``auto`` takes it where it measured faster on this device: see
``ROUTE``), ``torch`` (``guided_logits_torch``: plain PyTorch, chunked over rows).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from .._triton import interpreter_enabled, tl, triton
from .._validate import GuidedArgs, check_backend, check_vocab_map, validate_guided, validate_out
from ._columns import gather_columns
from ._gemm import addmm_into, gemm_kind, measured_kind
from ._measured import Measured, fastest, rtol_for, tensors_agree
from ._tile_launch import launch_logits, logits_config, tiles_fit, tma_takes
from .packed_heads import packed_view

# The CUDA kernel keeps one fp32 accumulator per row in registers: it handles decode-sized M.
CUDA_MAX_ROWS = 16

# backend="auto" between the CUDA kernel and Triton (M <= CUDA_MAX_ROWS): measured, not tabled (``_measured``).
# The H100 and the H200 disagree (H100: CUDA faster at M = 1 and, for eager calls with base logits, up to M = 3;
# H200: Triton 0.315 ms against CUDA's 0.342 ms at M = 1), so the first eager call of each shape class on each
# device times both kernels on its own inputs (back-to-back calls: the host launch path counts where it bounds the
# loop). A shape first seen inside a CUDA-graph capture or while torch.compile traces gets Triton, recorded, so
# eager and captured calls of that shape always run the same kernel (identical numbers).
ROUTE = Measured(fallback="triton")
ROUTE_CALLS = 20

# From this many rows (serving batches, prefill, scoring) the head is compute-bound: the Triton tiles reached a
# third of the H200's matrix rate there (M = 128: 0.736 ms against 0.38 ms for the two heads in cuBLAS), so the
# heads run as cuBLAS GEMMs accumulated into ``out``, or as one tile GEMM with the heads as K segments
# (``_head_kind``: ``IVL_KERNELS_GEMM``, measured per shape class by default).
GEMM_MIN_ROWS = 128
# ``auto`` times the head's two GEMM kinds on at most this many rows of a call (scratch: ~0.3 GB at the qwen
# vocabulary in float32); from here the head is compute-bound at a steady rate per row.
HEAD_MEASURE_ROWS = 512


# --------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------
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


def _triton_supports(a: GuidedArgs) -> str:
    dtypes = {a.value_hidden.dtype, a.out_dtype}
    if a.base_hidden is not None:
        dtypes.add(a.base_hidden.dtype)
    if a.base_logits is not None:
        dtypes.add(a.base_logits.dtype)
    return _backends.triton_dtype_problem(dtypes)


def _head_kind(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
               alpha_scalar: float, fill: float, out: torch.Tensor) -> str:
    """How the ``triton`` backend computes the head: ``"rows"`` (the row-tile kernel: below ``GEMM_MIN_ROWS``
    rows, where the head is memory-bound), else ``"cublas"`` (GEMMs: any fill with the identity map, whose
    unmapped ids are a tail of columns, fill 0 with a map), ``"tiles"`` (one tile GEMM, the map in its loads:
    any map and fill; unit-stride operands) or ``"tma"`` (that tile GEMM through TMA descriptors: no map;
    ``_tile_launch.tma_takes``). ``IVL_KERNELS_GEMM`` forces a GEMM kind; ``auto`` measures the class's
    candidates (``_gemm.measured_kind``) on the call's first ``HEAD_MEASURE_ROWS`` rows into scratch outputs (an
    in-place call in place, on a copy of its base logits), against cuBLAS, or the row-tile kernel where cuBLAS
    cannot express the fill."""
    M, Vv = value_hidden.shape[0], value_weight.shape[0]
    if M < GEMM_MIN_ROWS or Vv == 0:
        return "rows"
    kind = gemm_kind()
    reference = "cublas" if vocab_map is None or fill == 0.0 else "rows"
    if kind == "cublas" or not tiles_fit(out, value_hidden, value_weight, base_hidden, base_weight):
        return reference
    if kind in ("tiles", "tma"):
        return kind
    in_place = base_logits is not None and out.data_ptr() == base_logits.data_ptr()
    dt, Hb = value_hidden.dtype, base_hidden.shape[1] if base_hidden is not None else 0
    packed = base_hidden is not None and vocab_map is None and base_hidden.dtype == dt and packed_view(
        base_weight, value_weight, min(out.shape[1], Vv)) is not None
    key = ("head", min(triton.next_power_of_2(M), HEAD_MEASURE_ROWS), dt, out.dtype, out.shape[1],
           tuple(value_weight.shape), Hb, base_hidden.dtype if base_hidden is not None else None,
           base_logits.dtype if base_logits is not None else None, in_place, packed, vocab_map is not None,
           fill != 0.0, alpha_tensor is not None)

    def candidate(which):
        def run():
            r = min(M, HEAD_MEASURE_ROWS)
            rows = lambda t: t[:r] if t is not None else None  # noqa: E731
            if in_place:
                scratch = base_logits[:r].clone()
                base = scratch
            else:
                scratch, base = torch.empty((r, out.shape[1]), dtype=out.dtype, device=out.device), rows(base_logits)
            _launch_head(which, value_hidden[:r], value_weight, base, rows(base_hidden), base_weight, vocab_map,
                         rows(alpha_tensor), alpha_scalar, fill, scratch)
            return scratch
        return run

    kinds = [reference, "tiles"]
    if tma_takes(vocab_map, value_hidden, value_weight, base_hidden, base_weight):
        kinds.append("tma")
    rtol = rtol_for(out.dtype)
    choice = measured_kind(out.device, key, {k: candidate(k) for k in kinds},
                           agree=lambda x, y: tensors_agree(x, y, rtol))
    return choice if choice in kinds else reference


def _launch_head(which: str, *args) -> None:
    if which in ("tiles", "tma"):
        _launch_tiles(*args, tma=which == "tma")
    elif which == "cublas":
        _launch_cublas(*args)
    else:
        _launch_rows(*args)


def _launch_tiles(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                  alpha_scalar: float, fill: float, out: torch.Tensor, tma: bool = False) -> None:
    """The head as one tile GEMM (``_head_kind``; ``ops/_tile_kernels.py``, ``MODE`` 3): both heads
    as two K segments of one float32 accumulator, base logits added in the epilogue, the map applied in the value
    head's loads, ``out`` written once (it may be ``base_logits`` itself: each tile reads its base before it
    writes). The loss's logits tiles (``logits_config``); ``tma``: through TMA descriptors on a persistent grid
    where that kernel can take the call (``_tile_launch.tma_takes``)."""
    M, Hv = value_hidden.shape
    Vv, Vb = value_weight.shape[0], out.shape[1]
    dt = value_hidden.dtype
    prec = {torch.float32: "ieee"}
    launch_logits({**logits_config(dt), "tma": tma}, value_hidden, value_weight, base_hidden, base_weight,
                  base_logits, vocab_map, alpha_tensor, out, out, out, out, out, out, R=M, Vb=Vb,
                  Vval=Vb if vocab_map is not None else Vv, Vv=Vv, Vg=0, ld_out=out.stride(0),
                  alpha_scalar=alpha_scalar, fill=fill, smooth_self=0.0, smooth_all=0.0, inv_scale=1.0, mode=3,
                  v_prec=prec.get(dt, "tf32"),
                  b_prec=prec.get(base_hidden.dtype if base_hidden is not None else dt, "tf32"))


def _launch_cublas(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                   alpha_scalar: float, fill: float, out: torch.Tensor) -> None:
    """The head as GEMMs into ``out [M, Vb]`` (float32 accumulation, one rounding to ``out``'s dtype per GEMM):

        out  = (alpha * X_v) @ W^T  (W = value_weight[:Vb], or its rows gathered through the map, zero rows
                                     for unmapped ids: contributes nothing there, the fill being 0; added to
                                     a copy of base_logits, or to base_logits itself when out is it)
        out[:, Vv:] = alpha * fill  (identity map: the base ids beyond the value vocabulary, added likewise)
        out += X_b @ W_b^T          (base hidden states)

    A map costs one gather of the value head per call (``[Vb, Hv]``).
    """
    Vv, Vb = value_weight.shape[0], out.shape[1]
    dt = value_hidden.dtype
    if base_hidden is not None and vocab_map is None and base_hidden.dtype == dt:
        wcat = packed_view(base_weight, value_weight, min(Vb, Vv))
        if wcat is not None:
            _launch_packed(value_hidden, base_hidden, base_weight, wcat, alpha_tensor, alpha_scalar, fill, out)
            return
    if alpha_tensor is not None:
        xs, a, a_col = value_hidden * alpha_tensor[:, None].to(dt), 1.0, alpha_tensor[:, None].to(out.dtype)
    else:
        xs, a, a_col = value_hidden, alpha_scalar, alpha_scalar
    if base_hidden is not None:
        # The value GEMM writes (beta = 0) and the base GEMM, K = Hb (4x the value head's K at the qwen shapes),
        # adds on top: the read of ``out`` rides on the longer GEMM, whose epilogue has more compute to hide it.
        beta_v = 0.0
    else:
        beta_v = 1.0
        if base_logits is not None:
            if not (out.data_ptr() == base_logits.data_ptr() and out.stride() == base_logits.stride()):
                out.copy_(base_logits)
        else:
            beta_v = 0.0
    if vocab_map is None:
        cols = min(Vb, Vv)
        if cols:
            part = out[:, :cols]
            addmm_into(part, xs, value_weight[:cols].T, beta=beta_v, alpha=a)
        if cols < Vb:
            tail = out[:, cols:]
            if beta_v == 0.0:
                tail.zero_()
            tail.add_(a_col * fill)
    else:
        idx = vocab_map.long()
        valid = (idx >= 0) & (idx < Vv)
        # Clamped gather: no entry, whatever its value, addresses outside the head; invalid rows are zeroed.
        w = value_weight.index_select(0, idx.clamp(0, max(Vv - 1, 0))).mul_(valid[:, None].to(dt))
        addmm_into(out, xs, w.T, beta=beta_v, alpha=a)
    if base_hidden is not None:
        addmm_into(out, base_hidden, base_weight.T, beta=1.0)


def _launch_packed(value_hidden, base_hidden, base_weight, wcat, alpha_tensor, alpha_scalar: float, fill: float,
                   out: torch.Tensor) -> None:
    """The head of packed weights (``packed_heads``) as one GEMM: ``out[:, :V] = [X_b | alpha X_v] @ wcat^T``
    with ``wcat [V, Hb + Hv]``; base ids past the value vocabulary get ``X_b @ W_b[V:]^T + alpha * fill``."""
    Hb, cols, Vb = base_hidden.shape[1], wcat.shape[0], out.shape[1]
    x = torch.empty(base_hidden.shape[0], Hb + value_hidden.shape[1], dtype=base_hidden.dtype,
                    device=base_hidden.device)
    x[:, :Hb].copy_(base_hidden)
    if alpha_tensor is not None:
        torch.mul(value_hidden, alpha_tensor[:, None].to(value_hidden.dtype), out=x[:, Hb:])
    else:
        torch.mul(value_hidden, alpha_scalar, out=x[:, Hb:])
    addmm_into(out[:, :cols], x, wcat.T, beta=0.0)
    if cols < Vb:
        tail = out[:, cols:]
        addmm_into(tail, base_hidden, base_weight[cols:].T, beta=0.0)
        a_col = alpha_tensor[:, None].to(out.dtype) if alpha_tensor is not None else alpha_scalar
        tail.add_(a_col * fill)


def launch_triton(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                  alpha_tensor, alpha_scalar: float, fill: float, out: torch.Tensor) -> None:
    """Run the ``triton`` backend: all tensors already validated and flattened (``[M, Hv]``, ``[M, Vb]``...);
    the row-tile kernel, or from ``GEMM_MIN_ROWS`` rows a GEMM kind (``_head_kind``)."""
    if value_hidden.shape[0] == 0 or out.shape[1] == 0:
        return
    args = (value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, alpha_scalar,
            fill, out)
    _launch_head(_head_kind(*args), *args)


def _launch_rows(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                 alpha_tensor, alpha_scalar: float, fill: float, out: torch.Tensor) -> None:
    """The row-tile kernel ``_guided_logits_kernel``: one launch over vocabulary tiles x row tiles."""
    M, Hv = value_hidden.shape
    Vv = value_weight.shape[0]
    Vb = out.shape[1]
    base_mode = 1 if base_logits is not None else (2 if base_hidden is not None else 0)
    Hb = base_hidden.shape[1] if base_hidden is not None else 0
    dummy = value_hidden
    cfg = _triton_config(M, value_hidden.dtype)
    grid = (triton.cdiv(Vb, cfg["BLOCK_V"]), triton.cdiv(M, cfg["BLOCK_M"]))
    bl = base_logits if base_logits is not None else None
    bh = base_hidden if base_hidden is not None else None
    bw = base_weight if base_weight is not None else None
    _guided_logits_kernel[grid](
        value_hidden, value_weight,
        vocab_map if vocab_map is not None else dummy,
        bl if bl is not None else dummy,
        bh if bh is not None else dummy,
        bw if bw is not None else dummy,
        alpha_tensor if alpha_tensor is not None else dummy,
        out,
        M, Vb, Vv, Hv, Hb,
        value_hidden.stride(0), value_hidden.stride(1), value_weight.stride(0), value_weight.stride(1),
        bl.stride(0) if bl is not None else 0, bl.stride(1) if bl is not None else 0,
        bh.stride(0) if bh is not None else 0, bh.stride(1) if bh is not None else 0,
        bw.stride(0) if bw is not None else 0, bw.stride(1) if bw is not None else 0,
        out.stride(0), out.stride(1),
        alpha_tensor.stride(0) if alpha_tensor is not None else 0,
        vocab_map.stride(0) if vocab_map is not None else 0,
        alpha_scalar, fill,
        HAS_MAP=vocab_map is not None, BASE_MODE=base_mode, ALPHA_IS_TENSOR=alpha_tensor is not None,
        DOT_PRECISION="ieee" if value_hidden.dtype == torch.float32 else None,
        **cfg,
    )


@torch.library.custom_op("ivl_kernels::guided_logits_triton", mutates_args=("out",))
def _guided_logits_triton_op(value_hidden: torch.Tensor, value_weight: torch.Tensor,
                             base_logits: Optional[torch.Tensor], base_hidden: Optional[torch.Tensor],
                             base_weight: Optional[torch.Tensor], vocab_map: Optional[torch.Tensor],
                             alpha_tensor: Optional[torch.Tensor], alpha_scalar: float, fill: float,
                             out: torch.Tensor) -> None:
    _backends.require_triton(out.device)
    if vocab_map is not None:
        # Under torch.compile the public function cannot read map values; check them here, before writing.
        check_vocab_map(vocab_map, out.shape[1], value_weight.shape[0], value_hidden.device)
    launch_triton(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                  alpha_tensor, alpha_scalar, fill, out)


@_guided_logits_triton_op.register_fake
def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
      alpha_scalar, fill, out) -> None:
    return None


# --------------------------------------------------------------------------------------------------------------
# torch backend (the CPU path)
# --------------------------------------------------------------------------------------------------------------
# Rows per chunk are chosen so one chunk of value logits holds about this many elements (128 MiB in fp32).
_CHUNK_ELEMS = 1 << 25


def guided_logits_torch(a: GuidedArgs, out: torch.Tensor) -> torch.Tensor:
    """The ``torch`` backend of ``fused_guided_logits``: writes ``[M, Vb]`` guided logits into ``out``.

    Value (and base) logits are computed by ``torch.matmul`` in the input dtype (fp32 accumulation inside
    the matmul for half types), then scaled, remapped and added in float32 (float64 for float64 inputs).
    Extra memory: one chunk of about ``2**25`` logits, whatever ``M`` is. ``out`` may alias ``base_logits``:
    each chunk reads its base rows before it writes them.
    """
    compute = torch.float64 if a.value_hidden.dtype == torch.float64 or a.out_dtype == torch.float64 else torch.float32
    cols, unmapped = gather_columns(a.vocab_map, a.Vb, a.Vv, a.device)
    rows = max(1, _CHUNK_ELEMS // max(a.Vv, a.Vb, 1))
    for r0 in range(0, a.M, rows):
        r1 = min(a.M, r0 + rows)
        value_logits = torch.matmul(a.value_hidden[r0:r1], a.value_weight.T)
        remapped = value_logits.index_select(1, cols).to(compute)
        if unmapped is not None:
            remapped.masked_fill_(unmapped, a.fill)
        if isinstance(a.alpha, torch.Tensor):
            remapped.mul_(a.alpha[r0:r1].to(compute).unsqueeze(1))
        else:
            remapped.mul_(a.alpha)
        if a.base_logits is not None:
            remapped.add_(a.base_logits[r0:r1].to(compute))
        elif a.base_hidden is not None:
            remapped.add_(torch.matmul(a.base_hidden[r0:r1], a.base_weight.T).to(compute))
        out[r0:r1].copy_(remapped)
    return out


# --------------------------------------------------------------------------------------------------------------
# CUDA extension (csrc/guided_logits.cu): ivl_kernels::guided_logits_decode_
# --------------------------------------------------------------------------------------------------------------
@_backends.when_cuda_extension_loads
def _register_cuda_fakes() -> None:
    """Fake (meta) implementation of the compiled op, so ``torch.compile`` can trace through it: registered
    beside the op's wrapper, as soon as the extension that defines the op is loaded (``torch.library`` needs the
    op to exist). It writes ``out`` in place and returns nothing, so the fake does nothing."""

    @torch.library.register_fake("ivl_kernels::guided_logits_decode_")
    def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
          alpha_scalar, fill, out) -> None:
        return None


def _vector_aligned(t: torch.Tensor) -> bool:
    """16-byte loads need a contiguous last dim, rows starting on 16-byte boundaries.

    While tracing (torch.compile) there is no data pointer to look at: the compiled op re-checks the
    alignment of the real tensors and raises if it does not hold.
    """
    vec = 16 // t.element_size()
    aligned_start = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return t.stride(-1) == 1 and aligned_start and t.shape[-1] % vec == 0 and (
        t.dim() == 1 or t.stride(0) % vec == 0)


def _route_key(a: GuidedArgs) -> tuple:
    bh = a.base_hidden
    return (a.device.index if a.device.index is not None else torch.cuda.current_device(), a.M, a.base_mode,
            a.value_hidden.dtype, a.out_dtype, a.Vb, tuple(a.value_weight.shape), bh.shape[1] if bh is not None else 0,
            a.vocab_map is not None, isinstance(a.alpha, torch.Tensor))


def _measure_route(a: GuidedArgs) -> str:
    """``"cuda"`` or ``"triton"``: the faster on this device for this call's shapes, of those that agree with
    Triton (each into its own scratch output, so an in-place call's logits are not touched)."""
    alpha_tensor = a.alpha if isinstance(a.alpha, torch.Tensor) else None
    alpha_scalar = 0.0 if alpha_tensor is not None else a.alpha
    scratch = {which: torch.empty((a.M, a.Vb), dtype=a.out_dtype, device=a.device) for which in ("triton", "cuda")}

    def candidate(which):
        def run():
            _run(which, a, alpha_tensor, alpha_scalar, scratch[which])
            return scratch[which]
        return run

    rtol = rtol_for(a.out_dtype)
    return fastest({which: candidate(which) for which in scratch}, "triton", calls=ROUTE_CALLS,
                   agree=lambda x, y: tensors_agree(x, y, rtol))


def _cuda_preferred(a: GuidedArgs) -> bool:
    """Whether ``auto`` takes the CUDA kernel over Triton for this call: the cached measurement of its shape
    class on this device (made now if this is the first eager call of the class; see ``ROUTE``)."""
    choice = ROUTE.choose(_route_key(a), lambda: _measure_route(a))
    return choice == "cuda"


def _cuda_supports(a: GuidedArgs, out: Optional[torch.Tensor]) -> str:
    if a.M > CUDA_MAX_ROWS:
        return f"it handles M <= {CUDA_MAX_ROWS} rows (decode), got M = {a.M}; use backend='triton'"
    dt = a.value_hidden.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        return f"value dtype must be float16, bfloat16 or float32, got {dt}"
    if a.base_mode == 0:
        return "it needs a base term"
    if a.base_mode == 1 and a.base_logits.dtype not in (dt, torch.float32):
        return f"base_logits dtype must be {dt} or float32, got {a.base_logits.dtype}"
    if a.base_mode == 2 and a.base_hidden.dtype != dt:
        return f"base_hidden/base_weight dtype must equal the value dtype {dt}, got {a.base_hidden.dtype}"
    vec_tensors = [("value_hidden", a.value_hidden), ("value_weight", a.value_weight)]
    if a.base_mode == 2:
        vec_tensors += [("base_hidden", a.base_hidden), ("base_weight", a.base_weight)]
    for name, t in vec_tensors:
        if not _vector_aligned(t):
            return (f"{name} must have stride(-1) == 1, 16-byte aligned rows and a last dim divisible by "
                    f"{16 // t.element_size()}")
    for name, t in (("base_logits", a.base_logits), ("out", out)):
        if t is not None and t.stride(-1) != 1:
            return f"{name} must have stride(-1) == 1"
    if a.vocab_map is not None and a.vocab_map.stride(0) != 1:
        return "vocab_map must be contiguous"
    return ""


def _run(which: str, a: GuidedArgs, alpha_tensor, alpha_scalar: float, out2d: torch.Tensor) -> None:
    if which == "torch":
        guided_logits_torch(a, out2d)
    elif which == "triton":
        torch.ops.ivl_kernels.guided_logits_triton(
            a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map,
            alpha_tensor, alpha_scalar, a.fill, out2d)
    else:
        if alpha_tensor is not None and (alpha_tensor.dtype != torch.float32 or alpha_tensor.stride(0) != 1):
            alpha_tensor = alpha_tensor.float().contiguous()
        torch.ops.ivl_kernels.guided_logits_decode_(
            a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map,
            alpha_tensor, alpha_scalar, a.fill, out2d)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------
def fused_guided_logits(value_hidden, value_weight, *, base_logits=None, base_hidden=None, base_weight=None,
                        vocab_map=None, alpha=1.0, fill=0.0, out=None, backend="auto") -> torch.Tensor:
    """Guided next-token logits ``[M, Vb]`` in one fused pass.

    ``out[m, b] = base[m, b] + alpha[m] * (value_hidden[m] . value_weight[map[b]])``, and
    ``base[m, b] + alpha[m] * fill`` where ``map[b] == -1``.

    Args:
        value_hidden: ``[..., Hv]`` value-network final hidden states; leading dims are flattened to ``M``.
        value_weight: ``[Vv, Hv]`` value LM head, same dtype as ``value_hidden``.
        base_logits: ``[..., Vb]`` base logits (leading dims as ``value_hidden``). Or instead:
        base_hidden: ``[..., Hb]`` base hidden states, with
        base_weight: ``[Vb, Hb]`` the base LM head, fused into the same pass.
        vocab_map: int32/int64 ``[Vb]`` (or a ``VocabMap``), entries in ``[-1, Vv)``, ``-1`` = unmapped.
            ``None`` = identity (``b -> b`` for ``b < Vv``, unmapped beyond). Other entries raise
            ``ValueError``; the range is read on every call for a CPU map, once per tensor and version for a
            CUDA map (no host sync in a decode loop), and not during CUDA-graph capture. An entry that escapes
            the check (written behind torch's version counter, or first seen inside a capture) is treated as
            unmapped by every backend: no out-of-range address is ever formed.
        alpha: guidance strength, a float or a ``[M]`` tensor (one per row).
        fill: the value logit used for unmapped base ids.
        out: optional ``[M, Vb]`` output; may be ``base_logits`` itself (in place, as a logits processor does).
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``IVL_KERNELS_BACKEND`` overrides ``"auto"``).

    Returns:
        ``out`` if given, else a new ``[M, Vb]`` tensor of ``base_logits.dtype`` (float32 when the base is
        given as hidden states). Accumulation is float32. No gradient flows through this op.
    """
    check_backend(backend)
    # Under torch.compile, reading the map's values would break the graph: the custom ops check them at run
    # time instead, before they write anything.
    a = validate_guided(value_hidden, value_weight, base_logits=base_logits, base_hidden=base_hidden,
                        base_weight=base_weight, vocab_map=vocab_map, alpha=alpha, fill=fill,
                        check_map_values=not torch.compiler.is_compiling())
    out2d = validate_out(out, a)
    which = _backends.select(backend, a.device, cuda_supports=lambda: _cuda_supports(a, out2d),
                             triton_supports=lambda: _triton_supports(a), cuda_preferred=lambda: _cuda_preferred(a))
    if out2d is None:
        out2d = torch.empty((a.M, a.Vb), dtype=a.out_dtype, device=a.device)
    alpha_tensor = a.alpha if isinstance(a.alpha, torch.Tensor) else None
    alpha_scalar = 0.0 if alpha_tensor is not None else a.alpha
    with torch.no_grad():
        _run(which, a, alpha_tensor, alpha_scalar, out2d)
    return out if out is not None else out2d

"""The ``triton`` backend's launches: the row-tile kernel below ``GEMM_MIN_ROWS`` rows, from there a GEMM kind
(``_head_kind``: cuBLAS GEMMs accumulated into ``out``, packed heads as one GEMM, or one tile GEMM with the heads as
K segments, plain or through TMA), and the custom op ``ivl_kernels::guided_logits_triton`` that runs them."""

from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from ..._triton import triton
from ..._validate import check_vocab_map
from .._amp import no_autocast
from .._columns import add_fill, gathered_head
from .._gemm import TILE_KINDS, addmm_into, gemm_kind, measured_kind
from .._measured import rtol_for, tensors_agree
from .._tile_launch import kind_logits_config, launch_logits, logits_config, tiles_fit, tma_takes, wide_applies
from ..packed_heads import adjacent_columns, packed_view
from ._kernel import _guided_logits_kernel, _triton_config

# From this many rows (serving batches, prefill, scoring) the head is compute-bound: the Triton tiles reached a
# third of the H200's matrix rate there (M = 128: 0.736 ms against 0.38 ms for the two heads in cuBLAS), so the
# heads run as cuBLAS GEMMs accumulated into ``out``, or as one tile GEMM with the heads as K segments
# (``_head_kind``: ``IVL_KERNELS_GEMM``, measured per shape class by default).
GEMM_MIN_ROWS = 128
# ``auto`` times the head's two GEMM kinds on at most this many rows of a call (scratch: ~0.3 GB at the qwen
# vocabulary in float32); from here the head is compute-bound at a steady rate per row.
HEAD_MEASURE_ROWS = 512


def _head_kind(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
               alpha_scalar: float, fill: float, out: torch.Tensor) -> str:
    """How the ``triton`` backend computes the head: ``"rows"`` (the row-tile kernel: below ``GEMM_MIN_ROWS``
    rows, where the head is memory-bound), else ``"cublas"`` (GEMMs: any map and fill), ``"tiles"`` (one tile
    GEMM, the map in its loads: any map and fill; unit-stride operands), ``"tma"`` (that tile GEMM through TMA
    descriptors: no map; ``_tile_launch.tma_takes``) or ``"wide"`` (``"tma"`` on ``_tile_launch.WIDE_TILES`` where
    ``_tile_launch.wide_applies``; ``"hybrid"``, a loss kind, runs the head as ``"wide"``). ``IVL_KERNELS_GEMM``
    forces a GEMM kind; ``auto`` measures the class's candidates (``_gemm.measured_kind``) on the call's first
    ``HEAD_MEASURE_ROWS`` rows into scratch outputs (an in-place call in place, on a copy of its base logits),
    against cuBLAS."""
    M, Vv = value_hidden.shape[0], value_weight.shape[0]
    if M < GEMM_MIN_ROWS or Vv == 0:
        return "rows"
    kind = gemm_kind()
    if kind == "cublas" or not tiles_fit(out, value_hidden, value_weight, base_hidden, base_weight):
        return "cublas"
    if kind in TILE_KINDS:
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

    kinds = ["cublas", "tiles"]
    if tma_takes(vocab_map, value_hidden, value_weight, base_hidden, base_weight):
        kinds += ["tma", "wide"] if wide_applies(dt, True) else ["tma"]
    rtol = rtol_for(out.dtype)
    choice = measured_kind(out.device, key, {k: candidate(k) for k in kinds},
                           agree=lambda x, y: tensors_agree(x, y, rtol))
    return choice if choice in kinds else "cublas"


def _launch_head(which: str, *args) -> None:
    if which in TILE_KINDS:
        _launch_tiles(*args, kind=which)
    elif which == "cublas":
        _launch_cublas(*args)
    else:
        _launch_rows(*args)


def _launch_tiles(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                  alpha_scalar: float, fill: float, out: torch.Tensor, kind: str = "tiles") -> None:
    """The head as one tile GEMM (``_head_kind``; ``ops/_tile_kernels.py``, ``MODE`` 3): both heads
    as two K segments of one float32 accumulator, base logits added in the epilogue, the map applied in the value
    head's loads, ``out`` written once (it may be ``base_logits`` itself: each tile reads its base before it
    writes). The loss's logits tiles (``logits_config``) as ``kind`` has them (``_tile_launch.kind_logits_config``:
    ``tma`` and ``wide`` through TMA descriptors on a persistent grid where that kernel can take the call)."""
    M, Hv = value_hidden.shape
    Vv, Vb = value_weight.shape[0], out.shape[1]
    dt = value_hidden.dtype
    prec = {torch.float32: "ieee"}
    cfg = kind_logits_config(logits_config(dt), kind, vocab_map, value_hidden, value_weight, base_hidden, base_weight)
    launch_logits(cfg, value_hidden, value_weight, base_hidden, base_weight, base_logits, vocab_map, alpha_tensor,
                  out, out, out, out, out, out, R=M, Vb=Vb, Vval=Vb if vocab_map is not None else Vv, Vv=Vv, Vg=0,
                  ld_out=out.stride(0), alpha_scalar=alpha_scalar, fill=fill, smooth_self=0.0, smooth_all=0.0,
                  inv_scale=1.0, mode=3,
                  v_prec=prec.get(dt, "tf32"),
                  b_prec=prec.get(base_hidden.dtype if base_hidden is not None else dt, "tf32"))


def _launch_cublas(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                   alpha_scalar: float, fill: float, out: torch.Tensor) -> None:
    """The head as GEMMs into ``out [M, Vb]`` (float32 accumulation, one rounding to ``out``'s dtype per GEMM):

        out  = (alpha * X_v) @ W^T  (W = value_weight[:Vb], or its rows gathered through the map, zero rows
                                     for unmapped ids; added to a copy of base_logits, or to base_logits
                                     itself when out is it)
        out[:, Vv:] += alpha * fill (identity map: the base ids beyond the value vocabulary)
        out += alpha * fill * unmapped  (a map: its unmapped ids, one rank-1 update; none for fill 0)
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
        xs, a = value_hidden * alpha_tensor[:, None].to(dt), 1.0
    else:
        xs, a = value_hidden, alpha_scalar
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
            add_fill(tail, None, fill, alpha_tensor, alpha_scalar)
    else:
        # Clamped gather: no entry, whatever its value, addresses outside the head; invalid rows are zeroed.
        w, _, unmapped = gathered_head(value_weight, vocab_map)
        addmm_into(out, xs, w.T, beta=beta_v, alpha=a)
        add_fill(out, unmapped, fill, alpha_tensor, alpha_scalar)
    if base_hidden is not None:
        addmm_into(out, base_hidden, base_weight.T, beta=1.0)


def _launch_packed(value_hidden, base_hidden, base_weight, wcat, alpha_tensor, alpha_scalar: float, fill: float,
                   out: torch.Tensor) -> None:
    """The head of packed weights (``packed_heads``) as one GEMM: ``out[:, :V] = [X_b | alpha X_v] @ wcat^T``
    with ``wcat [V, Hb + Hv]``; base ids past the value vocabulary get ``X_b @ W_b[V:]^T + alpha * fill``.
    ``[X_b | X_v]`` is read in place where the hidden states are adjacent columns of one tensor and alpha is 1."""
    Hb, cols, Vb = base_hidden.shape[1], wcat.shape[0], out.shape[1]
    x = adjacent_columns(base_hidden, value_hidden) if alpha_tensor is None and alpha_scalar == 1.0 else None
    if x is None:
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
        add_fill(tail, None, fill, alpha_tensor, alpha_scalar)


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
    # A compiled graph runs this op under the caller's autocast state: off here, the GEMMs in the inputs' dtypes.
    with no_autocast(out.device):
        launch_triton(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                      alpha_tensor, alpha_scalar, fill, out)


@_guided_logits_triton_op.register_fake
def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
      alpha_scalar, fill, out) -> None:
    return None

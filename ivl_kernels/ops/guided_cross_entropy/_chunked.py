"""The fast loss path (``backend="triton"``): row chunks, the matrix work in cuBLAS, the row work in Triton.

For each chunk of ``r`` rows (``r`` sized so the chunk's logits stay within ``CHUNK_BYTES``):

1. logits GEMMs: ``buf = X_v @ W_cols^T`` (value head; ``W_cols`` = ``value_weight``, or its rows gathered
   through the map, so value column ``b`` is aligned with base column ``b``) and the base head
   ``X_b @ W_b^T`` when the base comes as hidden states. Identity map, base hidden states and no L1 term: the
   value GEMM accumulates into the base logits (``addmm``, beta = 1), one buffer instead of two.
2. ``_ce_rows_kernel`` (one program per row): log-sum-exp, target logit, smoothing and L1 sums, then the
   value-logit gradient ``G`` written over ``buf`` (the second read of each row mostly hits L2).
3. gradient GEMMs: ``dX[rows] = G @ W_cols``, ``dW_cols += G^T @ X_v`` accumulated in float32 (cuBLAS with a
   float32 output for half inputs). A non-identity map folds ``dW_cols`` into ``d value_weight`` once, at the end
   (``index_put_`` with accumulation: deterministic under ``torch.use_deterministic_algorithms``).

No atomics anywhere: the result is bit-reproducible. The forward computes the gradients in the same pass when
the weights of the rows are known then (``reduction`` "mean"/"sum", no process group): nothing is recomputed.
Otherwise (``"none"``, a process group whose log-sum-exp must be all-reduced first) the forward gathers the
statistics and the backward runs the chunks again with the final log-sum-exp.

Extra memory: one chunk of logits (``CHUNK_BYTES``, 1.25 GiB on a GPU), the float32 ``dW`` accumulator and, with
a map, the gathered value head; never ``[N, V]``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..._triton import interpreter_enabled, triton
from .._amp import no_autocast
from .._gemm import addmm_into, gemm_kind, measured_kind
from .._measured import rtol_for, tensors_agree
from .._tile_launch import tma_takes, wide_applies
from ..packed_heads import packed_view
from ._kernels import _ce_rows_kernel, _l1_rows_kernel
from ._tiles import tile_chunks, tiles_take

# Chunk of logits per pass: big enough for cuBLAS to run the GEMMs at full rate (4096 rows of the qwen heads),
# small enough to keep the loss's extra memory under 2 GiB with the float32 gradient accumulator.
CHUNK_BYTES = {"cuda": 1280 << 20, "cpu": 32 << 20}
# Rows per chunk are rounded down to this on a GPU (tile-friendly GEMM shapes).
ROW_ALIGN = 128

def chunk_rows(bytes_per_row: int, n: int, device: torch.device, fixed: int = 0) -> int:
    """Rows per chunk: the chunk's logits plus ``fixed`` bytes (a map's gathered head and second accumulator)
    within ``CHUNK_BYTES`` (never under a quarter of it). Meta tensors (the ahead-of-time compile test's stand-ins)
    are planned as on a GPU, so that the kernels it compiles are specialised as the GPU's launches are."""
    gpu = device.type in ("cuda", "meta")
    total = CHUNK_BYTES["cuda" if gpu else "cpu"]
    budget = max(total // 4, total - fixed)
    rows = max(1, budget // max(bytes_per_row, 1))
    if gpu and rows > ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return max(1, min(rows, n))


def _row_config(cols: int) -> dict:
    if interpreter_enabled():
        return dict(BLOCK=max(16, min(1024, triton.next_power_of_2(max(cols, 1)))), num_warps=4)
    return dict(BLOCK=2048, num_warps=8)


def chunked_loss(vh: torch.Tensor, vw: torch.Tensor, base_logits: Optional[torch.Tensor],
                 base_hidden: Optional[torch.Tensor], base_weight: Optional[torch.Tensor],
                 vocab_map: Optional[torch.Tensor], alpha_tensor: Optional[torch.Tensor], alpha_scalar: float,
                 fill: float, target_local: torch.Tensor, Vb: int, with_l1: bool, smooth_self: float,
                 smooth_all: float, l1_scale: float, *, want_stats: bool, lse: Optional[torch.Tensor] = None,
                 g: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None, need_dvh: bool = False,
                 need_dvw: bool = False, kind: Optional[str] = None) -> tuple:
    """``(stats [4, N] fp32 or None, d value_hidden [N, Hv] or None, d value_weight [Vv, Hv] or None)``.

    ``stats`` = (this shard's lse, target logit, sum_b z, sum_v |value logit|) per row, when ``want_stats``;
    otherwise ``lse [N]`` must be given. Gradients (input dtype, float32 accumulation) use the row weights
    ``g [N]`` (cross-entropy) and ``h [N]`` (L1; ``None``: ``g``), float32. ``kind``: the matrix kernels,
    ``"cublas"``, ``"tiles"``, ``"tma"``, ``"wide"`` or ``"hybrid"`` (``None``: ``IVL_KERNELS_GEMM``, and for
    ``auto`` the measured choice).
    """
    args = locals().copy()
    N, Hv = vh.shape
    Vv = vw.shape[0]
    dt, dev = vh.dtype, vh.device
    grads = need_dvh or need_dvw
    if h is None:
        h = g
    if alpha_tensor is not None and alpha_tensor.stride(0) != 1:
        alpha_tensor = alpha_tensor.contiguous()  # [N]: the row kernel reads alpha[n] at unit stride
    identity = vocab_map is None
    v_min = min(Vb, Vv)
    combined = identity and base_hidden is not None and not with_l1 and v_min > 0
    kind = kind or gemm_kind()
    if kind != "cublas" and tiles_take(with_l1, vh, vw, base_hidden, base_weight):
        kind = _measured_kind(args) if kind == "auto" else kind
    else:
        kind = "cublas"
    tiles = kind != "cublas"
    if identity:
        w_cols, v_val = vw, (v_min if combined else Vv)
    elif tiles:
        w_cols, v_val = vw, Vb  # the tile kernels read the value head through the map: nothing gathered
    else:
        # Value rows gathered into base-column order: the value GEMM's column b is value row map[b]. Clamped, so
        # an entry changed after its range check cannot address outside the head (the kernel drops it).
        w_cols, v_val = vw.index_select(0, vocab_map.long().clamp(0, max(Vv - 1, 0))), Vb
    sep_l1 = with_l1 and not identity
    v_cols = Vb if combined else max(Vb, v_val)
    esize = vh.element_size()
    per_row = esize * ((Vb if base_hidden is not None else 0) + (0 if combined else v_val) + (Vv if sep_l1 else 0))
    fixed = 0 if identity else (0 if tiles else w_cols.numel() * esize) + (Vv * Hv * 4 if need_dvw else 0)
    rows = chunk_rows(per_row, N, dev, fixed)

    stats = torch.zeros((4, N), dtype=torch.float32, device=dev) if want_stats else None
    if stats is not None:
        stats[0].fill_(float("-inf"))
    dvh = torch.zeros((N, Hv), dtype=dt, device=dev) if need_dvh else None
    acc = torch.zeros((Vb if tiles and not identity else w_cols.shape[0], Hv), dtype=torch.float32,
                      device=dev) if need_dvw else None
    acc_v = acc if identity else (torch.zeros((Vv, Hv), dtype=torch.float32, device=dev) if need_dvw else None)
    scale = 1.0
    if grads and dt == torch.float16 and N > 0 and dev.type != "meta":
        # float16 gradients of a mean over many rows (g ~ 1/N) would sink into subnormals: G is stored divided
        # by the largest row weight and the GEMM results multiplied back.
        top = torch.maximum(g.abs().max(), h.abs().max() * l1_scale).item()
        scale = top if top > 0 else 1.0
    if N == 0 or (v_cols == 0 and not sep_l1):
        return stats, dvh, (acc_v.to(vw.dtype) if need_dvw else None)

    def finish(dvh_scaled: bool) -> tuple:
        if need_dvh and scale != 1.0 and not dvh_scaled:
            dvh.mul_(scale)
        if need_dvw and not identity and Vv > 0:
            # Rows of unmapped columns are exactly 0 (the kernels wrote G = 0 there): clamping their index adds 0.
            acc_v.index_put_((vocab_map.long().clamp(0, Vv - 1),), acc, accumulate=True)
        return stats, dvh, (acc_v.to(vw.dtype) if need_dvw else None)

    if tiles:
        tile_chunks(vh, vw, Vv if identity else Vb, base_logits, base_hidden, base_weight,
                    vocab_map, alpha_tensor, alpha_scalar, fill, target_local, Vb, Vv, smooth_self, smooth_all,
                    stats=stats, lse=lse, g=g, dvh=dvh, acc=acc, scale=scale,
                    chunk_rows=lambda per_row: chunk_rows(per_row, N, dev, fixed), kind=kind)
        return finish(dvh_scaled=True)

    dummy = target_local
    cfg = _row_config(v_cols)
    # Packed heads (ops/packed_heads.py) in the combined case: one GEMM per chunk instead of a GEMM plus a second
    # one that reads the chunk back.
    wcat = packed_view(base_weight, vw, v_min) if combined and base_hidden.dtype == dt else None
    Hb = base_hidden.shape[1] if base_hidden is not None else 0
    def one_chunk(r0: int, r1: int) -> None:
        # A function so that this chunk's logits, and every view of them, are freed when it returns, before the
        # next chunk's GEMM allocates its own: one chunk alive at a time, not two.
        xv = vh[r0:r1]
        base_arg = base_logits[r0:r1] if base_logits is not None else None
        if combined and wcat is not None:
            # Packed heads: one GEMM over [X_b | alpha X_v] writes the guided logits (the chunk is written once).
            buf = torch.empty((r1 - r0, Vb), dtype=dt, device=dev)
            x = torch.empty((r1 - r0, Hb + Hv), dtype=dt, device=dev)
            x[:, :Hb].copy_(base_hidden[r0:r1])
            torch.mul(xv, alpha_tensor[r0:r1, None].to(dt) if alpha_tensor is not None else alpha_scalar,
                      out=x[:, Hb:])
            torch.mm(x, wcat.T, out=buf[:, :v_min])
            if v_min < Vb:
                torch.mm(base_hidden[r0:r1], base_weight[v_min:].T, out=buf[:, v_min:])
        elif combined:
            # The base GEMM writes the chunk, the value GEMM adds into its first v_min columns (beta = 1).
            buf = torch.mm(base_hidden[r0:r1], base_weight.T)
            xs = xv * alpha_tensor[r0:r1, None].to(dt) if alpha_tensor is not None else xv
            addmm_into(buf[:, :v_min], xs, vw[:v_min].T, alpha=1.0 if alpha_tensor is not None else alpha_scalar)
        else:
            if base_hidden is not None:
                base_arg = torch.mm(base_hidden[r0:r1], base_weight.T)
            buf = torch.mm(xv, w_cols.T)
        if v_cols > 0:
            _ce_rows_kernel[(r1 - r0,)](
                buf, base_arg if base_arg is not None else dummy, vocab_map if vocab_map is not None else dummy,
                alpha_tensor[r0:r1] if alpha_tensor is not None else dummy, target_local[r0:r1],
                g[r0:r1] if grads else dummy, h[r0:r1] if grads else dummy,
                lse[r0:r1] if not want_stats else dummy, stats[:, r0:r1] if want_stats else dummy,
                Vb, v_val, Vv, (Vv if with_l1 and identity else 0), v_cols, buf.stride(0),
                base_arg.stride(0) if base_arg is not None else 0, base_arg.stride(1) if base_arg is not None else 0,
                vocab_map.stride(0) if vocab_map is not None else 0, N,
                alpha_scalar, fill, smooth_self, smooth_all, l1_scale, 1.0 / scale,
                HAS_BASE=base_arg is not None, COMBINED=combined, HAS_MAP=vocab_map is not None,
                ALPHA_IS_TENSOR=alpha_tensor is not None, WITH_L1=with_l1 and identity, SMOOTH=smooth_all != 0.0,
                STATS=want_stats, GRAD=grads, **cfg)
        if grads:
            G, w_g = buf[:, :v_val], w_cols[:v_val]
            if need_dvh:
                torch.mm(G, w_g, out=dvh[r0:r1])
            if need_dvw:
                addmm_into(acc[:v_val], G.T, xv, alpha=scale)
        if sep_l1:
            lv = torch.mm(xv, vw.T)
            _l1_rows_kernel[(r1 - r0,)](lv, h[r0:r1] if grads else dummy, stats[:, r0:r1] if want_stats else dummy,
                                        Vv, lv.stride(0), N, l1_scale, 1.0 / scale, STATS=want_stats, GRAD=grads,
                                        **_row_config(Vv))
            if grads:
                if need_dvh:
                    dvh[r0:r1].addmm_(lv, vw)
                if need_dvw:
                    addmm_into(acc_v, lv.T, xv, alpha=scale)

    for r0 in range(0, N, rows):
        one_chunk(r0, min(N, r0 + rows))
    return finish(dvh_scaled=False)


# ``auto`` times the loss's kinds on at most this many rows of a call (about one chunk of the qwen heads).
LOSS_MEASURE_ROWS = 4096


def _measured_kind(args: dict) -> str:
    """``auto``'s kind for this ``chunked_loss`` call (``_gemm.measured_kind``): cuBLAS, the tiles and, where the TMA
    kernel can take the call, ``tma`` (and ``wide`` where it applies, ``_tile_launch.wide_applies``; ``hybrid``
    where the call computes the gradients in one pass) run on the
    call's first ``LOSS_MEASURE_ROWS`` rows (their own scratch results; every output compared with cuBLAS's),
    before this call allocates anything, so the measurement adds no more than one more result of those rows to the
    call's peak memory."""
    vh, base_hidden, vocab_map = args["vh"], args["base_hidden"], args["vocab_map"]
    N = vh.shape[0]
    r = min(N, LOSS_MEASURE_ROWS)
    rows = {"vh", "base_logits", "base_hidden", "alpha_tensor", "target_local", "lse", "g", "h"}
    sub = {k: (v[:r] if k in rows and v is not None else v) for k, v in args.items()}
    key = ("loss", triton.next_power_of_2(r), vh.dtype, tuple(args["vw"].shape), args["Vb"],
           base_hidden.shape[1] if base_hidden is not None else (-1 if args["base_logits"] is not None else 0),
           vocab_map is not None, args["alpha_tensor"] is not None, args["smooth_all"] != 0.0, args["want_stats"],
           args["need_dvh"], args["need_dvw"])
    rtol = rtol_for(vh.dtype)
    kinds = ["cublas", "tiles"]
    if tma_takes(vocab_map, vh, args["vw"], base_hidden, args["base_weight"]):
        kinds.append("tma")
        if wide_applies(vh.dtype, True, args["base_logits"] is not None):
            kinds.append("wide")
        if args["lse"] is None and (args["need_dvh"] or args["need_dvw"]):
            # The one-pass gradients with cuBLAS products (elsewhere the tile path's products are cuBLAS already).
            kinds.append("hybrid")
    candidates = {kind: functools.partial(chunked_loss, **{**sub, "kind": kind}) for kind in kinds}
    return measured_kind(vh.device, key, candidates,
                         agree=lambda x, y: all(tensors_agree(a, b, rtol) for a, b in zip(x, y)))


def launch_fwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
               alpha_scalar: float, fill: float, target_local: torch.Tensor, Vb: int, with_l1: bool) -> torch.Tensor:
    """Forward statistics ``[4, N]`` fp32: this shard's lse, target logit, sum_b z, sum_v |value logit|."""
    return chunked_loss(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                        alpha_scalar, fill, target_local, Vb, with_l1, 1.0, 0.0, 0.0, want_stats=True)[0]


def launch_bwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
               alpha_scalar: float, fill: float, target_local: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
               Vb: int, smooth_self: float, smooth_all: float, l1_scale: float,
               g_l1: Optional[torch.Tensor] = None) -> tuple:
    """``(d value_hidden [N, Hv], d value_weight [Vv, Hv])`` from the final ``lse``, in the input dtype.

    ``g [N]`` fp32: each row's cross-entropy weight; ``g_l1 [N]`` fp32: each row's L1 weight (``None``: ``g``).
    """
    _, dvh, dvw = chunked_loss(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                               alpha_tensor, alpha_scalar, fill, target_local, Vb, l1_scale != 0.0, smooth_self,
                               smooth_all, l1_scale, want_stats=False, lse=lse, g=g, h=g_l1, need_dvh=True,
                               need_dvw=True)
    return dvh, dvw


@torch.library.custom_op("ivl_kernels::guided_ce_chunked", mutates_args=())
def _guided_ce_chunked_op(value_hidden: torch.Tensor, value_weight: torch.Tensor,
                          base_logits: Optional[torch.Tensor], base_hidden: Optional[torch.Tensor],
                          base_weight: Optional[torch.Tensor], vocab_map: Optional[torch.Tensor],
                          alpha_tensor: Optional[torch.Tensor], alpha_scalar: float, fill: float,
                          target_local: torch.Tensor, lse: Optional[torch.Tensor], g: Optional[torch.Tensor],
                          h: Optional[torch.Tensor], Vb: int, with_l1: bool, smooth_self: float, smooth_all: float,
                          l1_scale: float, need_dvh: bool, need_dvw: bool,
                          scalars: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(stats [4, N] or [0], d value_hidden [N, Hv] or [0], d value_weight [Vv, Hv] or [0])``: the statistics
    when ``lse`` is None, the gradients that are asked for (row weights ``g``, ``h``).

    ``scalars``: ``None``, or a float64 CPU ``[4]`` tensor (``fill, smooth_self, smooth_all, l1_scale``) that
    replaces those four float arguments: the public function passes it while torch.compile traces
    (``_traced.host_scalars``), so that a float that changes between calls is a graph input, not a value the graph
    is specialised on (a ``float`` argument is: one compile per value)."""
    from ... import _backends
    from ..._validate import check_vocab_map

    _backends.require_triton(value_hidden.device)
    if scalars is not None:
        fill, smooth_self, smooth_all, l1_scale = scalars.tolist()  # a CPU tensor: no device synchronisation
    if vocab_map is not None:
        # Under torch.compile the public function cannot read map values; check them here (cached per map).
        check_vocab_map(vocab_map, vocab_map.shape[0], value_weight.shape[0], value_hidden.device)
    # A compiled graph runs this op under the caller's autocast state: off here, the GEMMs in the inputs' dtypes.
    with no_autocast(value_hidden.device):
        stats, dvh, dvw = chunked_loss(value_hidden, value_weight, base_logits, base_hidden, base_weight,
                                       vocab_map, alpha_tensor, alpha_scalar, fill, target_local, Vb, with_l1,
                                       smooth_self, smooth_all, l1_scale, want_stats=lse is None, lse=lse, g=g,
                                       h=h, need_dvh=need_dvh, need_dvw=need_dvw)
    def empty(dtype):  # a fresh tensor each: custom-op outputs must not alias one another
        return value_hidden.new_empty((0,), dtype=dtype)

    return (stats if stats is not None else empty(torch.float32), dvh if dvh is not None else empty(None),
            dvw if dvw is not None else empty(None))


@_guided_ce_chunked_op.register_fake
def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, alpha_scalar, fill,
      target_local, lse, g, h, Vb, with_l1, smooth_self, smooth_all, l1_scale, need_dvh, need_dvw, scalars=None):
    N = value_hidden.shape[0]
    stats = value_hidden.new_empty((4, N) if lse is None else (0,), dtype=torch.float32)
    dvh = value_hidden.new_empty(value_hidden.shape if need_dvh else (0,))
    dvw = value_weight.new_empty(value_weight.shape if need_dvw else (0,))
    return stats, dvh, dvw

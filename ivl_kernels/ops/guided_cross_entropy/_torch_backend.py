"""The loss's torch backend: plain PyTorch chunked over rows (the CPU path and the float64 path).

As the Triton backend's chunks (``_chunked.py``), it computes the gradients in the forward pass when the row
weights are known then (``reduction`` "mean"/"sum", no process group): one logits GEMM per chunk of rows, then
``dX`` and ``dW`` GEMMs, nothing recomputed. Otherwise the forward gathers per-row statistics and the backward
recomputes each chunk's logits with the final log-sum-exp. Per chunk of ``r`` rows:

- Without the L1 term the value head is read in base-column order, ``W_cols`` = ``value_weight[:min(Vb, Vv)]``
  (identity) or ``value_weight[map]`` with the rows of unmapped ids zeroed (gathered once per call):
  ``z = alpha * (X_v W_cols^T + fill_cols) + base``, the base head's GEMM written first and the value GEMM
  accumulated into it when both are in the compute dtype. The softmax and then the gradient ``G`` are formed in
  place over ``z``; ``dX = G W_cols``, ``dW_cols += G^T X_v`` (folded into ``d value_weight`` through the map once,
  at the end, with an accumulating ``index_put_``: deterministic).
- With the L1 term the value logits over the whole value vocabulary are needed (their ``|.|`` and sign): they
  are computed once, ``z`` is gathered from them, and the gradient of both terms is formed over them.

Extra memory: ``z`` and, with L1, the value logits (``r * V`` elements each, about ``CHUNK_ELEMS`` of the
device), a base GEMM's result when it cannot be accumulated in place, the ``[Vv, Hv]`` accumulator and, with a
map, the gathered head and its ``[Vb, Hv]`` accumulator: never ``[N, V]``. The tests' oracle is ``ivl_kernels.reference``, written
independently of this module.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._columns import add_fill, fill_columns, gather_columns, gathered_head
from .._gemm import addmm_into
from .._traced import traced_scalar

# Logits per [rows, V] buffer of a chunk of rows. CPU: 16 MiB in fp32, so a chunk's passes run near the caches
# (2**23 measured no faster on the 2-core CI machine). GPU (the fallback without Triton): 512 MiB in fp32, ~880 rows
# of the qwen heads, enough for cuBLAS to run at its rate with the loss's extra memory (the float32 chunk, its
# half-precision temporaries, the float32 accumulators) under 2 GiB; 2**22 would be 27 rows and launch-bound.
CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 27}


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` (``out`` may have another dtype: the product is then computed in ``a``'s and cast).

    Eagerly into ``out`` (a strided view, such as the first ``Vv`` columns of a chunk's logits: no temporary);
    while torch.compile traces, as a product copied in, since dynamo does not trace ``out=`` into a
    non-contiguous tensor (the compiler may then write the product in place)."""
    if out.dtype == a.dtype and not torch.compiler.is_compiling():
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def row_chunks(N, rows: int) -> list:
    """``[(r0, r1), ...]``: the chunks of at most ``rows`` rows that cover ``[0, N)``.

    Eagerly ``[0, rows), [rows, 2 rows), ...``. While torch.compile traces, ``N`` may be symbolic (dynamic shapes,
    from the second size on; traced code cannot tell), and ``range(0, N, rows)`` cannot take it: the loop is
    unrolled into the graph, and its length specialised the graph on ``N`` itself (one compile per batch shape).
    There the rows are split evenly over ``k`` chunks, ``k`` the smallest power of two with ``k * rows >= N``:
    chunk ``i`` is ``[i N // k, (i + 1) N // k)``, at most ``ceil(N / k) <= rows`` rows (never more memory than
    eagerly), and the graph is guarded on ``N``'s range (``k rows / 2 < N <= k rows``) only. One graph serves every
    ``N <= rows`` (``CHUNK_ELEMS // V`` rows: one chunk, as eagerly); beyond that one graph per doubling of ``N``,
    with fewer than twice the chunks that eager runs. Each row's results do not depend on the chunking; only
    ``d value_weight``'s sum over the chunks is added in another order than eagerly."""
    if not torch.compiler.is_compiling():
        return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]
    k = 1
    while k * rows < N:
        k *= 2
    return [((i * N) // k, ((i + 1) * N) // k) for i in range(k)]


def _scale_add_base(z: torch.Tensor, a_c, base_logits, base_hidden, base_weight, r0: int, r1: int) -> None:
    """``z = a_c * z + base`` in place, for rows ``[r0, r1)`` (``a_c`` a float or an ``[r, 1]`` column)."""
    if isinstance(a_c, torch.Tensor) or a_c != 1.0:
        z.mul_(a_c)
    if base_logits is not None:
        z.add_(base_logits[r0:r1])
    elif base_hidden is not None:
        z.add_(torch.mm(base_hidden[r0:r1], base_weight.T))


def torch_chunks(vh: torch.Tensor, vw: torch.Tensor, base_logits: Optional[torch.Tensor],
                 base_hidden: Optional[torch.Tensor], base_weight: Optional[torch.Tensor],
                 vocab_map: Optional[torch.Tensor], alpha_tensor: Optional[torch.Tensor], alpha_scalar: float,
                 fill: float, target_local: torch.Tensor, Vb: int, with_l1: bool, smooth_self: float,
                 smooth_all: float, l1_scale: float, compute: torch.dtype, *, want_stats: bool,
                 want_sum: bool = True, lse: Optional[torch.Tensor] = None, g: Optional[torch.Tensor] = None,
                 h: Optional[torch.Tensor] = None, need_dvh: bool = False, need_dvw: bool = False) -> tuple:
    """``(stats [4, N] or None, d value_hidden [N, Hv] or None, d value_weight [Vv, Hv] or None)``.

    Same contract as ``_chunked.chunked_loss``, in the ``compute`` dtype: ``stats`` = (lse, target logit, sum_b z
    (0 unless ``want_sum``), sum_v |value logit|) per row when ``want_stats``, else ``lse [N]`` must be given;
    gradients (input dtype) for the row weights ``g [N]`` (cross-entropy) and ``h [N]`` (L1; ``None``: ``g``).
    """
    N, Hv = vh.shape
    Vv = vw.shape[0]
    dt, dev = vh.dtype, vh.device
    grads = need_dvh or need_dvw
    h = g if h is None else h
    stats = None
    if want_stats:
        stats = torch.zeros((4, N), dtype=compute, device=dev)
        stats[0].fill_(float("-inf"))
    dvh = torch.zeros((N, Hv), dtype=dt, device=dev) if need_dvh else None
    acc_v = torch.zeros((Vv, Hv), dtype=compute, device=dev) if need_dvw else None

    def result():
        return stats, dvh, (acc_v.to(vw.dtype) if need_dvw else None)

    if N == 0 or (Vb == 0 and not with_l1):
        return result()
    scale = 1.0
    if grads and dt == torch.float16:
        # float16 gradients of a mean over many rows (g ~ 1/N) would sink into subnormals: G is formed divided by
        # the largest row weight and the GEMM results multiplied back (as the Triton backend does).
        if torch.compiler.is_compiling():
            # No host read while tracing (.item() breaks the graph): the scale stays a 0-d tensor, and d value_weight
            # is multiplied back once at the end rather than by each chunk's GEMM (whose alpha= takes a number).
            top = torch.maximum(g.abs().max(), h.abs().max() * l1_scale).to(compute)
            scale = torch.where(top > 0, top, torch.ones_like(top))
        else:
            top = max(g.abs().max().item(), h.abs().max().item() * l1_scale)
            scale = top if top > 0 else 1.0
    traced_scale = isinstance(scale, torch.Tensor)
    scaled = traced_scale or scale != 1.0

    v_min = min(Vb, Vv)
    identity_view = vocab_map is None and Vb <= Vv
    # Without L1 the value head is read in base-column order (W[:v_min], or W[map] with unmapped rows zeroed);
    # with L1 the value logits over all of Vv are computed and gathered through cols.
    if with_l1 or vocab_map is None:
        cols, unmapped = (None, None) if identity_view else gather_columns(vocab_map, Vb, Vv, dev)
        w_cols, v_val = vw[:v_min], v_min
    else:
        (w_cols, cols, unmapped), v_val = gathered_head(vw, vocab_map), Vb
    if not with_l1:
        acc_cols = None
        if need_dvw:
            acc_cols = acc_v[:v_min] if vocab_map is None else torch.zeros((Vb, Hv), dtype=compute, device=dev)
        fill_cols = fill_columns(unmapped, fill, compute) if (unmapped is not None and fill != 0.0) else None
        base_in_place = (base_hidden is not None and dt == compute and base_hidden.dtype == compute
                         and base_weight.dtype == compute)
    rows = max(1, CHUNK_ELEMS.get(dev.type, CHUNK_ELEMS["cpu"]) // max(Vb, Vv, 1))
    for r0, r1 in row_chunks(N, rows):
        r = r1 - r0
        xv = vh[r0:r1]
        a_c = alpha_tensor[r0:r1].to(compute).unsqueeze(1) if alpha_tensor is not None else alpha_scalar
        if with_l1:
            vl = torch.mm(xv, vw.T).to(compute)
            if want_stats:
                stats[3, r0:r1] = torch.linalg.vector_norm(vl, 1, dim=1)  # sum |.| without an [r, Vv] temporary
            z = vl[:, :Vb].clone() if identity_view else vl.index_select(1, cols)
            if unmapped is not None:
                z.masked_fill_(unmapped, traced_scalar(fill, compute, dev))
            _scale_add_base(z, a_c, base_logits, base_hidden, base_weight, r0, r1)
        elif base_in_place:
            z = torch.mm(base_hidden[r0:r1], base_weight.T)
            if v_val:
                if alpha_tensor is not None:
                    z[:, :v_val].addmm_(xv * a_c, w_cols.T)
                else:
                    z[:, :v_val].addmm_(xv, w_cols.T, alpha=alpha_scalar)
            if unmapped is not None:
                add_fill(z, unmapped, fill, a_c.squeeze(1) if alpha_tensor is not None else None, alpha_scalar)
        else:
            z = torch.empty((r, Vb), dtype=compute, device=dev)
            if v_val:
                _mm_into(z[:, :v_val], xv, w_cols.T)
            z[:, v_val:].zero_()
            if fill_cols is not None:
                z.add_(fill_cols)
            _scale_add_base(z, a_c, base_logits, base_hidden, base_weight, r0, r1)

        if Vb > 0:
            t = target_local[r0:r1]
            has_t = (t >= 0) & (t < Vb)
            tc = t.clamp(0, Vb - 1).long()
            if want_stats:
                stats[1, r0:r1] = torch.where(has_t, z.gather(1, tc.unsqueeze(1)).squeeze(1), 0.0)
                if want_sum:
                    stats[2, r0:r1] = z.sum(1)
                # The softmax is formed in place: z - max, exp, then 1 / sum as a row factor.
                m = z.amax(1, keepdim=True)
                m.masked_fill_(~torch.isfinite(m), 0.0)  # a row of -inf logits: exp gives 0, lse -inf
                e = z.sub_(m).exp_()
                s = e.sum(1, keepdim=True)
                stats[0, r0:r1] = (m + s.log()).squeeze(1)
                inv = torch.where(s > 0, s.reciprocal(), 0.0)
            elif grads:
                lse_c = lse[r0:r1].to(compute).unsqueeze(1)
                e = z.sub_(lse_c.masked_fill(~torch.isfinite(lse_c), 0.0)).exp_()
                inv = 1.0
        if not grads:
            continue
        if Vb > 0:
            gw = g[r0:r1].to(compute).unsqueeze(1) * a_c
            if scaled:
                gw = gw / scale
            # G = g * alpha * (p - (1 - eps) * onehot(t) - eps / Vb), in place over the exponentials.
            dz = e.mul_(gw * inv)
            if smooth_all:
                dz.sub_(gw * smooth_all)
            # One target per row: an indexed subtract writes distinct elements, deterministic on every device
            # (scatter_add_ on a 2-D CUDA tensor is not, under torch.use_deterministic_algorithms).
            dz[torch.arange(r, device=dev), tc] -= torch.where(has_t, gw.squeeze(1) * smooth_self, 0.0)
        if with_l1:
            dvl = vl.sign_().mul_(h[r0:r1].to(compute).unsqueeze(1) * (l1_scale / scale))
            if Vb > 0:
                if identity_view:
                    dvl[:, :Vb].add_(dz)
                else:
                    if unmapped is not None:
                        dz.masked_fill_(unmapped, 0.0)
                    dvl.index_add_(1, cols, dz)
            dvl, w_g, acc_g = dvl.to(dt), vw, acc_v
        else:
            dvl, w_g, acc_g = dz[:, :v_val].to(dt), w_cols, acc_cols
        if need_dvh:
            _mm_into(dvh[r0:r1], dvl, w_g)
        if need_dvw:
            addmm_into(acc_g, dvl.T, xv, alpha=1.0 if traced_scale else scale)  # in place: no [Vv, Hv] temporary
    if need_dvh and scaled:
        dvh.mul_(scale)
    if need_dvw and not with_l1 and vocab_map is not None:
        # Rows of unmapped ids hold their columns' gradient for the zeroed head rows: dropped, not folded.
        acc_cols.masked_fill_(unmapped.unsqueeze(1), 0.0)
        acc_v.index_put_((cols,), acc_cols, accumulate=True)
    if need_dvw and traced_scale:
        acc_v.mul_(scale)
    return result()


def torch_fwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
              alpha_scalar, fill, target_local, Vb, with_l1, compute) -> torch.Tensor:
    """``[4, N]`` (lse, target logit, sum z, L1 sum) in ``compute`` dtype (``launch_fwd``'s contract)."""
    return torch_chunks(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                        alpha_scalar, fill, target_local, Vb, with_l1, 1.0, 0.0, 0.0, compute, want_stats=True)[0]


def torch_bwd(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
              alpha_scalar, fill, target_local, lse, g, Vb, smooth_self, smooth_all, l1_scale, compute,
              need_dvh=True, need_dvw=True, g_l1=None) -> tuple:
    """``(d value_hidden, d value_weight)`` from the final ``lse`` (``launch_bwd``'s contract), logits recomputed."""
    return torch_chunks(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                        alpha_scalar, fill, target_local, Vb, l1_scale != 0.0, smooth_self, smooth_all, l1_scale,
                        compute, want_stats=False, lse=lse, g=g, h=g_l1, need_dvh=need_dvh, need_dvw=need_dvw)[1:]

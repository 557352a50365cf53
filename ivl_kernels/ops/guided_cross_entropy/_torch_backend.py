"""The loss's torch backend: plain PyTorch chunked over rows, logits recomputed in the backward pass.

The CPU path (``backend="auto"`` on CPU tensors) and the float64 path. Extra memory: about six ``[rows, V]``
temporaries of ``CHUNK_ELEMS`` logits each, whatever N is. The tests' oracle is ``ivl_kernels.reference``,
written independently of this module.
"""

from __future__ import annotations

import torch

from .._columns import gather_columns

# Rows are processed in chunks of about this many logits per [rows, V] temporary (16 MiB in fp32).
CHUNK_ELEMS = 1 << 22


def loop_shape(value_weight, vocab_map, base_logits, base_weight, Vb_hint: int) -> tuple:
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
    Vb, Vv, _, _ = loop_shape(value_weight, vocab_map, base_logits, base_weight, Vb_hint)
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


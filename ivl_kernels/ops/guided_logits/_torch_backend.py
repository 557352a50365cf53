"""The ``torch`` backend of ``fused_guided_logits`` (the CPU path): plain PyTorch, chunked over rows.

Traced by ``torch.compile`` like user code (no custom op around it): nothing here reads data pointers or storage,
and every write into ``out`` is an in-place method, so that an ``out`` aliasing ``base_logits`` stays correct
eagerly and under functionalization (``copy_`` of a tensor onto its own memory is a no-op)."""

from __future__ import annotations

import torch

from ..._validate import GuidedArgs
from .._columns import add_fill, gather_columns, gathered_head
from .._traced import traced_scalar

# Rows per chunk are chosen so one chunk of value logits holds about this many elements (128 MiB in fp32).
_CHUNK_ELEMS = 1 << 25


def guided_logits_torch(a: GuidedArgs, out: torch.Tensor) -> torch.Tensor:
    """The ``torch`` backend of ``fused_guided_logits``: writes ``[M, Vb]`` guided logits into ``out``.

    ``out`` in the compute dtype (float32, or float64 for float64 inputs): the base term is written into it
    first (copied, or ``X_b W_b^T`` by a GEMM into it), then the value term added once: with the identity map
    and operands in the compute dtype as a GEMM accumulated into ``out[:, :min(Vb, Vv)]`` (``alpha X_v W_v^T``;
    no ``[M, V]`` temporary); with a map and ``M >= Hv`` the same GEMM over the value head's rows gathered into
    base order (``W_v[map]``, unmapped rows zeroed and their columns given ``alpha * fill``: gathering
    ``Vb x Hv`` weights costs less than gathering ``M x Vb`` logits); with a map and fewer rows as the value
    logits of a chunk of rows gathered through the map.
    Otherwise (``out`` in half precision) value and base logits are summed in float32 per chunk, then rounded
    once to ``out``'s dtype. Matmuls run in the operands' dtype (fp32 accumulation inside for half types).
    Extra memory: one chunk of about ``2**25`` logits, whatever ``M`` is, or the gathered ``[Vb, Hv]`` head (no
    larger than ``out``). ``out`` may alias ``base_logits``.
    """
    compute = torch.float64 if a.value_hidden.dtype == torch.float64 or a.out_dtype == torch.float64 else torch.float32
    alpha_tensor = a.alpha if isinstance(a.alpha, torch.Tensor) else None
    alpha_scalar = 1.0 if alpha_tensor is not None else float(a.alpha)
    if out.dtype == compute and a.value_hidden.dtype == compute and (a.vocab_map is None
                                                                     or a.M >= a.value_hidden.shape[1]):
        _gemm_into(a, out, alpha_tensor, alpha_scalar, compute)
        return out
    cols, unmapped = gather_columns(a.vocab_map, a.Vb, a.Vv, a.device)
    rows = max(1, _CHUNK_ELEMS // max(a.Vv, a.Vb, 1))
    for r0 in range(0, a.M, rows):
        r1 = min(a.M, r0 + rows)
        value_logits = torch.matmul(a.value_hidden[r0:r1], a.value_weight.T)
        remapped = value_logits.index_select(1, cols).to(compute)
        if unmapped is not None:
            remapped.masked_fill_(unmapped, traced_scalar(a.fill, compute, a.device))
        alpha_col = alpha_tensor[r0:r1].to(compute).unsqueeze(1) if alpha_tensor is not None else None
        o = out[r0:r1]
        if out.dtype == compute:
            _base_into(a, o, r0, r1, compute)
            if alpha_col is not None:
                o.addcmul_(remapped, alpha_col)
            else:
                o.add_(remapped, alpha=alpha_scalar)
            continue
        # out in half precision: the sum in the compute dtype, one rounding to out's.
        remapped.mul_(alpha_col if alpha_col is not None else alpha_scalar)
        if a.base_logits is not None:
            remapped.add_(a.base_logits[r0:r1].to(compute))
        elif a.base_hidden is not None:
            remapped.add_(torch.matmul(a.base_hidden[r0:r1], a.base_weight.T).to(compute))
        o.copy_(remapped)
    return out


def _base_into(a: GuidedArgs, o: torch.Tensor, r0: int, r1: int, compute: torch.dtype) -> None:
    """Rows ``[r0, r1)`` of the base term into ``o`` (``out``'s rows, in the compute dtype); zeros without one."""
    if a.base_logits is not None:
        o.copy_(a.base_logits[r0:r1])  # a no-op where out is base_logits
    elif a.base_hidden is not None and a.base_hidden.dtype == compute:
        o.addmm_(a.base_hidden[r0:r1], a.base_weight.T, beta=0.0)  # beta 0: o's old values (NaN too) unread
    elif a.base_hidden is not None:
        o.copy_(torch.matmul(a.base_hidden[r0:r1], a.base_weight.T))
    else:
        o.zero_()


def _gemm_into(a: GuidedArgs, out: torch.Tensor, alpha_tensor, alpha_scalar: float, compute) -> None:
    """Value operands in the compute dtype: ``out = base``, then ``out[:, :V] += (alpha X_v) @ W_cols^T`` and
    ``alpha * fill`` added at the unmapped columns. Identity: ``W_cols = W_v[:V]``, ``V = min(Vb, Vv)``, the columns
    past ``Vv`` unmapped; a map: ``W_cols = W_v[map]`` (``V = Vb``) with the rows of unmapped ids zeroed."""
    _base_into(a, out, 0, a.M, compute)
    if a.vocab_map is None:
        v, unmapped = min(a.Vb, a.Vv), None
        w_cols = a.value_weight[:v]
    else:
        v = a.Vb
        w_cols, _, unmapped = gathered_head(a.value_weight, a.vocab_map)
    if alpha_tensor is not None:
        alpha_vec = alpha_tensor.to(compute)
        xs, scale = a.value_hidden * alpha_vec.unsqueeze(1), 1.0
    else:
        alpha_vec, xs, scale = None, a.value_hidden, alpha_scalar
    if v:
        out[:, :v].addmm_(xs, w_cols.T, alpha=scale)
    # Identity: the columns past Vv, one block; a map: its unmapped columns.
    add_fill(out[:, v:] if unmapped is None else out, unmapped, a.fill, alpha_vec, alpha_scalar)

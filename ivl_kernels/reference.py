"""Plain-PyTorch semantics of every op: the oracle of the tests and the ``torch`` backend (CPU path).

``guided_logits_naive`` is the formula written once, unchunked, for testing (evaluate it in float64 for an
oracle, or in the input dtype to measure what plain torch gets wrong in that dtype). ``guided_logits_torch``
is the ``torch`` backend: the same formula, chunked over rows so its extra memory stays bounded.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validate import GuidedArgs

# Rows per chunk are chosen so one chunk of value logits holds about this many elements (128 MiB in fp32).
_CHUNK_ELEMS = 1 << 25


def gather_columns(vocab_map: Optional[torch.Tensor], Vb: int, Vv: int, device) -> tuple:
    """``(cols [Vb] int64, unmapped [Vb] bool or None)``: the value column read by each base id.

    ``vocab_map=None`` is the identity: base id ``b`` reads value id ``b`` for ``b < Vv``; ids ``b >= Vv`` are
    unmapped. Unmapped ids read column 0 (any valid column) and are replaced by ``fill`` afterwards. Entries
    outside ``[-1, Vv)`` (which validation rejects, but which a map mutated after its check can hold) are
    unmapped too, as in every kernel: no index out of range is ever formed.
    """
    if vocab_map is None:
        cols = torch.arange(Vb, device=device)
        if Vb <= Vv:
            return cols, None
        unmapped = cols >= Vv
        return cols.masked_fill(unmapped, 0), unmapped
    vocab_map = vocab_map.long()
    unmapped = (vocab_map < 0) | (vocab_map >= Vv)
    return vocab_map.masked_fill(unmapped, 0), unmapped


def guided_logits_naive(value_hidden, value_weight, *, base_logits=None, base_hidden=None, base_weight=None,
                        vocab_map=None, alpha=1.0, fill=0.0, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``out[m, b] = base[m, b] + alpha[m] * (value_hidden[m] . value_weight[map[b]])`` (or ``* fill`` where
    ``map[b] == -1``), evaluated unchunked in ``dtype`` (default: ``value_hidden.dtype``). Returns ``[M, Vb]``.

    Shapes: ``value_hidden [..., Hv]``, ``value_weight [Vv, Hv]``, ``base_logits [..., Vb]`` or
    ``base_hidden [..., Hb]`` + ``base_weight [Vb, Hb]`` (or no base), ``vocab_map [Vb]`` or ``None``,
    ``alpha`` a float or ``[M]``.
    """
    dtype = dtype or value_hidden.dtype
    vh = value_hidden.reshape(-1, value_hidden.shape[-1]).to(dtype)
    vw = value_weight.to(dtype)
    Vv = vw.shape[0]
    value_logits = vh @ vw.T
    if base_logits is not None:
        base = base_logits.reshape(-1, base_logits.shape[-1]).to(dtype)
    elif base_hidden is not None:
        base = base_hidden.reshape(-1, base_hidden.shape[-1]).to(dtype) @ base_weight.to(dtype).T
    else:
        base = None
    Vb = base.shape[1] if base is not None else (vocab_map.shape[0] if vocab_map is not None else Vv)
    cols, unmapped = gather_columns(vocab_map, Vb, Vv, vh.device)
    remapped = value_logits[:, cols]
    if unmapped is not None:
        remapped = remapped.masked_fill(unmapped, fill)
    if isinstance(alpha, torch.Tensor):
        scaled = alpha.reshape(-1, 1).to(dtype) * remapped
    else:
        scaled = alpha * remapped
    return scaled if base is None else base + scaled


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


def guided_cross_entropy_naive(value_hidden, value_weight, target, *, base_logits=None, base_hidden=None,
                               base_weight=None, vocab_map=None, alpha=1.0, fill=0.0, l1_coef=0.0,
                               l1_reduction="kept", ignore_index=-100, label_smoothing=0.0, reduction="mean",
                               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``fused_guided_cross_entropy`` written once, unchunked, with materialised ``[N, Vb]`` / ``[N, Vv]`` logits,
    evaluated in ``dtype`` (default ``value_hidden.dtype``); differentiable w.r.t. ``value_hidden`` and
    ``value_weight`` (the oracle of the tests, and the "naive" benchmark row).

    ``z = guided_logits_naive(...)``, ``ce_n = F.cross_entropy(z, target)[n]`` (label smoothing as torch; 0 for
    ignored rows), ``l1_n = l1_coef * sum_j |value_hidden[n] . value_weight[j]| / Vv``, ``K`` = number of kept
    rows, ``N`` = number of rows:

    - ``l1_reduction="kept"``: ``loss_n = ce_n + l1_n`` for kept rows, 0 for ignored rows; ``"mean"`` is
      ``sum_n loss_n / K`` (0 when ``K = 0``), ``"sum"`` is ``sum_n loss_n``, ``"none"`` is ``loss_n``.
    - ``l1_reduction="all"``: ``"mean"`` is ``sum_n ce_n / K + sum_n l1_n / N`` (each term 0 when its count is
      0), ``"sum"`` is ``sum_n (ce_n + l1_n)``, ``"none"`` is ``ce_n + l1_n`` (ignored rows carry their L1 term).

    ``"none"`` has the leading shape of ``value_hidden``.
    """
    import torch.nn.functional as F

    dtype = dtype or value_hidden.dtype
    z = guided_logits_naive(value_hidden, value_weight, base_logits=base_logits, base_hidden=base_hidden,
                            base_weight=base_weight, vocab_map=vocab_map, alpha=alpha, fill=fill, dtype=dtype)
    t = target.reshape(-1).long()
    loss = F.cross_entropy(z, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    kept = t != ignore_index
    n_kept = kept.sum().clamp(min=1).to(loss.dtype)
    if l1_coef:
        vh = value_hidden.reshape(-1, value_hidden.shape[-1]).to(dtype)
        vw = value_weight.to(dtype)
        l1 = (vh @ vw.T).abs().sum(-1) * (l1_coef / vw.shape[0])
        if l1_reduction == "all":
            ce = torch.where(kept, loss, torch.zeros_like(loss))
            if reduction == "none":
                return (ce + l1).view(value_hidden.shape[:-1])
            if reduction == "sum":
                return ce.sum() + l1.sum()
            return ce.sum() / n_kept + l1.sum() / max(l1.shape[0], 1)
        loss = loss + torch.where(kept, l1, torch.zeros_like(l1))
    if reduction == "none":
        return loss.view(value_hidden.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / n_kept

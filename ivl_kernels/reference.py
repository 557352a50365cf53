"""Plain-PyTorch semantics of every op, written once and unchunked: the oracle of the tests.

Evaluate a function in float64 for an oracle, or in the input dtype to measure what plain torch gets wrong in
that dtype. Nothing here is a backend: the ``torch`` backends live with their ops
(``ops/guided_logits/_torch_backend.py``, ``ops/guided_cross_entropy/_torch_backend.py``) and share no code with
this module, so a bug in one cannot hide in the comparison.
"""

from __future__ import annotations

from typing import Optional

import torch



def _remap(value_logits: torch.Tensor, vocab_map: Optional[torch.Tensor], Vb: int, fill: float) -> torch.Tensor:
    """``[M, Vb]``: column ``b`` is value column ``map[b]`` (identity when ``vocab_map`` is None), ``fill`` where
    ``b`` has no value column (``-1``, or outside ``[0, Vv)``)."""
    M, Vv = value_logits.shape
    src = torch.arange(Vb, device=value_logits.device) if vocab_map is None else vocab_map.to(torch.int64)
    has = (src >= 0) & (src < Vv)
    out = torch.full((M, Vb), fill, dtype=value_logits.dtype, device=value_logits.device)
    out[:, has] = value_logits[:, src[has]]
    return out


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
    remapped = _remap(value_logits, vocab_map, Vb, fill)
    if isinstance(alpha, torch.Tensor):
        scaled = alpha.reshape(-1, 1).to(dtype) * remapped
    else:
        scaled = alpha * remapped
    return scaled if base is None else base + scaled


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

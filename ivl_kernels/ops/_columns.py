"""Base id -> value column, as the torch backends and the GEMM paths read it (the tests' oracle in ``reference.py``
has its own)."""

from __future__ import annotations

from typing import Optional

import torch

from ._traced import traced_scalar


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


def gathered_head(value_weight: torch.Tensor, vocab_map: torch.Tensor) -> tuple:
    """``(w [Vb, Hv], cols [Vb] int64, unmapped [Vb] bool)``: the value head's rows in base-column order through
    the map (``w[b] = value_weight[map[b]]``; ``cols``, ``unmapped`` as ``gather_columns``), the rows of unmapped
    ids zero. A GEMM against ``w`` gives each base id its value logit and unmapped ids 0 (their fill is added
    apart); ``G @ w`` sends their columns no gradient. One gather: a ``[Vb, Hv]`` copy of the head."""
    cols, unmapped = gather_columns(vocab_map, vocab_map.shape[0], value_weight.shape[0], value_weight.device)
    return value_weight.index_select(0, cols).masked_fill_(unmapped.unsqueeze(1), 0), cols, unmapped


def fill_columns(unmapped: torch.Tensor, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """``[Vb]`` in ``dtype``: ``fill`` at the unmapped base ids, exactly 0 at the mapped ones, for an infinite
    ``fill`` too (``unmapped * fill`` would be ``0 * inf = NaN`` there, poisoning every mapped column: ``fill=-inf``
    is how a caller bans the unmapped tokens)."""
    return torch.zeros(unmapped.shape, dtype=dtype, device=unmapped.device).masked_fill_(
        unmapped, traced_scalar(fill, dtype, unmapped.device))


def add_fill(out: torch.Tensor, unmapped: Optional[torch.Tensor], fill: float, alpha_vec: Optional[torch.Tensor],
             alpha_scalar: float) -> None:
    """``out[:, b] += alpha * fill`` at the unmapped base ids ``b`` (``out [M, Vb]``, ``unmapped [Vb]`` bool,
    ``alpha_vec [M]`` per row or ``alpha_scalar``), after a GEMM against ``gathered_head`` gave them 0;
    ``unmapped=None``: every column of ``out`` (the identity map's ids past ``Vv``, passed as that slice).

    A map's ids by a rank-1 update over every column (``fill_columns``: ``fill`` at the unmapped ones, 0 at the
    mapped ones): selecting the unmapped columns would read the map's values on the host, a device sync that a
    CUDA-graph capture forbids and torch.compile cannot trace. Computed in float32 (float64 for a float64 ``out``),
    rounded once to ``out``'s dtype."""
    if fill == 0.0 or out.numel() == 0:
        return
    acc = torch.promote_types(out.dtype, torch.float32)
    if unmapped is None:
        if alpha_vec is not None and torch.compiler.is_compiling():
            out.add_(alpha_vec.to(acc).unsqueeze(1) * traced_scalar(fill, acc, out.device))  # alpha=fill specialises
        elif alpha_vec is not None:
            out.add_(alpha_vec.to(acc).unsqueeze(1), alpha=fill)
        else:
            out.add_(alpha_scalar * fill)
        return
    fill_cols = fill_columns(unmapped, fill, acc)
    if alpha_vec is not None:
        out.addcmul_(alpha_vec.to(acc).unsqueeze(1), fill_cols)
    else:
        out.add_(fill_cols, alpha=alpha_scalar)

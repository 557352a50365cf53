"""Base id -> value column, as the torch backends read it (the tests' oracle in ``reference.py`` has its own)."""

from __future__ import annotations

from typing import Optional

import torch


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

"""The ``torch`` backend of ``fused_guided_logits`` (the CPU path): plain PyTorch, chunked over rows."""

from __future__ import annotations

import torch

from ..._validate import GuidedArgs
from .._columns import gather_columns

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

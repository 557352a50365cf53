"""Python-float arguments while ``torch.compile`` traces.

Dynamo traces a float argument that changes between calls as a symbolic float from its second value on, but an
op that takes it as a number (a custom op's ``float`` argument, ``addmm``'s ``alpha=``, ``torch.full``'s value)
specialises the graph on it again: every new value recompiled the step, and after dynamo's recompile limit
(8) the step ran eagerly or, with ``fullgraph=True``, failed. A tensor computed from the float (``ones * x``)
is traced as a graph input, so one graph serves every value.
"""

from __future__ import annotations

import torch


def alpha_rows(alpha: float, M: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float ``alpha`` as the per-row ``[M]`` alpha tensor (``dtype``), for the ops' tensor-alpha path while
    tracing: traced from the float without specialising on its value (``torch.full`` would)."""
    return torch.ones((M,), dtype=dtype, device=device) * alpha


def traced_scalar(x: float, dtype: torch.dtype, device: torch.device):
    """``x`` eagerly; while tracing a 0-d ``dtype`` tensor computed from it (``masked_fill_`` takes either, and
    arithmetic with it does not specialise the graph on ``x``, as ``masked_fill_(mask, x)`` and
    ``add_(t, alpha=x)`` do)."""
    if not torch.compiler.is_compiling():
        return x
    return torch.ones((), dtype=dtype, device=device) * x


def host_scalars(*xs: float):
    """``None`` eagerly; while tracing a float64 ``[len(xs)]`` CPU tensor holding ``xs``, for an op whose schema
    takes the floats as numbers (a custom op's ``float`` arguments, which specialise the graph on each value): the
    op takes the tensor instead and reads the numbers back when it runs, exactly (float64 holds a Python float),
    and on the host (a CPU tensor: no device synchronisation). A graph with a CPU tensor in it is not captured by
    inductor's CUDA graphs (``mode="reduce-overhead"``); a float that changes is a CPU graph input already."""
    if not torch.compiler.is_compiling():
        return None
    one = torch.ones((), dtype=torch.float64, device="cpu")
    return torch.stack([one * x for x in xs])

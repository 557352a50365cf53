"""``fused_guided_logits``: value LM head + vocabulary remap + base logits (or base LM head) in one pass.

    out[m, b] = base[m, b] + alpha[m] * (value_hidden[m] . value_weight[map[b]])     (map[b] >= 0)
    out[m, b] = base[m, b] + alpha[m] * fill                                          (map[b] == -1)

with ``base`` either loaded from ``base_logits [M, Vb]`` or computed as ``base_hidden[m] . base_weight[b]``
in the same loop. No ``[M, Vv]`` intermediate exists on the fused backends.

Backends: ``triton`` (any M: below ``GEMM_MIN_ROWS`` rows one launch over a grid of vocabulary tiles x row tiles,
memory-bound like decoding; from ``GEMM_MIN_ROWS`` rows, where the work is compute-bound, the heads as cuBLAS
GEMMs accumulated into ``out`` or as one tile GEMM, whichever ``_head_kind`` picks), ``cuda`` (the compiled
decode kernel of ``csrc/``, M <= 16; ``auto`` takes it where it measured faster on this device: see
``ROUTE``), ``torch`` (``guided_logits_torch``: plain PyTorch, chunked over rows).

The package: ``_kernel`` (the row-tile Triton kernel and its tiles), ``_launch`` (the ``triton`` backend's launches
and its custom op), ``_torch_backend``, ``_route`` (the CUDA kernel's preconditions, ``auto``'s measured routing,
running one backend); this module validates and dispatches.
"""

from __future__ import annotations

import torch

from ... import _backends
from ..._validate import assert_map_range_async, check_backend, validate_guided, validate_out
from .._amp import no_autocast
from .._traced import alpha_rows
from ._launch import GEMM_MIN_ROWS, HEAD_MEASURE_ROWS, launch_triton
from ._route import CUDA_MAX_ROWS, _cuda_preferred, _cuda_supports, _triton_supports, run_backend
from ._torch_backend import guided_logits_torch

__all__ = ["fused_guided_logits", "guided_logits_torch", "launch_triton", "CUDA_MAX_ROWS", "GEMM_MIN_ROWS",
           "HEAD_MEASURE_ROWS"]


def fused_guided_logits(value_hidden, value_weight, *, base_logits=None, base_hidden=None, base_weight=None,
                        vocab_map=None, alpha=1.0, fill=0.0, out=None, backend="auto") -> torch.Tensor:
    """Guided next-token logits ``[M, Vb]`` in one fused pass.

    ``out[m, b] = base[m, b] + alpha[m] * (value_hidden[m] . value_weight[map[b]])``, and
    ``base[m, b] + alpha[m] * fill`` where ``map[b] == -1``.

    Args:
        value_hidden: ``[..., Hv]`` value-network final hidden states; leading dims are flattened to ``M``.
        value_weight: ``[Vv, Hv]`` value LM head, same dtype as ``value_hidden``.
        base_logits: ``[..., Vb]`` base logits (leading dims as ``value_hidden``). Or instead:
        base_hidden: ``[..., Hb]`` base hidden states, with
        base_weight: ``[Vb, Hb]`` the base LM head, fused into the same pass.
        vocab_map: int32/int64 ``[Vb]`` (or a ``VocabMap``), entries in ``[-1, Vv)``, ``-1`` = unmapped.
            ``None`` = identity (``b -> b`` for ``b < Vv``, unmapped beyond). Other entries raise
            ``ValueError``; the range is read on every call for a CPU map, once per tensor and version for a
            CUDA map (no host sync in a decode loop), and not during CUDA-graph capture. An entry that escapes
            the check (written behind torch's version counter, or first seen inside a capture) is treated as
            unmapped by every backend: no out-of-range address is ever formed.
        alpha: guidance strength, a float or a ``[M]`` tensor (one per row).
        fill: the value logit used for unmapped base ids: finite in float32, or ``-inf`` (bans them) / ``+inf``
            (a finite value beyond float32's range, or NaN, is a ``ValueError``).
        out: optional ``[M, Vb]`` output; may be ``base_logits`` itself (in place, as a logits processor does).
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``IVL_KERNELS_BACKEND`` overrides ``"auto"``).

    Returns:
        ``out`` if given, else a new ``[M, Vb]`` tensor of ``base_logits.dtype`` (float32 when the base is
        given as hidden states). Accumulation is float32. No gradient flows through this op.
    """
    check_backend(backend)
    # Under torch.compile, reading the map's values would break the graph: the Triton op checks them at run
    # time instead, before it writes anything, and for the other backends the range is asserted on the device.
    a = validate_guided(value_hidden, value_weight, base_logits=base_logits, base_hidden=base_hidden,
                        base_weight=base_weight, vocab_map=vocab_map, alpha=alpha, fill=fill,
                        check_map_values=not torch.compiler.is_compiling())
    out2d = validate_out(out, a)
    which = _backends.select(backend, a.device, cuda_supports=lambda: _cuda_supports(a, out2d),
                             triton_supports=lambda: _triton_supports(a), cuda_preferred=lambda: _cuda_preferred(a))
    if a.vocab_map is not None and which != "triton" and torch.compiler.is_compiling():
        # The Triton op checks the map's range when it runs (a ValueError); the other backends' is asserted on
        # the device here (a RuntimeError at run time), before anything is written.
        assert_map_range_async(a.vocab_map, a.Vv)
    if out2d is None:
        out2d = torch.empty((a.M, a.Vb), dtype=a.out_dtype, device=a.device)
    alpha_tensor = a.alpha if isinstance(a.alpha, torch.Tensor) else None
    if alpha_tensor is None and torch.compiler.is_compiling():
        # A float alpha as the per-row tensor: one graph for every value of an alpha that changes (_traced.py).
        fp64 = torch.float64 in (a.value_hidden.dtype, a.out_dtype)
        alpha_tensor = a.alpha = alpha_rows(a.alpha, a.M, torch.float64 if fp64 else torch.float32, a.device)
    alpha_scalar = 0.0 if alpha_tensor is not None else a.alpha
    # The inputs' dtypes, float32 accumulation, whatever an ambient torch.autocast asks (ops/_amp.py).
    with torch.no_grad(), no_autocast(a.device):
        run_backend(which, a, alpha_tensor, alpha_scalar, out2d)
    return out if out is not None else out2d

"""cuBLAS GEMMs with a float32 (or float64) output for half-precision inputs: the matrix work of the
compute-bound paths (the loss, the guided head at M >= 128) runs here, at the library's matrix rate.

torch >= 2.8 has ``addmm(..., out_dtype=torch.float32)`` on CUDA (cuBLAS with bf16/fp16 operands, fp32 C and
accumulation). Elsewhere (CPU, or a torch without it) the operands are upcast: exact, slower, and only the CPU
path and the tests take it.
"""

from __future__ import annotations

import torch


_OUT_DTYPE_BROKEN = []  # the error of a failed out_dtype GEMM on this torch, if one failed


def has_out_dtype_gemm() -> bool:
    """Whether this torch has ``aten::addmm.dtype_out`` (checked by schema: no kernel runs, so it is safe inside
    a CUDA-graph capture) and it has not failed here."""
    return hasattr(torch.ops.aten.addmm, "dtype_out") and not _OUT_DTYPE_BROKEN


def addmm_into(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> None:
    """``c = beta * c + alpha * (a @ b)`` in place (``c`` may be a strided view; ``beta = 0`` ignores what ``c``
    held, NaN included). ``a``/``b`` share a dtype; ``c`` has theirs or a wider float type."""
    if c.dtype == a.dtype:
        torch.addmm(c, a, b, beta=beta, alpha=alpha, out=c)
        return
    if a.is_cuda and c.dtype == torch.float32 and has_out_dtype_gemm():
        try:
            torch.addmm(c, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=c)
            return
        except RuntimeError as exc:  # an overload this torch declares but rejects for these arguments
            _OUT_DTYPE_BROKEN.append(f"{type(exc).__name__}: {exc}")
    if a.is_cuda and c.dtype == torch.float32:
        # Without a float32-output GEMM: the product rounded to the operands' dtype, added in float32 (an upcast
        # of the operands would cost a float32 copy of a [rows, V] chunk).
        if beta == 0.0:
            c.copy_(torch.mm(a, b)).mul_(alpha)
        else:
            c.mul_(beta).add_(torch.mm(a, b), alpha=alpha)
    else:
        torch.addmm(c, a.to(c.dtype), b.to(c.dtype), beta=beta, alpha=alpha, out=c)

"""cuBLAS GEMMs with a float32 (or float64) output for half-precision inputs: the matrix work of the
compute-bound paths (the loss, the guided head at M >= 128) runs here, at the library's matrix rate.

torch >= 2.8 has ``addmm(..., out_dtype=torch.float32)`` on CUDA (cuBLAS with bf16/fp16 operands, fp32 C and
accumulation). Elsewhere (CPU, or a torch without it) the operands are upcast: exact, slower, and only the CPU
path and the tests take it.
"""

from __future__ import annotations

import os

import torch

GEMM_KINDS = ("cublas", "tiles")


def gemm_kind() -> str:
    """The compute-bound paths' matrix kernels, ``IVL_KERNELS_GEMM`` read at each call: ``cublas`` (default: these
    GEMMs, plus the loss's Triton row kernel) or ``tiles`` (Triton tile GEMMs with the row work in their epilogue
    and prologue: ``ops/_tile_kernels.py``). Applies to the loss and to the guided head from ``GEMM_MIN_ROWS``
    rows; the default moves to ``tiles`` only once a GPU run shows it faster (benchmarks/NOTES.md)."""
    env = os.environ.get("IVL_KERNELS_GEMM", "").strip() or "cublas"
    if env not in GEMM_KINDS:
        raise ValueError(f"IVL_KERNELS_GEMM must be one of {', '.join(GEMM_KINDS)}; got {env!r}")
    return env


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

"""cuBLAS GEMMs with a float32 (or float64) output for half-precision inputs: the matrix work of the
compute-bound paths (the loss, the guided head at M >= 128) runs here, at the library's matrix rate.

torch >= 2.8 has ``addmm(..., out_dtype=torch.float32)`` on CUDA (cuBLAS with bf16/fp16 operands, fp32 C and
accumulation). Elsewhere (CPU, or a torch without it) the operands are upcast: exact, slower, and only the CPU
path and the tests take it.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from ._measured import Measured, fastest

GEMM_KINDS = ("auto", "cublas", "tiles", "tma", "wide", "hybrid")
# The kinds whose logits GEMM is the tile kernel (``_tile_launch.kind_logits_config`` gives its configuration).
TILE_KINDS = ("tiles", "tma", "wide", "hybrid")


def gemm_kind() -> str:
    """The compute-bound paths' matrix kernels, ``IVL_KERNELS_GEMM`` read at each call: ``auto`` (the default:
    per shape class on this GPU, the fastest of the kinds that agree with cuBLAS, measured once;
    ``measured_kind``), ``cublas`` (these GEMMs, plus the loss's Triton row kernel), ``tiles`` (Triton tile GEMMs
    with the row work in their epilogue and prologue: ``ops/_tile_kernels.py``), ``tma`` (the same, with the
    logits kernel reading through TMA descriptors on a persistent grid where it can take the call:
    ``_tile_launch.tma_takes``; the pointer tiles elsewhere) or ``wide`` (``tma`` with the logits kernel on
    ``_tile_launch.WIDE_TILES``, 128 x 256, where ``_tile_launch.wide_applies``; elsewhere ``tma``) or ``hybrid``
    (the loss: ``wide``'s logits kernel, then ``G`` finished in place and the gradient products in cuBLAS; the
    head: ``wide``). Applies to the loss and to the guided head from ``GEMM_MIN_ROWS`` rows."""
    env = os.environ.get("IVL_KERNELS_GEMM", "").strip() or "auto"
    if env not in GEMM_KINDS:
        raise ValueError(f"IVL_KERNELS_GEMM must be one of {', '.join(GEMM_KINDS)}; got {env!r}")
    return env


# ``auto``'s choices: cuBLAS where nothing may be measured (a capture, tracing, deterministic algorithms), so that
# those calls, and every later call of their shape class, take the path that needs no measurement to be trusted.
GEMM = Measured(fallback="cublas")


def can_time(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be timed against each other (CUDA events): a GPU."""
    return device.type == "cuda"


def measured_kind(device: torch.device, key: tuple, candidates: Mapping[str, Callable[[], object]],
                  agree: Callable[[object, object], bool]) -> str:
    """``auto``'s kind for this shape class (``key``) on ``device``: the name of the fastest of ``candidates``
    (scratch runs of the call's first rows; the first is the reference) whose result agrees with the first's,
    measured by the class's first eager call and cached (``_measured``); ``"cublas"`` off a GPU."""
    if not can_time(device):
        return "cublas"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return GEMM.choose((index, *key), lambda: fastest(candidates, "cublas", agree=agree))


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

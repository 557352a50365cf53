"""Which backend runs a call, and running it: the CUDA decode kernel's preconditions and ``auto``'s measured choice
between it and Triton (``ROUTE``), the compiled op's fake, and ``run`` (one backend into ``out``)."""

from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from ..._validate import GuidedArgs
from .._measured import Measured, fastest, rtol_for, tensors_agree
from ._torch_backend import guided_logits_torch

# The CUDA kernel keeps one fp32 accumulator per row in registers: it handles decode-sized M.
CUDA_MAX_ROWS = 16

# backend="auto" between the CUDA kernel and Triton (M <= CUDA_MAX_ROWS): measured, not tabled (``_measured``).
# The H100 and the H200 disagree (H100: CUDA faster at M = 1 and, for eager calls with base logits, up to M = 3;
# H200: Triton 0.315 ms against CUDA's 0.342 ms at M = 1), so the first eager call of each shape class on each
# device times both kernels on its own inputs (back-to-back calls: the host launch path counts where it bounds the
# loop). A shape first seen inside a CUDA-graph capture or while torch.compile traces gets Triton, recorded, so
# eager and captured calls of that shape always run the same kernel (identical numbers).
ROUTE = Measured(fallback="triton")
ROUTE_CALLS = 20


def _triton_supports(a: GuidedArgs) -> str:
    dtypes = {a.value_hidden.dtype, a.out_dtype}
    if a.base_hidden is not None:
        dtypes.add(a.base_hidden.dtype)
    if a.base_logits is not None:
        dtypes.add(a.base_logits.dtype)
    return _backends.triton_dtype_problem(dtypes)


@_backends.when_cuda_extension_loads
def _register_cuda_fakes() -> None:
    """Fake (meta) implementation of the compiled op, so ``torch.compile`` can trace through it: registered
    beside the op's wrapper, as soon as the extension that defines the op is loaded (``torch.library`` needs the
    op to exist). It writes ``out`` in place and returns nothing, so the fake does nothing."""

    @torch.library.register_fake("ivl_kernels::guided_logits_decode_")
    def _(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
          alpha_scalar, fill, out) -> None:
        return None


def _vector_aligned(t: torch.Tensor) -> bool:
    """16-byte loads need a contiguous last dim, rows starting on 16-byte boundaries.

    While tracing (torch.compile) there is no data pointer to look at: the compiled op re-checks the
    alignment of the real tensors and raises if it does not hold.
    """
    vec = 16 // t.element_size()
    aligned_start = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return t.stride(-1) == 1 and aligned_start and t.shape[-1] % vec == 0 and (
        t.dim() == 1 or t.stride(0) % vec == 0)


def _route_key(a: GuidedArgs) -> tuple:
    bh = a.base_hidden
    return (a.device.index if a.device.index is not None else torch.cuda.current_device(), a.M, a.base_mode,
            a.value_hidden.dtype, a.out_dtype, a.Vb, tuple(a.value_weight.shape), bh.shape[1] if bh is not None else 0,
            a.vocab_map is not None, isinstance(a.alpha, torch.Tensor))


def _measure_route(a: GuidedArgs) -> str:
    """``"cuda"`` or ``"triton"``: the faster on this device for this call's shapes, of those that agree with
    Triton (each into its own scratch output, so an in-place call's logits are not touched)."""
    alpha_tensor = a.alpha if isinstance(a.alpha, torch.Tensor) else None
    alpha_scalar = 0.0 if alpha_tensor is not None else a.alpha
    scratch = {which: torch.empty((a.M, a.Vb), dtype=a.out_dtype, device=a.device) for which in ("triton", "cuda")}

    def candidate(which):
        def run():
            run_backend(which, a, alpha_tensor, alpha_scalar, scratch[which])
            return scratch[which]
        return run

    rtol = rtol_for(a.out_dtype)
    return fastest({which: candidate(which) for which in scratch}, "triton", calls=ROUTE_CALLS,
                   agree=lambda x, y: tensors_agree(x, y, rtol))


def _cuda_preferred(a: GuidedArgs) -> bool:
    """Whether ``auto`` takes the CUDA kernel over Triton for this call: the cached measurement of its shape
    class on this device (made now if this is the first eager call of the class; see ``ROUTE``)."""
    choice = ROUTE.choose(_route_key(a), lambda: _measure_route(a))
    return choice == "cuda"


def _cuda_supports(a: GuidedArgs, out: Optional[torch.Tensor]) -> str:
    if a.M > CUDA_MAX_ROWS:
        return f"it handles M <= {CUDA_MAX_ROWS} rows (decode), got M = {a.M}; use backend='triton'"
    dt = a.value_hidden.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        return f"value dtype must be float16, bfloat16 or float32, got {dt}"
    if a.base_mode == 0:
        return "it needs a base term"
    if a.base_mode == 1 and a.base_logits.dtype not in (dt, torch.float32):
        return f"base_logits dtype must be {dt} or float32, got {a.base_logits.dtype}"
    if a.base_mode == 2 and a.base_hidden.dtype != dt:
        return f"base_hidden/base_weight dtype must equal the value dtype {dt}, got {a.base_hidden.dtype}"
    vec_tensors = [("value_hidden", a.value_hidden), ("value_weight", a.value_weight)]
    if a.base_mode == 2:
        vec_tensors += [("base_hidden", a.base_hidden), ("base_weight", a.base_weight)]
    for name, t in vec_tensors:
        if not _vector_aligned(t):
            return (f"{name} must have stride(-1) == 1, 16-byte aligned rows and a last dim divisible by "
                    f"{16 // t.element_size()}")
    for name, t in (("base_logits", a.base_logits), ("out", out)):
        if t is not None and t.stride(-1) != 1:
            return f"{name} must have stride(-1) == 1"
    if a.vocab_map is not None and a.vocab_map.stride(0) != 1:
        return "vocab_map must be contiguous"
    return ""


def run_backend(which: str, a: GuidedArgs, alpha_tensor, alpha_scalar: float, out2d: torch.Tensor) -> None:
    """Run backend ``which`` (``"torch" | "triton" | "cuda"``) on the validated call ``a`` into ``out2d [M, Vb]``."""
    if which == "torch":
        guided_logits_torch(a, out2d)
    elif which == "triton":
        torch.ops.ivl_kernels.guided_logits_triton(
            a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map,
            alpha_tensor, alpha_scalar, a.fill, out2d)
    else:
        if alpha_tensor is not None and (alpha_tensor.dtype != torch.float32 or alpha_tensor.stride(0) != 1):
            alpha_tensor = alpha_tensor.float().contiguous()
        torch.ops.ivl_kernels.guided_logits_decode_(
            a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map,
            alpha_tensor, alpha_scalar, a.fill, out2d)

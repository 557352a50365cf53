"""Launches of the logits tile kernel (``_tile_kernels.py``), shared by the loss (``MODE`` 0-2) and the guided head
(``MODE`` 3): the pointer kernel ``_ce_logits_tile_kernel``, or ``_ce_logits_tma_kernel`` (TMA descriptors, a
persistent grid; no map; Hopper).

The TMA kernel is the ``"tma"`` GEMM kind (``_gemm.GEMM_KINDS``): ``auto`` measures it beside cuBLAS and the
pointer tiles where it can take a call (``tma_takes``), ``IVL_KERNELS_GEMM=tma`` forces it; on 128 x 256 tiles
with its epilogue in two column halves (``WIDE_TILES``) it is the ``"wide"`` kind, measured too where
``wide_applies``. Compiled for sm_90 it
uses wgmma and TMA, with 126-255 registers against the pointer kernel's 128-232 (its epilogue still holds the
whole float32 tile) and, with one K segment, 131 KB of shared memory; which is faster depends on the GPU and the
shapes (``benchmarks/bench_loss_tiles.py``, variant "z TMA persistent"). It takes operands a tensor descriptor can
address (unit last stride, 16-byte aligned base and rows), without a map, in half precision on sm_90+ (any dtype
under the interpreter, which runs it on CPU); elsewhere the pointer kernel runs. A configuration asks for it with
``"tma": True``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._triton import interpreter_enabled, triton
from ._tile_kernels import _ce_logits_tile_kernel, _ce_logits_tma_kernel

def logits_config(dtype: torch.dtype, interpret: Optional[bool] = None) -> dict:
    """The logits tile kernel's tiles (the loss's and the head's). Half precision: wgmma-sized tiles on sm_90
    (128 x 128 x 64, 8 warps, 3 stages: 128 x 256 spilled), not yet tuned on a GPU (candidates:
    benchmarks/bench_loss_tiles.py); float32: smaller tiles (exact float32 dots, no TF32, as torch's default
    matmul) with ``maxnreg=255``: without it ptxas capped some float32 variants at 80-128 registers and spilled
    (sm_80, Triton 3.6 and 3.8)."""
    if interpreter_enabled() if interpret is None else interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2, maxnreg=255)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


# The wide tiles (cuBLAS's Hopper tile shape), the ``wide`` GEMM kind: 128 x 256 x 64, 8 warps, the epilogue on two
# 128-column halves. With one epilogue over the whole tile its float32 temporaries spilled (sm_90, bf16, Triton 3.8:
# 84-1732 bytes in the loss's one-pass mode); split, the TMA kernel compiles without spills on sm_90 in every mode
# of the head and of the loss without base logits (the ahead-of-time compile test checks it). Where it did not,
# ``wide_applies`` keeps the ``tma`` kind's tiles: sm_100 (278 KB of shared memory, spills), a map (the pointer
# kernel: 4 bytes), the loss with base logits (fp16: 32 bytes). ``auto`` measures it where it applies; not the default
# until a GPU has timed it (bench_loss_tiles.py, bench_guided_logits.py).
WIDE_TILES = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, EPILOGUE_SPLIT=2)


def wide_applies(dtype: torch.dtype, takes_tma: bool, loss_with_base_logits: bool = False) -> bool:
    """Whether ``WIDE_TILES`` run a ``wide`` call (see there): half precision, the TMA kernel taking the call
    (``tma_takes``), sm_90 (or the interpreter), and not the loss with base logits."""
    return (dtype in (torch.float16, torch.bfloat16) and takes_tma and not loss_with_base_logits
            and (interpreter_enabled() or _target_arch() // 10 == 9))


def kind_logits_config(cfg: dict, kind: str, vocab_map: Optional[torch.Tensor] = None,
                       xv: Optional[torch.Tensor] = None, wv: Optional[torch.Tensor] = None,
                       xb: Optional[torch.Tensor] = None, wb: Optional[torch.Tensor] = None, *,
                       loss_with_base_logits: bool = False) -> dict:
    """The logits kernel's configuration for a tile GEMM kind (``_gemm.GEMM_KINDS``) over these operands (as
    ``tma_takes`` reads them; unused for ``tiles``): ``cfg`` for ``tiles``, ``cfg`` through TMA descriptors for
    ``tma``, and for ``wide`` (and ``hybrid``, whose logits kernel is ``wide``'s) ``WIDE_TILES`` through them
    where ``wide_applies``, the ``tma`` kind's elsewhere."""
    if kind == "tiles":
        return cfg
    wide = kind in ("wide", "hybrid") and wide_applies(xv.dtype, tma_takes(vocab_map, xv, wv, xb, wb),
                                                       loss_with_base_logits)
    return {**(WIDE_TILES if wide else cfg), "tma": True}


def partial_tile_n(cfg: dict) -> int:
    """The column width of one tile's row partials (``part [3, T, R]``, the factors ``dX`` / ``dW`` read):
    ``BLOCK_N``, or its half where ``EPILOGUE_SPLIT`` is 2 (each column half finishes as a tile of its own)."""
    split = cfg.get("EPILOGUE_SPLIT", 1)
    if split not in (1, 2):
        raise ValueError(f"tile configuration: EPILOGUE_SPLIT must be 1 or 2, got {split!r}")
    return cfg["BLOCK_N"] // split


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's: what the ahead-of-time compile test (meta tensors) and the interpreter plan for


def tiles_fit(*operands: Optional[torch.Tensor]) -> bool:
    """Whether the tile kernels can read these operands (``None`` = absent): unit stride along the last dim."""
    return all(t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 for t in operands)


def _descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a Triton without host-side tensor descriptors
        return None
    return TensorDescriptor


def _target_arch() -> int:
    """The compute capability Triton compiles for now (the current device's; the compile test's stand-in)."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # no GPU driver
        return 0
    return target.arch if target.backend == "cuda" and isinstance(target.arch, int) else 0


def tma_usable(dtype: torch.dtype, *operands: torch.Tensor) -> bool:
    """Whether the TMA kernel can take a launch over these 2-D GEMM operands (module docstring)."""
    if _descriptor_class() is None:
        return False
    if not interpreter_enabled() and (dtype not in (torch.float16, torch.bfloat16) or _target_arch() < 90):
        return False
    for t in operands:
        esize = t.element_size()
        if t.dim() != 2 or 0 in t.shape or t.stride(-1) != 1 or (t.stride(0) * esize) % 16:
            return False
        if t.device.type != "meta" and t.data_ptr() % 16:
            return False
    return True


def tma_takes(vocab_map: Optional[torch.Tensor], xv: torch.Tensor, wv: torch.Tensor,
              xb: Optional[torch.Tensor] = None, wb: Optional[torch.Tensor] = None) -> bool:
    """Whether the TMA kernel can take a logits launch (no map, descriptor-addressable operands, the chip)."""
    return vocab_map is None and tma_usable(xv.dtype, xv, wv, *((xb, wb) if xb is not None else ()))


def launch_logits(cfg: dict, xv, wv, xb, wb, base, vocab_map, alpha_tensor, tgt, g, lse, out, part, stats, *,
                  R: int, Vb: int, Vval: int, Vv: int, Vg: int, ld_out: int, alpha_scalar: float, fill: float,
                  smooth_self: float, smooth_all: float, inv_scale: float, mode: int, v_prec: str,
                  b_prec: str) -> None:
    """One launch of the logits tile kernel over rows ``[0, R)`` and base columns ``[0, Vb)`` (see
    ``_ce_logits_tile_kernel``). ``xv [R, Hv]``, ``wv [Vv, Hv]``, ``xb [R, Hb]`` / ``wb [Vb, Hb]`` or ``None``,
    ``base [R, Vb]`` or ``None``; ``tgt``, ``g``, ``lse``, ``out``, ``part``, ``stats`` as the kernel reads them
    (any tensor where the mode does not use one)."""
    cfg = dict(cfg)
    want_tma = cfg.pop("tma", False)
    partial_tile_n(cfg)  # checks EPILOGUE_SPLIT
    cfg.setdefault("EPILOGUE_SPLIT", 1)
    Hv, Hb = xv.shape[1], xb.shape[1] if xb is not None else 0
    dummy = out
    flags = dict(HAS_BASE_LOGITS=base is not None, HAS_BASE_HIDDEN=xb is not None,
                 ALPHA_IS_TENSOR=alpha_tensor is not None, SMOOTH=smooth_all != 0.0, MODE=mode, V_PREC=v_prec,
                 B_PREC=b_prec)
    base_args = (base if base is not None else dummy, base.stride(0) if base is not None else 0,
                 base.stride(1) if base is not None else 0)
    tiles = triton.cdiv(R, cfg["BLOCK_M"]) * triton.cdiv(Vb, cfg["BLOCK_N"])
    if want_tma and tma_takes(vocab_map, xv, wv, xb, wb):
        TensorDescriptor = _descriptor_class()
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        xv_d, wv_d = TensorDescriptor.from_tensor(xv, [bm, bk]), TensorDescriptor.from_tensor(wv, [bn, bk])
        xb_d, wb_d = ((TensorDescriptor.from_tensor(xb, [bm, bk]), TensorDescriptor.from_tensor(wb, [bn, bk]))
                      if xb is not None else (xv_d, wv_d))
        programs = max(1, min(tiles, sm_count(xv.device)))
        _ce_logits_tma_kernel[(programs,)](
            xv_d, wv_d, xb_d, wb_d, base_args[0], alpha_tensor if alpha_tensor is not None else dummy, tgt, g, lse,
            out, part, stats, R, Vb, Vval, Vg, Hv, Hb, base_args[1], base_args[2], ld_out,
            part.stride(0) if part.dim() > 1 else 0, part.stride(1) if part.dim() > 1 else 0,
            stats.stride(0) if stats.dim() > 1 else 0, alpha_scalar, fill, smooth_self, smooth_all, inv_scale,
            FLATTEN=xb is None, NUM_PROGRAMS=programs, **flags, **cfg)
        return
    _ce_logits_tile_kernel[(tiles,)](
        xv, wv, xb if xb is not None else xv, wb if wb is not None else wv, base_args[0],
        vocab_map if vocab_map is not None else dummy, alpha_tensor if alpha_tensor is not None else dummy, tgt, g,
        lse, out, part, stats, R, Vb, Vval, Vv, Vg, Hv, Hb, xv.stride(0), wv.stride(0),
        xb.stride(0) if xb is not None else 0, wb.stride(0) if wb is not None else 0, base_args[1], base_args[2],
        vocab_map.stride(0) if vocab_map is not None else 0, ld_out,
        part.stride(0) if part.dim() > 1 else 0, part.stride(1) if part.dim() > 1 else 0,
        stats.stride(0) if stats.dim() > 1 else 0, alpha_scalar, fill, smooth_self, smooth_all, inv_scale,
        HAS_MAP=vocab_map is not None, EVEN_K=Hv % cfg["BLOCK_K"] == 0 and Hb % cfg["BLOCK_K"] == 0, **flags, **cfg)

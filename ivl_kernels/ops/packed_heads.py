"""Packed LM heads: the base and the value head as adjacent column blocks of one buffer, so that from
``GEMM_MIN_ROWS`` rows the fused head is ONE GEMM over the concatenated hidden states:

    out[:, :V] = [X_b | alpha * X_v] @ [W_b | W_v][:V]^T        (V = min(Vb, Vv), identity map)
    out[:, V:] = X_b @ W_b[V:]^T + alpha * fill                   (base ids past the value vocabulary)

Unpacked, the two heads are two GEMMs, and the second reads back and rewrites the ``[M, Vb]`` output the first
wrote (one more pass over the largest tensor of the call: 1.07-1.11x the time of the two heads computed
separately, H200, M = 128-2048). Packed, the output is written once and the weights are read once, as by a
single GEMM with ``K = Hb + Hv``.

``pack_head_weights`` builds the buffer; ``fused_guided_logits`` recognises packed heads from the tensors
alone (same storage, equal row stride, the value block starting ``Hb`` elements after the base block), so the
recognition holds through ``torch.compile``, CUDA graphs and any wrapper that keeps the views. Nothing is
cached or registered. The cost of packing is the buffer itself, which replaces the two heads (no extra memory
once the original weights are dropped); the concatenated hidden states ``[M, Hb + Hv]`` are built per call,
except where they already lie side by side with alpha 1 (``adjacent_columns``: vLLM's forward returns
``[X_b | X_v | ...]``), which is then read in place.

One more rounding than unpacked: ``alpha * X_v`` is formed in the hidden states' dtype before the GEMM (exact
for alpha = 1, the common case; a relative error below 2^-9 per element in bf16 otherwise, of the same order as
the output's own rounding).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def pack_head_weights(base_weight: torch.Tensor, value_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy ``base_weight [Vb, Hb]`` and ``value_weight [Vv, Hv]`` into one buffer ``[max(Vb, Vv), Hb + Hv]``
    and return views of it: ``(base [Vb, Hb], value [Vv, Hv])``, both with row stride ``Hb + Hv``. Pass the
    views (or parameters made from them) wherever the weights went; ``fused_guided_logits`` then runs the head
    as one GEMM from ``GEMM_MIN_ROWS`` rows when the base is given as hidden states with the identity map.

    The weights must share dtype and device (the GEMM has one operand dtype). Rows of one head past the other's
    vocabulary are zero in the other block and never read.
    """
    for name, w in (("base_weight", base_weight), ("value_weight", value_weight)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [V, H], got "
                             f"{type(w).__name__ if not isinstance(w, torch.Tensor) else list(w.shape)}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {w.dtype}")
    if base_weight.dtype != value_weight.dtype:
        raise TypeError(f"value_weight must have base_weight's dtype {base_weight.dtype} to be packed with it, "
                        f"got {value_weight.dtype}")
    if base_weight.device != value_weight.device:
        raise ValueError(f"value_weight must be on base_weight's device {base_weight.device}, got "
                         f"{value_weight.device}")
    (Vb, Hb), (Vv, Hv) = base_weight.shape, value_weight.shape
    with torch.no_grad():
        buf = base_weight.new_zeros(max(Vb, Vv), Hb + Hv)
        buf[:Vb, :Hb].copy_(base_weight)
        buf[:Vv, Hb:].copy_(value_weight)
    return buf[:Vb, :Hb], buf[:Vv, Hb:]


def packed_view(base_weight: torch.Tensor, value_weight: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """``[rows, Hb + Hv]`` view over both heads when ``value_weight``'s columns continue ``base_weight``'s in
    one buffer (rows ``< rows`` of both exist: ``rows <= min(Vb, Vv)``; rows do not overlap), else ``None``.
    Reads only metadata."""
    if rows <= 0 or rows > min(base_weight.shape[0], value_weight.shape[0]) \
            or base_weight.stride(0) < base_weight.shape[1] + value_weight.shape[1]:
        return None
    return adjacent_columns(base_weight[:rows], value_weight[:rows])


def adjacent_columns(left: torch.Tensor, right: torch.Tensor) -> Optional[torch.Tensor]:
    """``[M, H_l + H_r]`` view over ``left [M, H_l]`` and ``right [M, H_r]`` when ``right``'s columns continue
    ``left``'s in one buffer (same storage, dtype and row stride, unit column stride: column blocks of one
    tensor, as ``torch.cat(..., dim=-1)`` lays them out), else ``None``. Reads only metadata."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0] or left.dtype != right.dtype \
            or left.device != right.device or left.shape[1] == 0 or right.shape[1] == 0:
        return None
    stride = left.stride(0)
    if left.stride(1) != 1 or right.stride(1) != 1 or right.stride(0) != stride:
        return None
    if right.storage_offset() != left.storage_offset() + left.shape[1]:
        return None
    if right.untyped_storage().data_ptr() != left.untyped_storage().data_ptr():
        return None
    return left.as_strided((left.shape[0], left.shape[1] + right.shape[1]), (stride, 1))


def install_parameter(model: nn.Module, old: torch.Tensor, new: nn.Parameter) -> None:
    """``new`` in place of the parameter ``old`` in every module of ``model`` that holds it (an LM head, an
    input embedding tied to it): how packed head views replace the heads they were copied from."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is old:
                setattr(module, name, new)

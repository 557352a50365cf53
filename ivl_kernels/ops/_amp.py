"""Autocast: the ops compute in the dtypes of their inputs (float32 accumulation) whatever the ambient autocast.

An ambient ``torch.autocast`` (HF Trainer's ``bf16=True`` wraps the forward in one) would otherwise recast the
ops' inner GEMMs (``torch.mm`` to bfloat16) and break their ``out=`` / in-place products, whose results the ops
keep in float32. The ops' contract is that of a custom kernel: the hidden states and weights are used in their
given dtypes, so autocast is disabled around the work (not ``torch.amp.custom_fwd(cast_inputs=...)``, which
would recast the inputs), in the forward, the backward and the custom ops' bodies (a compiled graph runs its
custom ops under the caller's autocast state).
"""

from __future__ import annotations

import contextlib

import torch

# Device types without an autocast implementation (``torch.autocast("meta", ...)`` raises).
_AUTOCAST_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "maia", "privateuseone"})


def no_autocast(device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device``'s type (a ``torch.device``, a tensor or a type name)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    dev_type = device.type if isinstance(device, torch.device) else str(device)
    if dev_type not in _AUTOCAST_TYPES:
        return contextlib.nullcontext()
    if not torch.compiler.is_compiling():
        # Nothing to undo (the common case): no context entered, so an eager decode step pays nothing for it.
        try:
            if not torch.is_autocast_enabled(dev_type):
                return contextlib.nullcontext()
        except (TypeError, RuntimeError):  # a torch whose is_autocast_enabled takes no device type
            pass
    return torch.autocast(dev_type, enabled=False)

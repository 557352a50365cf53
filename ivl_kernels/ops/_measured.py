"""``auto``'s measured choices: which of several kernels that compute the same thing runs faster on this GPU.

Fixed routing tables are wrong somewhere: the H100 and the H200 disagree on the decode kernels, and cuBLAS against
our tile GEMMs depends on the chip, the shapes and the library versions. So the first eager call of each shape
class on each device runs every candidate on its own inputs (into scratch outputs: nothing the caller owns is
written), times them back to back and caches the winner for the process, like Triton's autotuner. A candidate
that raises, or whose result disagrees with the first candidate's (``agree``), is never chosen: a kernel that is
fast and wrong on some GPU loses to the reference path.

Nothing is measured, and the class gets the fallback (recorded, so later calls of the class follow it):

- inside a CUDA-graph capture or while ``torch.compile`` traces: eager and captured calls of a shape then always
  run the same kernel and give identical numbers;
- under ``torch.use_deterministic_algorithms(True)``: two runs of a program give the same numbers, which a choice
  made by a timing could not promise.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, Mapping, Optional

import torch

from .._timing import back_to_back_ms
from .._triton import KERNEL_ERRORS

MEASURE_CALLS = 3
_UNSET = object()


def can_measure() -> bool:
    """Whether a choice may be measured now (see the module docstring)."""
    return not (torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()
                or torch.are_deterministic_algorithms_enabled())


def time_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call (the candidates ran once already: compiled and warm)."""
    return back_to_back_ms(fn, calls, warmup=0)


class Measured:
    """Choices cached per shape class; ``fallback`` where nothing may be measured."""

    def __init__(self, fallback: str):
        self.fallback = fallback
        self.choices: dict = {}
        self._lock = threading.Lock()

    def choose(self, key: Hashable, measure: Callable[[], str]) -> str:
        """The cached choice of ``key``, made now by ``measure()`` if this is the class's first eager call."""
        with self._lock:
            choice = self.choices.get(key)
        if choice is None:
            choice = measure() if can_measure() else self.fallback
            with self._lock:
                choice = self.choices.setdefault(key, choice)
        return choice

    def clear(self) -> None:
        with self._lock:
            self.choices.clear()


def fastest(candidates: Mapping[str, Callable[[], object]], fallback: str, calls: int = MEASURE_CALLS,
            agree: Optional[Callable[[object, object], bool]] = None) -> str:
    """The name of the fastest candidate that runs and, with ``agree``, gives the first candidate's result.

    Each candidate runs once (compilation, and the result that ``agree`` compares with the first candidate's,
    before anything is timed: a candidate may update its scratch in place), then ``calls`` times back to back.
    ``fallback`` when none qualifies."""
    ok, reference = [], _UNSET
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                result = fn()
            except KERNEL_ERRORS:  # a kernel that cannot run here (resources, an unsupported layout) is not chosen
                if reference is _UNSET:
                    break  # nothing to compare the others with
                continue
            if reference is _UNSET:
                reference = result
                ok.append(name)
            elif agree is None or agree(result, reference):
                ok.append(name)
            del result
        reference = None
        ms = {name: time_ms(candidates[name], calls) for name in ok}
    return min(ms, key=ms.get) if ms else fallback


def tensors_agree(a: Optional[torch.Tensor], b: Optional[torch.Tensor], rtol: float) -> bool:
    """``a`` equals ``b`` up to ``rtol`` of ``b``'s largest finite magnitude, with the same non-finite entries
    (a fill of ``-inf`` gives ``-inf`` columns in both); both ``None`` agree."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa].nan_to_num(0.0), b[~fb].nan_to_num(0.0)):
        return False
    if not bool(fa.any()):
        return True
    scale = b[fb].abs().max()
    return bool(((a[fa] - b[fb]).abs().max() <= rtol * scale + 1e-30).item())


def rtol_for(dtype: torch.dtype) -> float:
    """How far two correct kernels may differ (different summation orders and roundings): one rounding of the
    dtype, a few times over; a wrong kernel is off by the values' own size."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2

"""GPU timing shared by ``backend="auto"``'s routing measurement and the benchmarks."""

from __future__ import annotations

from typing import Callable

import torch


def back_to_back_ms(fn: Callable[[], object], calls: int, warmup: int = 2) -> float:
    """Milliseconds per call of ``calls`` back-to-back eager calls after ``warmup`` calls (compilation excluded),
    timed with CUDA events: the GPU time, or the host's launch path where that is slower."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls

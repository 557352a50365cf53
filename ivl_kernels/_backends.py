"""Backend availability and dispatch.

``backend="auto" | "cuda" | "triton" | "torch"``; the environment variable ``IVL_KERNELS_BACKEND`` replaces
``"auto"``. An explicitly requested backend that cannot run raises ``RuntimeError`` naming what is missing; it
never silently falls back. Nothing here touches a device at import time.

Layers point one way: ``ops/`` imports this module, never the reverse. The compiled extension is loaded here
(lazily, on first use); the ops register what their compiled ops need once it is loaded (their fake kernels, for
``torch.compile``) with ``when_cuda_extension_loads``, beside each op's Python wrapper.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

import torch

from ._triton import HAS_TRITON, TRITON_IMPORT_ERROR, interpreter_enabled, interpreter_problem
from ._validate import check_backend

_CUDA_EXT = None
_CUDA_EXT_ERROR: Optional[str] = None
_ON_LOAD: List[Callable[[], None]] = []


def when_cuda_extension_loads(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn()`` once the compiled extension is loaded (at once when it already is); usable as a decorator.
    A hook that raises counts as a failed load (the extension is then reported unavailable, with the reason)."""
    _ON_LOAD.append(fn)
    if _CUDA_EXT is not None:
        fn()
    return fn


def requested_backend(backend: str) -> str:
    """The backend asked for: the argument, or ``IVL_KERNELS_BACKEND`` when the argument is ``"auto"``."""
    backend = check_backend(backend)
    if backend == "auto":
        env = os.environ.get("IVL_KERNELS_BACKEND", "").strip()
        if env:
            if env not in ("auto", "cuda", "triton", "torch"):
                raise ValueError(f"IVL_KERNELS_BACKEND must be one of auto, cuda, triton, torch; got {env!r}")
            backend = env
    return backend


def cuda_extension():
    """The compiled extension module ``ivl_kernels._C`` (loaded once), or ``None`` with the reason recorded."""
    global _CUDA_EXT, _CUDA_EXT_ERROR
    if _CUDA_EXT is None and _CUDA_EXT_ERROR is None:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.ivl_kernels.*)

            for hook in _ON_LOAD:  # the ops' fake kernels (registered in ops/, beside each op)
                hook()
            _CUDA_EXT = _C
        except Exception as exc:  # not built (pure-Python install), or built against another torch
            _CUDA_EXT_ERROR = f"{type(exc).__name__}: {exc}"
    return _CUDA_EXT


def cuda_extension_error() -> str:
    cuda_extension()
    return _CUDA_EXT_ERROR or ""


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of ``device``, and if not, why."""
    if not HAS_TRITON:
        return False, f"Triton is not importable ({TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreter_enabled():
        problem = interpreter_problem()
        return (not problem), problem
    if device.type == "cpu":
        return False, ("CPU tensors run Triton kernels only under the interpreter: set TRITON_INTERPRET=1 "
                       "before importing triton")
    return False, f"Triton kernels do not run on {device.type} tensors"


def require_triton(device: torch.device) -> None:
    """Raise the reason Triton cannot run on ``device``: the custom ops' check, for calls whose backend was chosen
    while ``torch.compile`` traced (where the interpreter's self-test cannot run, ``interpreter_problem``)."""
    ok, why = triton_usable(device)
    if not ok:
        raise RuntimeError(f"backend='triton' cannot run: {why}")


def triton_dtype_problem(dtypes) -> str:
    """``""`` when the Triton kernels take tensors of these dtypes, else why not (shared by every op)."""
    if torch.float64 in dtypes:
        return "float64 inputs are handled by backend='torch'"
    if interpreter_enabled() and torch.bfloat16 in dtypes:
        return "the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16"
    return ""


def cuda_usable(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"it needs CUDA tensors, got tensors on {device}"
    if cuda_extension() is None:
        return False, (f"it needs the compiled extension ivl_kernels._C, which is not available "
                       f"({_CUDA_EXT_ERROR}); reinstall with a CUDA build of torch and nvcc present")
    return True, ""


def select(backend: str, device: torch.device, *, cuda_supports: Optional[Callable[[], str]] = None,
           triton_supports: Optional[Callable[[], str]] = None,
           cuda_preferred: Optional[Callable[[], bool]] = None) -> str:
    """Pick the backend for one call.

    ``cuda_supports`` / ``triton_supports`` return ``""`` when that backend handles this particular call (shape,
    dtypes, strides), else the reason it does not; ``None`` means the op has no such backend. For ``"auto"``,
    ``cuda_preferred`` says whether the CUDA kernel is the faster of the two for this call (``None``: always);
    a call it is not preferred for still goes to it when Triton cannot run.
    """
    backend = requested_backend(backend)
    if backend == "torch":
        return "torch"
    if backend in ("cuda", "triton"):
        usable, supports = (cuda_usable, cuda_supports) if backend == "cuda" else (triton_usable, triton_supports)
        if supports is None:
            raise RuntimeError(f"backend={backend!r} is not implemented for this op; use "
                               f"{'triton' if backend == 'cuda' and triton_supports else 'torch'!r}")
        ok, why = usable(device)
        if not ok:
            raise RuntimeError(f"backend={backend!r} cannot run: {why}")
        why = supports()
        if why:
            raise RuntimeError(f"backend={backend!r} does not handle this call: {why}")
        return backend
    # auto: the CPU path is the torch backend (the interpreter is for testing, not for speed).
    if device.type == "cuda":
        cuda_ok = cuda_supports is not None and cuda_usable(device)[0] and not cuda_supports()
        if cuda_ok and (cuda_preferred is None or cuda_preferred()):
            return "cuda"
        if triton_supports is not None and triton_usable(device)[0] and not triton_supports():
            return "triton"
        if cuda_ok:
            return "cuda"
    return "torch"


def info() -> dict:
    """What this installation can run (for ``ivl-kernels info`` and bug reports)."""
    import platform

    d = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": None,
        "triton_interpreter": interpreter_enabled(),
        "cuda_extension": cuda_extension() is not None,
        "cuda_extension_error": _CUDA_EXT_ERROR,
    }
    if HAS_TRITON:
        import triton

        d["triton"] = triton.__version__
    else:
        d["triton_error"] = TRITON_IMPORT_ERROR
    if d["cuda_available"]:
        d["device"] = torch.cuda.get_device_name()
    return d

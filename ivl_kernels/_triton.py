"""Optional Triton import.

Kernel files import ``triton`` and ``tl`` from here so that ``import ivl_kernels`` works on a machine without
Triton: the stand-ins below accept the decorators and ``tl.constexpr`` annotations that kernel definitions
evaluate at import time, and the dispatcher never selects the Triton backend when ``HAS_TRITON`` is False.
Triton reads ``TRITON_INTERPRET`` when it is first imported, so set it before importing this package.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
    try:
        from triton.errors import TritonError as _TritonError
    except ImportError:  # a Triton without a common error base: its errors are RuntimeErrors
        _TritonError = RuntimeError
except Exception as exc:  # ImportError, or a broken install that fails while initialising
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _Missing:
        """Stands in for ``triton`` / ``triton.language`` so kernel definitions still evaluate."""

        def __getattr__(self, name):
            return _Missing()

        def __call__(self, *args, **kwargs):
            # As a decorator (``@triton.jit`` or ``@triton.jit(...)``): hand back something inert.
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _Missing()
            return _Missing()

        def __getitem__(self, item):
            return _Missing()

    triton = _Missing()
    tl = _Missing()
    _TritonError = RuntimeError

# What a kernel raises when it cannot compile or launch on this GPU (shared memory or registers over the chip's
# limit, a layout the compiler refuses) rather than compute a wrong result: Triton's own errors (OutOfResources,
# CompilationError, PTXASError) are not RuntimeErrors.
KERNEL_ERRORS = (RuntimeError, _TritonError)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETER_PROBLEM: "str | None" = None


def interpreter_problem() -> str:
    """``""`` when the interpreter runs our kernels, else why not (probed once, on first use).

    Triton 3.6's interpreter turns a loop bound derived from ``program_id`` into a Python int with ``int(array)``,
    which NumPy >= 2.4 refuses for 1-element arrays (triton-lang/triton#9171; Triton 3.8 squeezes first). Every
    kernel here loops from its program id, so such a pair fails on every call: detect it with a two-program kernel
    instead of trusting version numbers.
    """
    global _INTERPRETER_PROBLEM
    if _INTERPRETER_PROBLEM is None:
        import torch

        if torch.compiler.is_compiling():
            # A launch cannot be traced (Dynamo stops at inspect's source lookup in the interpreter's rewrite);
            # the kernels run later, eagerly, inside the custom ops, which check again (_backends.require_triton).
            return ""
        try:
            out = torch.zeros(2, dtype=torch.int64)
            _interpreter_probe_kernel[(2,)](out, 2)
            ok = out.tolist() == [0, 1]
            _INTERPRETER_PROBLEM = "" if ok else f"its interpreter computed {out.tolist()} for [0, 1] in a self-test"
        except Exception as exc:
            import numpy

            _INTERPRETER_PROBLEM = (f"Triton {getattr(triton, '__version__', '?')}'s interpreter fails with NumPy "
                                    f"{numpy.__version__} ({type(exc).__name__}: {exc}); install numpy<2.4 or a "
                                    f"Triton whose interpreter supports NumPy 2.4 (see triton-lang/triton#9171)")
    return _INTERPRETER_PROBLEM


@triton.jit
def _interpreter_probe_kernel(out_ptr, n):
    pid = tl.program_id(0).to(tl.int64)
    for i in range(pid, n, 2):
        tl.store(out_ptr + i, i)

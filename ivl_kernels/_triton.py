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


def interpreter_enabled() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

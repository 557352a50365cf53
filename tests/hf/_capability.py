"""Skips by capability for static-cache tests: where the installed transformers cannot serve the package's static
cache (4.50-4.55 build no ``StaticCache`` of its form; their models do not declare ``_can_compile_fullgraph``), a
test first checks that a call forcing it is refused with the package's ``ValueError``, then skips. Found as the
package finds it (``ivl_kernels.hf._static``), never from a version string."""

from __future__ import annotations

import pytest


def static_cache_refusal(*models) -> str:
    """Why transformers builds no ``StaticCache`` the way the package does for one of ``models`` (4.50-4.55 want
    the batch size up front), else ``""``: found by capability, as the package finds it."""
    from ivl_kernels.hf._static import static_window_fits

    for model in models:
        why = static_window_fits(model, 64)
        if why.startswith("transformers builds no StaticCache"):
            return why
    return ""


def skip_unless_static_cache(forced_call, *models) -> None:
    """Skip a static-cache test where transformers builds no ``StaticCache`` for ``models``, after checking that
    ``forced_call()`` (a call forcing the static cache) is refused with that reason instead of running."""
    _skip_if_refused(static_cache_refusal(*models), forced_call, "builds no StaticCache",
                     "this transformers builds no StaticCache as the package does; a forced one is refused")


def compile_step_refusal(*models) -> str:
    """Why ``compile_step=True`` cannot run for ``models`` on this transformers (a model that does not declare
    ``_can_compile_fullgraph``, or no ``StaticCache`` of the package's form), else ``""``."""
    from ivl_kernels.hf._static import static_supported

    return next((w for w in map(static_supported, models) if w), "") or static_cache_refusal(*models)


def skip_unless_compile_step(forced_call, *models) -> None:
    """Skip a ``compile_step=True`` test where this transformers cannot serve it for ``models``, after checking
    that ``forced_call()`` (a ``compile_step=True`` call) is refused with the package's ``ValueError``."""
    _skip_if_refused(compile_step_refusal(*models), forced_call,
                     "compile_step=True needs a static cache|builds no StaticCache",
                     "this transformers cannot serve compile_step=True for these models; it is refused")


def _skip_if_refused(why: str, forced_call, match: str, what: str) -> None:
    """Where ``why`` says the capability is missing: ``forced_call()`` must raise the package's ``ValueError``
    matching ``match``; then the test skips, saying ``what`` and ``why``."""
    if why:
        with pytest.raises(ValueError, match=match):
            forced_call()
        pytest.skip(f"{what} (checked): {why}")

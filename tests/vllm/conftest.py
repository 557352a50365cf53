"""Fixtures of the vLLM tests (``make test-vllm``, in ``.venv-vllm``). No vLLM import here: in the main venv every
test module of this directory skips itself (``pytest.importorskip("vllm.sampling_params")``)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest


def _have_vllm() -> bool:
    # Not find_spec("vllm"): where vLLM is absent, this very directory is found as a namespace package "vllm".
    try:
        return importlib.util.find_spec("vllm.sampling_params") is not None
    except ImportError:
        return False
    finally:
        mod = sys.modules.get("vllm")
        if mod is not None and getattr(mod, "__file__", None) is None:  # that namespace package: forget it
            del sys.modules["vllm"]


if _have_vllm():
    # vLLM's engine processes inherit the environment: Triton's interpreter (set by tests/conftest.py for the op
    # tests) is not for them, and the KV cache is kept small (GiB).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from _vllm_models import save_models

    return save_models(tmp_path_factory.mktemp("vllm_models"))


@pytest.fixture(scope="session")
def checkpoints(models, tmp_path_factory):
    """Guided checkpoints: ``one`` (base + value, alpha 0.7) and ``proxy`` (five terms: value +1, anti-expert
    -0.5, a smaller vocabulary with a map, the same smaller vocabulary without a map (base ids >= 256 read its pad
    id), a larger vocabulary with a map; ids >= 290 suppressed)."""
    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    from _vllm_models import PROXY_ALPHAS, write_proxy

    root = tmp_path_factory.mktemp("vllm_guided")
    out = {"one": str(root / "one"), "proxy": str(root / "proxy")}
    write_guided_checkpoint(out["one"], models["base"], [{"model": models["value"], "alpha": 0.7}])
    write_proxy(out["proxy"], models, PROXY_ALPHAS)
    return out


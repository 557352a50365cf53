"""Build script: the optional CUDA extension ``ivl_kernels._C`` (metadata lives in pyproject.toml).

The extension is compiled when torch is a CUDA build and ``nvcc`` is found (``$CUDA_HOME``, else
``/usr/local/cuda``). ``IVL_KERNELS_SKIP_CUDA_BUILD=1`` skips it. Without a toolchain the install is pure
Python (Triton and torch backends only) and says so. Nothing here touches the network.
"""

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


REQUIRE = os.environ.get("IVL_KERNELS_REQUIRE_CUDA_BUILD", "0") not in ("", "0")


def _say(msg: str) -> None:
    print(f"[ivl-kernels] {msg}", file=sys.stderr)


def _no_extension(msg: str):
    if REQUIRE:
        raise RuntimeError(f"IVL_KERNELS_REQUIRE_CUDA_BUILD=1 but the CUDA extension cannot be built: {msg}")
    _say(msg)
    return None


def _missing_library_headers(cuda_home: str) -> list:
    """Include dirs for CUDA library headers that torch's headers include (cuSPARSE, cuBLAS) when the toolkit
    at ``cuda_home`` ships only the compiler and runtime: the pip wheels torch depends on carry them."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        for sub in sorted(os.listdir(root)):
            inc = os.path.join(root, sub, "include")
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                dirs.append(inc)
    if dirs:
        _say(f"CUDA library headers not in {cuda_home}/include; using {dirs[0]} (from the nvidia pip wheels)")
    return dirs[:1]


def _cuda_extension():
    if os.environ.get("IVL_KERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return _no_extension("IVL_KERNELS_SKIP_CUDA_BUILD set: pure-Python install (Triton and torch backends)")
    try:
        import torch
    except ImportError:
        return _no_extension("torch is not importable in the build environment: pure-Python install. "
                             "Install torch first and build with `pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        return _no_extension(f"torch {torch.__version__} is a CPU build: pure-Python install (no CUDA extension)")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return _no_extension(f"nvcc not found (looked in {cuda_home}/bin and PATH): pure-Python install")
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported: set it first.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the architecture from: build for Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    include_dirs = _missing_library_headers(cuda_home)
    _say(f"building the CUDA extension with {nvcc} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        name="ivl_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/guided_logits.cu"],
        depends=["csrc/guided_logits_kernel.cuh"],  # the kernel (shared with the tests' host emulation)
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    return ext, BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


_ext = _cuda_extension()
if _ext is None:
    setup()
else:
    setup(ext_modules=[_ext[0]], cmdclass={"build_ext": _ext[1]})

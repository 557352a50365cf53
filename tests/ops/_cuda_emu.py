"""Builds and loads the host SIMT emulation of the CUDA decode kernel (csrc/emulation/) for the tests.

The kernel text of ``csrc/guided_logits_kernel.cuh`` is compiled by the host C++ compiler (``$CXX``, else
``g++``, ``clang++`` or ``c++``) with ``csrc/emulation/simt_emu.{h,cpp}`` into a shared library loaded with
ctypes: no CUDA toolkit, no torch headers, a few seconds on one core. The library is cached under
``build/simt_emu/`` (else a temporary directory), keyed by the sources, the flags and the compiler.

``guided_logits(...)`` has the signature of ``torch.ops.ivl_kernels.guided_logits_decode_`` (CPU tensors) plus
``max_blocks`` (the grid cap, the extension's ``SMs * 16``) and ``workers`` (OS threads); it returns what the
launch did (``rows``, ``blocks``, ``warps``, ``shuffle_rounds``, ``vector_loads``) and raises ``EmulationError``
with the emulation's message when a lane faults (a misaligned or out-of-bounds vector load, a divergent
shuffle).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = [os.path.join(CSRC, "emulation", "guided_logits_emu.cpp"), os.path.join(CSRC, "emulation", "simt_emu.cpp")]
HEADERS = [os.path.join(CSRC, "emulation", "simt_emu.h"), os.path.join(CSRC, "guided_logits_kernel.cuh")]
FLAGS = ["-std=c++17", "-O2", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wextra",
         "-Wno-unknown-pragmas", "-pthread"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class EmulationError(RuntimeError):
    """The emulated kernel faulted (the message says where and why)."""


def find_compiler() -> Optional[list]:
    """The host C++ compiler command: ``$CXX`` (may carry arguments, e.g. ``ccache g++``), else the first of
    ``g++``, ``clang++``, ``c++`` on PATH; None when there is none."""
    env = shlex.split(os.environ.get("CXX", ""))
    if env and shutil.which(env[0]):
        return [shutil.which(env[0])] + env[1:]
    for name in ("g++", "clang++", "c++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def _compiler_id(cxx: list) -> str:
    try:
        return subprocess.run(cxx + ["--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # pragma: no cover
        return " ".join(cxx)


def build(cxx: list) -> str:
    """Path of the compiled library (compiled now unless cached). Raises RuntimeError with the compiler output."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    h.update(" ".join(cxx + FLAGS).encode() + _compiler_id(cxx).encode())
    name = f"libivl_simt_emu-{h.hexdigest()[:16]}.so"
    cache = None
    for d in (os.path.join(ROOT, "build", "simt_emu"), os.path.join(tempfile.gettempdir(), "ivl_simt_emu")):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            cache = d
            break
    if cache is None:
        cache = tempfile.mkdtemp(prefix="ivl_simt_emu-")
    lib = os.path.join(cache, name)
    if os.path.exists(lib):
        return lib
    tmp = f"{lib}.{os.getpid()}.tmp"
    cmd = cxx + FLAGS + ["-I", CSRC] + SOURCES + ["-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    os.replace(tmp, lib)  # atomic: a concurrent run sees the whole library or none
    return lib


class _Args(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int), ("base_mode", ctypes.c_int), ("base_is_float", ctypes.c_int),
        ("value_hidden", ctypes.c_void_p), ("vh_stride", ctypes.c_int64),
        ("value_weight", ctypes.c_void_p), ("vw_stride", ctypes.c_int64),
        ("vocab_map", ctypes.c_void_p), ("map_is_int64", ctypes.c_int),
        ("base_logits", ctypes.c_void_p), ("bl_stride", ctypes.c_int64),
        ("base_hidden", ctypes.c_void_p), ("bh_stride", ctypes.c_int64),
        ("base_weight", ctypes.c_void_p), ("bw_stride", ctypes.c_int64),
        ("alpha", ctypes.c_void_p), ("alpha_scalar", ctypes.c_float), ("fill", ctypes.c_float),
        ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
        ("M", ctypes.c_int), ("Vb", ctypes.c_int64), ("Vv", ctypes.c_int64), ("Hv", ctypes.c_int), ("Hb", ctypes.c_int),
        ("max_blocks", ctypes.c_int64), ("workers", ctypes.c_int),
    ]


class _Result(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int), ("blocks", ctypes.c_int), ("warps", ctypes.c_int64),
                ("shuffle_rounds", ctypes.c_int64), ("vector_loads", ctypes.c_int64)]


@dataclass
class LaunchInfo:
    rows: int
    blocks: int
    warps: int
    shuffle_rounds: int
    vector_loads: int


def _aligned16(t: torch.Tensor) -> bool:
    """The extension's precondition for tensors read with 16-byte loads (guided_logits.cu: aligned16)."""
    vec = 16 // t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and t.shape[-1] % vec == 0
            and (t.dim() == 1 or t.stride(0) % vec == 0))


class Emulator:
    def __init__(self, path: str):
        self.path = path
        self.lib = lib = ctypes.CDLL(path)
        errbuf = [ctypes.c_char_p, ctypes.c_size_t]
        lib.ivl_emu_guided_logits.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_Result)] + errbuf
        lib.ivl_emu_guided_logits.restype = ctypes.c_int
        for name in ("ivl_emu_f32_to_f16", "ivl_emu_f16_to_f32", "ivl_emu_f32_to_bf16", "ivl_emu_bf16_to_f32"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            getattr(lib, name).restype = None
        lib.ivl_emu_shuffle_table.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p] + errbuf
        lib.ivl_emu_lockstep.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + errbuf
        lib.ivl_emu_faulty.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + errbuf
        lib.ivl_emu_set_portable_switch.argtypes = [ctypes.c_int]
        self.threads_per_block = lib.ivl_emu_threads_per_block()
        self.max_rows = lib.ivl_emu_max_rows()
        self.blocks_per_sm = lib.ivl_emu_blocks_per_sm()

    @staticmethod
    def _check(rc: int, err) -> None:
        if rc != 0:
            raise EmulationError(err.value.decode(errors="replace"))

    # -- the decode kernel --------------------------------------------------------------------------------------
    def guided_logits(self, value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                      alpha_tensor, alpha_scalar: float, fill: float, out, *, max_blocks: int,
                      workers: int = 1) -> LaunchInfo:
        """``torch.ops.ivl_kernels.guided_logits_decode_`` on CPU tensors, through the emulated kernel."""
        dt = value_hidden.dtype
        if dt not in DTYPE_CODE:
            raise ValueError(f"value dtype must be float32, float16 or bfloat16, got {dt}")
        tensors = [value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, out]
        if any(t is not None and t.device.type != "cpu" for t in tensors):
            raise ValueError("the emulation runs on CPU tensors")
        M, Hv = value_hidden.shape
        Vv = value_weight.shape[0]
        Vb = out.shape[1]
        # guided_logits.cu's checks, the ones the kernel's memory accesses rely on.
        if not (value_weight.dtype == dt and value_weight.shape[1] == Hv and out.shape[0] == M and out.stride(1) == 1):
            raise ValueError("value_hidden [M, Hv], value_weight [Vv, Hv] and out [M, Vb] (contiguous last dim)")
        if not (_aligned16(value_hidden) and _aligned16(value_weight)):
            raise ValueError("value tensors need stride(-1) == 1 and 16-byte aligned rows")
        if (base_logits is None) == (base_hidden is None or base_weight is None):
            raise ValueError("give base_logits or base_hidden + base_weight")
        if base_logits is not None:
            base_mode, Hb = 1, 0
            if base_logits.dtype not in (dt, torch.float32) or out.dtype != base_logits.dtype:
                raise ValueError("base_logits (and out) dtype must be the value dtype or float32")
            if not (base_logits.stride(1) == 1 and tuple(base_logits.shape) == (M, Vb)):
                raise ValueError("base_logits must be [M, Vb] with a contiguous last dim")
        else:
            base_mode, Hb = 2, base_hidden.shape[1]
            if base_hidden.dtype != dt or base_weight.dtype != dt or out.dtype != torch.float32:
                raise ValueError("base_hidden/base_weight in the value dtype, out float32")
            if not (_aligned16(base_hidden) and _aligned16(base_weight)):
                raise ValueError("base tensors need stride(-1) == 1 and 16-byte aligned rows")
            if tuple(base_weight.shape) != (Vb, Hb) or base_hidden.shape[0] != M:
                raise ValueError("base_weight must be [Vb, Hb], base_hidden [M, Hb]")
        if vocab_map is not None:
            if vocab_map.dtype not in (torch.int32, torch.int64) or vocab_map.shape != (Vb,) or vocab_map.stride(0) != 1:
                raise ValueError("vocab_map must be a contiguous int32/int64 [Vb] tensor")
        if alpha_tensor is not None:
            if alpha_tensor.dtype != torch.float32 or not alpha_tensor.is_contiguous() or alpha_tensor.numel() != M:
                raise ValueError("alpha_tensor must be a contiguous float32 [M] tensor")
        ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        a = _Args(
            dtype=DTYPE_CODE[dt], base_mode=base_mode,
            base_is_float=int(base_logits is not None and base_logits.dtype == torch.float32),
            value_hidden=ptr(value_hidden), vh_stride=value_hidden.stride(0),
            value_weight=ptr(value_weight), vw_stride=value_weight.stride(0),
            vocab_map=ptr(vocab_map), map_is_int64=int(vocab_map is not None and vocab_map.dtype == torch.int64),
            base_logits=ptr(base_logits), bl_stride=base_logits.stride(0) if base_logits is not None else 0,
            base_hidden=ptr(base_hidden), bh_stride=base_hidden.stride(0) if base_hidden is not None else 0,
            base_weight=ptr(base_weight), bw_stride=base_weight.stride(0) if base_weight is not None else 0,
            alpha=ptr(alpha_tensor), alpha_scalar=alpha_scalar, fill=fill,
            out=ptr(out), out_stride=out.stride(0),
            M=M, Vb=Vb, Vv=Vv, Hv=Hv, Hb=Hb, max_blocks=max_blocks, workers=workers)
        res = _Result()
        err = ctypes.create_string_buffer(4096)
        self._check(self.lib.ivl_emu_guided_logits(ctypes.byref(a), ctypes.byref(res), err, len(err)), err)
        return LaunchInfo(res.rows, res.blocks, res.warps, res.shuffle_rounds, res.vector_loads)

    # -- the emulation's own checks -------------------------------------------------------------------------------
    def convert(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``name`` in f32_to_f16, f16_to_f32, f32_to_bf16, bf16_to_f32 (16-bit values as int16 bit patterns)."""
        x = x.contiguous()
        out_dtype = torch.float32 if name.endswith("f32") else torch.int16
        y = torch.empty(x.shape, dtype=out_dtype)
        getattr(self.lib, f"ivl_emu_{name}")(x.data_ptr(), y.data_ptr(), x.numel())
        return y

    def shuffle_table(self, blocks: int, threads: int) -> torch.Tensor:
        out = torch.full((blocks * threads, 33), float("nan"))
        err = ctypes.create_string_buffer(4096)
        self._check(self.lib.ivl_emu_shuffle_table(blocks, threads, out.data_ptr(), err, len(err)), err)
        return out

    def lockstep(self, blocks: int, threads: int) -> torch.Tensor:
        counters = torch.zeros(2 * (blocks * threads // 32), dtype=torch.int32)
        seen = torch.full((2, blocks * threads), -1, dtype=torch.int32)
        err = ctypes.create_string_buffer(4096)
        self._check(self.lib.ivl_emu_lockstep(blocks, threads, counters.data_ptr(), seen.data_ptr(), err, len(err)),
                    err)
        return seen

    def faulty(self, which: int, n16: int = 8) -> None:
        buf = torch.zeros(n16 * 4, dtype=torch.int32)
        assert buf.data_ptr() % 16 == 0
        out = torch.zeros(32)
        err = ctypes.create_string_buffer(4096)
        self._check(self.lib.ivl_emu_faulty(which, buf.data_ptr(), n16, out.data_ptr(), err, len(err)), err)

    def set_portable_switch(self, on: bool) -> bool:
        return self.lib.ivl_emu_set_portable_switch(int(on)) == 0

    def portable_switch(self) -> bool:
        return bool(self.lib.ivl_emu_portable_switch())


_EMULATOR: Optional[Emulator] = None


def load() -> Emulator:
    """The emulator (built on first use). Raises LookupError when there is no host C++ compiler."""
    global _EMULATOR
    if _EMULATOR is None:
        cxx = find_compiler()
        if cxx is None:
            raise LookupError("no host C++ compiler ($CXX, g++, clang++ or c++) to build the CUDA kernel's emulation")
        _EMULATOR = Emulator(build(cxx))
    return _EMULATOR

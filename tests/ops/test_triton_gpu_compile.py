"""Every Triton kernel compiles for real GPUs (sm_80, sm_90, sm_100) on a machine without one, exactly as launched.

The interpreter runs the kernels' arithmetic on CPU but never lowers them: it would not catch a construct that
fails in Triton's GPU compiler (a dot shape or precision mode, an atomic, a dtype in a store), nor a tile
configuration that runs out of shared memory or spills registers. This test compiles each kernel ahead of time,
through ptxas, with the specialisation Triton's JIT applies at launch: unit integers become constants, integers
and pointers get their divisibility-by-16 hints, small integers are typed i32 (the JIT's own binder decides, not
a copy of its rules). It does so by calling the real launchers (``launch_triton``, ``launch_fwd``,
``launch_bwd``) on meta-device stand-ins of the benchmark shapes (DESIGN's "qwen" workload) under a stand-in
driver for the target GPU, with each ``kernel[grid](...)`` turned into ``JITFunction.run(..., warmup=True)``:
Triton's own launch path up to, but not including, the launch. The argument lists therefore cannot drift from
the launchers. Each compiled kernel must fit the opt-in shared memory of its GPU and must not spill registers
(``ptxas -v`` on the kernel's PTX, with the ptxas and flags Triton uses; results cached beside Triton's cache),
and each half-precision tile kernel must reach the tensor cores: ``wgmma`` on sm_90 and ``tcgen05.mma`` on sm_100
(B200) for tiles of 64+ rows, ``mma.sync`` otherwise (``expected_mma``).

It runs in a subprocess because the test session has Triton in interpreter mode; the subprocess prints one row
per compiled kernel: registers, shared memory, stack, spill stores/loads, and how many parameters the JIT turned
into the constant 1 / gave a divisibility-by-16 hint / typed i32 (``=1/d16/i32``). Run it directly for the
table: ``python tests/ops/test_triton_gpu_compile.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from ivl_kernels._triton import HAS_TRITON

# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100/H200 (sm_90) and B200 (sm_100) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448, 100: 232448}
# sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4, L40) lower like sm_80 but give a block 99 KiB: what is compiled for
# sm_80 must fit there too, or those GPUs fail at launch.
SHARED_MEMORY_LIMIT_SM8X = 101376
# DESIGN's "qwen" workload: Qwen2.5-7B base head, Qwen2.5-0.5B value head.
QWEN = dict(Vb=152064, Hb=3584, Vv=151936, Hv=896)
LOGITS_ROWS = (1, 8, 64, 512)         # decode (M = 1, 8), scoring, prefill
BASE_MODES = ("none", "logits", "hidden")


# --------------------------------------------------------------------------------------------------------------
# What to compile: one job = one launcher call at one compute capability
# --------------------------------------------------------------------------------------------------------------
# Loss rows: N = 16383, one short of the benchmark's 16384 tokens. The launchers chunk the meta stand-ins as on a
# GPU (rows of ~4096, multiples of 128), so the last chunk's row count is odd: both specialisations of a row count
# (a multiple of 16, and not), as a user's arbitrary N launches them, are compiled.
N_LOSS = 16383
# Except the tile kernels on sm_80, compiled at the benchmark's 16384 (every chunk a multiple of 16 rows): with
# Triton 3.6 the one-pass pointer logits kernel (bf16, 128 x 128 x 64, value-only, alpha tensor, smoothing) spills
# 16 bytes on sm_80 when the row count is not a multiple of 16 (Triton 3.8: none; sm_90: none). Left, not hidden:
# an A100 on Triton 3.6 takes that variant for such a chunk (``auto`` times it against cuBLAS like any other).
N_SM80_TILES = 16384
# Coverage per (dtype, arch[, N]): "full" = every flag combination; "rows" = every row count and base mode, the
# other flags alternating (each value still appears); "spot" = every row count (logits) or base mode (loss),
# flags alternating. bf16 on sm_90 is the benchmark (H100/H200); fp16 lowers like bf16; fp32 has its own tiles.
# sm_100 (B200), spot checks of the kernels with matrix work: nothing there has run on one, but a kernel that
# does not build for it would fail at a user's first call (auto skips such a candidate; the decode head has none).
LOGITS_COVERAGE = (("bf16", 90, "full"), ("bf16", 80, "rows"), ("fp32", 90, "rows"), ("fp32", 80, "spot"),
                   ("fp16", 90, "spot"), ("bf16", 100, "spot"))
LOSS_COVERAGE = (("bf16", 90, N_LOSS, "full"), ("bf16", 80, N_LOSS, "rows"), ("fp32", 90, N_LOSS, "rows"),
                 ("fp32", 80, N_LOSS, "spot"), ("fp16", 90, N_LOSS, "spot"))
TILES_COVERAGE = (("bf16", 90, N_LOSS, "full"), ("bf16", 80, N_SM80_TILES, "spot"), ("fp32", 90, N_LOSS, "spot"),
                  ("fp32", 80, N_SM80_TILES, "spot"), ("fp16", 90, N_LOSS, "spot"), ("bf16", 100, N_LOSS, "spot"))
# The TMA + persistent logits kernel (``_tile_launch``, the ``tma`` kind that ``auto`` measures): sm_90, no map, in
# the benchmark's dtype (float16 spilled 4 bytes in one epilogue: the loss's one-pass mode with base hidden states;
# ``auto`` times it like any candidate).
TMA_COVERAGE = (("bf16", 90, N_LOSS), ("bf16", 100, N_LOSS))
# The ``wide`` kind (``_tile_launch.WIDE_TILES``: 128 x 256, the epilogue in two column halves), which ``auto``
# measures where ``wide_applies``: on sm_90 the TMA kernel in every mode and base term of the head and the loss
# (a whole-tile epilogue spilled 84-1732 bytes). Where the wide tiles do not apply (a map, the loss with base
# logits, sm_100) the kind compiles the ``tma`` kind's tiles: covered too (mostly the same kernels as above).
WIDE_COVERAGE = (("bf16", 90, N_LOSS), ("fp16", 90, N_LOSS), ("bf16", 100, N_LOSS))
# The ``hybrid`` kind (the loss's one pass with ``G`` finished in place by ``_ce_finish_grad_kernel``, the products
# in cuBLAS; its logits kernel is the ``wide`` kind's, compiled above): where ``auto`` measures it (half precision,
# sm_90) and where it can be forced (sm_80, float32, sm_100), each base mode, with and without a map.
HYBRID_COVERAGE = (("bf16", 90, N_LOSS), ("fp16", 90, N_LOSS), ("bf16", 80, N_SM80_TILES), ("fp32", 90, N_LOSS),
                   ("bf16", 100, N_LOSS))


def jobs() -> list:
    """``(op, dtype, rows, base, with_map, alpha_tensor, with_l1, grad_skip, cc)`` launcher calls to compile."""
    out = []
    for dtype, cc, cover in LOGITS_COVERAGE:
        for i, M in enumerate(LOGITS_ROWS):
            bases = ("logits", "hidden") if cover != "spot" else (("logits", "hidden")[i % 2],)
            for j, base in enumerate(bases):
                odd = (i + j) % 2 == 1
                flags = ([(m, a) for m in (False, True) for a in (False, True)] if cover == "full" else
                         [(not odd, odd)])
                for with_map, alpha_tensor in flags:
                    out.append(("logits", dtype, M, base, with_map, alpha_tensor, False, False, cc))
    for dtype, cc, N, cover in LOSS_COVERAGE:
        for j, base in enumerate(BASE_MODES):
            for with_map in ((False, True) if cover != "spot" else (j % 2 == 1,)):
                for with_l1 in ((False, True) if cover == "full" else ((j + with_map) % 2 == 0 or cover == "spot",)):
                    odd = (j + with_map + (with_l1 if cover == "full" else 0)) % 2 == 1
                    out.append(("fwd", dtype, N, base, with_map, odd, with_l1, False, cc))
                    out.append(("bwd", dtype, N, base, with_map, odd, with_l1, False, cc))
                    out.append(("one", dtype, N, base, with_map, not odd, with_l1, False, cc))
    # The tile GEMMs (IVL_KERNELS_GEMM=tiles): the loss's (no L1 term: that stays on cuBLAS), every base mode and
    # map / alpha combination in bf16 on sm_90, alternating elsewhere.
    for dtype, cc, N, cover in TILES_COVERAGE:
        for j, base in enumerate(BASE_MODES):
            for with_map in ((False, True) if cover != "spot" else (j % 2 == 1,)):
                odd = (j + with_map) % 2 == 1
                for op in ("fwd", "bwd", "one"):
                    out.append(("tiles:" + op, dtype, N, base, with_map, odd if op != "one" else not odd, False,
                                False, cc))
        # The guided head from GEMM_MIN_ROWS rows as one tile GEMM (MODE 3), at the prefill size.
        for j, base in enumerate(("logits", "hidden")):
            for with_map in ((False, True) if cover != "spot" else (j % 2 == 1,)):
                out.append(("tiles:logits", dtype, 512, base, with_map, (j + with_map) % 2 == 1, False, False, cc))
    for dtype, cc, N in TMA_COVERAGE:
        for j, base in enumerate(BASE_MODES):
            for op in ("fwd", "bwd", "one"):
                out.append(("tiles-tma:" + op, dtype, N, base, False, (j + (op == "one")) % 2 == 1, False, False, cc))
        for j, base in enumerate(("logits", "hidden")):
            out.append(("tiles-tma:logits", dtype, 512, base, False, j % 2 == 1, False, False, cc))
    for dtype, cc, N in WIDE_COVERAGE:
        full = dtype == "bf16" and cc == 90
        for j, base in enumerate(BASE_MODES):
            for op in ("fwd", "bwd", "one"):
                for with_map in ((False, True) if full and op == "one" else (False,)):
                    out.append(("tiles-wide:" + op, dtype, N, base, with_map, (j + (op == "one")) % 2 == 1, False,
                                False, cc))
        for j, base in enumerate(("logits", "hidden")):
            for with_map in ((False, True) if full else (False,)):
                out.append(("tiles-wide:logits", dtype, 512, base, with_map, (j + with_map) % 2 == 1, False, False,
                            cc))
    for dtype, cc, N in HYBRID_COVERAGE:
        for j, base in enumerate(BASE_MODES):
            out.append(("tiles-hybrid:one", dtype, N, base, j == 1, j % 2 == 0, False, False, cc))
    return out


# --------------------------------------------------------------------------------------------------------------
# Meta-device stand-ins of the benchmark tensors, handed to the real launchers
# --------------------------------------------------------------------------------------------------------------
def _launcher_call(job):
    """``(fn, args)``: the launcher and the arguments the public op would pass it for this job."""
    import torch

    from ivl_kernels.ops import guided_cross_entropy as gce
    from ivl_kernels.ops import guided_logits as gl

    op, dtype, rows, base, with_map, alpha_tensor, with_l1, grad_skip, cc = job
    if op.startswith(("tiles:", "tiles-tma:", "tiles-wide:", "tiles-hybrid:")):
        kind, inner = op.split(":", 1)
        fn, args = _launcher_call((inner, *job[1:]))

        def with_tiles(*a):
            old = os.environ.get("IVL_KERNELS_GEMM")
            os.environ["IVL_KERNELS_GEMM"] = {"tiles": "tiles", "tiles-tma": "tma", "tiles-wide": "wide",
                                              "tiles-hybrid": "hybrid"}[kind]
            try:
                return fn(*a)
            finally:
                if old is None:
                    del os.environ["IVL_KERNELS_GEMM"]
                else:
                    os.environ["IVL_KERNELS_GEMM"] = old

        return with_tiles, args
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    Vb, Hb, Vv, Hv = QWEN["Vb"], QWEN["Hb"], QWEN["Vv"], QWEN["Hv"]

    def t(*shape, dtype=dt):
        # Meta tensors: no memory; their data pointer (0) is 16-byte aligned, as the caching allocator's are.
        return torch.empty(shape, dtype=dtype, device="meta")

    vh, vw = t(rows, Hv), t(Vv, Hv)
    base_logits = t(rows, Vb) if base == "logits" else None
    base_hidden, base_weight = (t(rows, Hb), t(Vb, Hb)) if base == "hidden" else (None, None)
    vocab_map = t(Vb, dtype=torch.int32) if with_map else None       # VocabMap.index is int32
    alpha = t(rows, dtype=torch.float32) if alpha_tensor else None
    alpha_scalar, fill = (0.0 if alpha_tensor else 1.5), -2.0
    if op == "logits":
        out = base_logits if base_logits is not None else t(rows, Vb, dtype=torch.float32)
        return gl.launch_triton, (vh, vw, base_logits, base_hidden, base_weight, vocab_map, alpha, alpha_scalar,
                                  fill, out)
    target = t(rows, dtype=torch.int64)          # target_local: int64, as the public function builds it
    if op == "fwd":
        return gce.launch_fwd, (vh, vw, base_logits, base_hidden, base_weight, vocab_map, alpha, alpha_scalar,
                                fill, target, Vb, with_l1)
    lse, g = t(rows, dtype=torch.float32), t(rows, dtype=torch.float32)
    if op == "bwd":
        return gce.launch_bwd, (vh, vw, base_logits, base_hidden, base_weight, vocab_map, alpha, alpha_scalar,
                                fill, target, lse, g, Vb, 0.9, 0.1 / Vb, (1.0 / Vv) if with_l1 else 0.0)

    def one_pass(*a):  # statistics and gradients in one pass (the forward of "mean"/"sum" losses)
        return gce.chunked_loss(*a, want_stats=True, g=g, h=g, need_dvh=True, need_dvw=True)

    return one_pass, (vh, vw, base_logits, base_hidden, base_weight, vocab_map, alpha, alpha_scalar, fill, target,
                      Vb, with_l1, 0.9, 0.1 / Vb, (1.0 / Vv) if with_l1 else 0.0)


class _TargetDriver:
    """Stands in for the active GPU driver: what ``JITFunction.run`` asks before it compiles.

    The device index is the compute capability, so each target keeps its own in-process kernel cache."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.cc = cc
        self.target = GPUTarget("cuda", cc, 32)

    def get_current_device(self):
        return self.cc

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _kernels():
    """Every Triton kernel of the ops, wherever it lives (an op that grows into a package keeps its kernels in a
    submodule; missing one here would let that kernel launch for real instead of compiling)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import ivl_kernels.ops as ops

    found = {}
    for info in pkgutil.walk_packages(ops.__path__, ops.__name__ + "."):
        mod = importlib.import_module(info.name)
        for v in vars(mod).values():
            if isinstance(v, JITFunction):
                found[id(v)] = v
    return list(found.values())


@contextlib.contextmanager
def _compile_instead_of_launch(cc: int, on_launch):
    """Inside: ``kernel[grid](...)`` of any kernel of the ops calls ``on_launch(kernel, args, kwargs, compile)``;
    ``compile()`` runs the JIT's own ``run`` with ``warmup=True`` (bind, specialise, compile; no launch) for
    ``sm_{cc}`` and returns the ``CompiledKernel``; ``key()`` gives the JIT's in-process cache key."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction, compute_cache_key

    kernels = _kernels()
    previous = getattr(driver, "_active", None)    # reset_active() would look for a real driver: none here
    driver.set_active(_TargetDriver(cc))

    def hook(kernel):
        def run(*args, grid, warmup, **kwargs):
            def compile_():
                return JITFunction.run(kernel, *args, grid=grid, warmup=True, **kwargs)

            def key():
                kernel_cache, kernel_key_cache, target, backend, binder = kernel.device_caches[cc]
                _, specialization, options = binder(*args, **kwargs)
                return kernel.__name__, cc, compute_cache_key({}, specialization, options)

            on_launch(kernel, args, kwargs, compile_, key)

        return run

    try:
        for k in kernels:
            k.run = hook(k)      # an instance attribute: shadows JITFunction.run, which kernel[grid] calls
        yield
    finally:
        for k in kernels:
            k.__dict__.pop("run", None)
        driver.set_active(previous)


# --------------------------------------------------------------------------------------------------------------
# Resource usage: ptxas -v on the compiled PTX
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _ptxas_cmd(cc: int) -> tuple:
    """ptxas as Triton's ``make_cubin`` runs it (same binary, arch and register-allocation flags)."""
    import inspect

    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(cc).path
    src = inspect.getsource(nv.CUDABackend.make_cubin)
    extra = ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in src else []
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return (ptxas, "-lineinfo", "-v", *extra, f"--gpu-name={nv.sm_arch_from_capability(cc)}"), version


def _cache_dir() -> str:
    from triton import knobs

    d = os.path.join(knobs.cache.dir, "ivl_ptxas_usage")
    os.makedirs(d, exist_ok=True)
    return d


def ptxas_usage(ptx: str, cc: int) -> dict:
    """``registers``, ``stack``, ``spill_stores``, ``spill_loads`` (bytes) of the kernel, from ``ptxas -v``
    (cached by PTX and command, beside Triton's own cache)."""
    import tempfile

    cmd, version = _ptxas_cmd(cc)
    key = hashlib.sha256((ptx + "\0" + " ".join(cmd[1:]) + "\0" + version).encode()).hexdigest()
    cached = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([*cmd, src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    assert m and regs, log
    usage = dict(registers=int(regs.group(1)), stack=int(m.group(1)), spill_stores=int(m.group(2)),
                 spill_loads=int(m.group(3)))
    with open(cached + ".tmp%d" % os.getpid(), "w") as f:
        json.dump(usage, f)
    os.replace(cached + ".tmp%d" % os.getpid(), cached)
    return usage


def mma_kind(ptx: str) -> str:
    """The matrix instructions in ``ptx``: ``tcgen05`` (Blackwell's tensor-memory MMA), ``wgmma`` (Hopper's
    warpgroup MMA), ``mma`` (``mma.sync``, sm_80's tensor cores), or ``-`` (none: FMA only)."""
    if re.search(r"\btcgen05\.mma", ptx):
        return "tcgen05"
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "-"


def expected_mma(r: dict) -> str:
    """The matrix instruction a tile kernel must use: a half-precision dot over tiles of 64+ rows (a warpgroup's
    MMA shape) must be ``wgmma`` on sm_90 and ``tcgen05`` on sm_100, smaller tiles ``mma.sync`` at least, and every
    half-precision dot on sm_80 ``mma.sync``. ``None`` where nothing is required (no dot, or float32)."""
    if r["kernel"] not in TILE_KERNELS or r["dtype"] == "fp32":
        return None
    if (r["block_m"] or 0) >= 64 and r["cc"] >= 90:
        return "tcgen05" if r["cc"] >= 100 else "wgmma"
    return "mma"


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------
KERNEL_NAMES = {"_guided_logits_kernel": "logits", "_ce_rows_kernel": "loss rows", "_l1_rows_kernel": "loss L1",
                "_ce_logits_tile_kernel": "tile z", "_ce_logits_tma_kernel": "tile z tma",
                "_ce_combine_kernel": "loss lse", "_ce_dx_tile_kernel": "loss dX", "_ce_dw_tile_kernel": "loss dW",
                "_ce_finish_grad_kernel": "loss G"}
# Kernels whose half-precision dots must reach the tensor cores (``expected_mma``).
TILE_KERNELS = ("logits", "tile z", "tile z tma", "loss dX", "loss dW")
# A pointer every launch of the kernel passes 16-byte aligned (the stand-ins are): it must carry the hint.
ALIGNED_POINTER = {"logits": "vh_ptr", "tile z": "xv_ptr", "tile z tma": "part_ptr", "loss lse": "part_ptr",
                   "loss dX": "p_ptr", "loss dW": "p_ptr", "loss G": "p_ptr"}


def _describe(job, kwargs) -> str:
    op, dtype, rows, base, with_map, alpha_tensor, with_l1, grad_skip, cc = job
    parts = [f"{'M' if op.endswith('logits') else 'N'}={rows}", f"base={base}", "map" if with_map else "no-map",
             "alpha[]" if alpha_tensor else "alpha=f"]
    if op != "logits":
        parts[0] = f"{op}:" + parts[0]
        flags = [k.lower() for k in ("COMBINED", "WITH_L1", "SMOOTH", "STATS", "GRAD", "FACTORS", "ACCUMULATE")
                 if kwargs.get(k)] + ([f"mode{kwargs['MODE']}"] if "MODE" in kwargs else [])
        parts.append("+".join(flags))
        if "BLOCK" in kwargs:
            parts.append(f"B{kwargs['BLOCK']} w{kwargs.get('num_warps')}")
        elif "BLOCK_R" in kwargs:
            parts.append(f"R{kwargs['BLOCK_R']}x" + (f"T{kwargs['BLOCK_T']}" if "BLOCK_T" in kwargs else
                                                     f"N{kwargs['TILE_N']} w{kwargs.get('num_warps')}"))
        else:
            parts.append("x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                         + f" w{kwargs.get('num_warps')} s{kwargs.get('num_stages')}"
                         + (f" e{kwargs['EPILOGUE_SPLIT']}" if kwargs.get("EPILOGUE_SPLIT", 1) != 1 else ""))
        return " ".join(parts)
    tiles = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K"))
    parts.append(f"{tiles} w{kwargs.get('num_warps')} s{kwargs.get('num_stages')}"
                 + (f" r{kwargs['maxnreg']}" if kwargs.get("maxnreg") else ""))
    return " ".join(parts)


def _specialisation(compiled, kernel) -> dict:
    """What the JIT specialised in ``compiled``: non-constexpr parameters that became the constant 1, those with
    a divisibility-by-16 hint, and integer parameters typed i32."""
    src, names = compiled.src, kernel.arg_names
    declared = {p.name for p in kernel.params if p.is_constexpr}
    return dict(unit=sorted(names[k[0]] for k, v in src.constants.items()
                            if names[k[0]] not in declared and v == 1),
                div16=sorted(names[k[0]] for k, a in src.attrs.items() if ["tt.divisibility", 16] in a),
                i32=sorted(n for n, ty in src.signature.items() if ty == "i32"))


def _job_keys(job) -> list:
    """The JIT cache keys of every launch this launcher call makes (no compiling)."""
    fn, args = _launcher_call(job)
    keys = []
    with _compile_instead_of_launch(job[-1], lambda kernel, a, kw, compile_, key: keys.append(key())):
        fn(*args)
    return keys


def _run_job(item) -> list:
    """Compile the launches of ``job`` whose keys are in ``wanted``; one result row per compiled kernel."""
    job, wanted = item
    rows, done = [], set()

    def on_launch(kernel, args, kwargs, compile_, key):
        k = key()
        if k not in wanted or k in done:  # a chunked launcher launches one kernel several times
            return
        done.add(k)
        t0 = time.time()
        compiled = compile_()
        assert compiled is not None and len(compiled.asm.get("cubin", b"")) > 0, kernel.__name__
        usage = ptxas_usage(compiled.asm["ptx"], job[-1])
        rows.append(dict(kernel=KERNEL_NAMES.get(kernel.__name__, kernel.__name__),
                         mma=mma_kind(compiled.asm["ptx"]), block_m=kwargs.get("BLOCK_M"),
                         tma=bool(re.search(r"\bcp\.async\.bulk\.tensor", compiled.asm["ptx"])),
                         variant=_describe(job, kwargs), dtype=job[1], cc=job[-1],
                         shared=compiled.metadata.shared, seconds=time.time() - t0,
                         spec=_specialisation(compiled, kernel), **usage))

    fn, args = _launcher_call(job)
    with _compile_instead_of_launch(job[-1], on_launch):
        fn(*args)
    return rows


def main() -> int:
    from concurrent.futures import ProcessPoolExecutor

    import triton

    t0 = time.time()
    todo, seen = [], set()
    for job in jobs():
        new = [k for k in _job_keys(job) if k not in seen]
        seen.update(new)
        if new:
            todo.append((job, frozenset(new)))
    # Heaviest first (the loss kernels, sm_90), so the pool's last stragglers are short.
    todo.sort(key=lambda it: (it[0][0] == "logits", -it[0][2], it[0][-1]))
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = [r for rows in pool.map(_run_job, todo) for r in rows]

    head = f"{'kernel':9} {'variant':52} {'dtype':5} {'arch':6} {'regs':>4} {'shared':>7} {'stack':>5} " \
           f"{'spill st/ld':>11} {'mma':>5} {'=1/d16/i32':>10} {'s':>5}"
    print(f"triton {triton.__version__}, {len(results)} kernels compiled with the launch specialisation")
    print(head)
    failures = []
    for r in results:
        spec = r["spec"]
        counts = "/".join(str(len(spec[k])) for k in ("unit", "div16", "i32"))
        print(f"{r['kernel']:9} {r['variant']:52} {r['dtype']:5} sm_{r['cc']:<3} {r['registers']:>4} "
              f"{r['shared']:>7} {r['stack']:>5} {r['spill_stores']:>5}/{r['spill_loads']:<5} {r['mma']:>5} "
              f"{counts:>10} {r['seconds']:5.1f}")
        unit = "stride_vh_k" if r["kernel"] == "logits" else None
        if (unit and unit not in spec["unit"]) or ALIGNED_POINTER.get(r["kernel"], "buf_ptr") not in spec["div16"]:
            # The stand-ins are contiguous and aligned: a launch specialises both.
            failures.append(f"not compiled with the launch specialisation: {r}")
        if r["shared"] > SHARED_MEMORY_LIMIT[r["cc"]]:
            # A launch that asks for more shared memory than the SM has fails only at run time.
            failures.append(f"shared memory {r['shared']} > {SHARED_MEMORY_LIMIT[r['cc']]}: {r}")
        elif r["cc"] == 80 and r["shared"] > SHARED_MEMORY_LIMIT_SM8X:
            failures.append(f"shared memory {r['shared']} > {SHARED_MEMORY_LIMIT_SM8X} (sm_86/sm_89): {r}")
        if r["kernel"] == "tile z tma" and not r["tma"]:
            failures.append(f"no TMA load (cp.async.bulk.tensor) in the TMA kernel: {r}")
        if r["spill_stores"] or r["spill_loads"]:
            failures.append(f"register spills: {r}")
        want = expected_mma(r)
        if want in ("wgmma", "tcgen05") and r["mma"] != want or want == "mma" and r["mma"] == "-":
            # A half-precision tile that lowers without tensor cores runs at a fraction of the matrix rate.
            failures.append(f"matrix instructions {r['mma']!r}, expected {want!r}: {r}")
    print(f"compiled {len(results)} kernel variants in {time.time() - t0:.0f} s ({workers} processes)")
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        return 1
    return 0


def test_mma_kind_reads_the_ptx_and_the_rule_rejects_fma_tiles():
    wg = "wgmma.fence.sync.aligned;\n wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;"
    assert mma_kind(wg) == "wgmma"
    assert mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};") == "mma"
    assert mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "-"
    row = dict(kernel="logits", dtype="bf16", cc=90, block_m=64)
    assert expected_mma(row) == "wgmma"
    assert expected_mma({**row, "block_m": 16}) == "mma"
    assert expected_mma({**row, "cc": 80}) == "mma"
    assert expected_mma({**row, "cc": 100}) == "tcgen05"
    assert mma_kind("tcgen05.mma.cta_group::1.kind::f16 [%r1], %rd1, %rd2, %r2, %p1;") == "tcgen05"
    assert expected_mma({**row, "dtype": "fp32"}) is None
    assert expected_mma({**row, "kernel": "loss rows"}) is None


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_as_launched_for_sm80_sm90_sm100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                       cwd=repo, timeout=1200)
    print(r.stdout)
    assert r.returncode == 0, (r.stdout[-6000:] + r.stderr[-6000:])
    assert "kernel variants" in r.stdout


if __name__ == "__main__":
    sys.exit(main())

"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' arithmetic on CPU but never lowers them: it would not catch a construct that
fails in Triton's GPU compiler (a dot shape or precision mode, an atomic, a dtype in a store). This test
compiles each kernel ahead of time, through ptxas, for the tile configurations the launchers pick on a GPU, in
fp32, fp16 and bf16. It runs in a subprocess because the test session has Triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ivl_kernels._triton import HAS_TRITON

POINTER_TYPES = {
    # value tensors and base tensors take the dtype under test; the rest are fixed by the launchers.
    "vh_ptr": "value", "vw_ptr": "value", "base_ptr": "value", "bh_ptr": "value", "bw_ptr": "value",
    "map_ptr": "i32", "alpha_ptr": "fp32", "tgt_ptr": "i64", "st_ptr": "fp32", "lse_ptr": "fp32",
    "g_ptr": "fp32", "dvh_ptr": "fp32", "dvw_ptr": "fp32",
}
FLOAT_ARGS = {"alpha_scalar", "fill", "smooth_self", "smooth_all", "l1_scale", "skip_threshold"}
TRITON_TYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}


def compile_kernel(kernel, dtype: str, out_type: str, constexprs: dict, options: dict, cc: int):
    """Compile ``kernel`` for ``sm_{cc}`` with pointer/scalar types from the argument names."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name == "out_ptr":
            sig[p.name] = "*" + out_type
        elif p.name in POINTER_TYPES:
            t = POINTER_TYPES[p.name]
            sig[p.name] = "*" + (TRITON_TYPE[dtype] if t == "value" else t)
        elif p.name in FLOAT_ARGS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i64"
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    opts = {k: v for k, v in options.items() if k in ("num_warps", "num_stages")}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    # A launch that asks for more shared memory than the SM has fails only at run time ("out of resources").
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[cc], (kernel.__name__, constexprs, compiled.metadata.shared)
    return compiled


def jobs() -> list:
    """(kernel module, kernel name, dtype, out type, constexprs, tile config, compute capability) to compile.

    fp32 and bf16 cover every kernel and tile configuration; fp16 lowers like bf16, so it gets the decode
    configuration of the logits kernel only.
    """
    from ivl_kernels.ops import guided_cross_entropy as gce
    from ivl_kernels.ops import guided_logits as gl

    out = []
    for dtype in ("fp32", "bf16", "fp16"):
        precision = "ieee" if dtype == "fp32" else None
        for M in ((1, 64, 512) if dtype != "fp16" else (1,)):
            cfg = gl._triton_config(M)
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            for base_mode, out_type in ((1, dtype), (2, "fp32")):
                flags = dict(HAS_MAP=M != 64, BASE_MODE=base_mode, ALPHA_IS_TENSOR=M == 1, DOT_PRECISION=precision)
                for cc in (80, 90) if M == 1 else (90,):
                    out.append(("guided_logits", "_guided_logits_kernel", dtype, out_type, dict(flags, **blocks), cfg, cc))
        if dtype == "fp16":
            continue
        for N in (64, 16384):
            cfg = gce._tile_config(N)
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            variants = [
                dict(HAS_MAP=True, BASE_MODE=2, ALPHA_IS_TENSOR=True, FUSE_L1=False, L1_ONLY=False),
                dict(HAS_MAP=False, BASE_MODE=1, ALPHA_IS_TENSOR=False, FUSE_L1=True, L1_ONLY=False),
                dict(HAS_MAP=True, BASE_MODE=0, ALPHA_IS_TENSOR=False, FUSE_L1=False, L1_ONLY=True),
            ]
            for v in variants:
                flags = dict(v, DOT_PRECISION=precision, **blocks)
                cc = 80 if N == 64 else 90
                out.append(("guided_cross_entropy", "_ce_fwd_kernel", dtype, dtype, flags, cfg, cc))
                out.append(("guided_cross_entropy", "_ce_bwd_kernel", dtype, dtype,
                            dict(flags, GRAD_SKIP=v["HAS_MAP"]), cfg, cc))
    return out


def _run_job(job) -> str:
    import importlib

    module, name, dtype, out_type, constexprs, cfg, cc = job
    kernel = getattr(importlib.import_module(f"ivl_kernels.ops.{module}"), name)
    compiled = compile_kernel(kernel, dtype, out_type, constexprs, cfg, cc)
    return f"{name} {dtype} sm_{cc} shared={compiled.metadata.shared} {constexprs}"


def main() -> int:
    from concurrent.futures import ProcessPoolExecutor

    todo = jobs()
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        done = list(pool.map(_run_job, todo))
    print("\n".join(done))
    print(f"compiled {len(done)} kernel variants")
    return 0


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                       cwd=repo, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:] + r.stderr[-6000:])
    assert "compiled" in r.stdout


if __name__ == "__main__":
    sys.exit(main())

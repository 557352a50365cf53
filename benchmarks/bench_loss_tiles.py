"""The loss's tile GEMMs (``IVL_KERNELS_GEMM=tiles``), kernel by kernel, against cuBLAS on the same products.

    python benchmarks/bench_loss_tiles.py [--rows 3840] [--quick] [--out benchmarks/results/] [--overwrite]

One chunk of rows (the launcher's chunk at DESIGN's "qwen" shapes: 3840 rows of Vv 151936 x Hv 896, bf16; and the
guided case with the base head Vb 152064 x Hb 3584 as a second K segment), with the gradients computed in the
forward (the one-pass "mean" loss). For each candidate tile configuration (``VARIANTS``: the default, then one
kernel's tiles changed at a time) it reports:
  * per kernel (``_ce_logits_tile_kernel`` = "z", ``_ce_combine_kernel`` = "lse", ``_ce_dx_tile_kernel`` = "dX",
    ``_ce_dw_tile_kernel`` = "dW"; for the ``hybrid`` variant ``_ce_finish_grad_kernel`` = "G", the pass that
    writes the gradient over ``P`` before cuBLAS computes dX and dW): GPU time from ``torch.profiler`` over
    back-to-back chunks, TFLOP/s, and its
    time over cuBLAS computing the same product (``torch.mm`` into bf16 for z and dX, a float32-output GEMM for
    dW; for the guided z one GEMM over the concatenated K, the best cuBLAS can do), timed with
    ``triton.testing.do_bench`` (median);
  * the whole chunk (``do_bench`` median) beside the cuBLAS path of the same chunk (cuBLAS GEMMs + row kernel);
  * ``rel_err``: the largest of ||x - cuBLAS path's|| / ||cuBLAS path's|| over lse, d value_hidden and the float32
    d value_weight accumulator (a wrong configuration shows here, not only in its time).
The winners go into ``_tiles._default_config``; the rows say which kernel is under cuBLAS's rate and by how much.
Without a GPU the kernels run only under ``TRITON_INTERPRET=1``: the script then checks every variant's
correctness on a small chunk and times nothing (``status`` says so). Stopped by SIGTERM (gpu_session.sh's time
limit), it writes the rows measured so far and a "(stopped)" row.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Stopped, add_output_args, environment, format_table, output_options, plot_bars,  # noqa: E402
                     print_environment, sigterm_deferred, stop_on_sigterm, write_csv)
from ivl_kernels.ops._tile_launch import WIDE_TILES  # noqa: E402

KERNELS = {"_ce_logits_tile_kernel": "z", "_ce_logits_tma_kernel": "z", "_ce_combine_kernel": "lse",
           "_ce_dx_tile_kernel": "dX", "_ce_dw_tile_kernel": "dW", "_ce_finish_grad_kernel": "G"}
LOGIT_STD = 3.0  # as bench_guided_loss.py: a peaked softmax


def _tiles(m, n, k, w, s):
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)


HYBRID = "hybrid: z wide, G, cuBLAS dX dW"

# Half precision. Each variant changes one kernel's tiles from the default (the logits tile's BLOCK_N must stay a
# multiple of dX's BLOCK_K and dW's BLOCK_M).
VARIANTS = {
    "default": {},
    # TMA descriptors and a persistent grid (_tile_launch: a candidate, sm_90, no map).
    "z TMA persistent": {"logits": {**_tiles(128, 128, 64, 8, 3), "tma": True}},
    "z TMA persistent 4 stages": {"logits": {**_tiles(128, 128, 64, 8, 4), "tma": True}},
    # The "wide" kind: 128 x 256 tiles, the epilogue in two column halves (_tile_launch.WIDE_TILES).
    "z TMA wide 128x256": {"logits": {**WIDE_TILES, "tma": True}},
    "z 4 stages": {"logits": _tiles(128, 128, 64, 8, 4)},
    "z 64x128 4 warps": {"logits": _tiles(64, 128, 64, 4, 4)},
    "z k32 5 stages": {"logits": _tiles(128, 128, 32, 8, 5)},
    "dX 4 stages": {"dx": _tiles(128, 128, 64, 8, 4)},
    "dX 64x128 4 warps": {"dx": _tiles(64, 128, 64, 4, 4)},
    "dX 128x256 8 warps": {"dx": _tiles(128, 256, 64, 8, 3)},
    "dW 4 stages": {"dw": _tiles(128, 128, 64, 8, 4)},
    "dW 64x128 4 warps": {"dw": _tiles(64, 128, 64, 4, 4)},
    "dW k32 5 stages": {"dw": _tiles(128, 128, 32, 8, 5)},
    # The "hybrid" kind: the wide kind's z, then G written over P in place ("G") and dX / dW in cuBLAS (the
    # cuBLAS rows above): against "z TMA wide 128x256", the memory pass against the tile GEMMs' rate.
    HYBRID: {},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rows", type=int, default=None, help="rows of the chunk (GPU default 3840, CPU 40)")
    p.add_argument("--quick", action="store_true", help="the default and two variants only")
    p.add_argument("--variants", nargs="*", default=None, help=f"names from {list(VARIANTS)}")
    add_output_args(p, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    output_options(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ivl_kernels._triton import interpreter_enabled
    from ivl_kernels.ops._gemm import addmm_into
    from ivl_kernels.ops.guided_cross_entropy import _chunked, _tiles

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if not gpu and not interpreter_enabled():
        print("no GPU and TRITON_INTERPRET is not set: the tile kernels cannot run here")
        return 2
    if gpu:
        R, Vb, Hb, Vv, Hv, dtype = args.rows or 3840, 152064, 3584, 151936, 896, torch.bfloat16
    else:
        R, Vb, Hb, Vv, Hv, dtype = args.rows or 40, 300, 16, 290, 32, torch.float16
    env = environment(device)
    print_environment(env)
    print(f"# chunk: R={R} Vb={Vb} Hb={Hb} Vv={Vv} Hv={Hv} {str(dtype).replace('torch.', '')}")
    names = args.variants or (["default", "z 4 stages", "dX 4 stages"] if args.quick else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    torch.manual_seed(0)
    vh = torch.randn(R, Hv, device=device, dtype=dtype)
    vw = torch.randn(Vv, Hv, device=device, dtype=dtype) * (LOGIT_STD / Hv ** 0.5)
    bh = torch.randn(R, Hb, device=device, dtype=dtype)
    bw = torch.randn(Vb, Hb, device=device, dtype=dtype) * (LOGIT_STD / Hb ** 0.5)
    target = torch.randint(0, min(Vb, Vv), (R,), device=device)
    target[::17] = -1
    g = torch.where(target >= 0, 1.0 / R, 0.0).float()

    def chunk(case, gemm):
        base = (bh, bw) if case == "guided" else (None, None)
        vb = Vb if case == "guided" else Vv
        return _chunked.chunked_loss(vh, vw, None, *base, None, None, 1.0, 0.0, target, vb, False, 1.0, 0.0, 0.0,
                                     want_stats=True, g=g, need_dvh=True, need_dvw=True, kind=gemm)

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def bench(fn):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def kernel_ms(fn, reps=5):
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        out = {}
        for e in prof.key_averages():
            for k, short in KERNELS.items():
                if k in e.key:
                    total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
                    out[short] = out.get(short, 0.0) + total / reps / 1e3  # us -> ms per chunk
        return out

    rows = []
    stop_on_sigterm()  # gpu_session.sh's time limit: write the rows measured so far
    try:
        for case in ("value-only", "guided"):
            vb = Vb if case == "guided" else Vv
            flops = {"z": 2 * R * vb * (Hv + (Hb if case == "guided" else 0)), "dX": 2 * R * Vv * Hv,
                     "dW": 2 * R * Vv * Hv, "lse": 0, "G": 0}
            ref = chunk(case, "cublas")
            cublas = {}
            if gpu:
                x = torch.cat([bh, vh], 1) if case == "guided" else vh
                w = torch.cat([bw, torch.nn.functional.pad(vw, (0, 0, 0, Vb - Vv))], 1) if case == "guided" else vw
                G = torch.randn(R, Vv, device=device, dtype=dtype) / Vv
                acc = torch.zeros(Vv, Hv, device=device, dtype=torch.float32)
                cublas = {"z": bench(lambda: torch.mm(x, w.T)), "dX": bench(lambda: torch.mm(G, vw)),
                          "dW": bench(lambda: addmm_into(acc, G.T, vh))}
                path_ms = bench(lambda: chunk(case, "cublas"))
                del x, w, G, acc
                rows.append(dict(case=case, variant="cuBLAS path (GEMMs + row kernel)", kernel="chunk", config="",
                                 ms=path_ms, TFLOPs=sum(flops.values()) / (path_ms * 1e-3) / 1e12, x_cublas="",
                                 rel_err=0.0, status="ok"))
                for k in ("z", "dX", "dW"):
                    rows.append(dict(case=case, variant="cuBLAS", kernel=k, config="torch.mm", ms=cublas[k],
                                     TFLOPs=flops[k] / (cublas[k] * 1e-3) / 1e12, x_cublas=1.0, rel_err="",
                                     status="ok"))
            for name in names if case == "value-only" else ["default"] + [HYBRID] * (HYBRID in names):
                _tiles.CONFIG_OVERRIDE.clear()
                _tiles.CONFIG_OVERRIDE.update(VARIANTS[name])
                if not gpu:  # the GPU's half-precision tiles, run by the interpreter
                    _tiles.CONFIG_OVERRIDE.update({**_tiles._default_config(dtype, interpret=False), **VARIANTS[name]})
                kind = "hybrid" if name == HYBRID else "tiles"
                cfg = _tiles._config(dtype, kind, (None, vh, vw, None, None))
                base_row = dict(case=case, variant=name)
                try:
                    got = chunk(case, kind)
                    err = max(rel(got[0][0], ref[0][0]), rel(got[1], ref[1]), rel(got[2], ref[2]))
                    if not gpu:
                        rows.append(dict(base_row, kernel="chunk", config="", ms="", TFLOPs="", x_cublas="",
                                         rel_err=err, status="interpreter: correctness only, not timed"))
                        continue
                    total = bench(lambda: chunk(case, kind))
                    per = kernel_ms(lambda: chunk(case, kind))
                    rows.append(dict(base_row, kernel="chunk", config="", ms=total,
                                     TFLOPs=sum(flops.values()) / (total * 1e-3) / 1e12, x_cublas="", rel_err=err,
                                     status="ok"))
                    # hybrid: dX and dW are cuBLAS's (the "cuBLAS" rows); its own kernel is the pass that forms G.
                    kernels = (("logits", "z"), ("combine", "lse")) + (
                        (("finish", "G"),) if kind == "hybrid" else (("dx", "dX"), ("dw", "dW")))
                    for k, short in kernels:
                        c = cfg[k]
                        desc = ("x".join(str(c[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) +
                                f" w{c.get('num_warps')} s{c.get('num_stages')}") if "BLOCK_M" in c else str(c)
                        ms = per.get(short, float("nan"))
                        rows.append(dict(base_row, kernel=short, config=desc, ms=ms,
                                         TFLOPs=flops[short] / (ms * 1e-3) / 1e12 if flops[short] else "",
                                         x_cublas=ms / cublas[short] if short in cublas else "", rel_err="",
                                         status="ok"))
                except Exception as exc:  # report, try the next variant
                    rows.append(dict(base_row, kernel="chunk", config="", ms="", TFLOPs="", x_cublas="", rel_err="",
                                     status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
                    if os.environ.get("IVL_BENCH_DEBUG"):
                        traceback.print_exc()
                finally:
                    _tiles.CONFIG_OVERRIDE.clear()
                if gpu:
                    torch.cuda.empty_cache()
                print(f"  {case:10s} {name:22s} " + "  ".join(
                    f"{r['kernel']} {r['ms']:.3f} ms" if isinstance(r["ms"], float) else f"{r['kernel']} {r['status']}"
                    for r in rows if r["case"] == case and r["variant"] == name), flush=True)
    except Stopped as exc:
        print(f"# STOPPED: {exc}; the rows so far are kept")
        rows.append(dict(case="", variant="(stopped)", kernel="", config="", ms="", TFLOPs="", x_cublas="",
                         rel_err="", status=str(exc)))

    with sigterm_deferred(raise_after=False):  # measuring is over: the files get written
        print(format_table(rows, ["case", "variant", "kernel", "config", "ms", "TFLOPs", "x_cublas", "rel_err",
                                  "status"]))
        tag = f"loss_tiles_{'gpu' if gpu else 'cpu_interpreter'}_R{R}_{str(dtype).replace('torch.', '')}"
        write_csv(os.path.join(args.out, tag + ".csv"), rows, env)
        timed = [r for r in rows if isinstance(r["ms"], float) and r["kernel"] != "lse"]
        if timed:
            plot_bars(os.path.join(args.out, tag + ".png"), timed, group="kernel", series="variant", value="ms",
                      title=f"loss tile GEMMs per chunk of {R} rows ({env['device']})", ylabel="ms", panel="case")
    return 0


if __name__ == "__main__":
    sys.exit(main())

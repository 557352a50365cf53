"""Guided cross-entropy loss: forward+backward time and peak memory, every implementation side by side.

    python benchmarks/bench_guided_loss.py [--device cpu|cuda] [--quick] [--out benchmarks/results/]

Two cases:
  * "guided": frozen base head given as hidden+weight + value head (the IVL training loss, identity map):
    naive eager (materialised logits), torch.compile of the naive loss, ours (each available backend).
  * "value-only": fused linear cross-entropy over the value head alone: naive eager, F.linear_cross_entropy
    (if this torch has it), Liger-Kernel's LigerFusedLinearCrossEntropyLoss, cut-cross-entropy's
    linear_cross_entropy (each when installed and able to run on the device), ours.
Defaults: CPU N=4096, V=32000, H=64, fp32; GPU DESIGN's "qwen" workload (Vb 152064 / Hb 3584, Vv 151936 / Hv 896,
bf16) at N=16384. Timing: GPU ``triton.testing.do_bench`` (median), CPU ``torch.utils.benchmark`` (median).
Peak memory: GPU ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call; CPU the growth
of the process's peak RSS (Linux VmHWM, reset through /proc/self/clear_refs after ``malloc_trim``), which
counts every byte the call touched including allocator slack. Times are reported, never asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_environment, time_ms, write_csv  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="smaller N, fewer repeats")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--N", type=int, default=None, help="tokens (default: 4096 on CPU, 16384 on GPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    import ivl_kernels as ivl
    from ivl_kernels.reference import guided_cross_entropy_naive

    gpu = device.startswith("cuda")
    if gpu:
        N = args.N or (4096 if args.quick else 16384)
        Vb, Hb, Vv, Hv = 152064, 3584, 151936, 896
        dtype = getattr(torch, args.dtype or "bfloat16")
    else:
        N = args.N or (1024 if args.quick else 4096)
        Vb, Hb, Vv, Hv = 32000, 64, 32000, 64
        dtype = getattr(torch, args.dtype or "float32")
        torch.set_num_threads(os.cpu_count() or 1)

    versions = environment(torch.device(device))
    for mod in ("liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:
            versions[mod] = "not installed"
    print("ivl-kernels guided-loss benchmark")
    print_environment(versions)
    print(f"  workload: N={N} Vb={Vb} Hb={Hb} Vv={Vv} Hv={Hv} dtype={str(dtype).replace('torch.', '')} "
          f"device={device}{' (quick)' if args.quick else ''}")

    torch.manual_seed(0)
    vh = torch.randn(N, Hv, device=device, dtype=dtype)
    vw = (torch.randn(Vv, Hv, device=device, dtype=dtype) / Hv ** 0.5).requires_grad_()
    vh.requires_grad_()
    bh = torch.randn(N, Hb, device=device, dtype=dtype)
    bw = torch.randn(Vb, Hb, device=device, dtype=dtype) / Hb ** 0.5
    target = torch.randint(0, min(Vb, Vv), (N,), device=device)
    target[::17] = -100

    def step(loss_fn):
        def run():
            vh.grad = None
            vw.grad = None
            loss = loss_fn()
            loss.backward()
        return run

    rows = []

    def naive_guided():
        return guided_cross_entropy_naive(vh, vw, target, base_hidden=bh, base_weight=bw)

    def naive_value():
        return F.cross_entropy((vh @ vw.T).float() if dtype != torch.float32 else vh @ vw.T, target)

    impls = [("guided", "naive eager (materialised logits)", lambda: step(naive_guided))]
    if not args.no_compile:
        def compiled():
            fn = torch.compile(lambda h, w, t, a, b: guided_cross_entropy_naive(h, w, t, base_hidden=a,
                                                                                base_weight=b))
            return step(lambda: fn(vh, vw, target, bh, bw))
        impls.append(("guided", "torch.compile(naive)", compiled))
    for backend in ("torch", "triton"):
        impls.append(("guided", f"ivl fused_guided_cross_entropy [{backend}]", (lambda b=backend: step(
            lambda: ivl.fused_guided_cross_entropy(vh, vw, target, base_hidden=bh, base_weight=bw, backend=b)))))

    impls.append(("value-only", "naive eager (F.linear + F.cross_entropy)", lambda: step(naive_value)))

    def torch_lce():
        if not hasattr(F, "linear_cross_entropy"):
            raise _Unavailable("this torch has no F.linear_cross_entropy")
        return step(lambda: F.linear_cross_entropy(vh, vw, target))
    impls.append(("value-only", "torch F.linear_cross_entropy", torch_lce))

    def liger():
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            raise _Unavailable(f"not installed ({type(exc).__name__})")
        if not gpu:
            raise _Unavailable("Triton kernels, needs CUDA")
        loss = LigerFusedLinearCrossEntropyLoss()
        return step(lambda: loss(vw, vh, target))
    impls.append(("value-only", "Liger LigerFusedLinearCrossEntropyLoss", liger))

    def cce():
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise _Unavailable(f"not installed ({type(exc).__name__})")
        if not gpu:
            raise _Unavailable("Triton kernels, needs CUDA")
        return step(lambda: linear_cross_entropy(vh, vw, target))
    impls.append(("value-only", "cut-cross-entropy linear_cross_entropy", cce))
    for backend in ("torch", "triton"):
        impls.append(("value-only", f"ivl fused_guided_cross_entropy [{backend}]", (lambda b=backend: step(
            lambda: ivl.fused_guided_cross_entropy(vh, vw, target, backend=b)))))

    for case, name, make in impls:
        row = dict(case=case, implementation=name, status="ok", time_ms="", peak_mem_MiB="",
                   mem_method="cuda max_memory_allocated delta" if gpu else "peak RSS growth (VmHWM)")
        try:
            if "[triton]" in name and not gpu:
                raise _Unavailable("Triton on CPU runs only under the interpreter (not benchmarked)")
            fn = make()
            fn()  # warm-up (compilation, autotuning)
            row["peak_mem_MiB"] = f"{_peak_mem(fn, gpu) / 2**20:.1f}"
            row["time_ms"] = f"{time_ms(fn, torch.device(device), min_run_time=1.0 if args.quick else 5.0):.2f}"
        except _Unavailable as exc:
            row["status"] = str(exc)
        except Exception as exc:  # report, keep benchmarking the others
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            if os.environ.get("IVL_BENCH_DEBUG"):
                traceback.print_exc()
        rows.append(row)
        print(f"  {case:10s} {name:45s} {row['time_ms']:>10s} ms {row['peak_mem_MiB']:>10s} MiB  {row['status']}",
              flush=True)

    os.makedirs(args.out, exist_ok=True)
    tag = f"guided_loss_{'gpu' if gpu else 'cpu'}_N{N}_{str(dtype).replace('torch.', '')}"
    csv_path = os.path.join(args.out, tag + ".csv")
    write_csv(csv_path, rows, versions)
    try:
        _plot(rows, os.path.join(args.out, tag + ".png"), versions, f"N={N}, {str(dtype).replace('torch.', '')}")
        print(f"wrote {os.path.join(args.out, tag + '.png')}")
    except Exception as exc:
        print(f"plot skipped: {type(exc).__name__}: {exc}")
    return 0


class _Unavailable(Exception):
    pass


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_mem(fn, gpu: bool) -> int:
    import gc

    import torch

    gc.collect()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _plot(rows, path, versions, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['case']}: {r['implementation']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(ok) + 2), sharey=True)
    axes[0].barh(labels, [float(r["time_ms"]) for r in ok], color="tab:blue")
    axes[0].set_xlabel("forward+backward, median ms")
    axes[1].barh(labels, [float(r["peak_mem_MiB"]) for r in ok], color="tab:orange")
    axes[1].set_xlabel(f"peak memory MiB ({ok[0]['mem_method'] if ok else ''})")
    axes[0].invert_yaxis()
    fig.suptitle(f"guided cross-entropy, {title} - {versions['device']}, torch {versions['torch']}, "
                 f"triton {versions['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

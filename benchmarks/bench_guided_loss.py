"""Guided cross-entropy loss: forward+backward time and peak memory, every implementation side by side.

    python benchmarks/bench_guided_loss.py [--device cpu|cuda] [--quick] [--N 16384] [--out benchmarks/results/]

Two cases:
  * "guided": frozen base head given as hidden+weight + value head (the IVL training loss, identity map):
    naive eager (materialised logits), torch.compile of the naive loss, ours (each backend).
  * "value-only": fused linear cross-entropy over the value head alone: naive eager, torch.compile of it, torch's
    F.linear_cross_entropy (chunked, when this torch has it), Liger-Kernel's LigerFusedLinearCrossEntropyLoss,
    cut-cross-entropy's linear_cross_entropy with its default gradient filtering (``filter_eps="high"``, i.e.
    bf16 eps / 32: backward skips blocks whose softmax is below it) and exact (``filter_eps=None``), ours.
Ours runs as each backend, and its Triton path six ways: the default (``IVL_KERNELS_GEMM=auto``: the fastest of
the kinds, measured on the first call), the cuBLAS GEMMs forced, the tile GEMMs forced (the row work inside the
matrix kernels, three passes over each chunk of logits instead of six), the tile GEMMs with the TMA logits
kernel (``tma``: Hopper, no map; elsewhere the same as the tiles), that kernel on 128 x 256 tiles (``wide``:
sm_90, half precision; elsewhere the same as ``tma``) and ``hybrid`` (``wide``'s logits kernel, then the
gradient written over the softmax in one memory pass and dX / dW in cuBLAS), set around each timed call.
Ours is exact (no gradient filtering). Each head's logits have std ``LOGIT_STD`` = 3 over the vocabulary (a
peaked softmax, as an LM's; ``--logit-std``): what filtering skips depends on it. At 3 on the qwen vocabulary
nearly every block of cut-cross-entropy's backward holds a probability above its eps, so its default runs like
its exact mode; a much larger std (a near one-hot softmax) lets it skip most of the vocabulary. DESIGN's targets
(N = 16384, forward + backward): guided <= 0.85x torch.compile(naive); value-only <= 0.85x cut-cross-entropy's
default, exact, and faster than Liger-Kernel and F.linear_cross_entropy; extra memory (peak minus inputs minus
returned gradients) bounded by a chunk, <= 2 GiB at these shapes, whatever N (``x_bar``: time over the bar).

Defaults: CPU N=4096, V=32000, H=64, fp32; GPU DESIGN's "qwen" workload (Vb 152064 / Hb 3584, Vv 151936 / Hv 896,
bf16) at N=16384. On a GPU the torch backend of ours (the fallback where Triton is missing: plain-torch chunks of
~880 rows with cuBLAS GEMMs, the gradients in the forward pass) is timed up to N = 16384 (1.2 s a call before its
chunks were sized for a GPU; a larger N is not timed).
Timing: GPU ``triton.testing.do_bench`` (median; a call over 1 s: the median of 3), CPU ``torch.utils.benchmark``
(every candidate timed together after the memory runs, median of 7 interleaved rounds: a shared CPU's speed drifts
between sequential runs); the ``timing`` column says which. Peak memory: GPU ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the call; CPU the growth of the process's peak RSS (Linux VmHWM, reset through
/proc/self/clear_refs after ``malloc_trim``), which counts every byte the call touched including allocator slack.
``loss_mem`` (DESIGN's "loss memory", also as % of naive eager's): on a GPU the peak minus the bytes of the two
gradients every implementation returns, on CPU the peak itself. ``grad_rel_err`` (||grad - ref|| / ||ref||, both
gradients stacked) and ``loss_rel_err`` (|loss - ref| / |ref|) check every implementation, the naive rows too,
against an error reference computed once per case on the same inputs in float32 on a GPU (TF32 off) and float64
on CPU, in chunks of rows (never the [N, V] logits at once); it is not timed (the timed naive rows stay the naive
code a user would write, in the inputs' dtype). Peers run before ours, so a fault in one of our kernels (which
poisons the CUDA context) cannot hide their rows; the matrix rate is measured before any of them, and after a
fault nothing touches CUDA again: the rows measured are written. Times are reported, never asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Stopped, add_output_args, output_options, cuda_context_error, environment, format_table, matrix_tflops,  # noqa: E402
                     env_var, print_environment, save_figure, sigterm_deferred, stop_on_sigterm,
                     time_cpu_interleaved_ms, time_ms, write_csv)

# The torch backend of ours is timed on a GPU only up to this many tokens (see the module docstring).
TORCH_BACKEND_MAX_N_GPU = 16384
# A GPU forward+backward slower than this (seconds) is timed over 3 calls only: the step has minutes, not hours.
SLOW_S = 1.0
# Standard deviation of each head's logits over the vocabulary. LM logits are peaked (a few units), so gradient
# filtering skips part of the vocabulary; unit-scale random logits would give a flat softmax (every p ~ 1/V, under
# the filter's eps) and let the filtering rows skip nearly everything.
LOGIT_STD = 3.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="smaller N, fewer repeats")
    add_output_args(p, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--N", type=int, default=None, help="tokens (default: 4096 on CPU, 16384 on GPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--logit-std", type=float, default=LOGIT_STD,
                   help=f"standard deviation of each head's logits (default {LOGIT_STD})")
    p.add_argument("--cases", nargs="+", choices=["guided", "value-only"], default=["guided", "value-only"],
                   help="which cases to run (default both)")
    args = p.parse_args(argv)
    output_options(args)
    return args


class _Unavailable(Exception):
    pass


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
          f"logit_std={args.logit_std:g} device={device}{' (quick)' if args.quick else ''}")

    torch.manual_seed(0)
    vh = torch.randn(N, Hv, device=device, dtype=dtype)
    vw = (torch.randn(Vv, Hv, device=device, dtype=dtype) * (args.logit_std / Hv ** 0.5)).requires_grad_()
    vh.requires_grad_()
    bh = torch.randn(N, Hb, device=device, dtype=dtype)
    bw = torch.randn(Vb, Hb, device=device, dtype=dtype) * (args.logit_std / Hb ** 0.5)
    target = torch.randint(0, min(Vb, Vv), (N,), device=device)
    target[::17] = -100

    def step(loss_fn):
        def run():
            vh.grad = None
            vw.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.detach()
        return run

    def naive_guided():
        return guided_cross_entropy_naive(vh, vw, target, base_hidden=bh, base_weight=bw)

    def value_loss(h, w, t):
        return F.cross_entropy((h @ w.T).float() if dtype != torch.float32 else h @ w.T, t)

    def naive_value():
        return value_loss(vh, vw, target)

    def compiled():
        fn = torch.compile(lambda h, w, t, a, b: guided_cross_entropy_naive(h, w, t, base_hidden=a, base_weight=b))
        return step(lambda: fn(vh, vw, target, bh, bw))

    def compiled_value():
        fn = torch.compile(value_loss)
        return step(lambda: fn(vh, vw, target))

    def torch_lce():
        if not hasattr(F, "linear_cross_entropy"):
            raise _Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        # The chunked path (never [N, V] logits) where this torch has it; options=None is naive eager again.
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        kw = {"options": options()} if options is not None else {}
        return step(lambda: F.linear_cross_entropy(vh, vw, target, ignore_index=-100, **kw))

    def liger():
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            raise _Unavailable(f"not installed ({type(exc).__name__}: {exc})"[:150])
        if not gpu:
            raise _Unavailable("Triton kernels, needs CUDA")
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return step(lambda: loss(vw, vh, target))

    def cce(eps):
        def make():
            try:
                from cut_cross_entropy import linear_cross_entropy
            except Exception as exc:
                raise _Unavailable(f"not installed ({type(exc).__name__}: {exc})"[:150])
            if not gpu:
                raise _Unavailable("Triton kernels, needs CUDA")
            return step(lambda: linear_cross_entropy(vh, vw, target, ignore_index=-100, filter_eps=eps))
        return make

    ref_dtype = torch.float32 if gpu else torch.float64

    def reference(case):
        """``(loss, (d value_hidden, d value_weight))`` of ``case``'s loss in ``ref_dtype`` on the same inputs: the
        error reference. Rows in chunks (each chunk's summed loss over the whole batch's kept count, so the
        chunks add up to the mean), the logits of a chunk at a time; TF32 off, so float32 means float32."""
        kept = max(int((target != -100).sum()), 1)
        vocab = Vb if case == "guided" else Vv
        w = vw.detach().to(ref_dtype, copy=True).requires_grad_()
        base_w = bw.to(ref_dtype) if case == "guided" else None
        budget = (4 << 30) if gpu else (512 << 20)  # bytes of one chunk's logits-sized tensors (~10 of them)
        rows = max(1, min(N, budget // (10 * vocab * torch.finfo(ref_dtype).bits // 8)))
        d_h = torch.empty(N, Hv, device=device, dtype=ref_dtype)
        loss = 0.0
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for s in range(0, N, rows):
                h = vh.detach()[s:s + rows].to(ref_dtype, copy=True).requires_grad_()
                t = target[s:s + rows]
                if case == "guided":
                    part = guided_cross_entropy_naive(h, w, t, base_hidden=bh[s:s + rows], base_weight=base_w,
                                                      dtype=ref_dtype, reduction="sum")
                else:
                    part = F.cross_entropy(h @ w.T, t, ignore_index=-100, reduction="sum")
                part = part / kept
                part.backward()
                loss += float(part)
                d_h[s:s + rows] = h.grad
                del h, part
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return loss, (d_h, w.grad)

    def ours(backend, guided=True, loss_gemm=None):
        """``loss_gemm``: the Triton path's GEMMs (``IVL_KERNELS_GEMM``), set around each timed call only."""
        def make():
            if backend == "triton" and not gpu:
                raise _Unavailable("Triton on CPU runs only under the interpreter (not benchmarked)")
            if backend == "torch" and gpu and N > TORCH_BACKEND_MAX_N_GPU:
                raise _Unavailable(f"torch backend not timed on GPU above N={TORCH_BACKEND_MAX_N_GPU} "
                                   "(plain-torch chunks): run a smaller --N")
            base = dict(base_hidden=bh, base_weight=bw) if guided else {}

            def loss():
                with env_var("IVL_KERNELS_GEMM", loss_gemm):
                    return ivl.fused_guided_cross_entropy(vh, vw, target, backend=backend, **base)
            return step(loss)
        return make

    def ours_packed():
        """The two heads packed into one buffer (pack_head_weights; the value head a trainable view of it): one
        GEMM per chunk over [X_b | X_v]. The buffer is built here, outside the timed and measured calls."""
        if not gpu:
            raise _Unavailable("Triton on CPU runs only under the interpreter (not benchmarked)")
        pb, pv = ivl.pack_head_weights(bw, vw.detach())
        pv = torch.nn.Parameter(pv)

        def run():
            vh.grad = None
            pv.grad = None
            loss = ivl.fused_guided_cross_entropy(vh, pv, target, backend="triton", base_hidden=bh, base_weight=pb)
            loss.backward()
            vw.grad, pv.grad = pv.grad, None  # the gradients the rows compare against the naive row's
            return loss.detach()
        return run

    impls = [("guided", "naive eager (materialised logits)", lambda: step(naive_guided))]
    if not args.no_compile:
        impls.append(("guided", "torch.compile(naive)", compiled))
    impls += [
        ("guided", "ivl fused_guided_cross_entropy [torch]", ours("torch")),
        ("guided", "ivl fused_guided_cross_entropy [triton]", ours("triton")),
        ("guided", "ivl fused_guided_cross_entropy [triton, packed heads]", ours_packed),
        ("guided", "ivl fused_guided_cross_entropy [triton, cuBLAS GEMMs]", ours("triton", loss_gemm="cublas")),
        ("guided", "ivl fused_guided_cross_entropy [triton, tile GEMMs]", ours("triton", loss_gemm="tiles")),
        ("guided", "ivl fused_guided_cross_entropy [triton, tile GEMMs, TMA]", ours("triton", loss_gemm="tma")),
        ("guided", "ivl fused_guided_cross_entropy [triton, tile GEMMs, TMA wide]", ours("triton", loss_gemm="wide")),
        ("guided", "ivl fused_guided_cross_entropy [triton, hybrid: TMA wide + cuBLAS dX/dW]",
         ours("triton", loss_gemm="hybrid")),
        ("value-only", "naive eager (F.linear + F.cross_entropy)", lambda: step(naive_value)),
    ]
    if not args.no_compile:
        impls.append(("value-only", "torch.compile(naive)", compiled_value))
    impls += [
        ("value-only", "torch F.linear_cross_entropy", torch_lce),
        ("value-only", "Liger LigerFusedLinearCrossEntropyLoss", liger),
        ("value-only", "cut-cross-entropy linear_cross_entropy [filter_eps=high, default]", cce("high")),
        ("value-only", "cut-cross-entropy linear_cross_entropy [filter_eps=None, exact]", cce(None)),
        ("value-only", "ivl fused_guided_cross_entropy [torch]", ours("torch", guided=False)),
        ("value-only", "ivl fused_guided_cross_entropy [triton]", ours("triton", guided=False)),
        ("value-only", "ivl fused_guided_cross_entropy [triton, cuBLAS GEMMs]",
         ours("triton", guided=False, loss_gemm="cublas")),
        ("value-only", "ivl fused_guided_cross_entropy [triton, tile GEMMs]",
         ours("triton", guided=False, loss_gemm="tiles")),
        ("value-only", "ivl fused_guided_cross_entropy [triton, tile GEMMs, TMA]",
         ours("triton", guided=False, loss_gemm="tma")),
        ("value-only", "ivl fused_guided_cross_entropy [triton, tile GEMMs, TMA wide]",
         ours("triton", guided=False, loss_gemm="wide")),
        ("value-only", "ivl fused_guided_cross_entropy [triton, hybrid: TMA wide + cuBLAS dX/dW]",
         ours("triton", guided=False, loss_gemm="hybrid")),
    ]
    impls = [impl for impl in impls if impl[0] in args.cases]
    order = sorted(range(len(impls)), key=lambda i: impls[i][1].startswith("ivl"))  # peers first (stable)
    rows: list = [None] * len(impls)
    # FLOP floor at the matrix rate measured in this run, before any implementation runs (after a kernel fault
    # in one, CUDA can no longer be used): forward heads + the two gradient products (the base head is frozen:
    # forward only). DESIGN's bars: guided vs torch.compile(naive), value-only vs CCE's default.
    flops = {"guided": 2 * N * (Vb * Hb + Vb * Hv + 2 * Vv * Hv), "value-only": 6 * N * Vv * Hv}
    tflops = matrix_tflops(torch.device(device), dtype) if gpu else None
    versions["matrix_tflops"] = f"{tflops:.0f}" if tflops else "not measured (CPU)"
    versions["logit_std"] = f"{args.logit_std:g}"
    lost = ""
    refs = {}  # case -> (loss, gradients) in ref_dtype: grad_rel_err's and loss_rel_err's reference
    for case in dict.fromkeys(impl[0] for impl in impls):
        try:
            refs[case] = reference(case)
        except Exception as exc:  # the rows are still timed; their error columns stay empty
            why = (str(exc).splitlines() or [""])[0][:120]
            print(f"  {case}: error reference failed ({type(exc).__name__}: {why})")
            lost = cuda_context_error() if gpu else ""
            if lost:
                break
        if gpu:
            torch.cuda.empty_cache()
    versions["error_reference"] = (f"{str(ref_dtype).replace('torch.', '')} on the same inputs, chunked"
                                   + (", TF32 off" if gpu else "") + f" (cases: {', '.join(refs) or 'none'})")
    naive = {}  # case -> loss memory of the naive row (loss_mem_vs_naive_pct's denominator)
    # Every implementation returns these two gradients: memory beyond them is what the loss itself costs. RSS
    # growth (CPU) does not see them when they land in pages the process already holds: nothing to subtract.
    grad_bytes = (vh.numel() + vw.numel()) * vh.element_size() if gpu else 0
    stop_on_sigterm()
    stopped = ""
    cpu_fns = {}  # CPU: timed together after the loop, in interleaved rounds (this machine's speed drifts)
    for i in order:
        case, name, make = impls[i]
        row = dict(case=case, implementation=name, status="ok", time_ms="", TFLOPs="", x_flop_floor="", x_bar="",
                   peak_mem_MiB="", loss_mem_MiB="",
                   loss_mem_vs_naive_pct="",
                   loss="", grad_rel_err="", timing="",
                   mem_method="cuda max_memory_allocated delta" if gpu else "peak RSS growth (VmHWM)",
                   loss_rel_err="")
        rows[i] = row
        if lost or stopped:
            row["status"] = f"not run: {stopped or f'CUDA context lost earlier ({lost})'}"[:160]
            continue
        try:
            fn = make()
            fn()  # warm-up (compilation, autotuning)
            # The warm-up's gradients freed before the baseline is read: else the call's new gradients replace
            # them at no net cost, and subtracting their bytes below undercounts (below zero for the peers).
            vh.grad = vw.grad = None
            t0 = time.perf_counter()
            peak, loss = _peak_mem(fn, gpu)
            once_s = time.perf_counter() - t0
            grads = (vh.grad.detach().float().clone(), vw.grad.detach().float().clone())
            loss_mem = peak - grad_bytes
            row["peak_mem_MiB"] = f"{peak / 2**20:.1f}"
            row["loss_mem_MiB"] = f"{loss_mem / 2**20:.1f}"
            row["loss"] = f"{float(loss):.6g}"
            if name.startswith("naive"):
                naive[case] = loss_mem
            elif case in naive:
                row["loss_mem_vs_naive_pct"] = f"{100 * loss_mem / naive[case]:.3g}"
            if case in refs:
                ref_loss, ref_grads = refs[case]
                row["grad_rel_err"] = f"{_rel_err(grads, ref_grads):.3g}"
                row["loss_rel_err"] = f"{abs(float(loss) - ref_loss) / abs(ref_loss):.3g}" if ref_loss else ""
            del grads
            if gpu and once_s > SLOW_S:
                # do_bench would spend at least 7 more calls estimating and warming up: time 3 and keep the median.
                ms, row["timing"] = _median_of_3_ms(fn), f"median of 3 calls (one took over {SLOW_S} s)"
            elif gpu:
                ms, row["timing"] = time_ms(fn, torch.device(device), rep_ms=300), "do_bench median"
            else:
                cpu_fns[i] = fn
                ms = None
            if ms is not None:
                row["time_ms"] = f"{ms:.2f}"
        except _Unavailable as exc:
            row["status"] = str(exc)
        except Stopped as exc:
            stopped = f"stopped ({exc})"
            row["status"] = stopped
        except Exception as exc:  # report, keep benchmarking the others
            row["status"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
            if os.environ.get("IVL_BENCH_DEBUG"):
                traceback.print_exc()
            lost = cuda_context_error() if gpu else ""
        if gpu and not lost:  # after a fault every CUDA call fails: the rows so far must still be written
            torch.cuda.empty_cache()
        print(f"  {case:10s} {name:72s} {row['time_ms'] or '(later)':>10s} ms {row['peak_mem_MiB']:>10s} MiB  "
              f"{row['status']}", flush=True)
    if cpu_fns and not stopped:
        print(f"  timing the {len(cpu_fns)} CPU candidates together (interleaved rounds) ...", flush=True)
        try:
            for i, ms in time_cpu_interleaved_ms(cpu_fns, min_run_time=1.0 if args.quick else 5.0).items():
                rows[i]["time_ms"] = f"{ms:.2f}"
                rows[i]["timing"] = "torch.utils.benchmark, median of 7 interleaved rounds"
        except Stopped as exc:
            stopped = f"stopped ({exc})"
            for i in cpu_fns:
                rows[i]["status"] = f"not timed: {stopped}"
    refs.clear()

    with sigterm_deferred(raise_after=False):  # measuring is over: the files get written
        # Value-only: cut-cross-entropy's default where it runs (a GPU), else torch's own chunked
        # F.linear_cross_entropy.
        bars = {"guided": ["torch.compile(naive)"],
                "value-only": ["cut-cross-entropy linear_cross_entropy [filter_eps=high",
                               "torch F.linear_cross_entropy"]}
        for r in rows:
            if not r["time_ms"]:
                continue
            t = float(r["time_ms"])
            r["TFLOPs"] = f"{flops[r['case']] / (t * 1e-3) / 1e12:.3g}"
            if tflops:
                r["x_flop_floor"] = f"{t / (flops[r['case']] / (tflops * 1e12) * 1e3):.2f}"
            bar = [b for prefix in bars[r["case"]] for b in rows
                   if b["case"] == r["case"] and b["implementation"].startswith(prefix) and b["time_ms"]]
            if bar:
                r["x_bar"] = f"{t / float(bar[0]['time_ms']):.3f}"
        if tflops:
            print(f"  measured matrix rate {tflops:.0f} TFLOP/s; FLOP floors: guided "
                  f"{flops['guided'] / (tflops * 1e12) * 1e3:.1f} ms, value-only "
                  f"{flops['value-only'] / (tflops * 1e12) * 1e3:.1f} ms")
        print("  x_bar: time over DESIGN's bar (guided: torch.compile(naive); value-only: cut-cross-entropy default, "
              "or F.linear_cross_entropy where it does not run)")
        print(format_table(rows, ["case", "implementation", "time_ms", "TFLOPs", "x_flop_floor", "x_bar",
                                  "peak_mem_MiB", "loss_mem_MiB", "loss_mem_vs_naive_pct", "loss", "grad_rel_err",
                                  "loss_rel_err", "timing", "status"]))
        os.makedirs(args.out, exist_ok=True)
        tag = f"guided_loss_{'gpu' if gpu else 'cpu'}_N{N}_{str(dtype).replace('torch.', '')}" + (
            f"_std{args.logit_std:g}" if args.logit_std != LOGIT_STD else "") + (
            "" if len(args.cases) == 2 else "_" + args.cases[0])
        csv_path = os.path.join(args.out, tag + ".csv")
        write_csv(csv_path, rows, versions)
        try:
            written = _plot(rows, os.path.join(args.out, tag + ".png"), versions,
                            f"N={N}, {str(dtype).replace('torch.', '')}")
            print(f"wrote {written}")
        except Exception as exc:
            print(f"plot skipped: {type(exc).__name__}: {exc}")
    return 0


def _median_of_3_ms(fn) -> float:
    import torch

    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1]


def _rel_err(got, ref) -> float:
    num = sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return (num / den) ** 0.5 if den else float("nan")


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


def _peak_mem(fn, gpu: bool):
    """``(peak extra bytes, fn's result)`` of one call."""
    import gc

    import torch

    gc.collect()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    result = fn()
    return _status("VmHWM") - before, result


def _plot(rows, path, versions, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["time_ms"]]
    labels = [f"{r['case']}: {r['implementation']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(16, 0.45 * len(ok) + 2), sharey=True)
    axes[0].barh(labels, [float(r["time_ms"]) for r in ok], color="tab:blue")
    axes[0].set_xlabel("forward+backward, median ms")
    axes[1].barh(labels, [float(r["peak_mem_MiB"]) for r in ok], color="tab:orange")
    axes[1].set_xlabel(f"peak memory MiB ({ok[0]['mem_method'] if ok else ''})")
    axes[1].set_xscale("log")
    axes[0].invert_yaxis()
    fig.suptitle(f"guided cross-entropy, {title} - {versions['device']}, torch {versions['torch']}, "
                 f"triton {versions['triton']}", fontsize=9)
    fig.tight_layout()
    written = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return written


if __name__ == "__main__":
    sys.exit(main())

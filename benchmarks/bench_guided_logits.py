"""Guided LM head, side by side: fused backends vs unfused eager torch vs torch.compile vs cuBLAS vs the floor.

    out[m, b] = base[m, b] + alpha * (value_hidden[m] . value_weight[map[b]])      ([M, Vb] float32 logits)

Two ways to give the base term, each with two vocabulary maps:
  * base "hidden": base hidden states + base LM head, both heads in one pass (GuidedCausalLM; DESIGN's target);
    base "logits": float32 base logits given (IVLLogitsProcessor: the value head alone, ~0.09 ms on an H100).
  * map "identity": ``vocab_map=None`` (same tokenizer, base ids beyond the value vocabulary unmapped);
    map "permuted": a random permutation as an int32 map (cross-vocabulary guidance: a gather per id).

Each fused backend is timed twice: "ivl BACKEND op" calls ``torch.ops.ivl_kernels.*`` with arguments validated
once beforehand (the kernel launch alone), "ivl BACKEND" the public ``fused_guided_logits`` (validation and
dispatch in Python on every call). On a GPU:
  * ``ms`` is GPU time from ``triton.testing.do_bench_cudagraph`` (replayed CUDA graph, no host overhead; no L2
    flush, which the "qwen" weights, 27x the L2, make irrelevant); a call that cannot be captured is timed by
    ``do_bench`` and the ``timing`` column says so;
  * ``launch_loop_ms`` is the per-call time of back-to-back eager calls: what a decode loop pays, host overhead
    included where the host is slower than the kernel (compare "ivl cuda op" with "ivl cuda").
The floor (DESIGN): the larger of the FLOP floor (``2 M (Vb Hb + Vb Hv)`` FLOPs over the matrix rate measured in
the same run, GPU only) and the memory floor: bytes that must move over the measured bandwidth (the faster of a copy, read + write,
and a streaming read: the stricter floor), i.e. the
weight matrices read, the base logits read (base "logits"), the float32 logits written; ``x_floor`` = ms /
floor. Hidden states and the map add < 0.1 % and are left out. The bandwidth is a probe (torch's copy and sum),
not a bound: a fused row can beat it (``x_floor`` < 1). ``best_GBps`` is the highest bandwidth any implementation
reached in this run and ``x_best_bw`` = ``best_GBps`` / the row's ``GBps`` (>= 1; ``_common.add_best_bandwidth``).
``rel_err`` is ||out - ref|| / ||ref|| against float32 arithmetic on the same (upcast) inputs.
DESIGN's targets for base "hidden": at M <= 64 ivl within 1.10x of the memory floor and faster than eager and
torch.compile of the unfused expression; at M = 128 ... 2048 no slower than cuBLAS computing the two heads
separately and within 1.15x of max(memory floor, FLOP floor).

"torch.compile (unfused)" is compiled afresh for every (M, base, map) after ``torch._dynamo.reset()``: one
compiled function over all of them would share dynamo's recompile limit (8 graphs per function) and the rows
past it would time eager code under the compiled label. A row whose first call compiled no graph (dynamo fell
back to eager) is reported as failed, not timed; one that compiled again while timed says so in ``note``.

    python benchmarks/bench_guided_logits.py                 # GPU: "qwen" workload, M = 1, 8, 64, 128, 256, 512, 2048
    python benchmarks/bench_guided_logits.py --device cpu    # CPU: a scaled-down workload
    TRITON_INTERPRET=1 python benchmarks/bench_guided_logits.py --device cpu --workload tiny --quick
                                                             # also checks the Triton rows (interpreted, untimed)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Stopped, add_best_bandwidth, add_output_args, cuda_context_error, env_var,  # noqa: E402
                     environment, floor_bandwidth_gbs, format_table, matrix_tflops, output_options, plot_bars,
                     print_environment, sigterm_deferred, stop_on_sigterm, time_cpu_interleaved_ms, time_gpu_graph,
                     time_launch_loop, write_csv)

import ivl_kernels as ivl  # noqa: E402
from ivl_kernels import _backends  # noqa: E402
from ivl_kernels._triton import interpreter_enabled  # noqa: E402
from ivl_kernels._validate import validate_guided, validate_out  # noqa: E402
from ivl_kernels.ops.guided_logits import GEMM_MIN_ROWS, _cuda_supports, _triton_supports  # noqa: E402
from ivl_kernels.ops.packed_heads import pack_head_weights  # noqa: E402

WORKLOADS = {
    # DESIGN's "qwen": base head Qwen2.5-7B, value head Qwen2.5-0.5B.
    "qwen": dict(Vb=152064, Hb=3584, Vv=151936, Hv=896, dtype="bfloat16", M=[1, 8, 64, 128, 256, 512, 2048]),
    # CPU-sized: a 32k-vocabulary base over a 32000-token value head (SentencePiece v3 -> v1 shape).
    "small": dict(Vb=32768, Hb=512, Vv=32000, Hv=256, dtype="float32", M=[1, 8, 64]),
    # Plumbing checks (the Triton interpreter): odd sizes, seconds per row.
    "tiny": dict(Vb=1000, Hb=64, Vv=936, Hv=32, dtype="float32", M=[1, 7]),
}
ALPHA = 0.7
FILL = 0.0


def value_term(vh, vw, cols, unmapped, Vb):
    """The value head's logits in base-vocabulary order: a pad (identity map) or a gather + fill (a map)."""
    value = F.linear(vh, vw).float()
    if cols is None:
        return F.pad(value, (0, Vb - value.shape[1]), value=FILL)
    return value.index_select(1, cols).masked_fill(unmapped, FILL)


def unfused_from_hidden(bh, bw, vh, vw, cols, unmapped):
    return F.linear(bh, bw).float() + ALPHA * value_term(vh, vw, cols, unmapped, bw.shape[0])


def unfused_from_logits(base_logits, vh, vw, cols, unmapped):
    return base_logits + ALPHA * value_term(vh, vw, cols, unmapped, base_logits.shape[1])


def make_map(kind: str, Vb: int, Vv: int, g: torch.Generator, device) -> torch.Tensor | None:
    if kind == "identity":
        return None
    vocab_map = torch.full((Vb,), -1, dtype=torch.int32)
    n = min(Vb, Vv)
    vocab_map[:n] = torch.randperm(Vv, generator=g)[:n].to(torch.int32)
    return vocab_map.to(device)


class ContextLost(RuntimeError):
    """A kernel fault poisoned the CUDA context: nothing after it can run in this process."""


COMPILED = "torch.compile (unfused)"


class NotCompiled(RuntimeError):
    """The torch.compile row's function ran without a compiled graph (dynamo fell back to eager)."""


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (``torch._dynamo.utils.counters``; ``reset()`` keeps them)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def fresh_compile(fn):
    """``torch.compile(fn, dynamic=False)`` after ``torch._dynamo.reset()``: its own recompile budget, so each
    configuration gets a compiled graph of its own shapes (see the module docstring)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def measure(fn) -> dict:
    """One GPU candidate (CPU candidates are timed together: ``time_cpu_interleaved_ms``)."""
    ms, how = time_gpu_graph(fn)
    return dict(ms=ms, timing=how, launch_loop_ms=time_launch_loop(fn, ms))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    d = got.double() - ref.double()
    return float(d.norm() / ref.double().norm())


def fused_candidates(vh, vw, base_kw, vocab_map, out, device):
    """``({impl: fn}, [(impl, why not run)])`` for the fused backends that can take this call."""
    a = validate_guided(vh, vw, vocab_map=vocab_map, alpha=ALPHA, fill=FILL, **base_kw)
    out2d = validate_out(out, a)

    def public(backend):
        return lambda: ivl.fused_guided_logits(vh, vw, vocab_map=vocab_map, alpha=ALPHA, fill=FILL, out=out,
                                               backend=backend, **base_kw)

    def bare(op):
        def call():
            op(a.value_hidden, a.value_weight, a.base_logits, a.base_hidden, a.base_weight, a.vocab_map, None,
               a.alpha, a.fill, out2d)
            return out2d
        return call

    cands = {"ivl torch": public("torch")}
    skipped = []
    for backend in ("cuda", "triton"):
        if backend == "cuda":
            ok, why = _backends.cuda_usable(device)
            why = why if not ok else _cuda_supports(a, out2d)
        else:
            ok, why = _backends.triton_usable(device)
            why = why if not ok else _triton_supports(a)
        if why:
            skipped.append((f"ivl {backend}", why))
            continue
        op = (torch.ops.ivl_kernels.guided_logits_decode_ if backend == "cuda"
              else torch.ops.ivl_kernels.guided_logits_triton)
        cands[f"ivl {backend} op"] = bare(op)
        cands[f"ivl {backend}"] = public(backend)
    return cands, skipped


def run_config(rows, *, M, base, map_name, vocab_map, wl, dtype, weights, compile_rows, device, bw_gbs, quick, g,
               tflops=None, packed=None):
    bw, vw = weights
    Vb = wl["Vb"]
    key = dict(M=M, base=base, map=map_name)
    vh = torch.randn(M, wl["Hv"], generator=g).to(device=device, dtype=dtype)
    cols = None if vocab_map is None else vocab_map.clamp(min=0).long()
    unmapped = None if vocab_map is None else vocab_map < 0
    if base == "hidden":
        bh = torch.randn(M, wl["Hb"], generator=g).to(device=device, dtype=dtype)
        base_kw = dict(base_hidden=bh, base_weight=bw)
        args = (bh, bw, vh, vw, cols, unmapped)
        ref = unfused_from_hidden(bh.float(), bw.float(), vh.float(), vw.float(), cols, unmapped)
        moved = bw.numel() * bw.element_size() + vw.numel() * vw.element_size() + M * Vb * 4
        flops = 2 * M * (bw.numel() + Vb * wl["Hv"])
    else:
        base_logits = (4 * torch.randn(M, Vb, generator=g)).to(device)
        base_kw = dict(base_logits=base_logits)
        args = (base_logits, vh, vw, cols, unmapped)
        ref = unfused_from_logits(base_logits, vh.float(), vw.float(), cols, unmapped)
        moved = vw.numel() * vw.element_size() + 2 * M * Vb * 4
        flops = 2 * M * Vb * wl["Hv"]
    mem_ms = moved / (bw_gbs * 1e9) * 1e3
    # DESIGN's floor: the larger of the memory floor and the FLOP floor at the measured matrix rate.
    flop_ms = flops / (tflops * 1e12) * 1e3 if tflops else 0.0
    floor_ms = max(mem_ms, flop_ms)
    eager = unfused_from_hidden if base == "hidden" else unfused_from_logits

    cands = {"eager (unfused)": lambda: eager(*args)}
    if base == "hidden" and device.type == "cuda":
        # The two heads alone in cuBLAS (bf16 out, no remap, no add): DESIGN's bar for M >= 128. Timing only.
        cands["cuBLAS heads separately"] = lambda: (bh @ bw.T, vh @ vw.T)
    if compile_rows:
        compiled = fresh_compile(eager)  # compiles on its first call below, with this configuration's shapes
        cands[COMPILED] = lambda: compiled(*args)
    out = torch.empty(M, Vb, device=device, dtype=torch.float32)
    fused, skipped = fused_candidates(vh, vw, base_kw, vocab_map, out, device)
    cands.update(fused)
    if packed is not None and base == "hidden" and vocab_map is None and "ivl triton" in fused:
        # The same heads packed into one buffer (pack_head_weights): from GEMM_MIN_ROWS rows, one GEMM.
        pb, pv = packed
        cands["ivl triton packed"] = lambda: ivl.fused_guided_logits(
            vh, pv, base_hidden=bh, base_weight=pb, alpha=ALPHA, fill=FILL, out=out, backend="triton")
        # vLLM's case: the hidden states already side by side ([X_b | X_v], its forward's output) with alpha 1, read
        # in place (nothing concatenated per call). Here [X_b | ALPHA X_v] is built once, outside the timing, so
        # the result is the other rows' (up to X_v's rounding after the scaling, as the packed path has it).
        side = torch.cat([bh, vh * ALPHA], dim=1)
        cands["ivl triton packed, side by side"] = lambda: ivl.fused_guided_logits(
            side[:, bh.shape[1]:], pv, base_hidden=side[:, :bh.shape[1]], base_weight=pb, alpha=1.0, fill=FILL,
            out=out, backend="triton")
    if "ivl triton" in fused and M >= GEMM_MIN_ROWS:
        # The default ("ivl triton") lets IVL_KERNELS_GEMM=auto choose per shape class; each kind forced too: the
        # cuBLAS GEMMs, the head as one tile GEMM (both heads as K segments, written once), and that GEMM through
        # TMA descriptors on a persistent grid (Hopper, no map; elsewhere the pointer tiles), on 128 x 256 tiles too.
        def forced(kind):
            def run():
                with env_var("IVL_KERNELS_GEMM", kind):
                    return fused["ivl triton"]()
            return run
        cands["ivl triton cuBLAS GEMMs"] = forced("cublas")
        cands["ivl triton tile GEMM"] = forced("tiles")
        if vocab_map is None:
            cands["ivl triton tile GEMM, TMA"] = forced("tma")
            # 128 x 256 tiles, the epilogue in two column halves (_tile_launch.WIDE_TILES; sm_90, half precision).
            cands["ivl triton tile GEMM, TMA wide"] = forced("wide")
    for impl, why in skipped:
        rows.append(dict(key, impl=impl, note=f"not run: {why}"[:160]))
        print_row(rows[-1])
    def timed(row, ms, how):
        row.update(ms=ms, timing=how, x_floor=ms / floor_ms, GBps=moved / (ms * 1e-3) / 1e9,
                   TFLOPs=flops / (ms * 1e-3) / 1e12)

    def recompiled(row, graphs):
        """Note on the torch.compile row when dynamo compiled again while it was timed."""
        if graphs is not None and dynamo_graphs() != graphs:
            row["note"] = (f"dynamo compiled {dynamo_graphs() - graphs} more graph(s) while timed: the time may "
                           f"include compilation or an eager fallback")

    cpu_pending = []  # CPU rows checked, timed together below (interleaved)
    compiled_graphs = None  # dynamo's graph count after the torch.compile row's first call
    for impl, fn in cands.items():
        row = dict(key, impl=impl)
        try:
            out.fill_(float("nan"))  # an element the kernel never writes cannot pass
            before = dynamo_graphs()
            got = fn()
            if impl == COMPILED:
                if dynamo_graphs() == before:
                    raise NotCompiled("no graph compiled on the first call: dynamo ran it eagerly (recompile "
                                      "limit or an unsupported construct); not timed under this label")
                compiled_graphs = dynamo_graphs()
            if torch.is_tensor(got):
                row["rel_err"] = rel_err(got, ref)
            if device.type == "cpu" and impl.startswith("ivl triton"):
                row["note"] = "Triton interpreter: checked, not timed"
            elif device.type == "cpu":
                cpu_pending.append((row, fn))
                continue
            else:
                m = measure(fn)
                timed(row, m.pop("ms"), m.pop("timing"))
                row.update(m)
                if impl == COMPILED:
                    recompiled(row, compiled_graphs)
        except Exception as exc:  # report, never hide, an implementation that cannot run here
            row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            lost = cuda_context_error() if device.type == "cuda" else ""
            if lost:
                rows.append(row)
                raise ContextLost(f"after {impl} at {key}: {lost}") from exc
        rows.append(row)
        print_row(row)
    if cpu_pending:
        ms = time_cpu_interleaved_ms({row["impl"]: fn for row, fn in cpu_pending},
                                     min_run_time=0.2 if quick else 0.5)
        for row, _ in cpu_pending:
            timed(row, ms[row["impl"]], "torch.utils.benchmark, interleaved rounds")
            if row["impl"] == COMPILED:
                recompiled(row, compiled_graphs)
            rows.append(row)
            print_row(row)
    rows.append(dict(key, impl="floor", ms=floor_ms, x_floor=1.0, GBps=bw_gbs,
                     note=f"max(memory {mem_ms:.3g} ms: {moved / 1e6:.1f} MB, FLOP {flop_ms:.3g} ms: "
                          f"{flops / 1e12:.3g} TFLOP at {tflops or 0:.0f} TFLOP/s)"))
    print_row(rows[-1])


def print_row(r: dict) -> None:
    """Each row as it is measured: a step stopped at its time limit still leaves its numbers in the log."""
    def f(k):
        v = r.get(k)
        return f"{v:.4g}" if isinstance(v, float) else "-"
    print(f"  M={r['M']:<4} {r['base']:6s} {r['map']:8s} {r['impl']:24s} ms {f('ms'):>9s}  x_floor {f('x_floor'):>7s}"
          f"  loop_ms {f('launch_loop_ms'):>9s}  rel_err {f('rel_err'):>9s}  {r.get('timing', '')} {r.get('note', '')}",
          flush=True)


def print_summary(rows, gpu: bool) -> None:
    """One line per (M, base, map): each implementation's ms and its multiple of the floor; on a GPU also the
    back-to-back eager loop's ms per call."""
    configs = list(dict.fromkeys((r["M"], r["base"], r["map"]) for r in rows if r["impl"] != "(stopped)"))
    for field, title in (("ms", "ms (x floor)"), ("launch_loop_ms", "eager loop ms per call"))[: 2 if gpu else 1]:
        impls = list(dict.fromkeys(r["impl"] for r in rows
                                   if r["impl"] != "floor" and isinstance(r.get(field), float)))
        table = []
        for M, base, map_name in configs:
            line = dict(M=M, base=base, map=map_name)
            for r in rows:
                if (r["M"], r["base"], r["map"]) == (M, base, map_name) and isinstance(r.get(field), float):
                    line[r["impl"]] = f"{r[field]:.3g}" + (f" ({r['x_floor']:.2f}x)" if field == "ms" else "")
            table.append(line)
        print(f"\n# summary: {title}")
        print(format_table(table, ["M", "base", "map"] + (["floor"] if field == "ms" else []) + impls))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda when available)")
    p.add_argument("--workload", default=None, choices=sorted(WORKLOADS), help="default: qwen on GPU, small on CPU")
    p.add_argument("--M", type=int, nargs="*", default=None, help="rows (tokens) to time")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--base", nargs="*", default=["hidden", "logits"], choices=["hidden", "logits"])
    p.add_argument("--map", nargs="*", default=["identity", "permuted"], choices=["identity", "permuted"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="the two smallest M only, shorter CPU timing")
    add_output_args(p, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    output_options(args)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    name = args.workload or ("qwen" if device.type == "cuda" else "small")
    wl = WORKLOADS[name]
    dtype = getattr(torch, args.dtype or wl["dtype"])
    Ms = args.M or wl["M"]
    if args.quick:
        Ms = Ms[:2]
    env = environment(device)
    env["triton_interpreter"] = str(interpreter_enabled())
    print_environment(env)
    print(f"# workload {name}: Vb={wl['Vb']} Hb={wl['Hb']} Vv={wl['Vv']} Hv={wl['Hv']} dtype={dtype} alpha={ALPHA}")

    g = torch.Generator(device="cpu").manual_seed(0)
    bw = (torch.randn(wl["Vb"], wl["Hb"], generator=g) / wl["Hb"] ** 0.5).to(device=device, dtype=dtype)
    vw = (torch.randn(wl["Vv"], wl["Hv"], generator=g) / wl["Hv"] ** 0.5).to(device=device, dtype=dtype)
    packed = pack_head_weights(bw, vw) if "hidden" in args.base and "identity" in args.map else None
    bw_gbs, copy_gbs, read_gbs = floor_bandwidth_gbs(device)
    print(f"# measured bandwidth: copy {copy_gbs:.1f} GB/s (read + write), streaming read {read_gbs:.1f} GB/s; "
          f"the floor uses {bw_gbs:.1f} GB/s")
    tflops = matrix_tflops(device, dtype) if device.type == "cuda" else None
    env["matrix_tflops"] = f"{tflops:.0f}" if tflops else "not measured (CPU: memory floor only)"
    if tflops:
        print(f"# measured matrix rate: {tflops:.0f} TFLOP/s ({dtype}, 8192^3 random)")

    rows: list[dict] = []
    stop_on_sigterm()
    try:
        for base in args.base:
            for map_name in args.map:
                vocab_map = make_map(map_name, wl["Vb"], wl["Vv"], g, device)
                for M in Ms:
                    # torch.compile rows: compiled afresh per configuration (fresh_compile), static shapes.
                    run_config(rows, M=M, base=base, map_name=map_name, vocab_map=vocab_map, wl=wl, dtype=dtype,
                               weights=(bw, vw), compile_rows=not args.no_compile, device=device, bw_gbs=bw_gbs,
                               quick=args.quick, g=g, tflops=tflops, packed=packed)
    except (ContextLost, Stopped) as exc:
        why = f"CUDA context lost {exc}" if isinstance(exc, ContextLost) else str(exc)
        print(f"# STOPPED: {why}; the rows so far are kept")
        rows.append(dict(M="", base="", map="", impl="(stopped)", note=why[:200]))

    # Measuring is over: a time limit arriving now lets the files be written.
    with sigterm_deferred(raise_after=False):
        best = add_best_bandwidth(rows, skip=lambda r: r["impl"] in ("floor", "(stopped)"))
        if best:
            env["best_GBps"] = f"{best:.1f} (the highest bandwidth an implementation reached in this run; x_best_bw)"
            print(f"# best bandwidth reached by an implementation: {best:.1f} GB/s (probe: {bw_gbs:.1f} GB/s)")
        cols = ["M", "base", "map", "impl", "ms", "x_floor", "GBps", "TFLOPs", "launch_loop_ms", "rel_err", "timing",
                "note", "best_GBps", "x_best_bw"]
        print_summary(rows, gpu=device.type == "cuda")
        tag = f"guided_logits_{name}_{device.type}"
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, f"{tag}.csv"), [{c: r.get(c, "") for c in cols} for r in rows], env)
        plot_bars(os.path.join(args.out, f"{tag}.png"),
                  [dict(r, panel=f"base {r['base']}, map {r['map']}") for r in rows if r.get("ms")],
                  group="M", series="impl", value="ms", panel="panel", log=True, ylabel="ms (median)",
                  title=f"guided head ({name}, {dtype}) on {env['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

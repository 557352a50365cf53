"""Guided LM head, side by side: fused backends vs unfused eager torch vs torch.compile vs the memory floor.

The computation is DESIGN's "guided head": ``base_hidden . base_weight^T + alpha * remap(value_hidden .
value_weight^T)`` with a vocabulary map, written as ``[M, Vb]`` float32 logits. The memory floor is the bytes
that must move (both weight matrices and both hidden states read, the logits written) over the device's
measured copy bandwidth: no implementation can beat it at decode sizes.

    python benchmarks/bench_guided_logits.py                 # GPU: "qwen" workload, M = 1, 8, 64, 512
    python benchmarks/bench_guided_logits.py --device cpu    # CPU: a scaled-down workload
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (copy_bandwidth_gbs, environment, format_table, plot_bars, print_environment,  # noqa: E402
                     time_ms, write_csv)

import ivl_kernels as ivl  # noqa: E402
from ivl_kernels import _backends  # noqa: E402
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled  # noqa: E402

WORKLOADS = {
    # DESIGN's "qwen": base head Qwen2.5-7B, value head Qwen2.5-0.5B.
    "qwen": dict(Vb=152064, Hb=3584, Vv=151936, Hv=896, dtype="bfloat16", M=[1, 8, 64, 512]),
    # CPU-sized: a 32k-vocabulary base over a 32000-token value head (SentencePiece v3 -> v1 shape).
    "small": dict(Vb=32768, Hb=512, Vv=32000, Hv=256, dtype="float32", M=[1, 8, 64]),
}


def eager_guided(bh, bw, vh, vw, cols, unmapped, alpha):
    """The unfused expression: two LM heads, a gather, a masked fill, a scale and an add."""
    base = torch.nn.functional.linear(bh, bw).float()
    value = torch.nn.functional.linear(vh, vw).float().index_select(1, cols)
    value = value.masked_fill(unmapped, 0.0)
    return base + alpha * value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda when available)")
    p.add_argument("--workload", default=None, choices=sorted(WORKLOADS), help="default: qwen on GPU, small on CPU")
    p.add_argument("--M", type=int, nargs="*", default=None, help="rows (tokens) to time")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--quick", action="store_true", help="smallest M only, short timing")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    wl = dict(WORKLOADS[args.workload or ("qwen" if device.type == "cuda" else "small")])
    dtype = getattr(torch, args.dtype or wl["dtype"])
    Ms = args.M or wl["M"]
    if args.quick:
        Ms = Ms[:2]
    env = environment(device)
    print_environment(env)
    name = args.workload or ("qwen" if device.type == "cuda" else "small")
    print(f"# workload {name}: Vb={wl['Vb']} Hb={wl['Hb']} Vv={wl['Vv']} Hv={wl['Hv']} dtype={dtype}")

    g = torch.Generator(device="cpu").manual_seed(0)
    bw = (torch.randn(wl["Vb"], wl["Hb"], generator=g) / wl["Hb"] ** 0.5).to(device=device, dtype=dtype)
    vw = (torch.randn(wl["Vv"], wl["Hv"], generator=g) / wl["Hv"] ** 0.5).to(device=device, dtype=dtype)
    # A realistic cross-vocabulary map: most ids shared, a tail of base ids unmapped.
    vocab_map = torch.arange(wl["Vb"], dtype=torch.int32)
    vocab_map[vocab_map >= wl["Vv"]] = -1
    vocab_map = vocab_map.to(device)
    cols = vocab_map.clamp(min=0).long()
    unmapped = vocab_map < 0
    alpha = 0.7
    bw_bytes = copy_bandwidth_gbs(device)
    print(f"# measured copy bandwidth: {bw_bytes:.1f} GB/s (read + write)")

    rows = []
    for M in Ms:
        bh = torch.randn(M, wl["Hb"], generator=g).to(device=device, dtype=dtype)
        vh = torch.randn(M, wl["Hv"], generator=g).to(device=device, dtype=dtype)
        moved = (bw.numel() * bw.element_size() + vw.numel() * vw.element_size()
                 + bh.numel() * bh.element_size() + vh.numel() * vh.element_size() + M * wl["Vb"] * 4)
        floor_ms = moved / (bw_bytes * 1e9) * 1e3
        want = eager_guided(bh, bw, vh, vw, cols, unmapped, alpha)
        cands = {"eager (unfused)": lambda: eager_guided(bh, bw, vh, vw, cols, unmapped, alpha)}
        if not args.no_compile:
            compiled = torch.compile(eager_guided)
            cands["torch.compile (unfused expr)"] = lambda: compiled(bh, bw, vh, vw, cols, unmapped, alpha)
        out = torch.empty(M, wl["Vb"], device=device, dtype=torch.float32)
        for backend in ("cuda", "triton", "torch"):
            why = ""
            if backend == "cuda":
                ok, why = _backends.cuda_usable(device)
            elif backend == "triton":
                ok, why = _backends.triton_usable(device)
                if ok and device.type == "cpu":
                    ok, why = False, "interpreter only on CPU (not timed)"
            else:
                ok = True
            if ok:
                def run(backend=backend):
                    return ivl.fused_guided_logits(vh, vw, base_hidden=bh, base_weight=bw, vocab_map=vocab_map,
                                                   alpha=alpha, out=out, backend=backend)
                try:
                    run()
                except RuntimeError as exc:  # e.g. the CUDA kernel's M limit
                    ok, why = False, str(exc)[:80]
            if ok:
                cands[f"ivl {backend}"] = run
            else:
                rows.append(dict(M=M, impl=f"ivl {backend}", ms=None, note=f"not run: {why[:70]}"))
        for impl, fn in cands.items():
            try:
                got = fn()
                err = (got.float() - want).abs().max().item()
                ms = time_ms(fn, device, min_run_time=0.2 if args.quick else 0.5)
                rows.append(dict(M=M, impl=impl, ms=ms, x_floor=ms / floor_ms, GBps=moved / (ms * 1e-3) / 1e9,
                                 max_abs_diff_vs_eager=err, note=""))
            except Exception as exc:  # report, never hide, a competitor that cannot run here
                rows.append(dict(M=M, impl=impl, ms=None, note=f"failed: {type(exc).__name__}: {exc}"[:100]))
        rows.append(dict(M=M, impl="memory floor", ms=floor_ms, x_floor=1.0, GBps=bw_bytes, note=f"{moved/1e6:.1f} MB"))

    print(format_table(rows, ["M", "impl", "ms", "x_floor", "GBps", "max_abs_diff_vs_eager", "note"]))
    tag = f"guided_logits_{name}_{device.type}"
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, f"{tag}.csv"), rows, env)
    plot_bars(os.path.join(args.out, f"{tag}.png"), [r for r in rows if r.get("ms")], group="M", series="impl",
              value="ms", title=f"guided head ({name}, {dtype}) on {env['device']}", ylabel="ms (median)", log=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark plumbing: environment header, timing, memory-floor bandwidth, CSV and plot output.

Timing, in milliseconds:
  * ``time_ms``: GPU ``triton.testing.do_bench`` median (L2 flushed before each call), CPU
    ``torch.utils.benchmark`` median. For work long enough that host overhead hides behind the GPU (the loss).
  * ``time_cpu_interleaved_ms``: CPU candidates compared side by side, timed in interleaved rounds (median of
    the rounds), so that a drifting CPU speed hits them all alike.
  * ``time_gpu_graph``: ``triton.testing.do_bench_cudagraph`` median, the GPU time of a call with the host
    taken out (the calls are replayed from a CUDA graph). A call that cannot be captured falls back to
    ``do_bench`` and says why.
  * ``time_launch_loop``: back-to-back eager calls, no graph, no cache flush: what a decode loop pays per call,
    host overhead (Python front end, launches) included when the host is slower than the GPU.

Bandwidth, in GB/s:
  * ``floor_bandwidth_gbs``: the faster of a torch ``copy_`` and a torch ``sum`` over the same bytes, timed like
    the rows. The memory floor (``x_floor`` = ms / floor) divides the bytes that must move by it. It is a probe,
    not a hardware bound: a kernel can stream faster than torch's copy and reduction (the H200 of 2026-12-04: a
    fused row at 4564 GB/s against a 4213 GB/s probe, ``x_floor`` 0.92), so ``x_floor`` below 1 is possible and
    means "faster than the probe". The column keeps its definition so that earlier results stay comparable.
  * ``add_best_bandwidth``: ``best_GBps``, the highest bandwidth any implementation reached in the same run (its
    bytes over its time), and ``x_best_bw`` = ``best_GBps`` / the row's ``GBps`` (1 for that row, above 1 for
    the others): a memory-bound row measured against the best this device was seen to do, never below 1.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import signal
import sys
from typing import Callable, Iterable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from ivl_kernels._atomic import atomic_file  # noqa: E402  (after the checkout is on the path)


def environment(device: torch.device) -> dict:
    """Device, date and versions, printed at the top of every benchmark and kept in its CSV."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    try:
        import ivl_kernels
        from ivl_kernels._backends import cuda_extension

        env["ivl_kernels"] = ivl_kernels.__version__
        env["cuda_extension"] = "built" if cuda_extension() is not None else "not built"
    except Exception as exc:  # the benchmark still reports the peers
        env["ivl_kernels"] = f"import failed: {exc}"
    return env


@contextlib.contextmanager
def env_var(name: str, value):
    """``os.environ[name] = value`` inside (``None``: leave it as it is)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def print_environment(env: dict) -> None:
    for k, v in env.items():
        print(f"# {k}: {v}")


def time_ms(fn: Callable[[], object], device: torch.device, *, min_run_time: float = 0.5, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    import torch.utils.benchmark as tb

    fn()  # warm-up (first-call allocations, compilation)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e3


def time_cpu_interleaved_ms(fns: dict, *, min_run_time: float = 0.5, rounds: int = 7) -> dict:
    """``{name: median ms}`` of each CPU callable, timed in ``rounds`` interleaved rounds (``torch.utils.benchmark``
    ``Timer.timeit`` per candidate per round; about ``min_run_time`` seconds per candidate in all). A shared CPU's
    speed drifts over seconds (up to 2x on the 2-core CI machine): timed one after the other, candidates would be
    compared across different speeds; interleaved, each round sees all of them at about the same one."""
    import torch.utils.benchmark as tb

    timers, number = {}, {}
    for name, fn in fns.items():
        fn()  # warm-up (first-call allocations, compilation)
        timers[name] = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        once = timers[name].timeit(1).median
        number[name] = max(1, int(min_run_time / rounds / max(once, 1e-6)))
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, t in timers.items():
            per_round[name].append(t.timeit(number[name]).median)
    return {name: sorted(v)[len(v) // 2] * 1e3 for name, v in per_round.items()}


def time_gpu_graph(fn: Callable[[], object], *, rep_ms: int = 50) -> tuple[float, str]:
    """``(median ms, how it was measured)`` of ``fn()`` replayed from a CUDA graph.

    ``fn`` must have run once already (compilation, autotuning, first allocations happen outside the capture).
    A call that cannot be captured (a host sync, a CPU tensor read) is timed by ``do_bench`` instead, and ``how``
    carries the capture error so the CSV says which number is which.
    """
    import triton.testing

    torch.cuda.synchronize()  # do_bench_cudagraph runs fn on a side stream: inputs must be ready
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")), "cuda graph"
    except Exception as exc:
        reason = f"cuda graph timing failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    lost = cuda_context_error()
    if lost:
        raise RuntimeError(f"{reason}; CUDA context lost: {lost}")
    return time_ms(fn, torch.device("cuda")), f"do_bench, {reason}"


def time_launch_loop(fn: Callable[[], object], gpu_ms: float, *, target_ms: float = 50.0) -> float:
    """Per-call ms of back-to-back eager calls (enough of them to take about ``target_ms`` of GPU time)."""
    from ivl_kernels._timing import back_to_back_ms

    return back_to_back_ms(fn, max(10, min(2000, int(target_ms / max(gpu_ms, 1e-3)))), warmup=3)


class Stopped(BaseException):
    """The benchmark was told to stop (SIGTERM) and writes what it has measured. Not an ``Exception``: the
    per-implementation ``except Exception`` that records a failing competitor must let it through."""


def stop_on_sigterm() -> None:
    """gpu_session.sh ends a step at its time limit with SIGTERM (``timeout``): raise ``Stopped`` instead of
    dying, so the rows measured so far still reach the CSV."""
    def handler(signum, frame):
        raise Stopped("SIGTERM (time limit)")
    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_deferred(raise_after: bool = True):
    """While the results are written: a SIGTERM is remembered instead of raised (``timeout`` sends SIGKILL only
    20 s later, time enough to finish the files); on leaving, ``Stopped`` is raised if one came and
    ``raise_after``, else it is dropped (the script is ending anyway)."""
    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
    if got and raise_after:
        raise Stopped("SIGTERM (time limit)")


def cuda_context_error() -> str:
    """``""`` while CUDA still works in this process, else the error: a kernel fault (illegal address, device
    assert) poisons the context, and every later CUDA call fails with it."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"


def floor_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> tuple[float, float, float]:
    """``(floor, copy, read)`` device bandwidths in GB/s: a copy (bytes read + bytes written per second), a
    streaming read (a sum over the same bytes), and the faster of the two, which the memory floor uses. An LM
    head mostly reads, and reads can stream faster than copies move (2 CPU cores here: copy 26.5-32.1 GB/s, read
    56.5 GB/s; against the copy figure alone an eager GEMV sat at 0.52x of the "floor"), so the faster figure is
    the closer one. It is still a probe, not a lower bound on time: a kernel can beat torch's copy and sum (the
    H200 of 2026-12-04: 4564 GB/s against this probe's 4213, ``x_floor`` 0.923). ``add_best_bandwidth`` gives
    each row's ratio to the best bandwidth an implementation reached in the same run as well."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (1 << 27))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy = 2 * nbytes / (time_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9
    read = nbytes / (time_ms(lambda: src.sum(), device) * 1e-3) / 1e9
    del src, dst
    return max(copy, read), copy, read


def add_best_bandwidth(rows: list[dict], *, gbps: str = "GBps",
                       skip: Callable[[dict], bool] = lambda r: False) -> float | None:
    """Set ``best_GBps`` (the highest ``rows[i][gbps]`` of an implementation in this run) and ``x_best_bw``
    (``best_GBps`` / the row's ``gbps``) on every row with a positive numeric ``gbps``; ``skip(row)``: rows that are
    not an implementation's measurement (a floor row, whose ``GBps`` is the probe's) are neither counted nor given
    the columns. Returns the best figure (``None`` when no row has one). Earlier columns are left as they are."""
    def rate(r):
        v = r.get(gbps)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        return float(v) if ok else None

    measured = [r for r in rows if not skip(r) and rate(r) is not None]
    if not measured:
        return None
    best = max(rate(r) for r in measured)
    for r in measured:
        r["best_GBps"] = best
        r["x_best_bw"] = best / rate(r)
    return best


def matrix_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matrix rate (TFLOP/s) of an ``n``-cubed product through torch (cuBLAS on a GPU) on random
    data: the FLOP floor's ceiling (METHOD: never a datasheet figure, never zeros)."""
    if device.type != "cuda":
        n = min(n, 1024)
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    del a, b
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# Results of the same name already in --out (the committed benchmarks/results/, a colleague's run) are kept unless
# the script was given --overwrite: this run's files then get a time-stamped name beside them.
_OUTPUT = {"overwrite": False, "stamp": datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}


def add_output_args(parser, default: str | None, what: str = "results directory") -> None:
    """``--out`` (``default``) and ``--overwrite`` on a benchmark's parser; call ``output_options(args)``."""
    parser.add_argument("--out", default=default, help=f"{what} (default: {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing results of the same name (default: keep them; this run's files are "
                             "written as NAME-<time>.EXT beside them)")


def output_options(args) -> None:
    _OUTPUT["overwrite"] = bool(getattr(args, "overwrite", False))


def output_path(path: str) -> str:
    """``path``, or a time-stamped sibling when ``path`` exists and --overwrite was not given (said on stdout)."""
    if _OUTPUT["overwrite"] or not os.path.lexists(path):
        return path
    stem, ext = os.path.splitext(path)
    new = f"{stem}-{_OUTPUT['stamp']}{ext}"
    n = 1
    while os.path.lexists(new):
        n += 1
        new = f"{stem}-{_OUTPUT['stamp']}-{n}{ext}"
    print(f"# {path} exists: kept (pass --overwrite to replace it); this run's file is {new}")
    return new


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``output_path(path)`` atomically; returns the path written."""
    path = output_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return path


def write_csv(path: str, rows: list[dict], env: dict) -> None:
    path = output_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    # Whole or not at all: a run stopped mid-write never leaves a truncated CSV in place of an earlier one.
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        for k, v in env.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def save_figure(fig, path: str, dpi: int) -> str:
    """``fig.savefig(path)`` through a temporary sibling (the format from ``path``'s extension); an existing
    ``path`` is kept unless --overwrite (``output_path``). Returns the path written."""
    path = output_path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1].lstrip(".") or "png")
    return path


def plot_bars(path: str, rows: list[dict], *, group: str, series: str, value: str, title: str,
              ylabel: str, log: bool = False, panel: str | None = None) -> None:
    """Grouped bar chart: one group per ``group`` value, one bar per ``series`` value; one subplot per
    ``panel`` value when given."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    panels = list(dict.fromkeys(r[panel] for r in rows)) if panel else [None]
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / max(1, len(names))
    fig_w = max(6, 1.6 * len(groups) * max(1, len(names)) / 3)
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, 4 * len(panels)), squeeze=False)
    for ax, pv in zip(axes[:, 0], panels):
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, g in enumerate(groups):
                for r in rows:
                    if (r[group] == g and r[series] == name and (panel is None or r[panel] == pv)
                            and isinstance(r.get(value), (int, float))):
                        xs.append(j + i * width)
                        ys.append(r[value])
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([str(g) for g in groups])
        ax.set_xlabel(group)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.set_title(title if pv is None else f"{title}: {pv}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written = save_figure(fig, path, dpi=120)
    plt.close(fig)
    print(f"wrote {written}")


def format_table(rows: Iterable[dict], cols: list[str]) -> str:
    rows = list(rows)
    cells = [[str(c) for c in cols]] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

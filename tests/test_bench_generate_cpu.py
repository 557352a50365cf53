"""``benchmarks/bench_generate.py`` on a CPU, in process, on its tiny models: the timed calls replay what the
warm-up call built. Each method keeps its own static caches (GuidedCausalLM keeps one decoder set per object; a
processor is reset, not rebuilt), so after every method's warm-up no ``StaticRunner`` is constructed again (one
would mean caches rebuilt and, on CUDA, a graph captured again inside the timed call). ``torch.compile`` is
replaced by the identity: the cache plumbing is under test, not inductor (minutes on this CPU)."""

import csv
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_generate as bg

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    return bg


def test_no_static_runner_is_built_during_the_timed_rounds(bench, monkeypatch):
    from ivl_kernels.hf import _static

    bg = bench
    builds = []  # (method, its call number) of every StaticRunner construction; call 0 is the warm-up
    current = [None]
    real_init = _static.StaticRunner.__init__

    def counting_init(self, *args, **kw):
        builds.append(current[0])
        real_init(self, *args, **kw)

    monkeypatch.setattr(_static.StaticRunner, "__init__", counting_init)
    device = torch.device("cpu")
    base, value = bg._models(device, torch.float32, big=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 2048, (2, 12), generator=g)
    fed = torch.randint(2, 2048, (2, 3), generator=g)
    methods = bg._methods(base, value, ids, torch.ones_like(ids), fed, 4, list(ids[:1]), 2)
    calls = {}

    def counted(name, fn):
        def run():
            current[0] = (name, calls.get(name, 0))
            calls[name] = current[0][1] + 1
            return fn()
        return run

    best, first = bg._time_interleaved([counted(name, fn) for name, fn, _ in methods], device, repeats=2)
    assert all(calls[name] == 3 for name, _, _ in methods), calls  # warm-up + 2 rounds each
    assert all(t < float("inf") for t in best) and len(first) == len(methods)
    timed_builds = [b for b in builds if b[1] > 0]
    assert not timed_builds, f"static caches rebuilt inside timed calls: {timed_builds}"
    # The static methods did build in their warm-up (else the check above proves nothing).
    warm = {name for name, n in builds if n == 0}
    assert {"guided-static", "guided-compiled", "processor-compiled",
            "processor-compiled in base-static"} <= warm, warm


def test_a_stopped_run_writes_the_rows_it_has(bench, tmp_path, monkeypatch):
    """SIGTERM (gpu_session.sh's time limit) during the rounds: the batch's CSV is still written, the rows
    measured so far filled and the others saying why not."""
    bg = bench
    real = bg._two_forwards
    calls = [0]

    def stop_in_round(*args):
        calls[0] += 1
        if calls[0] == 2:  # the first timed round: what ran before it has its warm-up time only
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(bg, "_two_forwards", stop_in_round)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert bg.main(["--device", "cpu", "--batch", "2", "--prompt-len", "8", "--new", "4", "--repeats", "1",
                        "--out", str(tmp_path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".csv"]
    text = path.read_text()
    assert "# columns: time_vs_forwards" in text
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    by = {r["method"].split(" (")[0]: r for r in rows}
    assert len(rows) == 12 and by["guided-lm"]["tokens_per_s"] and by["guided-lm"]["status"] == "ok"
    assert all(r["first_call_s"] for r in rows)
    assert by["ivl-reference"]["tokens_per_s"] == "" and "SIGTERM" in by["ivl-reference"]["status"]

"""``benchmarks/bench_guided_logits.py`` on a CPU, in process: the "torch.compile (unfused)" rows time compiled
code, for more configurations than dynamo's recompile limit, and a row whose function fell back to eager is
reported as such instead of being timed under the compiled label. Times are faked (the plumbing is under test,
not the speed) and dynamo compiles with a counting backend instead of inductor (seconds instead of minutes)."""

import csv
import os
import signal
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
COMPILED = "torch.compile (unfused)"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_guided_logits as bgl

    compiles = []
    real_compile = torch.compile

    def counting_compile(fn, **kw):
        def backend(gm, example_inputs):
            compiles.append(gm)
            return gm.forward
        return real_compile(fn, backend=backend, **kw)

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(bgl, "time_cpu_interleaved_ms", lambda fns, **kw: {name: 1.0 for name in fns})
    monkeypatch.setattr(bgl, "floor_bandwidth_gbs", lambda device: (10.0, 5.0, 10.0))
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    torch._dynamo.reset()
    yield bgl, compiles
    signal.signal(signal.SIGTERM, handler)
    torch._dynamo.reset()


def _run(bgl, tmp_path, Ms, maps):
    argv = ["--device", "cpu", "--workload", "tiny", "--base", "hidden", "--map", *maps, "--M", *map(str, Ms),
            "--out", str(tmp_path)]
    assert bgl.main(argv) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".csv"]
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


@pytest.mark.slow
def test_every_compile_row_times_its_own_compiled_graph_past_the_recompile_limit(bench, tmp_path):
    bgl, compiles = bench
    limit = torch._dynamo.config.recompile_limit
    Ms = list(range(1, limit + 3))  # per map more configurations than one function may compile
    rows = _run(bgl, tmp_path, Ms, ["identity", "permuted"])
    compiled = [r for r in rows if r["impl"] == COMPILED]
    assert len(compiled) == 2 * len(Ms)
    for r in compiled:
        assert r["ms"] and "failed" not in r["note"] and "while timed" not in r["note"], r
        assert float(r["rel_err"]) < 1e-5, r
    # One compiled graph (at least) per configuration: none of them ran eagerly under the compiled label.
    assert len(compiles) >= len(compiled)


def test_a_compile_row_that_fell_back_to_eager_is_reported_not_timed(bench, tmp_path, monkeypatch):
    bgl, compiles = bench
    # Without the reset between configurations, one function's recompile limit (here 2) runs out.
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    rows = _run(bgl, tmp_path, [1, 2, 3, 4], ["identity"])
    compiled = {int(r["M"]): r for r in rows if r["impl"] == COMPILED}
    assert len(compiles) == 2
    for M in (1, 2):
        assert compiled[M]["ms"] and not compiled[M]["note"], compiled[M]
    for M in (3, 4):
        assert not compiled[M]["ms"] and "NotCompiled" in compiled[M]["note"], compiled[M]


def test_best_bandwidth_columns(bench, tmp_path):
    bgl, _ = bench
    rows = _run(bgl, tmp_path, [1, 2], ["identity"])
    timed = [r for r in rows if r["impl"] != "floor" and r["GBps"]]
    best = max(float(r["GBps"]) for r in timed)
    for r in timed:
        assert float(r["best_GBps"]) == pytest.approx(best)
        assert float(r["x_best_bw"]) == pytest.approx(best / float(r["GBps"])) and float(r["x_best_bw"]) >= 1
    floor = [r for r in rows if r["impl"] == "floor"]
    assert floor and all(not r["x_best_bw"] for r in floor)  # the probe is not an implementation
    assert float(floor[0]["x_floor"]) == 1.0  # the existing columns keep their meaning


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""``benchmarks/bench_guided_loss.py`` on a CPU, end to end on a small workload: every candidate that can run
here runs, computes the naive loss's gradients, is timed (interleaved rounds) and is compared with its bar."""

import csv
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "bench_guided_loss.py")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the benchmark")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-RSS reset needs Linux /proc")
def test_loss_benchmark_runs_on_cpu_and_fills_every_column_of_its_rows(tmp_path):
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--no-compile", "--N", "128", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".csv"]
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    rows = {(r["case"], r["implementation"]): r for r in csv.DictReader(lines)}
    ours = {case: rows[(case, "ivl fused_guided_cross_entropy [torch]")] for case in ("guided", "value-only")}
    for case, row in ours.items():
        assert row["status"] == "ok", row
        assert float(row["time_ms"]) > 0 and "interleaved" in row["timing"], row
        # The same loss as the naive row, and gradients within float32 rounding of it.
        naive = next(r for (c, name), r in rows.items() if c == case and name.startswith("naive eager"))
        assert abs(float(row["loss"]) - float(naive["loss"])) <= 1e-5 * abs(float(naive["loss"])), (row, naive)
        assert float(row["grad_rel_err"]) < 1e-5, row
        # Both against the float64 error reference, the naive row too.
        assert float(row["loss_rel_err"]) < 1e-5 and float(naive["grad_rel_err"]) < 1e-5, (row, naive)
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        # Value-only's bar where cut-cross-entropy cannot run: torch's own chunked linear cross-entropy.
        assert rows[("value-only", "torch F.linear_cross_entropy")]["x_bar"] == "1.000"
        assert float(ours["value-only"]["x_bar"]) > 0
    # The Triton rows say why they did not run on this CPU instead of vanishing.
    assert "interpreter" in rows[("guided", "ivl fused_guided_cross_entropy [triton]")]["status"]


def _run(tmp_path, *args):
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--no-compile", "--N", "128", "--out", str(tmp_path),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".csv"]
    text = path.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return text, {(r["case"], r["implementation"]): r for r in csv.DictReader(lines)}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the benchmark")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-RSS reset needs Linux /proc")
def test_bf16_errors_are_measured_against_an_exact_reference_not_the_bf16_naive_row(tmp_path):
    """In bf16 the naive row is itself ~1 % off: the error columns compare every row, it included, with a float64
    reference of the same inputs (a bf16 naive reference made ours look as inexact as the naive code)."""
    text, rows = _run(tmp_path, "--dtype", "bfloat16", "--cases", "guided")
    assert "# error_reference: float64" in text
    naive = rows[("guided", "naive eager (materialised logits)")]
    ours = rows[("guided", "ivl fused_guided_cross_entropy [torch]")]
    assert ours["status"] == naive["status"] == "ok", (ours, naive)
    assert float(ours["grad_rel_err"]) < float(naive["grad_rel_err"]), (ours, naive)
    assert float(ours["grad_rel_err"]) < 1e-2 and float(ours["loss_rel_err"]) < 1e-2, ours

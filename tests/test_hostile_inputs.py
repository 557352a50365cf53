"""Hostile inputs to the ops, ``ivl-kernels bench``, ``ivl-kernels demo`` and the shared output helpers (issue 17):
each case gives an error of the documented type naming the argument or path, before any work, with nothing
modified (``out`` poisoned beforehand stays as it was; files hash the same). The transformers-side writers and
loaders are in tests/hf/test_hostile_inputs.py."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import tempfile
import threading

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels import _atomic, _checked_values, cli


def _args(M=3, Vb=11, Vv=7, H=5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(M, H, generator=g), torch.randn(Vv, H, generator=g),
            torch.randn(M, Vb, generator=g))


# ---- alpha -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_alpha_tensor_must_be_finite_in_the_logits_op(bad):
    vh, vw, base = _args()
    alpha = torch.tensor([0.5, bad, 1.0])
    out = torch.full_like(base, 7.0)
    with pytest.raises(ValueError, match="alpha tensor entries must be finite.*row 1"):
        ivl.fused_guided_logits(vh, vw, base_logits=base, alpha=alpha, out=out, backend="torch")
    assert bool((out == 7.0).all())  # nothing written


def test_nan_alpha_on_an_ignored_row_is_refused_by_the_loss():
    """Before: a finite loss and NaN in value_weight.grad (the ignored row's alpha multiplied its gradient)."""
    vh, vw, base = _args()
    vw.requires_grad_()
    target = torch.tensor([1, -100, 2])
    with pytest.raises(ValueError, match="alpha tensor entries must be finite.*row 1"):
        ivl.fused_guided_cross_entropy(vh, vw, target, base_logits=base, alpha=torch.tensor([1.0, float("nan"), 1.0]),
                                       backend="torch")
    assert vw.grad is None


def test_alpha_beyond_float32_is_refused():
    vh, vw, base = _args()
    with pytest.raises(ValueError, match="alpha must be finite in float32"):
        ivl.fused_guided_logits(vh, vw, base_logits=base, alpha=1e39, backend="torch")
    with pytest.raises(ValueError, match="alpha tensor entries must be finite"):
        ivl.fused_guided_logits(vh, vw, base_logits=base, alpha=torch.tensor([1.0, 1e39, 1.0], dtype=torch.float64),
                                backend="torch")


def test_alpha_check_is_cached_per_tensor_version():
    """On a GPU the finiteness read is a sync: done once per tensor and version, again after an in-place edit
    (exercised here on the cache itself, which is device-agnostic)."""
    a = torch.ones(4)
    _checked_values.remember_checked(a, ("alpha",))
    assert _checked_values.already_checked(a, ("alpha",))
    a[1] = float("nan")  # bumps the version: checked again
    assert not _checked_values.already_checked(a, ("alpha",))


def test_empty_value_vocabulary_is_refused():
    vh, _, base = _args()
    with pytest.raises(ValueError, match=r"value_weight must have at least one row"):
        ivl.fused_guided_logits(vh, torch.empty(0, vh.shape[1]), base_logits=base, backend="torch")


def test_value_check_cache_is_thread_safe():
    """Several threads checking and remembering many maps at once (a server calling the op from a thread pool):
    no KeyError from the cache's get / move_to_end / eviction race."""
    maps = [torch.zeros(8, dtype=torch.int32) for _ in range(64)]
    errors = []

    def work(seed):
        try:
            for i in range(2000):
                m = maps[(seed * 7 + i) % len(maps)]
                if not _checked_values.already_checked(m, ("map", 5)):
                    _checked_values.remember_checked(m, ("map", 5))
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the unlocked cache raised KeyError here in every run
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


# ---- the shared output helpers ------------------------------------------------------------------------------------


def test_atomic_file_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_file(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.pt"]


def test_overwrite_replaces_stale_weight_shards(tmp_path):
    """A single-file save over an earlier sharded one: the old shards and index go (a loader would mix them);
    the user's other files stay."""
    out = tmp_path / "v"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "README.md"):
        (out / name).write_text("old")
    with _atomic.atomic_dir(out) as tmp:
        open(os.path.join(tmp, "model.safetensors"), "w").write("new")
    assert sorted(os.listdir(out)) == ["README.md", "model.safetensors"]


def test_atomic_dir_makes_missing_parents_and_removes_them_on_failure(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    _atomic.check_output_dir(target, overwrite=False)  # a new path: fine
    with pytest.raises(KeyboardInterrupt):
        with _atomic.atomic_dir(target) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("{}")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with _atomic.atomic_dir(target) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert os.listdir(target) == ["config.json"]
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        _atomic.check_output_dir(tmp_path, overwrite="yes")


# ---- ivl-kernels bench ----------------------------------------------------------------------------------------------


class _FakeBenchmark:
    """Stands in for a benchmark script: writes ``result.csv`` into its ``--out`` (or fails)."""

    def __init__(self, fail=False):
        self.fail, self.argv = fail, None

    def main(self, argv):
        self.argv = argv
        out = argv[argv.index("--out") + 1]
        with open(os.path.join(out, "result.csv"), "w") as f:
            f.write("impl,ms\nfused,1.0\n")
        if self.fail:
            raise RuntimeError("benchmark crashed")
        return 0


@pytest.fixture()
def fake_bench(monkeypatch):
    bench = _FakeBenchmark()
    monkeypatch.setattr(cli, "_load_benchmark", lambda root, name: bench)
    return bench


def _hash(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bench_writes_to_the_current_directory_by_default(fake_bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    package_results = os.path.join(os.path.dirname(os.path.dirname(ivl.__file__)), "benchmarks", "results")
    before = sorted(os.listdir(package_results)) if os.path.isdir(package_results) else None
    assert cli.main(["bench", "logits", "--device", "cpu"]) == 0
    assert os.listdir(tmp_path) == ["result.csv"]
    assert fake_bench.argv[:2] == ["--device", "cpu"]  # the benchmark's own arguments pass through
    if before is not None:  # the checkout's committed results are not touched
        assert sorted(os.listdir(package_results)) == before


def test_bench_does_not_replace_a_result_without_overwrite(fake_bench, tmp_path, capsys):
    old = tmp_path / "result.csv"
    old.write_text("82 lines of an earlier GPU session\n")
    digest = _hash(old)
    assert cli.main(["bench", "logits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite result.csv" in err and str(tmp_path) in err
    assert _hash(old) == digest
    kept = [n for n in os.listdir(tmp_path) if n.startswith("bench-logits-")]
    assert len(kept) == 1 and os.listdir(tmp_path / kept[0]) == ["result.csv"]  # this run's results, whole
    assert cli.main(["bench", "logits", "--out", str(tmp_path), "--overwrite"]) == 0
    assert old.read_text().startswith("impl,ms")


def test_failed_bench_leaves_no_partial_results(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load_benchmark", lambda root, name: _FakeBenchmark(fail=True))
    with pytest.raises(RuntimeError, match="benchmark crashed"):
        cli.main(["bench", "logits", "--out", str(tmp_path)])
    assert os.listdir(tmp_path) == []


def test_bench_refuses_the_package_directory(fake_bench, capsys):
    package = os.path.dirname(ivl.__file__)
    assert cli.main(["bench", "--out", package]) == 2
    assert "inside the installed package" in capsys.readouterr().err and fake_bench.argv is None


def test_bench_overwrite_over_a_directory_named_like_a_result(fake_bench, tmp_path, capsys):
    """Before: a ValueError traceback from commit_dir and a .bench-logits.tmp-* directory left in --out. Now: exit
    2 naming the clash, the user's directory untouched, this run's results kept whole in bench-logits-TIME."""
    (tmp_path / "result.csv").mkdir()
    (tmp_path / "result.csv" / "keep").write_text("new")
    assert cli.main(["bench", "logits", "--out", str(tmp_path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "cannot replace the directory" in err and "result.csv" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "result.csv") == ["keep"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    kept = [n for n in os.listdir(tmp_path) if n.startswith("bench-logits-")]
    assert len(kept) == 1 and os.listdir(tmp_path / kept[0]) == ["result.csv"] and kept[0] in err


def test_bench_unwritable_out_is_a_clear_error(fake_bench, tmp_path, monkeypatch, capsys):
    """Before: os.makedirs / mkdtemp raised an OSError traceback (a read-only --out). Now: exit 2, nothing run."""
    real_makedirs = os.makedirs

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # --out exists, nothing can be made in it
    assert cli.main(["bench", "logits", "--out", str(tmp_path)]) == 2
    assert "cannot write there (Read-only file system)" in capsys.readouterr().err
    monkeypatch.setattr(os, "makedirs", read_only)  # --out cannot be created
    assert cli.main(["bench", "logits", "--out", str(tmp_path / "sub")]) == 2
    assert "--out" in capsys.readouterr().err and fake_bench.argv is None
    monkeypatch.setattr(os, "makedirs", real_makedirs)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_cuda_without_a_gpu_is_a_clear_error(fake_bench, tmp_path, capsys):
    assert cli.main(["bench", "loss", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda: no CUDA GPU" in capsys.readouterr().err
    assert fake_bench.argv is None and os.listdir(tmp_path) == []


def test_benchmark_script_run_directly_keeps_existing_results(tmp_path):
    """A script run by hand writes into its --out (default: the committed benchmarks/results/): a result of the
    same name there is kept, byte for byte, unless --overwrite; this run's files get a time-stamped name."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "bench_guided_logits.py")
    old = tmp_path / "guided_logits_small_cpu.csv"
    old.write_text("# a committed result\n")
    cmd = [sys.executable, script, "--device", "cpu", "--no-compile", "--quick", "--M", "1", "--base", "logits",
           "--map", "identity", "--out", str(tmp_path)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert old.read_text() == "# a committed result\n"
    new = [p for p in tmp_path.iterdir() if p.name.startswith("guided_logits_small_cpu-") and p.suffix == ".csv"]
    assert len(new) == 1 and "exists: kept" in proc.stdout and "impl" in new[0].read_text()
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "impl" in old.read_text()



# ---- ivl-kernels demo -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [(["--length", "0"], "--length"), (["--length", "40"], "--length"),
                                        (["--steps", "-1"], "--steps"), (["--steps", "0"], "--steps")])
def test_demo_arguments_are_checked_before_any_work(args, flag, capsys):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *args])
    assert e.value.code == 2 and flag in capsys.readouterr().err

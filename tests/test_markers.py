"""The ``gpu`` marker (tests/conftest.py): ``-m gpu`` selects exactly the tests that need a CUDA GPU."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(*args) -> set:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode in (0, 5), r.stdout[-3000:] + r.stderr[-3000:]
    return {line.strip() for line in r.stdout.splitlines() if "::" in line}


def test_gpu_marker_selects_the_cuda_tests_and_only_them():
    files = ["tests/ops/test_determinism.py", "tests/ops/test_guided_logits.py"]
    gpu, cpu, every = _collect(*files, "-m", "gpu"), _collect(*files, "-m", "not gpu"), _collect(*files)
    assert gpu and cpu and gpu | cpu == every and not gpu & cpu
    # A skip condition naming a GPU, a test parametrized onto a CUDA device: gpu.
    assert "tests/ops/test_determinism.py::test_auto_on_gpu_picks_triton" in gpu
    assert any(t.endswith("-cuda]") for t in gpu) and not any(t.endswith("-cuda]") for t in cpu)
    # "Triton on a GPU or under the interpreter" runs on CPU: not gpu.
    assert "tests/ops/test_determinism.py::test_deterministic_mode_gives_bitwise_equal_runs[triton]" in cpu
    assert not any(t.endswith("-cpu]") for t in gpu)

"""`ivl-kernels demo --quick` runs end to end and reports the accuracies."""

import re

import pytest

pytest.importorskip("transformers")


def test_demo_quick_runs_and_prints_accuracies(capsys):
    from ivl_kernels.hf.demo import HONEST, main

    assert main(["--quick", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    acc = dict(re.findall(r"^\s+(base [AB][^\n]*?)\s+([\d.]+) %$", out, flags=re.M))
    assert set(acc) == {"base A alone", "base A + value (guided)", "base B alone", "base B + same value (transfer)"}
    assert "loss curve:" in out and HONEST in out
    # The value network was trained: guided beats the base it was trained on.
    assert float(acc["base A + value (guided)"]) > float(acc["base A alone"]) + 20

"""The OpenAI-compatible server serves a guided checkpoint: started on 127.0.0.1 as a subprocess, queried with the
``openai`` client, bounded by a timeout and stopped by its PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")
openai = pytest.importorskip("openai")

from _vllm_util import prompts, reference  # noqa: E402

START_TIMEOUT = 240
NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    import urllib.request

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoints["one"],
           "--served-model-name", "guided", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--enforce-eager", "--seed", "0", "--enable-prefix-caching",
           "--max-num-batched-tokens", "32", "--max-num-seqs", "8", "--block-size", "32"]
    with open(log, "wb") as out:
        # Its own process group (id = its PID): stopping it stops the engine processes it started.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start within {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0), proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_completions_match_guided_causal_lm(server, checkpoints):
    client, _ = server
    rows = prompts([5, 12, 33], seed=31)
    want, logits = reference(checkpoints["one"], rows, NEW)
    got = []
    for r in rows:
        resp = client.completions.create(model="guided", prompt=r, max_tokens=NEW, temperature=0, logprobs=2,
                                         extra_body={"return_token_ids": True})
        choice = resp.choices[0]
        got.append(list(choice.token_ids))
    assert got == want


def test_a_bad_request_is_refused_and_the_server_keeps_serving(server, checkpoints):
    client, proc = server
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="guided", prompt=[5, 10_000, 7], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="guided", prompt=[5] * 300, max_tokens=2)
    rows = prompts([7], seed=32)
    want, _ = reference(checkpoints["one"], rows, NEW)
    resp = client.completions.create(model="guided", prompt=rows[0], max_tokens=NEW, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert list(resp.choices[0].token_ids) == want[0]
    assert proc.poll() is None


def test_per_request_alpha_through_vllm_xargs(server, models, tmp_path):
    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    client, proc = server
    rows = prompts([9], seed=33)
    for alpha in (1.5, [0.0]):  # a number (one term), and a list that turns the term off
        path = str(tmp_path / f"alpha_{alpha}")
        a = alpha if isinstance(alpha, float) else alpha[0]
        write_guided_checkpoint(path, models["base"], [{"model": models["value"], "alpha": a}])
        want, _ = reference(path, rows, NEW)
        resp = client.completions.create(model="guided", prompt=rows[0], max_tokens=NEW, temperature=0,
                                         extra_body={"return_token_ids": True, "vllm_xargs": {"ivl_alpha": alpha}})
        assert list(resp.choices[0].token_ids) == want[0], alpha
    # Bad values: HTTP 400 naming the argument, for that request only.
    for bad in ("0.5", [1.0, 2.0]):
        with pytest.raises(openai.BadRequestError, match="ivl_alpha"):
            client.completions.create(model="guided", prompt=rows[0], max_tokens=2,
                                      extra_body={"vllm_xargs": {"ivl_alpha": bad}})
    assert proc.poll() is None

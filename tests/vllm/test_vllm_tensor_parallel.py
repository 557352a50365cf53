"""Tensor parallelism (two CPU workers): every model is vLLM's tensor-parallel build, the base head stays
vocabulary-sharded, each rank computes the guided logits of its base ids (maps sliced per rank, the terms' heads
gathered once at load) and one gather joins them. Same greedy tokens and logprobs as GuidedCausalLM."""

from __future__ import annotations

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

import torch  # noqa: E402

from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 8


@pytest.mark.slow
def test_tp2_matches_guided_causal_lm(checkpoints, models, monkeypatch, tmp_path):
    from vllm import LLM, SamplingParams

    from _vllm_models import write_proxy

    # vLLM's CPU build binds one OpenMP thread set per worker and finds one NUMA node here: bind them by hand.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function (test only)
    rows = prompts([3, 17, 41], seed=41) + prompts([2, 30], seed=42, prefix=prompts([40], seed=11)[0])
    want, logits = reference(checkpoints["proxy"], rows, NEW)
    # Per-request alpha under TP (the processor corrects the gathered logits with the full heads and maps): one
    # extra request, tokens checked against a checkpoint composed with its alphas.
    alpha = [0.0, -1.0, 0.5, 0.0, 0.8]
    extra = prompts([11], seed=43)
    want_alpha, _ = reference(write_proxy(str(tmp_path / "alpha"), models, alpha), extra, NEW)
    assert want_alpha != reference(checkpoints["proxy"], extra, NEW)[0]  # the alphas really change the tokens
    llm = LLM(model=checkpoints["proxy"], enforce_eager=True, tensor_parallel_size=2,
              distributed_executor_backend="mp", **ENGINE)
    try:
        # Each rank owns half of the (padded, 320-row) base vocabulary: the guided logits are computed per shard.
        from ivl_kernels.vllm.model import worker_info

        spans = sorted((w["lo"], w["hi"]) for w in llm.collective_rpc(worker_info))
        assert spans == [(0, 160), (160, 300)]
        params = [SamplingParams(max_tokens=NEW, temperature=0, logprobs=3)] * len(rows) + [
            SamplingParams(max_tokens=NEW, temperature=0, extra_args={"ivl_alpha": alpha})]
        outs = llm.generate([{"prompt_token_ids": r} for r in rows + extra], params, use_tqdm=False)
    finally:
        shutdown(llm)
    assert list(outs[-1].outputs[0].token_ids) == want_alpha[0]
    outs = outs[:-1]
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    worst = 0.0
    for r, o in enumerate(outs):
        ref = torch.log_softmax(logits[r].double(), dim=-1)
        for t, step in enumerate(o.outputs[0].logprobs):
            worst = max(worst, max(abs(lp.logprob - float(ref[t, tok])) for tok, lp in step.items()))
    assert worst < 1e-4, worst

"""vLLM's default (compiled: torch.compile of every sub-model's backbone) mode decodes as GuidedCausalLM too."""

from __future__ import annotations

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 8


@pytest.mark.slow
def test_compiled_mode_greedy_tokens_identical(checkpoints, models, tmp_path):
    from vllm import LLM, SamplingParams

    from _vllm_models import write_proxy

    rows = prompts([4, 13, 29, 50], seed=21)
    want, _ = reference(checkpoints["proxy"], rows, NEW)
    # One request with its own alphas in the batch (the processor reads compute_logits' rows in this mode too).
    alpha = [0.5, 0.0, 0.0, 1.0, 0.0]
    own = reference(write_proxy(str(tmp_path / "alpha"), models, alpha), rows[1:2], NEW)[0][0]
    assert own != want[1]  # the request's alphas really change its tokens
    want[1] = own
    llm = LLM(model=checkpoints["proxy"], enforce_eager=False, **ENGINE)
    try:
        assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # really compiled
        params = [SamplingParams(max_tokens=NEW, temperature=0, extra_args={"ivl_alpha": alpha} if i == 1 else None)
                  for i in range(len(rows))]
        outs = llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want
    finally:
        shutdown(llm)

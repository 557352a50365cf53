"""vLLM's default (compiled: torch.compile of every sub-model's backbone) mode decodes as GuidedCausalLM too."""

from __future__ import annotations

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 8


@pytest.mark.slow
def test_compiled_mode_greedy_tokens_identical(checkpoints):
    from vllm import LLM, SamplingParams

    rows = prompts([4, 13, 29, 50], seed=21)
    want, _ = reference(checkpoints["proxy"], rows, NEW)
    llm = LLM(model=checkpoints["proxy"], enforce_eager=False, **ENGINE)
    try:
        assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # really compiled
        outs = llm.generate([{"prompt_token_ids": r} for r in rows], SamplingParams(max_tokens=NEW, temperature=0),
                            use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want
    finally:
        shutdown(llm)

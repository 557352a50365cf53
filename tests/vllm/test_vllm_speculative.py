"""Draft-model speculative decoding with a guided target (vLLM's V1 runner on CPU): the drafter is a plain model
(here the base alone), the target verifies with its guided logits (``compute_logits``), so greedy outputs equal
the non-speculative guided ones."""

from __future__ import annotations

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 12


def _metric(llm, name):
    for m in llm.get_metrics():
        if m.name == name:
            return getattr(m, "value", None)
    raise AssertionError(f"no metric {name}")


def test_draft_model_greedy_equals_guided(checkpoints, models):
    from vllm import LLM, SamplingParams

    rows = prompts([4, 13, 29, 50], seed=61)
    want, _ = reference(checkpoints["proxy"], rows, NEW)
    llm = LLM(model=checkpoints["proxy"], enforce_eager=True, disable_log_stats=False,
              speculative_config={"method": "draft_model", "model": models["base"], "num_speculative_tokens": 3},
              **ENGINE)
    try:
        # vLLM's V1 runner refuses custom logits processors under speculative decoding: no per-request alpha here.
        assert not llm.llm_engine.vllm_config.model_config.logits_processors
        outs = llm.generate([{"prompt_token_ids": r} for r in rows], SamplingParams(max_tokens=NEW, temperature=0),
                            use_tqdm=False)
        drafted = _metric(llm, "vllm:spec_decode_num_draft_tokens")
        accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
    finally:
        shutdown(llm)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    assert drafted > 0 and 0 < accepted <= drafted  # speculation really ran, and some drafts were kept

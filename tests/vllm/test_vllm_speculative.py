"""Draft-model speculative decoding with a guided target (vLLM's V1 runner on CPU): the drafter is a plain model
(here the base alone), the target verifies with its guided logits (``compute_logits``), so greedy outputs equal
the non-speculative guided ones. Per-request alpha is not available there (vLLM's V1 runner runs no custom logits
processor under speculative decoding): a request that sets ``ivl_alpha`` is refused, never served with the
checkpoint's alphas."""

from __future__ import annotations

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

from _vllm_models import PROXY_ALPHAS  # noqa: E402
from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 12
ROWS = prompts([4, 13, 29, 50], seed=61)


def _metric(llm, name):
    for m in llm.get_metrics():
        if m.name == name:
            return getattr(m, "value", None)
    raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def spec_llm(checkpoints, models):
    from vllm import LLM

    llm = LLM(model=checkpoints["proxy"], enforce_eager=True, disable_log_stats=False,
              speculative_config={"method": "draft_model", "model": models["base"], "num_speculative_tokens": 3},
              **ENGINE)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def want(checkpoints):
    return reference(checkpoints["proxy"], ROWS, NEW)[0]


def _params(extra_args=None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW, temperature=0, extra_args=extra_args)


def test_draft_model_greedy_equals_guided(spec_llm, want):
    # vLLM's V1 runner refuses custom logits processors under speculative decoding: no per-request alpha here.
    assert not spec_llm.llm_engine.vllm_config.model_config.logits_processors
    outs = spec_llm.generate([{"prompt_token_ids": r} for r in ROWS], _params(), use_tqdm=False)
    drafted = _metric(spec_llm, "vllm:spec_decode_num_draft_tokens")
    accepted = _metric(spec_llm, "vllm:spec_decode_num_accepted_tokens")
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    assert drafted > 0 and 0 < accepted <= drafted  # speculation really ran, and some drafts were kept


@pytest.mark.parametrize("alpha", [
    [0.0] * 5,            # unguided: was served with the checkpoint's alphas, silently
    [-1.0] * 5,
    list(PROXY_ALPHAS),   # even the checkpoint's own alphas: ivl_alpha is not available at all here
    "abc",                # malformed values were not even validated
    [1e39, 0.0, 0.0, 0.0, 0.0],
    0.5,
])
def test_ivl_alpha_is_refused_for_that_request_only(spec_llm, want, alpha):
    # Refused in the front-end (a ValueError, also vLLM's VLLMValidationError: 400 in the server) before the engine
    # sees it, also within a batch of good requests; requests without ivl_alpha are served as before.
    with pytest.raises(ValueError, match=r'extra_args\["ivl_alpha"\].*per-request alpha is not available with '
                                         r"speculative decoding.*without speculative_config.*ivl-kernels compose"):
        spec_llm.generate([{"prompt_token_ids": ROWS[0]}, {"prompt_token_ids": ROWS[1]}],
                          [_params(), _params({"ivl_alpha": alpha})], use_tqdm=False)
    outs = spec_llm.generate([{"prompt_token_ids": ROWS[1]}, {"prompt_token_ids": ROWS[2]}],
                             [_params(), _params({"ivl_alpha": None, "other": 1})], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want[1:3]

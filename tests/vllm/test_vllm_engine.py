"""vLLM serving a guided checkpoint (eager) decodes exactly as GuidedCausalLM: greedy tokens on a batch of prompts of
different lengths, with chunked prefill and prefix caching on; returned logprobs are the guided distribution's;
vLLM's sampling parameters act on the guided logits; a bad request never kills the engine."""

from __future__ import annotations

import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

import torch  # noqa: E402

from _vllm_util import ENGINE, prompts, reference, shutdown  # noqa: E402

NEW = 8
# Prompts of several lengths (3 to 75 tokens) that share a 40-token prefix: with a 32-token budget per step the long
# ones are prefilled in chunks, and the second generate() finds their prefix blocks cached.
PREFIX = prompts([40], seed=11)[0]
ROWS = prompts([3, 9, 17], seed=5) + prompts([1, 20, 35], seed=6, prefix=PREFIX)


@pytest.fixture(scope="module")
def proxy_llm(checkpoints):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function (test only)
        mp.setenv("IVL_KERNELS_VLLM_PACK_HEADS", "1")  # packed on CPU too ("auto" packs on CUDA devices only)
        llm = LLM(model=checkpoints["proxy"], enforce_eager=True, **ENGINE)
        yield llm
        shutdown(llm)


def test_base_and_first_term_heads_are_packed(proxy_llm):
    """The first term has no map and the base's dtype: with IVL_KERNELS_VLLM_PACK_HEADS=1 (the default packs on
    CUDA devices) its head and the base's are views of one buffer (one GEMM from GEMM_MIN_ROWS rows on a GPU),
    the term's tied input embedding reading the same rows; every other test of this module runs on these packed
    heads (the same tokens and logprobs as GuidedCausalLM)."""
    def probe(worker):
        from ivl_kernels.ops.packed_heads import packed_view

        model = worker.model_runner.model
        base, term = model.base, model.term_a
        bw, vw = base.lm_head.weight, term.lm_head.weight
        return {"packed": model.packed_heads, "view": packed_view(bw, vw, min(bw.shape[0], vw.shape[0])) is not None,
                "term_tied": term.model.embed_tokens.weight is vw,
                "base_embedding_apart": base.model.embed_tokens.weight is not bw}

    assert proxy_llm.collective_rpc(probe) == [{"packed": True, "view": True, "term_tied": True,
                                                "base_embedding_apart": True}]


@pytest.fixture(scope="module")
def proxy_reference(checkpoints):
    return reference(checkpoints["proxy"], ROWS, NEW)


def _generate(llm, rows, **kw):
    from vllm import SamplingParams

    params = SamplingParams(**{"max_tokens": NEW, "temperature": 0.0, **kw})
    return llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)


def test_greedy_tokens_identical_to_guided_causal_lm(proxy_llm, proxy_reference):
    want, _ = proxy_reference
    first = _generate(proxy_llm, ROWS)
    assert [list(o.outputs[0].token_ids) for o in first] == want
    # Again: the shared prefix is now cached (prefix caching), the tokens must not change.
    second = _generate(proxy_llm, ROWS)
    assert [list(o.outputs[0].token_ids) for o in second] == want
    assert max(o.num_cached_tokens or 0 for o in second) >= 32
    # Ids >= suppress_ids_from (290) are never generated.
    assert max(max(t) for t in want) < 290


def test_logprobs_are_the_guided_distribution(proxy_llm, proxy_reference):
    want, logits = proxy_reference
    outs = _generate(proxy_llm, ROWS, logprobs=5)
    worst = 0.0
    for r, o in enumerate(outs):
        ref = torch.log_softmax(logits[r].double(), dim=-1)  # [NEW, V]
        for t, step in enumerate(o.outputs[0].logprobs):
            assert want[r][t] in step
            for tok, lp in step.items():
                worst = max(worst, abs(lp.logprob - float(ref[t, tok])))
            top = set(torch.topk(ref[t], 5).indices.tolist())
            assert top <= set(step), (r, t)
    assert worst < 1e-4, worst


def test_sampling_parameters_act_on_guided_logits(proxy_llm, proxy_reference):
    want, logits = proxy_reference
    # top_k=1 sampling at any temperature is the guided argmax.
    outs = _generate(proxy_llm, ROWS[:3], temperature=1.5, top_k=1, seed=3)
    assert [list(o.outputs[0].token_ids) for o in outs] == want[:3]
    # A banned token: vLLM's own logit processing applies on top of the guided logits.
    first = want[0][0]
    allowed = [t for t in range(290) if t != first]
    outs = _generate(proxy_llm, ROWS[:1], max_tokens=1, logprobs=1, allowed_token_ids=allowed)
    second_best = int(torch.topk(logits[0, 0], 2).indices[1])
    assert list(outs[0].outputs[0].token_ids) == [second_best]


def test_bad_requests_do_not_kill_the_engine(proxy_llm, proxy_reference):
    from vllm import SamplingParams

    want, _ = proxy_reference
    with pytest.raises(Exception, match="(?i)out of vocabulary|token id|vocab"):
        proxy_llm.generate([{"prompt_token_ids": [5, 10_000, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(Exception, match="(?i)longer than|max_model_len|maximum"):
        proxy_llm.generate([{"prompt_token_ids": [5] * 300}], SamplingParams(max_tokens=2), use_tqdm=False)
    # Prompts ending in base ids the 256-id value model has no row for (>= 256) are translated, not fed raw.
    high = [[299, 298, 290, 280, 270, 260, 257, 256]]
    ref_tokens, _ = reference(proxy_llm.llm_engine.model_config.model, high, NEW)
    assert [list(o.outputs[0].token_ids) for o in _generate(proxy_llm, high)] == ref_tokens
    assert [list(o.outputs[0].token_ids) for o in _generate(proxy_llm, ROWS)] == want


def test_per_request_alpha_raw_logprobs_are_the_checkpoints(proxy_llm, models, checkpoints, tmp_path):
    """vLLM's default logprobs_mode ("raw_logprobs") takes logprobs before logits processors: a request with its own
    alphas samples from them, but its returned logprobs are the checkpoint's distribution (documented)."""
    from ivl_kernels.hf import GuidedCausalLM

    from _vllm_models import write_proxy

    alpha = [0.0, 1.0, 0.0, 0.0, 1.5]
    row = ROWS[1]
    want, _ = reference(write_proxy(str(tmp_path / "alpha"), models, alpha), [row], NEW)
    out = _generate(proxy_llm, [row], logprobs=2, extra_args={"ivl_alpha": alpha})[0].outputs[0]
    assert list(out.token_ids) == want[0]
    lm = GuidedCausalLM.from_pretrained(checkpoints["proxy"], backend="torch")
    with torch.no_grad():
        seq = torch.tensor([row + want[0]])
        ref = torch.log_softmax(lm(seq).logits[0, len(row) - 1:-1].double(), dim=-1)  # [NEW, V]
    worst = max(abs(lp.logprob - float(ref[t, tok])) for t, step in enumerate(out.logprobs) for tok, lp in step.items())
    assert worst < 1e-4, worst

"""The issue-10 generate() features on a GPU (fused Triton / CUDA backends): per-term prompts, suppressed ids,
output_term_logits and stop criteria give the same results as the torch backend, and the analysis output adds
up to the guided logits. float32 models: greedy choices are far from ties (see tests/hf/test_generation.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import left_pad, make_base, make_value, random_map, random_prompts  # noqa: E402

NEW = 8
LIMIT = 290  # ids >= LIMIT suppressed (the base head has 300 rows)


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _run(dev="cuda", backends=("torch", "triton", "auto")):
    base = make_base().to(dev)
    expert, anti = make_value(seed=2).to(dev), make_value(vocab=300, hidden=40, seed=4, tie=False).to(dev)
    vmap = random_map().to(dev)
    ids, mask = (t.to(dev) for t in left_pad(random_prompts([4, 7, 2], seed=47)))
    chat, cmask = (t.to(dev) for t in left_pad(random_prompts([6, 3, 9], vocab=256, seed=3)))
    T = ids.shape[1]
    results = {}
    for backend in backends:
        lm = GuidedCausalLM(base, [GuidanceTerm(expert, 1.3, vmap), GuidanceTerm(anti, -0.7)], backend=backend,
                            suppress_ids_from=LIMIT)
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True,
                          output_scores=True, output_logits=True, output_term_logits=True,
                          term_inputs=[{"input_ids": chat, "attention_mask": cmask}, None])
        assert bool((out.sequences[:, T:] < LIMIT).all())
        for t in range(NEW):
            assert bool(torch.isneginf(out.logits[t][:, LIMIT:]).all())
            b, e, a = out.term_logits[t]
            total = (b + 1.3 * e - 0.7 * a)[:, :LIMIT]
            torch.testing.assert_close(total, out.logits[t][:, :LIMIT], rtol=0, atol=1e-3)
        results[backend] = out
    ref = results[backends[0]]
    for backend in backends[1:]:
        assert torch.equal(results[backend].sequences, ref.sequences), backend
        for x, y in zip(results[backend].logits, ref.logits):
            torch.testing.assert_close(x[:, :LIMIT], y[:, :LIMIT], rtol=0, atol=1e-3)
    # The processor path with the expert's own prompt and the same suppression: same tokens.
    procs = [IVLLogitsProcessor(expert, alpha=1.3, vocab_map=vmap, attention_mask=mask, value_input_ids=chat,
                                value_attention_mask=cmask),
             IVLLogitsProcessor(anti, alpha=-0.7, attention_mask=mask, suppress_ids_from=LIMIT)]
    hf = base.generate(ids, attention_mask=mask, logits_processor=procs, max_new_tokens=NEW, do_sample=False,
                       pad_token_id=0)
    assert torch.equal(hf, ref.sequences)
    # Stopping criteria: stops where the free run emitted the token, the same on every backend.
    stop = int(ref.sequences[0, T + 3])
    for backend in backends:
        lm = GuidedCausalLM(base, [GuidanceTerm(expert, 1.3, vmap), GuidanceTerm(anti, -0.7)], backend=backend,
                            suppress_ids_from=LIMIT)
        out = lm.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=NEW,
                          term_inputs=[{"input_ids": chat[:1], "attention_mask": cmask[:1]}, None],
                          stopping_criteria=StoppingCriteriaList([StopAfterToken(stop)]))
        first = ref.sequences[0, T:].tolist().index(stop)
        assert out[0, T:].tolist() == ref.sequences[0, T:T + first + 1].tolist(), backend


def test_issue10_features_on_gpu_match_the_torch_backend():
    _run()

"""GenARM: sampling from softmax((log p_base + a * log p_arm) / ((1 + a) * T)).

GuidedCausalLM adds raw logits, base + a * arm; log-softmax subtracts a per-row constant from each, so
softmax((base + a * arm) / tau) == softmax((log_softmax(base) + a * log_softmax(arm)) / tau) for any tau: GenARM
is GuidedCausalLM(base, arm, alpha=a) sampled at temperature (1 + a) * T (GenARM's own temperature T; T = 1 / (1 + a)
samples its decoding distribution at temperature 1). Checked per step against that log-softmax expression.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import left_pad, make_base, random_prompts  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def models():
    base = make_base(seed=41)
    arm = make_base(hidden=32, layers=1, seed=42)  # a smaller LM with the same tokenizer: the reward model
    return base, arm


@torch.no_grad()
def _genarm_distribution(base, arm, seq, a, T):
    """GenARM's per-step distribution in fp64, from the log-softmaxes."""
    lp_base = F.log_softmax(base(seq[None]).logits[0, -1].double(), -1)
    lp_arm = F.log_softmax(arm(seq[None]).logits[0, -1].double(), -1)
    return torch.softmax((lp_base + a * lp_arm) / ((1 + a) * T), -1)


@pytest.mark.parametrize("a,T", [(1.0, 0.5), (0.5, 1.0), (2.0, 0.8)])
def test_guided_lm_samples_genarm_distribution(models, a, T):
    base, arm = models
    prompts = random_prompts([5, 8, 3], seed=43)
    ids, mask = left_pad(prompts)
    L = ids.shape[1]
    lm = GuidedCausalLM(base, arm, alpha=a)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=(1 + a) * T,
                      top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(5),
                      return_dict_in_generate=True, output_scores=True)
    worst = worst_log = 0.0
    for r, p in enumerate(prompts):
        seq = torch.cat([p, out.sequences[r, L:]])
        for t in range(NEW):
            expected = _genarm_distribution(base, arm, seq[:p.shape[0] + t], a, T)
            got = torch.softmax(out.scores[t][r].double(), -1)
            worst = max(worst, float((got - expected).abs().max()))
            # Log space too: every token's probability to a relative 1e-5, not only the large ones.
            log_err = (F.log_softmax(out.scores[t][r].double(), -1) - expected.log()).abs().max()
            worst_log = max(worst_log, float(log_err))
    assert worst < 1e-6, worst
    assert worst_log < 1e-5, worst_log
    # Not vacuous: the ARM moves the distribution away from the base's at the same temperature.
    p0 = prompts[0]
    with torch.no_grad():
        plain = torch.softmax(base(p0[None]).logits[0, -1].double() / ((1 + a) * T), -1)
    assert float((plain - _genarm_distribution(base, arm, p0, a, T)).abs().max()) > 1e-3


def test_processor_path_and_greedy(models):
    base, arm = models
    a, T = 1.5, 0.7
    prompts = random_prompts([4, 6], seed=47)
    ids, mask = left_pad(prompts)
    L = ids.shape[1]
    proc = IVLLogitsProcessor(arm, alpha=a, attention_mask=mask)
    out = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW, do_sample=True,
                        temperature=(1 + a) * T, top_k=0, top_p=1.0, pad_token_id=0, return_dict_in_generate=True,
                        output_scores=True)
    for r, p in enumerate(prompts):
        seq = torch.cat([p, out.sequences[r, L:]])
        for t in range(NEW):
            expected = _genarm_distribution(base, arm, seq[:p.shape[0] + t], a, T)
            got = torch.softmax(out.scores[t][r].double(), -1)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Greedy: the argmax of GenARM's distribution (temperature does not move it).
    greedy = GuidedCausalLM(base, arm, alpha=a).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    for r, p in enumerate(prompts):
        seq = p.clone()
        for _ in range(NEW):
            seq = torch.cat([seq, _genarm_distribution(base, arm, seq, a, T).argmax().view(1)])
        assert greedy[r, L:].tolist() == seq[p.shape[0]:].tolist()

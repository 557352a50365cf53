"""LM heads padded past the tokenizer (Qwen2.5: 152064 rows, 151665 tokens): with the tokenizer known (or
``suppress_ids_from=``), ids the tokenizer cannot produce are never generated, as GenARM drops those logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenizers")

from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import CORPUS, left_pad, make_base, make_value, reference_next_logits, train_bpe_tokenizer  # noqa: E402

NEW = 8
ALPHA = 0.8
PAD_ROWS = 37


@pytest.fixture(scope="module")
def setup():
    tok = train_bpe_tokenizer(280, CORPUS)
    n = len(tok)
    base = make_base(vocab=n + PAD_ROWS, seed=31)
    with torch.no_grad():
        # Padded rows: scaled copies of real rows, so that an unsuppressed decoder picks them.
        g = torch.Generator().manual_seed(0)
        src = torch.randint(2, n, (PAD_ROWS,), generator=g)
        base.lm_head.weight[n:] = 3.0 * base.lm_head.weight[src]
    value = make_value(vocab=n, seed=32)
    texts = ["the quick brown", "small models can guide", "a"]
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    ids, mask = left_pad(prompts, pad_id=tok.pad_token_id)
    return tok, n, base, value, prompts, ids, mask


def _reference_sliced(base, value, prompt, n):
    """GenARM's way: logits sliced to the tokenizer's length, greedy."""
    ids = prompt.clone()
    for _ in range(NEW):
        z = reference_next_logits(base, [(value, ALPHA, None)], ids)[:n]
        ids = torch.cat([ids, z.argmax().view(1)])
    return ids[prompt.shape[0]:]


def test_guided_lm_never_generates_ids_past_the_tokenizer(setup):
    tok, n, base, value, prompts, ids, mask = setup
    T = ids.shape[1]
    free = GuidedCausalLM(base, value, alpha=ALPHA).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert bool((free[:, T:] >= n).any()), "the padded rows must win somewhere, or this test proves nothing"
    expected = [_reference_sliced(base, value, p, n).tolist() for p in prompts]
    for lm, kw in [(GuidedCausalLM(base, value, alpha=ALPHA, tokenizer=tok), {}),
                   (GuidedCausalLM(base, value, alpha=ALPHA), {"tokenizer": tok}),
                   (GuidedCausalLM(base, value, alpha=ALPHA, suppress_ids_from=n), {}),
                   (GuidedCausalLM(base, value, alpha=ALPHA), {"suppress_ids_from": n})]:
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)
        assert out[:, T:].tolist() == expected


def test_sampling_distribution_is_the_sliced_softmax(setup):
    tok, n, base, value, prompts, ids, mask = setup
    T = ids.shape[1]
    lm = GuidedCausalLM(base, value, alpha=ALPHA, tokenizer=tok)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0, temperature=0.9,
                      generator=torch.Generator().manual_seed(1), return_dict_in_generate=True,
                      output_scores=True, output_logits=True, output_term_logits=True)
    for r, p in enumerate(prompts):
        seq = torch.cat([p, out.sequences[r, T:]])
        for t in range(4):
            z = reference_next_logits(base, [(value, ALPHA, None)], seq[:p.shape[0] + t])
            expected = torch.zeros_like(z)
            expected[:n] = torch.softmax(z[:n] / 0.9, -1)
            got = torch.softmax(out.scores[t][r].double(), -1)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            assert torch.all(torch.isneginf(out.logits[t][r, n:]))
            # Each term's own logits are left as the models give them.
            assert torch.all(torch.isfinite(out.term_logits[t][0][r]))


def test_processor_suppresses_with_the_base_tokenizer_or_explicitly(setup):
    tok, n, base, value, prompts, ids, mask = setup
    T = ids.shape[1]
    expected = [_reference_sliced(base, value, p, n).tolist() for p in prompts]

    def run(proc):
        return base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW,
                             do_sample=False, pad_token_id=tok.pad_token_id)[:, T:].tolist()

    assert any(t >= n for row in run(IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask)) for t in row)
    # Same tokenizer on both sides: no re-tokenising, only the suppression.
    assert run(IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask, base_tokenizer=tok,
                                  value_tokenizer=tok)) == expected
    assert run(IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask, suppress_ids_from=n)) == expected


def test_suppress_ids_from_checks(setup):
    tok, n, base, value, prompts, ids, mask = setup
    with pytest.raises(ValueError, match=">= 1"):
        GuidedCausalLM(base, value, suppress_ids_from=0)
    with pytest.raises(TypeError, match="int"):
        GuidedCausalLM(base, value, suppress_ids_from="100")
    with pytest.raises(TypeError, match="int"):
        IVLLogitsProcessor(value, suppress_ids_from=1.5)
    # A limit at or past the head's size suppresses nothing.
    lm = GuidedCausalLM(base, value, alpha=ALPHA)
    a = lm.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(a, lm.generate(ids, attention_mask=mask, max_new_tokens=3, suppress_ids_from=n + PAD_ROWS))

"""What evaluation harnesses pass to ``generate``: stopping criteria, stop strings, ``max_length``, and
``return_dict_in_generate`` with the per-step scores, guided logits and each term's own logits; checked against
no-cache reference loops and against transformers' own ``generate`` with ``IVLLogitsProcessor``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import StoppingCriteria, StoppingCriteriaList, TopKLogitsWarper  # noqa: E402

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM, IVLLogitsProcessor  # noqa: E402
from ivl_kernels.hf.guided import GuidedGenerateOutput  # noqa: E402

from ._models import (BASE_VOCAB, CORPUS, left_pad, make_base, make_value, random_map, random_prompts,  # noqa: E402
                      reference_next_logits, remap, train_bpe_tokenizer, value_input_ids)

NEW = 8
ALPHA = 1.5


@pytest.fixture(scope="module")
def models():
    return make_base(), make_value(), random_map()


def _ref_continue(base, terms, prompt, n):
    """Greedy reference continuation of one unpadded prompt, recomputing everything each step."""
    ids = prompt.clone()
    for _ in range(n):
        ids = torch.cat([ids, reference_next_logits(base, terms, ids).argmax().view(1)])
    return ids[prompt.shape[0]:]


class StopAfterToken(StoppingCriteria):
    """Row r is done once its newest token is ``tokens[r]`` (a per-row tensor answer, transformers' API)."""

    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.tokens.to(input_ids.device)


class AllRowsHaveLength:
    """A plain callable answering one Python bool for the whole batch (lm-evaluation-harness' style)."""

    def __init__(self, length):
        self.length = length
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids.shape[1] >= self.length


def _reference_with_stops(free, stop_steps, T, pad=None):
    """What transformers' loop returns for rows that would emit ``free[r]`` and stop after step
    ``stop_steps[r]`` (0-based): the loop runs until the last row stops; stopped rows are padded with ``pad``
    when an EOS is set, else they run on."""
    n = max(stop_steps) + 1
    rows = []
    for r, s in enumerate(stop_steps):
        row = free[r][:n].tolist()
        if pad is not None:
            row = row[:s + 1] + [pad] * (n - s - 1)
        rows.append(row)
    return n, rows


@pytest.mark.parametrize("with_eos", [False, True], ids=["no-eos", "eos-pads-finished-rows"])
def test_stopping_criteria_stop_where_the_reference_loop_stops(models, with_eos):
    base, value, vmap = models
    prompts = random_prompts([5, 9, 3], seed=41)
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    terms = [(value, ALPHA, vmap)]
    free = [_ref_continue(base, terms, p, NEW) for p in prompts]
    # Each row stops after the first occurrence of its own token at step 1, 4 and 2.
    want = [1, 4, 2]
    stop_tokens = [int(free[r][s]) for r, s in enumerate(want)]
    stop_steps = [free[r].tolist().index(t) for r, t in enumerate(stop_tokens)]
    assert max(stop_steps) < NEW - 1, "the criteria must stop the loop before max_new_tokens"
    # An EOS no row emits, so EOS alone never stops anything: only the criteria do.
    eos = next(t for t in range(2, BASE_VOCAB) if all(t not in f.tolist() for f in free)) if with_eos else None
    pad = 7 if with_eos else None
    n, expected = _reference_with_stops(free, stop_steps, T, pad)

    lm = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap)
    crit = StoppingCriteriaList([StopAfterToken(stop_tokens)])
    kw = dict(eos_token_id=eos, pad_token_id=pad) if with_eos else {}
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, stopping_criteria=crit, **kw)
    assert out.shape == (3, T + n)
    assert out[:, T:].tolist() == expected

    # transformers' own generate with the guidance as a logits processor: same stopping rule, same tokens.
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask)
    hf = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([StopAfterToken(stop_tokens)]),
                       pad_token_id=pad if with_eos else 0, eos_token_id=eos)
    assert torch.equal(out, hf)

    # A plain list of callables, answering one bool for the batch, is accepted too.
    crit = AllRowsHaveLength(T + 3)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, stopping_criteria=[crit])
    assert out.shape[1] == T + 3 and crit.calls == 3
    assert out[:, T:].tolist() == [f[:3].tolist() for f in free]


def test_max_length_counts_the_prompt(models):
    base, value, vmap = models
    ids, mask = left_pad(random_prompts([4, 6], seed=43))
    lm = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap)
    a = lm.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 5)
    b = lm.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_length"):
        lm.generate(ids, attention_mask=mask, max_length=ids.shape[1])


@pytest.fixture(scope="module")
def tok_setup():
    tok = train_bpe_tokenizer(BASE_VOCAB, CORPUS)
    assert len(tok) <= BASE_VOCAB
    base = make_base(vocab=len(tok), seed=12)
    value = make_value(vocab=len(tok) - 20, seed=13)
    return tok, base, value


def test_stop_strings_with_a_tokenizer(tok_setup):
    tok, base, value = tok_setup
    texts = ["the quick brown", "small models can"]
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    ids, mask = left_pad(prompts, pad_id=tok.pad_token_id)
    T = ids.shape[1]
    terms = [(value, ALPHA, None)]
    free = [_ref_continue(base, terms, p, NEW) for p in prompts]
    # A stop string that row 0 completes at its 4th token: the text of its tokens 3 and 4 with the first
    # character dropped, so it runs across a token boundary (and is not in the prompt).
    text0 = tok.decode(free[0][:4].tolist())
    stop = tok.decode(free[0][2:4].tolist())[1:]
    assert stop and stop not in texts[0] and stop in text0

    def first_stop(r):
        for s in range(NEW):
            full = tok.decode(torch.cat([prompts[r], free[r][:s + 1]]).tolist())
            if stop in full:
                return s
        return None

    s0, s1 = first_stop(0), first_stop(1)
    assert s0 is not None and s0 <= 3
    lm = GuidedCausalLM(base, value, alpha=ALPHA, tokenizer=tok)
    one = lm.generate(ids[:1, -prompts[0].shape[0]:], max_new_tokens=NEW, stop_strings=stop)
    assert one.shape[1] == prompts[0].shape[0] + s0 + 1
    assert one[0, prompts[0].shape[0]:].tolist() == free[0][:s0 + 1].tolist()

    # Batched: the loop runs until both rows have stopped (or max_new_tokens), as in transformers.
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, stop_strings=[stop, "zzzz"])
    n = NEW if s1 is None else max(s0, s1) + 1
    assert out.shape[1] == T + n
    proc = IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask)
    hf = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW, do_sample=False,
                       stop_strings=[stop, "zzzz"], tokenizer=tok, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, hf)
    # The tokenizer may be given to generate() instead of the constructor; without one it is an error.
    plain = GuidedCausalLM(base, value, alpha=ALPHA)
    assert torch.equal(plain.generate(ids, attention_mask=mask, max_new_tokens=NEW, stop_strings=[stop, "zzzz"],
                                      tokenizer=tok), out)
    with pytest.raises(ValueError, match="tokenizer"):
        plain.generate(ids, attention_mask=mask, max_new_tokens=NEW, stop_strings=stop)


def _reference_steps(base, terms, prompt, generated):
    """Per generated position: (guided fp64 [Vb], base fp64 [Vb], [remapped term fp64 [Vb], ...])."""
    out = []
    ids = prompt.clone()
    Vb = base.config.vocab_size
    with torch.no_grad():
        for t in generated.tolist():
            b = base(ids[None]).logits[0, -1].double()
            parts = []
            for model, _, vmap in terms:
                v = model(value_input_ids(ids, vmap, model.config.vocab_size)[None]).logits[0, -1].double()
                parts.append(remap(v, vmap, Vb))
            guided = b + sum(a * p for (_, a, _), p in zip(terms, parts))
            out.append((guided, b, parts))
            ids = torch.cat([ids, torch.tensor([t])])
    return out


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling-temperature-top-k"])
def test_return_dict_scores_logits_and_term_logits_match_a_reference(sampling):
    base = make_base()
    expert, anti = make_value(seed=2), make_value(vocab=BASE_VOCAB, hidden=40, seed=4, tie=False)
    vmap = random_map()
    terms = [(expert, 1.3, vmap), (anti, -0.7, None)]
    prompts = random_prompts([4, 7, 2], seed=47)
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    lm = GuidedCausalLM(base, [GuidanceTerm(expert, 1.3, vmap), GuidanceTerm(anti, -0.7, None)])
    kw = dict(do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3)) if sampling \
        else {}
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True,
                      output_scores=True, output_logits=True, output_term_logits=True, **kw)
    assert isinstance(out, GuidedGenerateOutput)
    assert out.sequences.shape == (3, T + NEW)
    assert len(out.scores) == len(out.logits) == len(out.term_logits) == NEW
    assert all(len(tl) == 3 for tl in out.term_logits)  # base + 2 terms
    for r, p in enumerate(prompts):
        ref = _reference_steps(base, terms, p, out.sequences[r, T:])
        for t, (guided, b, parts) in enumerate(ref):
            logits = out.logits[t][r].double()
            assert out.logits[t].dtype == torch.float32 and out.logits[t].shape == (3, BASE_VOCAB)
            torch.testing.assert_close(logits, guided, rtol=0, atol=1e-4)
            torch.testing.assert_close(out.term_logits[t][0][r].double(), b, rtol=0, atol=1e-4)
            for i, part in enumerate(parts):
                torch.testing.assert_close(out.term_logits[t][i + 1][r].double(), part, rtol=0, atol=1e-4)
            # The analysis output adds up to the guided logits.
            total = out.term_logits[t][0][r] + sum(a * x[r] for (_, a, _), x in zip(terms, out.term_logits[t][1:]))
            torch.testing.assert_close(total, out.logits[t][r], rtol=0, atol=1e-5)
            if sampling:
                expected = TopKLogitsWarper(5)(None, (guided / 0.7)[None])[0]
                got = out.scores[t][r].double()
                assert torch.equal(torch.isinf(got), torch.isinf(expected))
                keep = torch.isfinite(expected)
                torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-4)
                assert int(out.sequences[r, T + t]) in keep.nonzero().flatten().tolist()
            else:
                torch.testing.assert_close(out.scores[t][r].double(), guided, rtol=0, atol=1e-4)
                assert int(out.sequences[r, T + t]) == int(guided.argmax())


def test_return_dict_agrees_with_transformers_generate_and_plain_output(models):
    base, value, vmap = models
    ids, mask = left_pad(random_prompts([3, 8], seed=53))
    lm = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True,
                      output_scores=True, output_logits=True)
    assert torch.equal(out.sequences, lm.generate(ids, attention_mask=mask, max_new_tokens=NEW))
    assert out.term_logits is None
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask)
    hf = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW, do_sample=False,
                       pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, hf.sequences)
    for ours, theirs in zip(out.scores, hf.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # Only what was asked for is collected; without return_dict_in_generate the ids come back.
    only = lm.generate(ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True)
    assert only.scores is None and only.logits is None and torch.equal(only.sequences, out.sequences[:, :-NEW + 2])
    assert isinstance(lm.generate(ids, attention_mask=mask, max_new_tokens=2, output_scores=True), torch.Tensor)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, output_term_logits=True)
    with pytest.raises(ValueError, match="output_hidden_states"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True,
                    output_hidden_states=True)


def test_logits_are_kept_before_in_place_logits_processors(models):
    base, value, vmap = models
    ids = random_prompts([5], seed=59)[0][None]

    def zero_first_ten(input_ids, scores):
        scores[:, :10] = 0.0  # in place
        return scores

    lm = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap)
    out = lm.generate(ids, max_new_tokens=3, logits_processor=[zero_first_ten], return_dict_in_generate=True,
                      output_scores=True, output_logits=True)
    for s, raw in zip(out.scores, out.logits):
        assert torch.all(s[:, :10] == 0) and not torch.all(raw[:, :10] == 0)
        torch.testing.assert_close(s[:, 10:], raw[:, 10:])

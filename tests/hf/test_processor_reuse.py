"""An ``IVLLogitsProcessor`` reused for another ``generate()`` without ``reset()``: a prompt batch of exactly
``seen + 1`` tokens has the shape of the next decode step, and the stale value cache guided the whole generation
silently. Each call must continue the previous call's ``input_ids``; one that does not raises ``ValueError``
(at that call on CPU; on CUDA, compared on the device, at the next call: emulated here on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.hf import IVLLogitsProcessor  # noqa: E402
from ivl_kernels.hf import processor as processor_module  # noqa: E402

from ._capability import skip_unless_static_cache  # noqa: E402
from ._models import (CORPUS, left_pad, make_base, make_value, random_map, random_prompts,  # noqa: E402
                      train_bpe_tokenizer)

ALPHA = 1.5
PATHS = ["dynamic", "static", "retokenize"]


def _pad_to(ids, mask, width, pad_id=0):
    """Left-pad ``ids``/``mask`` to ``width`` columns."""
    extra = width - ids.shape[1]
    assert extra >= 0
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
            torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], 1))


def _setup(path):
    """``(base, make_processor(mask), (ids1, mask1), (ids2, mask2), pad_id)``: two different prompt batches, the
    second one column wider than the first."""
    if path == "retokenize":
        tok_base = train_bpe_tokenizer(300, CORPUS)
        tok_value = train_bpe_tokenizer(280, CORPUS[::-1][:40])
        base, value = make_base(vocab=len(tok_base)), make_value(vocab=len(tok_value))
        vmap = random_map(Vb=len(tok_base), Vv=len(tok_value), unmapped=0.1)
        pad = tok_base.pad_token_id
        one = left_pad([torch.tensor(tok_base(t)["input_ids"]) for t in ("the quick brown", "a value network")], pad)
        two = left_pad([torch.tensor(tok_base(t)["input_ids"]) for t in ("small models", "the lazy dog")], pad)
        kw = dict(vocab_map=vmap, value_tokenizer=tok_value, base_tokenizer=tok_base)
    else:
        base, value = make_base(), make_value()
        pad = 0
        one = left_pad(random_prompts([5, 3, 4], seed=3))
        two = left_pad(random_prompts([2, 4, 3], seed=9))
        kw = dict(vocab_map=random_map(), cache_implementation=path)
    two = _pad_to(*two, one[0].shape[1] + 1, pad)

    def make(mask):
        return IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask, backend="torch", **kw)

    if path == "static":
        skip_unless_static_cache(lambda: _generate(base, *one, make(one[1]), 2, pad), value)
    return base, make, one, two, pad


def _generate(base, ids, mask, proc, new, pad=0, **kw):
    with torch.no_grad():
        return base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=pad, output_scores=True, return_dict_in_generate=True,
                             **{"do_sample": False, **kw})


def _assert_same_scores(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[False, True], ids=["cpu-check", "deferred-cuda-check-on-cpu"])
def deferred(request, monkeypatch):
    """Run each test with the CPU check and with the CUDA check's host logic (device flag, host copy, event)."""
    monkeypatch.setattr(processor_module, "_DEFER_ON_CPU", request.param, raising=False)
    return request.param


@pytest.mark.parametrize("path", PATHS)
def test_reuse_without_reset_for_a_prompt_of_seen_plus_one_tokens_raises(path, deferred):
    base, make, (ids1, mask1), (ids2, mask2), pad = _setup(path)
    proc = make(mask1)
    _generate(base, ids1, mask1, proc, 1, pad)  # one call, on the prompt: the next call expects one more column
    with pytest.raises(ValueError, match=r"reset\(attention_mask=") as err:
        _generate(base, ids2, mask2, proc, 4, pad)
    # On CPU at the call that got the new prompt; the CUDA check reads the device's answer at the next call.
    assert ("one call late" in str(err.value)) == deferred
    # Until reset(), every call raises (also the first prompt again, which would otherwise restart).
    with pytest.raises(ValueError, match="reset"):
        _generate(base, ids1, mask1, proc, 2, pad)
    # reset() then serves the new batch as a fresh processor does.
    proc.reset(attention_mask=mask2)
    _assert_same_scores(_generate(base, ids2, mask2, proc, 4, pad), _generate(base, ids2, mask2, make(mask2), 4, pad))


def test_reuse_without_reset_after_several_steps_raises(deferred):
    """After a first generate of 3 tokens the processor expects ``P + 3`` columns: the first prompt followed by
    three other tokens than the ones generated has that shape."""
    base, make, (ids1, mask1), _, pad = _setup("dynamic")
    proc = make(mask1)
    first = _generate(base, ids1, mask1, proc, 3, pad).sequences
    other = (first[:, ids1.shape[1]:] + 1) % 250 + 2  # three tokens, each unlike the one generated
    ids2, mask2 = torch.cat([ids1, other], 1), torch.cat([mask1, torch.ones_like(other)], 1)
    with pytest.raises(ValueError, match="reset"):
        _generate(base, ids2, mask2, proc, 3, pad)


def test_deferred_check_found_at_a_generates_last_call_is_warned_by_reset(monkeypatch):
    """The CUDA check reads a mismatch one call late: a generate() of one token returns before it is read; the
    processor's next call raises, or ``reset()`` warns (and resets)."""
    monkeypatch.setattr(processor_module, "_DEFER_ON_CPU", True, raising=False)
    base, make, (ids1, mask1), (ids2, mask2), pad = _setup("dynamic")
    for then_call in (True, False):
        proc = make(mask1)
        _generate(base, ids1, mask1, proc, 1, pad)
        _generate(base, ids2, mask2, proc, 1, pad)  # its one call is a mismatch, read after it returns
        if then_call:
            with pytest.raises(ValueError, match="reset"):
                _generate(base, ids2, mask2, proc, 1, pad)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                proc.reset(attention_mask=mask2)  # raised already: no warning
        else:
            with pytest.warns(RuntimeWarning, match="stale value cache"):
                proc.reset(attention_mask=mask2)
        _assert_same_scores(_generate(base, ids2, mask2, proc, 3, pad),
                            _generate(base, ids2, mask2, make(mask2), 3, pad))


@pytest.mark.parametrize("path", PATHS)
def test_normal_reuse_is_unchanged(path, deferred):
    """A generate, greedy or sampled, gives a fresh processor's scores; so does the same prompt generated again
    (a restart) and a generate fed the previous one's output (a true continuation of what the cache read)."""
    base, make, (ids1, mask1), _, pad = _setup(path)
    proc = make(mask1)
    a = _generate(base, ids1, mask1, proc, 3, pad)
    _assert_same_scores(a, _generate(base, ids1, mask1, make(mask1), 3, pad))
    _assert_same_scores(_generate(base, ids1, mask1, proc, 3, pad), a)  # the same prompt again: restart
    # The output of a generate's last call is one column past what the cache has read: it continues it.
    cont, cont_mask = a.sequences, torch.cat([mask1, torch.ones_like(a.sequences[:, ids1.shape[1]:])], 1)
    _assert_same_scores(_generate(base, cont, cont_mask, proc, 3, pad),
                        _generate(base, cont, cont_mask, make(cont_mask), 3, pad))
    proc.reset(attention_mask=mask1)
    torch.manual_seed(0)
    s1 = _generate(base, ids1, mask1, proc, 4, pad, do_sample=True)
    torch.manual_seed(0)
    _assert_same_scores(s1, _generate(base, ids1, mask1, make(mask1), 4, pad, do_sample=True))

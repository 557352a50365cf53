"""Guided generation (IVLLogitsProcessor, GuidedCausalLM) against a no-cache reference loop."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels._triton import HAS_TRITON, interpreter_enabled  # noqa: E402
from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._capability import skip_unless_static_cache  # noqa: E402
from ._models import (BASE_VOCAB, VALUE_VOCAB, left_pad, make_base, make_value, random_map,  # noqa: E402
                      random_prompts, reference_greedy, reference_next_logits)

NEW = 8
LENGTHS = [5, 11, 2]
ALPHA = 1.5

# (base tie_word_embeddings, value tie_word_embeddings, map kind)
CASES = [
    pytest.param(False, True, "identity-tail", id="base-untied-value-tied-identity-tail"),
    pytest.param(True, False, "random-map", id="base-tied-value-untied-random-map"),
]


def _setup(tie_base, tie_value, kind):
    base = make_base(tie=tie_base)
    value = make_value(tie=tie_value)
    vmap = None if kind == "identity-tail" else random_map()
    return base, value, vmap


class WritesAtCachePosition(torch.nn.Module):
    """A backbone with transformers 4.5x's static-cache contract, on any release: its ``forward`` takes
    ``cache_position`` and a ``StaticCache`` column is written where it says; without it, the position is 4.5x's
    estimate (``StaticLayer.get_seq_length``: the non-zero key rows of batch row 0, head 0, layer 0). Records
    the positions given per static call (``None``: none given). Other caches pass through."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.positions = []

    @staticmethod
    def emulable() -> str:
        """``""`` when this transformers lets the emulation place a column (its forward takes ``cache_position``,
        or its static layers count their columns in ``cumulative_length``), else why not."""
        from ivl_kernels.hf._static import _static_cache, takes_cache_position

        value = make_value()
        if takes_cache_position(value.model):
            return ""
        layers = getattr(_static_cache(value, 64), "layers", None) or ()
        if layers and all(hasattr(layer, "cumulative_length") for layer in layers):
            return ""
        return "its static layers neither take cache_position nor keep a cumulative_length"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                cache_position=None):
        from transformers import StaticCache

        from ivl_kernels.hf._common import cache_kwarg
        from ivl_kernels.hf._static import takes_cache_position

        extra = {}
        if isinstance(past_key_values, StaticCache):
            self.positions.append(None if cache_position is None else cache_position.tolist())
            if cache_position is None:
                keys = getattr(past_key_values.layers[0], "keys", None)
                past = int(keys[0, 0].any(-1).sum()) if keys is not None else 0
                cache_position = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
            if takes_cache_position(self.inner):
                extra["cache_position"] = cache_position
            else:  # layers that count their columns: start this call's at cache_position
                for layer in past_key_values.layers:
                    if getattr(layer, "is_initialized", False):
                        layer.cumulative_length.fill_(int(cache_position[0]))
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{cache_kwarg(self.inner): past_key_values}, **extra)


def expected_static_positions(T: int, steps: int) -> list:
    """The cache positions a static runner gives a prompt of ``T`` columns and ``steps`` decode steps."""
    return [list(range(T))] + [[T + i] for i in range(steps)]


def _hf_generate(base, ids, mask, processor, **kw):
    return base.generate(ids, attention_mask=mask, logits_processor=[processor], max_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("tie_base,tie_value,kind", CASES)
def test_processor_greedy_left_padded_matches_reference(tie_base, tie_value, kind):
    base, value, vmap = _setup(tie_base, tie_value, kind)
    prompts = random_prompts(LENGTHS)
    ids, mask = left_pad(prompts)
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask)
    out = _hf_generate(base, ids, mask, proc)
    for i, p in enumerate(prompts):
        expected = reference_greedy(base, [(value, ALPHA, vmap)], p, NEW)
        assert out[i, ids.shape[1]:].tolist() == expected.tolist(), f"row {i}"
    # The guidance changes the tokens (otherwise the comparison above proves nothing).
    plain = base.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out)


@pytest.mark.parametrize("tie_base,tie_value,kind", CASES)
def test_guided_causal_lm_greedy_left_padded_matches_reference(tie_base, tie_value, kind):
    base, value, vmap = _setup(tie_base, tie_value, kind)
    prompts = random_prompts(LENGTHS, seed=7)
    ids, mask = left_pad(prompts)
    model = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert out.shape == (len(prompts), ids.shape[1] + NEW) and out.dtype == torch.long
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        expected = reference_greedy(base, [(value, ALPHA, vmap)], p, NEW)
        assert out[i, ids.shape[1]:].tolist() == expected.tolist(), f"row {i}"


def test_processor_and_guided_lm_agree_on_a_padded_batch():
    base, value, vmap = _setup(False, True, "random-map")
    ids, mask = left_pad(random_prompts([3, 9, 6, 1], seed=11))
    a = GuidedCausalLM(base, value, alpha=0.7, vocab_map=vmap).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    proc = IVLLogitsProcessor(value, alpha=0.7, vocab_map=vmap, attention_mask=mask)
    b = _hf_generate(base, ids, mask, proc)
    assert torch.equal(a, b)


def test_several_terms_proxy_tuning_matches_reference():
    base = make_base()
    expert, anti = make_value(seed=2), make_value(vocab=BASE_VOCAB, hidden=40, seed=4, tie=False)
    vmap = random_map()
    terms = [GuidanceTerm(expert, 1.0, vmap), GuidanceTerm(anti, -1.0, None)]
    prompts = random_prompts([4, 7], seed=13)
    ids, mask = left_pad(prompts)
    out = GuidedCausalLM(base, terms).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    for i, p in enumerate(prompts):
        expected = reference_greedy(base, [(expert, 1.0, vmap), (anti, -1.0, None)], p, NEW)
        assert out[i, ids.shape[1]:].tolist() == expected.tolist(), f"row {i}"


def _tv(counts, p):
    emp = counts / counts.sum()
    return 0.5 * (emp - p).abs().sum().item()


@pytest.mark.parametrize("path", ["processor", "guided-lm"])
def test_sampling_first_step_draws_from_softmax_of_guided_logits(path):
    base, value, vmap = _setup(False, True, "random-map")
    prompt = random_prompts([6], seed=17)[0]
    N = 20000
    ids = prompt.repeat(N, 1)
    torch.manual_seed(123)
    if path == "processor":
        proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap)
        out = base.generate(ids, logits_processor=[proc], max_new_tokens=1, do_sample=True, top_k=0, pad_token_id=0)
    else:
        out = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap).generate(ids, max_new_tokens=1, do_sample=True,
                                                                              top_k=0)
    counts = torch.bincount(out[:, -1], minlength=BASE_VOCAB).double()
    p = torch.softmax(reference_next_logits(base, [(value, ALPHA, vmap)], prompt), -1)
    p_base = torch.softmax(reference_next_logits(base, [], prompt), -1)
    # E[TV(empirical, p)] <= 0.5 * sum_v sqrt(p_v / N): allow 2x that plus a small margin.
    bound = 2 * 0.5 * torch.sqrt(p / N).sum().item() + 0.01
    assert _tv(counts, p) < bound
    assert 0.5 * (p - p_base).abs().sum().item() > 2 * bound, "guidance too weak for the test to discriminate"
    assert _tv(counts, p_base) > bound


def test_seeded_sampling_equals_multinomial_of_reference():
    """Same seed, same draws: transformers' sampling calls torch.multinomial(softmax(scores), 1) per step."""
    base, value, vmap = _setup(False, True, "identity-tail")
    prompt = random_prompts([6], seed=19)[0]
    torch.manual_seed(7)
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap)
    out = base.generate(prompt[None], logits_processor=[proc], max_new_tokens=NEW, do_sample=True, top_k=0,
                        pad_token_id=0)
    g = torch.Generator().manual_seed(7)
    out2 = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap).generate(prompt[None], max_new_tokens=NEW,
                                                                              do_sample=True, top_k=0, generator=g)
    torch.manual_seed(7)
    ids = prompt.clone()
    for _ in range(NEW):
        probs = torch.softmax(reference_next_logits(base, [(value, ALPHA, vmap)], ids).float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs[None], 1)[0]])
    assert out[0].tolist() == ids.tolist()
    assert out2[0].tolist() == ids.tolist()


def test_eos_pad_min_new_tokens_and_streamer():
    base, value, vmap = _setup(False, True, "identity-tail")
    ids, mask = left_pad(random_prompts([4, 6], seed=23))
    model = GuidedCausalLM(base, value, alpha=ALPHA)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 emits this token at step 3 when unconstrained
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=5)
    T = ids.shape[1]
    first = out[0, T:].tolist().index(eos)
    assert first <= 2 and out.shape[1] <= T + NEW
    assert all(t == 5 for t in out[0, T + first + 1:].tolist()), "finished rows are padded with pad_token_id"
    constrained = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=5,
                                 min_new_tokens=5)
    assert eos not in constrained[0, T:T + 5].tolist()

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, x):
            self.chunks.append(x.clone())

        def end(self):
            self.ended = True

    rec = Recorder()
    single = model.generate(ids[1:, -6:], max_new_tokens=4, streamer=rec)
    assert rec.ended and torch.equal(rec.chunks[0], ids[1:, -6:])
    assert [int(c) for c in rec.chunks[1:]] == single[0, 6:].tolist()


@pytest.mark.skipif(not (HAS_TRITON and interpreter_enabled()),
                    reason="needs Triton and its interpreter (these models live on the CPU)")
def test_triton_backend_under_interpreter_matches_torch_backend():
    base, value, vmap = _setup(False, True, "random-map")
    ids, mask = left_pad(random_prompts([3, 5], seed=29))
    ref = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap, backend="torch").generate(
        ids, attention_mask=mask, max_new_tokens=3)
    tri = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap, backend="triton").generate(
        ids, attention_mask=mask, max_new_tokens=3)
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask, backend="triton")
    tri_proc = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(ref, tri) and torch.equal(ref, tri_proc)


def test_processor_reused_for_the_same_prompt_and_reset_for_a_new_one():
    base, value, _ = _setup(False, True, "identity-tail")
    ids, mask = left_pad(random_prompts([4, 6], seed=31))
    proc = IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask)
    a = _hf_generate(base, ids, mask, proc)
    b = _hf_generate(base, ids, mask, proc)  # same prompt: the processor restarts by itself
    assert torch.equal(a, b)
    ids2, mask2 = left_pad(random_prompts([5, 2], seed=37))
    with pytest.raises(ValueError, match="reset"):
        _hf_generate(base, ids2, mask2, proc)
    proc.reset(attention_mask=mask2)
    fresh = IVLLogitsProcessor(value, alpha=ALPHA, attention_mask=mask2)
    assert torch.equal(_hf_generate(base, ids2, mask2, proc), _hf_generate(base, ids2, mask2, fresh))


@pytest.mark.parametrize("own_prompt", [False, True], ids=["base-prompt", "own-value-prompt"])
def test_processor_static_cache_matches_dynamic_and_grows(own_prompt):
    """The processor's static path (the CUDA default; eager on CPU) gives the dynamic path's scores and tokens,
    including across a cache that fills and is re-read at twice the size (max_new_tokens=1 sizes it to 64
    columns; 70 tokens are generated)."""
    base, value, vmap = _setup(False, True, "random-map")
    ids, mask = left_pad(random_prompts(LENGTHS))
    skip_unless_static_cache(lambda: _hf_generate(base, ids, mask, IVLLogitsProcessor(
        value, vocab_map=vmap, attention_mask=mask, cache_implementation="static")), value)
    kw = {}
    if own_prompt:
        own_ids, own_mask = left_pad(random_prompts([7, 3, 9], vocab=VALUE_VOCAB, seed=5))
        kw = dict(value_input_ids=own_ids, value_attention_mask=own_mask)
    outs = {}
    for mode in ("dynamic", "static"):
        proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask, cache_implementation=mode,
                                  max_new_tokens=1, **kw)
        outs[mode] = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=70,
                                   min_new_tokens=70, do_sample=False, pad_token_id=0, output_scores=True,
                                   return_dict_in_generate=True)
        if mode == "static":
            assert proc._static[0].max_len == 128  # grown from 64
    assert torch.equal(outs["dynamic"].sequences, outs["static"].sequences)
    for a, b in zip(outs["dynamic"].scores, outs["static"].scores):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_processor_static_cache_gives_the_column_it_writes(monkeypatch):
    """transformers 4.5x writes a ``StaticCache`` column where the forward's ``cache_position`` says and, given none,
    estimates it from the cache (non-zero key rows of batch row 0): here row 0's prompt holds two tokens whose
    layer-0 keys are zero (value id 0: a zero embedding row, Qwen2's k_proj bias 0), the estimate fell two short,
    the first step overwrote a prompt column and every later step the same one: other tokens than the dynamic
    cache's, no error. Emulated on any release (``WritesAtCachePosition``): the static runner gives each call the
    columns it writes, and the tokens and scores are the dynamic path's."""
    from ivl_kernels.hf import processor as processor_module

    base, value, vmap = _setup(False, True, "random-map")
    ids, mask = left_pad(random_prompts(LENGTHS))
    skip_unless_static_cache(lambda: _hf_generate(base, ids, mask, IVLLogitsProcessor(
        value, vocab_map=vmap, attention_mask=mask, cache_implementation="static")), value)
    why = WritesAtCachePosition.emulable()
    if why:
        pytest.skip(f"cannot emulate transformers 4.5x's static cache here: {why}")
    wrappers = []
    split = processor_module.split_causal_lm

    def wrapped_split(model, role="value"):
        backbone, weight = split(model, role)
        wrappers.append(WritesAtCachePosition(backbone))
        return wrappers[-1], weight

    monkeypatch.setattr(processor_module, "split_causal_lm", wrapped_split)
    outs = {}
    for mode in ("dynamic", "static"):
        proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask, cache_implementation=mode)
        outs[mode] = _hf_generate(base, ids, mask, proc, output_scores=True, return_dict_in_generate=True)
    assert wrappers[0].positions == [] and wrappers[1].positions == expected_static_positions(ids.shape[1], NEW - 1)
    assert torch.equal(outs["dynamic"].sequences, outs["static"].sequences)
    for a, b in zip(outs["dynamic"].scores, outs["static"].scores):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_processor_cache_arguments_are_checked():
    value = make_value()
    with pytest.raises(ValueError, match="cache_implementation must be"):
        IVLLogitsProcessor(value, cache_implementation="paged")
    with pytest.raises(TypeError, match="cuda_graph must be"):
        IVLLogitsProcessor(value, cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph=True needs the static cache"):
        IVLLogitsProcessor(value, cache_implementation="dynamic", cuda_graph=True)
    with pytest.raises((ValueError, TypeError), match="max_new_tokens"):
        IVLLogitsProcessor(value, max_new_tokens=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_processor_cuda_graph_default_matches_eager_static():
    """On CUDA the default processor captures the value model's decode step: replayed, it gives the eager
    static step's scores bit for bit (the same kernels)."""
    base, value, vmap = _setup(False, True, "random-map")
    base, value = base.cuda().to(torch.bfloat16), value.cuda().to(torch.bfloat16)
    ids, mask = left_pad(random_prompts(LENGTHS))
    ids, mask = ids.cuda(), mask.cuda()
    skip_unless_static_cache(lambda: _hf_generate(base, ids, mask, IVLLogitsProcessor(
        value, vocab_map=vmap.cuda(), attention_mask=mask, cache_implementation="static")), value)
    outs = {}
    for name, kw in (("eager", dict(cache_implementation="static", cuda_graph=False)), ("default", {})):
        proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap.cuda(), attention_mask=mask, **kw)
        outs[name] = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=12,
                                   do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        if name == "default":
            assert proc._static is not None and proc._static[1].graph is not None
    assert torch.equal(outs["eager"].sequences, outs["default"].sequences)
    for a, b in zip(outs["eager"].scores, outs["default"].scores):
        torch.testing.assert_close(b, a, rtol=0, atol=0)

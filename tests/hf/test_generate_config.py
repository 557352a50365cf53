"""``GuidedCausalLM.generate`` and ``IVLLogitsProcessor`` follow transformers' generate where a user meets it: the
generation config (merged, its processors, its lengths, sampling defaults), sliding-window models on the static
cache, kept static caches after ``model.to(dtype)``, the raw logits transformers keeps, bad prompts.

With ``alpha=0`` the guided logits are the base's, so ``GuidedCausalLM`` must give ``base.generate``'s tokens."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("transformers")

from transformers import GenerationConfig  # noqa: E402

from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._capability import skip_unless_static_cache  # noqa: E402
from ._models import left_pad, make_base, make_value, random_prompts  # noqa: E402


@pytest.fixture
def models():
    base, value = make_base(seed=4), make_value(seed=5)
    for m in (base, value):  # wide weights: greedy choices far from ties
        for p in m.parameters():
            p.data.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return base, value


def _batch():
    return left_pad(random_prompts([5, 8, 3], seed=21))


def _same_as_transformers(base, value, **kw):
    ids, mask = _batch()
    want = base.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = GuidedCausalLM(base, value, alpha=0.0, backend="torch").generate(ids, attention_mask=mask, **kw)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got, want)
    return got, ids.shape[1]


def _eos_of(base):
    ids, mask = _batch()
    free = base.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    return int(free[0, ids.shape[1] + 2])


@pytest.mark.parametrize("field, value", [("repetition_penalty", 5.0), ("no_repeat_ngram_size", 1),
                                          ("bad_words_ids", "first-choice"), ("suppress_tokens", "first-choice"),
                                          ("begin_suppress_tokens", "first-choice")],
                         ids=["repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                              "begin_suppress_tokens"])
@pytest.mark.parametrize("source", ["model-config", "keyword"])
def test_config_processors_applied_as_transformers(models, field, value, source):
    base, value_model = models
    ids, mask = _batch()
    if value == "first-choice":  # ban what greedy picks first in row 0: the setting must change the tokens
        first = int(base.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[0, -1])
        value = [[first]] if field == "bad_words_ids" else [first]
    plain, T = _same_as_transformers(base, value_model, max_new_tokens=8)
    if source == "keyword":
        got, _ = _same_as_transformers(base, value_model, max_new_tokens=8, **{field: value})
    else:
        setattr(base.generation_config, field, value)
        got, _ = _same_as_transformers(base, value_model, max_new_tokens=8)
    assert not torch.equal(got, plain), f"{field}={value!r} changed nothing: the test would not see it ignored"


@pytest.mark.parametrize("setting", ["max_length", "min_new_tokens", "min_length"])
def test_config_lengths_as_transformers(models, setting):
    base, value = models
    ids, _ = _batch()
    T = ids.shape[1]
    gc = base.generation_config
    if setting == "max_length":
        gc.max_length = T + 4
        got, _ = _same_as_transformers(base, value)
        assert got.shape[1] == T + 4
        return
    gc.eos_token_id, gc.pad_token_id = _eos_of(base), 7
    if setting == "min_new_tokens":
        gc.min_new_tokens = 6
    else:
        gc.min_length = T + 6
    got, _ = _same_as_transformers(base, value, max_new_tokens=10)
    assert not torch.isin(got[:, T:T + 6], torch.tensor(gc.eos_token_id)).any()


def test_passed_generation_config_takes_unset_fields_from_the_models(models):
    """transformers 5: a ``generation_config=`` passed fills its unset fields from the model's (EOS, pad here)."""
    base, value = models
    if "defaults_only" not in __import__("inspect").signature(GenerationConfig.update).parameters:
        pytest.skip("this transformers replaces the model's generation config with the one passed")
    base.generation_config.eos_token_id, base.generation_config.pad_token_id = _eos_of(base), 7
    got, T = _same_as_transformers(base, value, generation_config=GenerationConfig(max_new_tokens=8))
    assert (got[0, T + 3:] == 7).all()  # row 0 stopped at the model's EOS and was padded with the model's pad


def test_sampling_defaults_as_transformers(models):
    """Unset ``top_k`` while sampling is transformers' default (50 on transformers 5), ``top_k=0`` keeps every id."""
    base, value = models
    ids, mask = _batch()
    lm = GuidedCausalLM(base, value, alpha=0.0, backend="torch")
    defaults = getattr(base.generation_config, "_get_default_generation_params", lambda: {})()
    k = defaults.get("top_k", GenerationConfig().top_k)
    hf = base.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=True, return_dict_in_generate=True,
                       output_scores=True)
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=True, return_dict_in_generate=True,
                       output_scores=True)
    finite = torch.isfinite(ours.scores[0]).sum(1)
    assert torch.equal(finite, torch.isfinite(hf.scores[0]).sum(1)) and (finite == k).all()
    every = lm.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=True, top_k=0,
                        return_dict_in_generate=True, output_scores=True)
    assert torch.isfinite(every.scores[0]).all()


def test_not_applied_config_settings_are_said_and_refused_as_keywords(models, caplog):
    base, value = models
    ids, mask = _batch()
    lm = GuidedCausalLM(base, value, alpha=0.0, backend="torch")
    with pytest.raises(TypeError, match="sequence_bias"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, sequence_bias={(3,): 1.0})
    base.generation_config.forced_eos_token_id = 5
    with caplog.at_level(logging.WARNING, logger="ivl_kernels.hf"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert any("forced_eos_token_id=5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["hybrid", "sliding_window"])
def test_config_cache_implementation_other_than_ours_leaves_the_default(models, value):
    """Gemma's generation configs ship ``cache_implementation="hybrid"``: generate runs (the default cache), with
    transformers' tokens. A transformers that cannot build that cache for a model without a sliding window (4.50:
    "requires the model config supporting sliding window", or reading ``config.sliding_window`` that Llama's config
    lacks: transformers' own code) is compared with its default cache."""
    base, value_model = models
    ids, mask = _batch()
    base.generation_config.cache_implementation = value
    try:
        want = base.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    except (ValueError, AttributeError) as exc:
        assert "sliding" in str(exc), exc
        base.generation_config.cache_implementation = None
        want = base.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
        base.generation_config.cache_implementation = value
    got = GuidedCausalLM(base, value_model, alpha=0.0, backend="torch").generate(ids, attention_mask=mask,
                                                                                 max_new_tokens=6)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cache_implementation must be"):
        GuidedCausalLM(base, value_model).generate(ids, attention_mask=mask, max_new_tokens=2,
                                                   cache_implementation=value)


def _sliding_base(window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(6)
    cfg = MistralConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=window, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                        initializer_range=0.2)
    return MistralForCausalLM(cfg).eval()


def test_sliding_window_shorter_than_the_static_cache(models, caplog):
    """A window of 8 < the 64-column static cache: forced static is a ValueError (it used to crash in the first
    decode step), the default on CUDA is the dynamic cache (said once), and the dynamic path is transformers'."""
    from ivl_kernels.hf import _static

    _, value = models
    base = _sliding_base(8)
    ids, mask = _batch()
    lm = GuidedCausalLM(base, value, alpha=0.0, backend="torch")
    want = base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=20), want)
    skip_unless_static_cache(lambda: lm.generate(ids, attention_mask=mask, max_new_tokens=20,
                                                 cache_implementation="static"), base)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=20, cache_implementation="static")
    owners = [lm.base_model] + list(lm.value_models)
    _static._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="ivl_kernels.hf"):
        assert lm._decode_mode(None, None, torch.device("cuda"), owners, sizes=(64, 64)) == (False, False)
    assert any("sliding window of 8" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="sliding window"):
        IVLLogitsProcessor(_sliding_model_as_value(8), cache_implementation="static")(ids, torch.zeros(3, 300))


def _sliding_model_as_value(window):
    return _sliding_base(window)


def test_sliding_window_longer_than_the_static_cache_runs_static(models):
    _, value = models
    base = _sliding_base(128)
    ids, mask = _batch()
    lm = GuidedCausalLM(base, value, alpha=0.0, backend="torch")
    skip_unless_static_cache(lambda: lm.generate(ids, attention_mask=mask, max_new_tokens=20,
                                                 cache_implementation="static"), base, value)
    want = base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=20, cache_implementation="static"), want)


def test_processor_static_cache_that_outgrows_the_window_goes_on_dynamic(models):
    """The processor's static cache doubles when it fills; past the value model's window it continues on the
    dynamic cache with the same tokens as the dynamic cache throughout."""
    base, _ = models
    value = _sliding_base(100)  # the value model has the window (vocabulary 300 = the base's)
    ids, mask = _batch()
    skip_unless_static_cache(lambda: base.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                                   logits_processor=[IVLLogitsProcessor(
                                                       value, attention_mask=mask, cache_implementation="static",
                                                       max_new_tokens=2)]), value)
    out = {}
    for mode in ("dynamic", "static"):
        proc = IVLLogitsProcessor(value, alpha=0.5, attention_mask=mask, cache_implementation=mode,
                                  max_new_tokens=40)  # a 64-column cache at first, 128 > 100 when it grows
        out[mode] = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=70,
                                  do_sample=False)
    assert out["static"].shape[1] == ids.shape[1] + 70
    assert torch.equal(out["static"], out["dynamic"])


def test_kept_static_caches_follow_the_models_dtype(models):
    base, value = models
    ids, mask = _batch()
    lm = GuidedCausalLM(copy.deepcopy(base), copy.deepcopy(value), alpha=0.5, backend="torch")
    skip_unless_static_cache(lambda: lm.generate(ids, attention_mask=mask, max_new_tokens=4,
                                                 cache_implementation="static"), base, value)
    lm.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static")
    lm.base_model.double()
    for v in lm.value_models:
        v.double()
    twice = lm.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static")
    dynamic = lm.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="dynamic")
    assert torch.equal(twice, dynamic)
    value64 = copy.deepcopy(value)
    proc = IVLLogitsProcessor(value64, alpha=0.5, attention_mask=mask, cache_implementation="static")
    base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=3, do_sample=False)
    value64.double()
    proc.reset(attention_mask=mask)
    base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=3, do_sample=False)


def test_processor_leaves_transformers_raw_logits(models):
    """``output_logits=True``: transformers keeps the scores it passed to the processors as the raw logits; the
    processor returns new guided scores and leaves those as they were."""
    base, value = models
    ids, mask = _batch()
    alone = base.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
    proc = IVLLogitsProcessor(value, alpha=0.5, attention_mask=mask)
    out = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=1, do_sample=False,
                        return_dict_in_generate=True, output_logits=True, output_scores=True)
    assert torch.equal(out.logits[0], alone.logits[0])
    assert not torch.equal(out.scores[0], out.logits[0])


def test_generate_refuses_bad_prompts_and_takes_a_tensor_eos(models):
    base, value = models
    ids, mask = _batch()
    lm = GuidedCausalLM(base, value, alpha=0.0, backend="torch")
    for bad in (300, -1, -100):
        wrong = ids.clone()
        wrong[0, 0] = bad  # a padding position of row 0
        with pytest.raises(ValueError, match=r"input_ids must be in \[0, 300\)"):
            lm.generate(wrong, attention_mask=mask, max_new_tokens=2)
    right = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        lm.generate(right, attention_mask=torch.cat([mask[:, 1:], mask[:, :1]], 1), max_new_tokens=2)
    eos = _eos_of(base)
    a = lm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=torch.tensor(eos), pad_token_id=7)
    b = lm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(a, b)

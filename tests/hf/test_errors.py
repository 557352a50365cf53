"""Bad input and unsupported generation modes: clear ValueError before any token is generated."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.hf import GuidedCausalLM, IVLForCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import CORPUS, left_pad, make_base, make_value, random_map, random_prompts, train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return make_base(), make_value(), make_value(vocab=512, seed=9)


def _gen(base, ids, mask, proc, **kw):
    return base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=3, pad_token_id=0, **kw)


def test_value_vocab_larger_than_base_without_map(models):
    base, _, big = models
    ids, mask = left_pad(random_prompts([3, 4]))
    with pytest.raises(ValueError, match="does not fit the base vocabulary"):
        GuidedCausalLM(base, big)
    with pytest.raises(ValueError, match="does not fit the base vocabulary"):
        IVLForCausalLM(base, big)
    proc = IVLLogitsProcessor(big, attention_mask=mask)
    with pytest.raises(ValueError, match="does not fit the base vocabulary"):
        proc.check_base_vocab(base.config.vocab_size)  # the check generate() runs on its first call
    with pytest.raises(ValueError, match="does not fit the base vocabulary"):
        _gen(base, ids, mask, proc)


@pytest.mark.parametrize("size", [299, 301], ids=["map-too-short", "map-too-long"])
def test_map_of_wrong_size(models, size):
    base, value, _ = models
    bad = random_map(Vb=size)
    with pytest.raises(ValueError, match="vocab_map"):
        GuidedCausalLM(base, value, vocab_map=bad)
    with pytest.raises(ValueError, match="vocab_map"):
        IVLForCausalLM(base, value, vocab_map=bad)
    proc = IVLLogitsProcessor(value, vocab_map=bad)  # size unknown until the base scores arrive
    ids, mask = left_pad(random_prompts([3, 4]))
    with pytest.raises(ValueError, match="vocab_map"):
        _gen(base, ids, None, proc)


def test_map_with_out_of_range_entries(models):
    base, value, _ = models
    bad = random_map()
    bad[7] = 256  # value vocabulary is 256
    with pytest.raises(ValueError, match=r"\[-1, 256\)"):
        GuidedCausalLM(base, value, vocab_map=bad)


def test_mismatched_tokenizers_without_map(models):
    _, value, _ = models
    tok_a = train_bpe_tokenizer(300, CORPUS)
    tok_b = train_bpe_tokenizer(280, CORPUS)
    with pytest.raises(ValueError, match="tokenizers differ but no vocab_map"):
        IVLLogitsProcessor(value, base_tokenizer=tok_a, value_tokenizer=tok_b)
    with pytest.raises(ValueError, match="both"):
        IVLLogitsProcessor(value, base_tokenizer=tok_a)
    # A map sized for another base vocabulary is caught at construction when the base tokenizer is known.
    with pytest.raises(ValueError, match="one entry per base id"):
        IVLLogitsProcessor(value, base_tokenizer=tok_a, value_tokenizer=tok_b, vocab_map=random_map(Vb=290, Vv=256))


def test_processor_beam_search_raises(models):
    base, value, _ = models
    ids, mask = left_pad(random_prompts([3, 4]))
    with pytest.raises(ValueError, match="num_beams > 1"):
        _gen(base, ids, mask, IVLLogitsProcessor(value, attention_mask=mask), num_beams=2)
    # Without the prompt mask the batch growth is not visible: the caller check catches beam search.
    with pytest.raises(ValueError, match="beam search"):
        _gen(base, ids, None, IVLLogitsProcessor(value), num_beams=2)


def test_processor_num_return_sequences_raises(models):
    base, value, _ = models
    ids, mask = left_pad(random_prompts([3, 4]))
    with pytest.raises(ValueError, match="num_return_sequences"):
        _gen(base, ids, mask, IVLLogitsProcessor(value, attention_mask=mask), do_sample=True, num_return_sequences=2)


def test_processor_assisted_decoding_raises(models):
    base, value, _ = models
    assistant = make_base(hidden=32, layers=1, seed=4)
    ids = random_prompts([5])[0][None]
    with pytest.raises(ValueError, match="assisted"):
        base.generate(ids, logits_processor=[IVLLogitsProcessor(value)], assistant_model=assistant,
                      max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_beams": 2}, "beam search"),
    ({"assistant_model": "x"}, "assisted"),
    ({"prompt_lookup_num_tokens": 3}, "prompt-lookup"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive"),
    ({"num_return_sequences": 2}, "num_return_sequences"),
], ids=["beam-search", "assistant-model", "prompt-lookup", "contrastive", "num-return-sequences"])
def test_guided_lm_unsupported_modes_raise_before_running(models, kwargs, match):
    base, value, _ = models
    model = GuidedCausalLM(base, value)
    calls = []
    handle = base.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            model.generate(random_prompts([3])[0][None], max_new_tokens=2, **kwargs)
    finally:
        handle.remove()
    assert not calls, "the error must come before any forward pass"


def test_value_head_with_bias_or_softcapping_is_rejected(models):
    base, value, _ = models
    import copy

    biased = copy.deepcopy(value)
    biased.lm_head = torch.nn.Linear(32, 256, bias=True)
    with pytest.raises(ValueError, match="bias"):
        IVLLogitsProcessor(biased)
    capped = copy.deepcopy(value)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        GuidedCausalLM(base, capped)


@pytest.mark.parametrize("attr", ["logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier"])
def test_a_logit_scale_other_than_one_is_rejected(models, attr):
    """Cohere, Granite, Falcon-H1 (``logits = lm_head(h) * lm_head_multiplier``, 0.039 in its checkpoints),
    Muse: the fused head is a plain linear map, so such a base or value would give silently scaled logits."""
    base, value, _ = models
    import copy

    for role in ("base", "value"):
        scaled = copy.deepcopy(base if role == "base" else value)
        setattr(scaled.config, attr, 0.0390625)
        with pytest.raises(ValueError, match=f"{attr}=0.0390625"):
            if role == "base":
                GuidedCausalLM(scaled, value)
            else:
                IVLForCausalLM(base, scaled)
        setattr(scaled.config, attr, 1.0)  # a scale of 1 changes nothing: accepted
        GuidedCausalLM(scaled, value) if role == "base" else IVLForCausalLM(base, scaled)


def test_importing_ivl_kernels_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, ivl_kernels; assert 'transformers' not in sys.modules, 'transformers imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

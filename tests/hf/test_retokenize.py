"""Value model with its own tokenizer: text re-tokenised each step, cache reused for the common prefix."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenizers")

from ivl_kernels.hf import IVLLogitsProcessor  # noqa: E402

from ._models import CORPUS, left_pad, make_base, make_value, random_map, remap, train_bpe_tokenizer  # noqa: E402

NEW = 10
ALPHA = 2.0


@pytest.fixture(scope="module")
def setup():
    tok_base = train_bpe_tokenizer(300, CORPUS)
    tok_value = train_bpe_tokenizer(280, CORPUS[::-1][:40])
    base = make_base(vocab=len(tok_base))
    value = make_value(vocab=len(tok_value))
    vmap = random_map(Vb=len(tok_base), Vv=len(tok_value), unmapped=0.1)
    return tok_base, tok_value, base, value, vmap


@torch.no_grad()
def _reference(tok_base, tok_value, base, value, vmap, prompt):
    ids = prompt.clone()
    for _ in range(NEW):
        # The text so far, an incomplete trailing character held back, read as plain text (special-token strings
        # stay characters).
        text = tok_base.decode(ids.tolist(), skip_special_tokens=True).rstrip("\ufffd")
        vids = torch.tensor(tok_value(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])
        z = base(ids[None]).logits[0, -1].double() + ALPHA * remap(value(vids[None]).logits[0, -1].double(), vmap,
                                                                   ids.new_tensor(0).numel() * 0 + base.config.vocab_size)
        ids = torch.cat([ids, z.argmax().view(1)])
    return ids[prompt.shape[0]:]


def test_retokenised_greedy_matches_reference_and_reuses_cache(setup):
    tok_base, tok_value, base, value, vmap = setup
    texts = ["the quick brown", "small models can guide large models", "a value"]
    prompts = [torch.tensor(tok_base(t)["input_ids"]) for t in texts]
    ids, mask = left_pad(prompts, pad_id=tok_base.pad_token_id)
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, attention_mask=mask,
                              value_tokenizer=tok_value, base_tokenizer=tok_base)
    widths = []
    handle = value.get_decoder().register_forward_hook(lambda m, args, kw, out: widths.append(kw["input_ids"].shape[1]),
                                                       with_kwargs=True)
    try:
        out = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW, do_sample=False,
                            pad_token_id=tok_base.pad_token_id)
    finally:
        handle.remove()
    for i, p in enumerate(prompts):
        assert out[i, ids.shape[1]:].tolist() == _reference(tok_base, tok_value, base, value, vmap, p).tolist(), i
    # Incremental: one prompt pass, then a few new value tokens per step, never the whole sequence again. A step
    # may bring a held-back piece too: these random models write invalid UTF-8, and a byte held back until the
    # next token shows it is no character's start arrives then as U+FFFD (3 byte-level value tokens) with the
    # next piece (at most 7 here, against 20 for the prompt pass).
    assert len(widths) <= NEW
    assert max(widths[1:]) <= 8 < widths[0]


def _value_tokens_after(proc, prompt_ids, generated):
    """Feed ``proc`` a one-row prompt then each generated base id; the value model's tokens after the last."""
    ids = prompt_ids[None]
    proc(ids, torch.zeros((1, 300)))  # the base's scores: only added to
    for g in generated:
        ids = torch.cat([ids, torch.tensor([[g]])], 1)
        proc(ids, torch.zeros((1, 300)))
    return list(proc._runner.tokens[0])


def test_generated_text_that_spells_a_special_token_stays_text(setup):
    """The base writing the characters ``<s>`` (ordinary tokens) must not give the value model its BOS id."""
    tok_base, tok_value, base, value, vmap = setup
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, value_tokenizer=tok_value, base_tokenizer=tok_base)
    gen = tok_base(" <s> the", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok_base.bos_token_id not in gen
    seen = _value_tokens_after(proc, torch.tensor(tok_base("the quick")["input_ids"]), gen)
    assert tok_value.bos_token_id not in seen[1:], tok_value.convert_ids_to_tokens(seen)
    assert tok_value.decode(seen, skip_special_tokens=True).endswith(" <s> the")


def test_half_a_character_is_held_back(setup):
    """A base token ending inside a multi-byte character decodes to U+FFFD: the value model never reads it; the
    character's bytes reach it once complete."""
    tok_base, tok_value, base, value, vmap = setup
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, value_tokenizer=tok_value, base_tokenizer=tok_base)
    gen = tok_base(" 𠀋", add_special_tokens=False)["input_ids"]
    assert len(gen) >= 3  # byte-level pieces of a 4-byte character
    prompt = torch.tensor(tok_base("the quick")["input_ids"])
    for k in range(1, len(gen) + 1):
        proc.reset()
        text = tok_value.decode(_value_tokens_after(proc, prompt, gen[:k]), skip_special_tokens=True)
        assert "\ufffd" not in text, (k, text)
    assert text.endswith(" 𠀋")


def test_own_prompt_continuation_reads_as_the_whole_text(setup):
    """``value_input_ids`` + generated text: with a SentencePiece-style value tokenizer (a dummy prefix) the
    generated text is encoded as a continuation, as the whole text would be, not with a second space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok_base, _, base, _, _ = setup
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    sp.decoder = decoders.Metaspace(prepend_scheme="always")
    sp.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>"],
                                                       show_progress=False))
    tok_sp = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")
    value = make_value(vocab=len(tok_sp))
    vmap = random_map(Vb=len(tok_base), Vv=len(tok_sp), unmapped=0.1)
    own = torch.tensor([tok_sp("the quick brown", add_special_tokens=False)["input_ids"]])
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap, value_tokenizer=tok_sp, base_tokenizer=tok_base,
                              value_input_ids=own)
    gen = tok_base(" fox jumps", add_special_tokens=False)["input_ids"]
    seen = _value_tokens_after(proc, torch.tensor(tok_base("the quick brown")["input_ids"]), gen)
    assert seen == tok_sp("the quick brown fox jumps", add_special_tokens=False)["input_ids"], \
        tok_sp.convert_ids_to_tokens(seen)

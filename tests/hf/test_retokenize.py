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
        text = tok_base.decode(ids.tolist(), skip_special_tokens=True)
        vids = torch.tensor(tok_value(text, add_special_tokens=True)["input_ids"])
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
    # Incremental: one prompt pass, then a few new value tokens per step, never the whole sequence again.
    assert len(widths) <= NEW
    assert max(widths[1:]) <= 4 < widths[0]

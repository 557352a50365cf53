"""A prompt per guidance term (proxy-tuning: the chat-tuned expert reads the prompt in its chat format, the base
and the anti-expert read it raw; all continue with the same generated tokens), against a naive loop that
recomputes each model's full forward on its own prompt + the generated tokens at every step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenizers")

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import CORPUS, left_pad, make_base, make_value, random_map, remap, train_bpe_tokenizer  # noqa: E402

NEW = 8
ALPHA = 1.0
TEXTS = ["the quick brown fox", "small models", "a value network learns to steer"]
SYSTEM = "answer briefly"
LLAMA2 = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{prompt} [/INST]"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>> {{ m['content'] }} <</SYS>> "
                 "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %} answer:{% endif %}")


@pytest.fixture(scope="module")
def setup():
    tok = train_bpe_tokenizer(300, CORPUS + ["[INST] <<SYS>> answer briefly <</SYS>> [/INST] answer:"] * 10)
    tok.chat_template = CHAT_TEMPLATE
    V = len(tok)
    base = make_base(vocab=V, seed=21)
    expert = make_value(vocab=V, seed=22)                     # "chat-tuned": reads the chat-formatted prompt
    anti = make_base(vocab=V, hidden=40, seed=23, tie=True)   # "untuned" small model: reads the raw prompt
    return tok, base, expert, anti


def _enc(tok, texts, **kw):
    rows = [torch.tensor(tok(t, **kw)["input_ids"]) for t in texts]
    ids, mask = left_pad(rows, pad_id=tok.pad_token_id)
    return rows, ids, mask


@torch.no_grad()
def _reference(base, expert, anti, raw, chat, n=NEW):
    """Greedy proxy-tuning, no cache: base(raw + gen) + a * (expert(chat + gen) - anti(raw + gen))."""
    gen, steps = [], []
    for _ in range(n):
        g = torch.tensor(gen, dtype=torch.long)
        r, c = torch.cat([raw, g]), torch.cat([chat, g])
        z = base(r[None]).logits[0, -1].double() + ALPHA * (expert(c[None]).logits[0, -1].double()
                                                              - anti(r[None]).logits[0, -1].double())
        steps.append(z)
        gen.append(int(z.argmax()))
    return gen, steps


def _terms(expert, anti, **expert_kw):
    return [GuidanceTerm(expert, ALPHA, **expert_kw), GuidanceTerm(anti, -ALPHA)]


def test_term_inputs_matches_a_full_recompute_loop_and_keeps_caches(setup):
    tok, base, expert, anti = setup
    raw_rows, ids, mask = _enc(tok, TEXTS)
    chat_rows, chat_ids, chat_mask = _enc(tok, [f"[INST] {t} [/INST]" for t in TEXTS])
    assert chat_ids.shape[1] != ids.shape[1]
    lm = GuidedCausalLM(base, _terms(expert, anti))
    widths = []
    handle = expert.get_decoder().register_forward_hook(
        lambda m, args, kw, out: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True,
                          output_logits=True,
                          term_inputs=[{"input_ids": chat_ids, "attention_mask": chat_mask}, None])
    finally:
        handle.remove()
    T = ids.shape[1]
    for r in range(len(TEXTS)):
        gen, steps = _reference(base, expert, anti, raw_rows[r], chat_rows[r])
        assert out.sequences[r, T:].tolist() == gen, f"row {r}"
        for t, z in enumerate(steps):
            torch.testing.assert_close(out.logits[t][r].double(), z, rtol=0, atol=1e-4)
    # The expert's cache is kept: its own prompt once, then one token per step.
    assert widths == [chat_ids.shape[1]] + [1] * (NEW - 1)
    # The expert's prompt matters (otherwise the comparison above proves nothing).
    same = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert not torch.equal(same, out.sequences)
    # A bare id tensor (no padding) is accepted for a batch of one.
    one = lm.generate(ids[2:, -raw_rows[2].shape[0]:], max_new_tokens=NEW, term_inputs=[chat_rows[2][None], None])
    assert one[0, raw_rows[2].shape[0]:].tolist() == out.sequences[2, T:].tolist()


@pytest.mark.parametrize("source", ["prompt_texts", "decoded"])
def test_prompt_template_with_system_prompt(setup, source):
    tok, base, expert, anti = setup
    raw_rows, ids, mask = _enc(tok, TEXTS)
    lm = GuidedCausalLM(base, _terms(expert, anti, prompt_template=LLAMA2, system_prompt=SYSTEM, tokenizer=tok))
    kw = {"prompt_texts": TEXTS} if source == "prompt_texts" else {"tokenizer": tok}
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)
    T = ids.shape[1]
    for r, text in enumerate(TEXTS):
        chat = torch.tensor(tok(f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{text} [/INST]")["input_ids"])
        gen, _ = _reference(base, expert, anti, raw_rows[r], chat)
        assert out[r, T:].tolist() == gen, f"row {r}"


def test_chat_template_and_callable_template(setup):
    tok, base, expert, anti = setup
    raw_rows, ids, mask = _enc(tok, TEXTS)
    T = ids.shape[1]
    # The term's tokenizer defaults to the one given to GuidedCausalLM.
    lm = GuidedCausalLM(base, _terms(expert, anti, prompt_template="chat", system_prompt=SYSTEM), tokenizer=tok)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    for r, text in enumerate(TEXTS):
        rendered = f"<<SYS>> {SYSTEM} <</SYS>> [INST] {text} [/INST] answer:"
        chat = torch.tensor(tok(rendered, add_special_tokens=False)["input_ids"])
        gen, _ = _reference(base, expert, anti, raw_rows[r], chat)
        assert out[r, T:].tolist() == gen, f"row {r}"
    # A callable template, no system prompt.
    lm = GuidedCausalLM(base, _terms(expert, anti, prompt_template=lambda t: f"[INST] {t} [/INST]"), tokenizer=tok)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    for r, text in enumerate(TEXTS):
        gen, _ = _reference(base, expert, anti, raw_rows[r], torch.tensor(tok(f"[INST] {text} [/INST]")["input_ids"]))
        assert out[r, T:].tolist() == gen, f"row {r}"


def test_processor_with_its_own_prompt_matches_guided_lm(setup):
    tok, base, expert, anti = setup
    raw_rows, ids, mask = _enc(tok, TEXTS)
    _, chat_ids, chat_mask = _enc(tok, [f"[INST] {t} [/INST]" for t in TEXTS])
    procs = [IVLLogitsProcessor(expert, alpha=ALPHA, attention_mask=mask, value_input_ids=chat_ids,
                                value_attention_mask=chat_mask),
             IVLLogitsProcessor(anti, alpha=-ALPHA, attention_mask=mask)]
    hf = base.generate(ids, attention_mask=mask, logits_processor=procs, max_new_tokens=NEW, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    lm = GuidedCausalLM(base, _terms(expert, anti))
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                       term_inputs=[{"input_ids": chat_ids, "attention_mask": chat_mask}, None])
    assert torch.equal(hf, ours)
    # Generating the same prompt again restarts with the same value prompt; reset() takes a new one.
    again = base.generate(ids, attention_mask=mask, logits_processor=procs, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    assert torch.equal(again, hf)
    procs[0].reset(attention_mask=mask)  # no value prompt any more: reads the base prompt
    procs[1].reset(attention_mask=mask)
    plain = base.generate(ids, attention_mask=mask, logits_processor=procs, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    assert torch.equal(plain, lm.generate(ids, attention_mask=mask, max_new_tokens=NEW))


@torch.no_grad()
def test_processor_own_prompt_with_retokenisation(setup):
    tok, base, _, _ = setup
    tok_v = train_bpe_tokenizer(280, CORPUS[::-1][:40] + ["[INST] [/INST]"] * 5)
    value = make_value(vocab=len(tok_v), seed=24)
    vmap = random_map(Vb=len(tok), Vv=len(tok_v), unmapped=0.1)
    raw_rows, ids, mask = _enc(tok, TEXTS)
    chat_v = [tok_v(f"[INST] {t} [/INST]")["input_ids"] for t in TEXTS]
    v_ids, v_mask = left_pad([torch.tensor(c) for c in chat_v], pad_id=tok_v.pad_token_id)
    proc = IVLLogitsProcessor(value, alpha=2.0, vocab_map=vmap, attention_mask=mask, base_tokenizer=tok,
                              value_tokenizer=tok_v, value_input_ids=v_ids, value_attention_mask=v_mask)
    out = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=NEW, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    T = ids.shape[1]
    for r in range(len(TEXTS)):
        seq = raw_rows[r].clone()
        prompt_text = tok.decode(raw_rows[r].tolist(), skip_special_tokens=True)

        def encode(text):  # plain text: special-token strings stay characters
            return tok_v(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

        for _ in range(NEW):
            # The generated text: the row's text past the prompt's, an incomplete last character held back,
            # encoded as a continuation (after an anchor "a" whose ids it keeps as a prefix; else alone).
            full = tok.decode(seq.tolist(), skip_special_tokens=True).rstrip("\ufffd")
            assert full.startswith(prompt_text)
            gen_text = full[len(prompt_text):]
            both, anchor = encode("a" + gen_text), encode("a")
            cont = (both[len(anchor):] if both[:len(anchor)] == anchor else encode(gen_text)) if gen_text else []
            vids = torch.tensor(chat_v[r] + cont)
            z = base(seq[None]).logits[0, -1].double() + 2.0 * remap(value(vids[None]).logits[0, -1].double(), vmap,
                                                                     len(tok))
            seq = torch.cat([seq, z.argmax().view(1)])
        assert out[r, T:].tolist() == seq[raw_rows[r].shape[0]:].tolist(), f"row {r}"


def test_bad_term_prompts_raise_before_running(setup):
    tok, base, expert, anti = setup
    _, ids, mask = _enc(tok, TEXTS)
    _, chat_ids, chat_mask = _enc(tok, [f"[INST] {t} [/INST]" for t in TEXTS])
    lm = GuidedCausalLM(base, _terms(expert, anti))
    calls = []
    handle = base.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="2 guidance terms"):
            lm.generate(ids, attention_mask=mask, term_inputs=[chat_ids])
        with pytest.raises(ValueError, match="rows"):
            lm.generate(ids, attention_mask=mask, term_inputs=[chat_ids[:2], None])
        right = chat_mask.flip(1)
        with pytest.raises(ValueError, match="left"):
            lm.generate(ids, attention_mask=mask, term_inputs=[{"input_ids": chat_ids, "attention_mask": right}, None])
        with pytest.raises(ValueError, match=r"\[0, "):
            lm.generate(ids, attention_mask=mask, term_inputs=[chat_ids + 1000, None])
        with pytest.raises(TypeError, match="one entry per guidance term"):
            lm.generate(ids, attention_mask=mask, term_inputs=chat_ids)
        templated = GuidedCausalLM(base, _terms(expert, anti, prompt_template=LLAMA2))
        with pytest.raises(ValueError, match="prompt_texts"):
            templated.generate(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="placeholder"):
            GuidedCausalLM(base, _terms(expert, anti, prompt_template="[INST]")).generate(
                ids, attention_mask=mask, tokenizer=tok)
        with pytest.raises(ValueError, match="3 strings"):
            templated.generate(ids, attention_mask=mask, prompt_texts=TEXTS[:2], tokenizer=tok)
    finally:
        handle.remove()
    assert not calls, "the errors must come before any forward pass"
    with pytest.raises(ValueError, match="left"):
        proc = IVLLogitsProcessor(expert, attention_mask=mask, value_input_ids=chat_ids, value_attention_mask=right)
        base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=2, pad_token_id=0)

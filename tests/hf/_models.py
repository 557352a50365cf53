"""Tiny random models and tokenizers for the transformers-integration tests (no downloads)."""

from __future__ import annotations

import torch

BASE_VOCAB = 300
VALUE_VOCAB = 256


def make_base(vocab=BASE_VOCAB, hidden=48, layers=2, tie=False, seed=0):
    """A Llama-architecture base model, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def make_value(vocab=VALUE_VOCAB, hidden=32, layers=2, tie=True, seed=1):
    """A Qwen2-architecture value network, fp32, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None)
    return Qwen2ForCausalLM(cfg).eval()


def random_map(Vb=BASE_VOCAB, Vv=VALUE_VOCAB, unmapped=0.2, seed=3):
    """A many-to-one base -> value map with about ``unmapped`` of the entries -1."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, Vv, (Vb,), generator=g)
    m[torch.rand(Vb, generator=g) < unmapped] = -1
    return m.to(torch.int32)


def remap(value_logits, vocab_map, Vb, fill=0.0):
    """Naive remap ``[..., Vv] -> [..., Vb]`` (identity with an unmapped tail when ``vocab_map`` is None)."""
    Vv = value_logits.shape[-1]
    if vocab_map is None:
        vocab_map = torch.where(torch.arange(Vb) < Vv, torch.arange(Vb), -1)
    vocab_map = vocab_map.long()
    out = value_logits[..., vocab_map.clamp(min=0)]
    return out.masked_fill(vocab_map < 0, fill)


def value_input_ids(ids, vocab_map, value_vocab, fallback=0):
    """Naive translation of base ids into value-model input ids (documented in ivl_kernels.hf._common)."""
    if vocab_map is None:
        return torch.where(ids < value_vocab, ids, fallback)
    v = vocab_map.long()[ids]
    return torch.where(v >= 0, v, fallback)


@torch.no_grad()
def reference_sequence_logits(base, terms, ids, suppress_from=None):
    """Guided logits ``[T, Vb]`` (float64) at every position of one unpadded sequence ``ids [T]``, each model run
    on the whole sequence by its own forward: ``base + sum alpha * remap(value)``, ids ``>= suppress_from`` -inf.
    ``terms``: list of (model, alpha, map)."""
    z = base(ids[None]).logits[0].double()
    Vb = z.shape[-1]
    for model, alpha, vmap in terms:
        Vv = model.config.vocab_size
        v = model(value_input_ids(ids, vmap, Vv)[None]).logits[0].double()
        z = z + alpha * remap(v, vmap, Vb)
    if suppress_from is not None:
        z[:, suppress_from:] = float("-inf")
    return z


def reference_next_logits(base, terms, ids):
    """Guided next-token logits ``[Vb]`` for one unpadded sequence ``ids [T]`` (no cache)."""
    return reference_sequence_logits(base, terms, ids)[-1]


def reference_token_log_probs(base, terms, ids, suppress_from=None):
    """``[T - 1]`` float64: ``log p_guided(ids[t] | ids[:t])`` for ``t >= 1``."""
    logp = torch.log_softmax(reference_sequence_logits(base, terms, ids, suppress_from), dim=-1)
    return logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)


def reference_greedy(base, terms, prompt, new_tokens):
    ids = prompt.clone()
    for _ in range(new_tokens):
        z = reference_next_logits(base, terms, ids)
        ids = torch.cat([ids, z.argmax().view(1)])
    return ids[prompt.shape[0]:]


def left_pad(prompts, pad_id=0):
    """``[B, T]`` ids and mask, left-padded."""
    T = max(p.shape[0] for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.shape[0]:] = p
        mask[i, T - p.shape[0]:] = 1
    return ids, mask


def random_prompts(lengths, vocab=BASE_VOCAB, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g) for n in lengths]


def train_bpe_tokenizer(vocab_size, corpus, seed_text=""):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in-process (different sizes -> different merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a value network learns to steer the base model",
    "guided decoding adds the value logits to the base logits",
    "small models can guide large models when vocabularies differ",
    "the dog and the fox are friends in the story of the lazy afternoon",
] * 20


def guided_setup(kind, seed=0, tokenizer=None):
    """``(GuidedCausalLM, reference terms [(model, alpha, map)], base)``. ``"single"``: one value network,
    identity map. ``"proxy"``: an expert through a many-to-one map with unmapped ids, and an anti-expert with a
    negative alpha, a smaller vocabulary and no map (base ids past it unmapped)."""
    from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM

    base = make_base(seed=seed)
    if kind == "single":
        value = make_value(seed=seed + 1)
        return GuidedCausalLM(base, value, alpha=0.7, tokenizer=tokenizer), [(value, 0.7, None)], base
    expert, anti = make_value(seed=seed + 1), make_value(seed=seed + 2, hidden=24)
    vmap = random_map(seed=seed + 3)
    lm = GuidedCausalLM(base, [GuidanceTerm(expert, 1.3, vmap), GuidanceTerm(anti, -0.6)], tokenizer=tokenizer)
    return lm, [(expert, 1.3, vmap), (anti, -0.6, None)], base


def save_guided(tmp_path, lm, terms, base):
    """Save the models under ``tmp_path`` and a guided checkpoint naming them (``tmp_path/guided``, with the
    model's tokenizer); returns ``(directory, lm)``."""
    base.save_pretrained(tmp_path / "base")
    refs = []
    for i, (model, _, _) in enumerate(terms):
        model.save_pretrained(tmp_path / f"term{i}")
        refs.append(str(tmp_path / f"term{i}"))
    lm.save_pretrained(str(tmp_path / "guided"), base=str(tmp_path / "base"), terms=refs)
    return str(tmp_path / "guided"), lm

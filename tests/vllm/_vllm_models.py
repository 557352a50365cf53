"""Tiny saved models for the vLLM tests: head sizes vLLM's CPU attention supports (32, 64), weights drawn wide
(std 0.08) so greedy choices are not near-ties, a byte-level BPE tokenizer trained offline."""

from __future__ import annotations

import os

import torch

from tests.hf._models import CORPUS, train_bpe_tokenizer

BASE_VOCAB = 300
SMALL_VOCAB = 256
BIG_VOCAB = 320


def _widen(model, std=0.08, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make_llama(vocab=BASE_VOCAB, hidden=128, heads=2, kv_heads=1, layers=2, seed=0, max_pos=512, tie=False):
    """Llama architecture, head size hidden / heads (64 by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                      torch_dtype="float32")
    return _widen(LlamaForCausalLM(cfg), seed=seed)


def make_qwen2(vocab=BASE_VOCAB, hidden=64, heads=2, kv_heads=1, layers=2, seed=1, max_pos=512, tie=True):
    """Qwen2 architecture, head size 32 by default (another head size than the base's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                      torch_dtype="float32")
    return _widen(Qwen2ForCausalLM(cfg), seed=seed)


def random_map(Vb, Vv, unmapped=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, Vv, (Vb,), generator=g)
    m[torch.rand(Vb, generator=g) < unmapped] = -1
    return m.to(torch.int32)


def save_models(root) -> dict:
    """Save the test models under ``root``; returns name -> path (and 'tok' -> the tokenizer)."""
    tok = train_bpe_tokenizer(BASE_VOCAB, CORPUS)
    specs = {
        "base": lambda: make_llama(seed=0),
        "value": lambda: make_qwen2(seed=1),
        "anti": lambda: make_qwen2(seed=7),
        "small": lambda: make_qwen2(vocab=SMALL_VOCAB, seed=2),
        "big": lambda: make_qwen2(vocab=BIG_VOCAB, seed=4),
        "short": lambda: make_qwen2(seed=5, max_pos=64),
    }
    paths = {}
    for name, build in specs.items():
        paths[name] = os.path.join(str(root), name)
        build().save_pretrained(paths[name])
        if name != "big":  # "small" shares the base tokenizer with a head cut at 256 ids (Qwen2.5-7B/0.5B's case)
            tok.save_pretrained(paths[name])
    paths["tok"] = tok
    return paths


PROXY_ALPHAS = (1.0, -0.5, 0.3, 0.2, 0.4)


def write_proxy(path, models, alphas):
    """The ``proxy`` checkpoint's five terms with the given alphas (the per-request tests' separate
    checkpoints)."""
    from ivl_kernels.hf.checkpoint import write_guided_checkpoint
    from ivl_kernels.vocab import VocabMap

    small_map = VocabMap(random_map(BASE_VOCAB, SMALL_VOCAB, seed=3), BASE_VOCAB, SMALL_VOCAB)
    big_map = VocabMap(random_map(BASE_VOCAB, BIG_VOCAB, seed=9), BASE_VOCAB, BIG_VOCAB)
    models_and_maps = [(models["value"], None), (models["anti"], None), (models["small"], small_map),
                       (models["small"], None), (models["big"], big_map)]
    write_guided_checkpoint(path, models["base"], [
        {"model": m, "alpha": float(a), **({"map": vmap} if vmap is not None else {})}
        for (m, vmap), a in zip(models_and_maps, alphas)], suppress_ids_from=290)
    return path

"""``compile_step=True``: the static cache's decode step with each backbone's forward through ``torch.compile``
(``GuidedCausalLM.generate`` and ``IVLLogitsProcessor``). On CPU inductor compiles C++; the same tokens and logits
as the uncompiled static step, one compile per backbone and shape (a second call of the same shapes compiles
nothing), and the arguments checked before any work. Generation runs without autograd on every path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._capability import skip_unless_compile_step, skip_unless_static_cache  # noqa: E402
from ._models import (CORPUS, left_pad, make_base, make_value, random_map, random_prompts,  # noqa: E402
                      train_bpe_tokenizer)

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code and counters of one test neither serve nor count in another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _two_terms(device="cpu", dtype=torch.float32, backend="torch"):
    base, value, anti = make_base(), make_value(), make_value(seed=9)
    vmap = random_map(seed=3).to(device)
    terms = [GuidanceTerm(value.to(device, dtype), 1.0, vmap), GuidanceTerm(anti.to(device, dtype), -0.5, vmap)]
    return GuidedCausalLM(base.to(device, dtype), terms, backend=backend)


def _generate(lm, ids, mask, **kw):
    return lm.generate(ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                       output_logits=True, **kw)


def _owners(lm):
    return [lm.base_model, *lm.value_models]


def test_compiled_decode_step_matches_the_static_one_and_compiles_once():
    lm = _two_terms()
    ids, mask = left_pad(random_prompts([6, 2, 9], seed=11))
    skip_unless_compile_step(lambda: _generate(lm, ids, mask, compile_step=True), *_owners(lm))
    eager = _generate(lm, ids, mask, cache_implementation="static")
    before = _unique_graphs()
    compiled = _generate(lm, ids, mask, compile_step=True)   # the default cache: static, chosen for compiling
    decoder = lm._decode_cache[2]
    assert all(r.compiled for r in decoder.runners) and len(decoder.runners) == 3
    assert _unique_graphs() > before
    assert torch.equal(eager.sequences, compiled.sequences)
    for a, b in zip(eager.logits, compiled.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # Another prompt of the same batch size and bucket: the runners (and their compiled code) are reused.
    ids2, mask2 = left_pad(random_prompts([3, 8, 5], seed=12))
    graphs = _unique_graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _generate(lm, ids2, mask2, compile_step=True)
    assert _unique_graphs() == graphs and lm._decode_cache[2] is decoder
    ref = _generate(lm, ids2, mask2, cache_implementation="static")
    assert torch.equal(again.sequences, ref.sequences)
    for a, b in zip(ref.logits, again.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_processor_compiled_decode_step_matches_the_static_one():
    base, value, vmap = make_base(), make_value(), random_map()
    ids, mask = left_pad(random_prompts([5, 11, 2]))
    skip_unless_compile_step(lambda: base.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                                   pad_token_id=0, logits_processor=[IVLLogitsProcessor(
                                                       value, vocab_map=vmap, attention_mask=mask,
                                                       max_new_tokens=8, compile_step=True)]), value)
    outs = {}
    for name, kw in (("static", dict(cache_implementation="static")), ("compiled", dict(compile_step=True))):
        proc = IVLLogitsProcessor(value, alpha=1.5, vocab_map=vmap, attention_mask=mask, max_new_tokens=8, **kw)
        before = _unique_graphs()
        outs[name] = base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=8,
                                   do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        assert proc._static is not None and proc._static[0].compiled == (name == "compiled")
        assert (_unique_graphs() > before) == (name == "compiled")
    assert torch.equal(outs["static"].sequences, outs["compiled"].sequences)
    for a, b in zip(outs["static"].scores, outs["compiled"].scores):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compile_step_arguments_are_checked_before_any_work(monkeypatch):
    lm = _two_terms()
    ids, mask = left_pad(random_prompts([3], seed=1))
    calls = []
    monkeypatch.setattr(type(lm.base_model.model), "forward",
                        lambda *a, **k: calls.append(1) or pytest.fail("a model ran"))
    with pytest.raises(TypeError, match="compile_step must be True or False"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, compile_step="yes")
    with pytest.raises(ValueError, match="compile_step=True .* not 'dynamic'"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, compile_step=True, cache_implementation="dynamic")
    value = make_value()
    with pytest.raises(TypeError, match="compile_step must be True or False"):
        IVLLogitsProcessor(value, compile_step=1)
    with pytest.raises(ValueError, match="compile_step=True .* not 'dynamic'"):
        IVLLogitsProcessor(value, compile_step=True, cache_implementation="dynamic")
    # Two tokenizers: the value model runs on its own re-tokenised ids, through a dynamic cache.
    tok_base, tok_value = train_bpe_tokenizer(300, CORPUS), train_bpe_tokenizer(280, CORPUS)
    with pytest.raises(ValueError, match="compile_step=True needs one tokenizer for both models"):
        IVLLogitsProcessor(value, compile_step=True, base_tokenizer=tok_base, value_tokenizer=tok_value,
                           vocab_map=random_map(Vb=len(tok_base), Vv=256))
    monkeypatch.setattr(type(value), "_can_compile_fullgraph", False, raising=False)  # 4.50: not declared
    with pytest.raises(ValueError, match="compile_step=True needs a static cache.*_can_compile_fullgraph"):
        IVLLogitsProcessor(value, compile_step=True)
    with pytest.raises(ValueError, match="compile_step=True needs a static cache for every model"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, compile_step=True)
    assert not calls


def test_a_failed_compile_names_the_switch(monkeypatch):
    from ivl_kernels.hf import _static

    def broken(module, **kw):
        def run(**kwargs):
            raise RuntimeError("inductor could not lower this")
        return run

    monkeypatch.setattr(_static.torch, "compile", broken)
    lm = _two_terms()
    ids, mask = left_pad(random_prompts([4, 2], seed=3))
    skip_unless_compile_step(lambda: lm.generate(ids, attention_mask=mask, max_new_tokens=3, compile_step=True),
                             *_owners(lm))
    said = "torch.compile'd decode step .*inductor could not lower.*compile_step=False"
    with pytest.raises(RuntimeError, match=said):
        lm.generate(ids, attention_mask=mask, max_new_tokens=3, compile_step=True)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_runs_without_autograd(cache):
    """Models whose parameters require grad (transformers' default) generate without recording autograd: the
    static decode step ran every backbone with autograd on before (a graph of saved activations per token)."""
    lm = _two_terms()
    assert any(p.requires_grad for p in lm.base_model.parameters())
    modes = []
    for m in (lm._base_backbone, *[t.backbone for t in lm._prepared]):
        m.register_forward_pre_hook(lambda mod, args: modes.append(torch.is_grad_enabled()))
    ids, mask = left_pad(random_prompts([4, 7], seed=5))
    if cache == "static":
        skip_unless_static_cache(lambda: _generate(lm, ids, mask, cache_implementation="static"), *_owners(lm))
    with torch.enable_grad():
        _generate(lm, ids, mask, cache_implementation=cache)
    assert modes and not any(modes)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_compiled_decode_step_in_a_cuda_graph():
    """On CUDA the compiled step is captured after its two warm-up steps; replayed, it gives the same logits as
    the same compiled step run eagerly (the same kernels), and the tokens of the uncompiled static step."""
    lm = _two_terms(device="cuda", dtype=torch.bfloat16, backend="auto")
    ids, mask = left_pad(random_prompts([6, 2, 9], seed=11))
    ids, mask = ids.cuda(), mask.cuda()
    eager = _generate(lm, ids, mask, compile_step=True, cuda_graph=False)
    graph = _generate(lm, ids, mask, compile_step=True, cuda_graph=True)
    assert lm._decode_cache[2].graph is not None
    plain = _generate(lm, ids, mask, cache_implementation="static")
    assert torch.equal(eager.sequences, graph.sequences)
    for a, b in zip(eager.logits, graph.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # Inductor's fusions round bf16 differently from eager kernels: the prompt's step (eager on both) agrees.
    torch.testing.assert_close(plain.logits[0], graph.logits[0], rtol=0, atol=0)

"""``GuidedCausalLM.generate(cache_implementation="static")``: the same tokens and logits as the dynamic cache, and
a decode step that reads no tensor value on the host, transformers' forward included (what a CUDA-graph capture
requires). The captured graph itself runs in the GPU test at the end."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM  # noqa: E402

from ._models import VALUE_VOCAB, left_pad, make_base, make_value, random_map, random_prompts  # noqa: E402
from .test_decode_syncs import _ScalarReads  # noqa: E402
from ._capability import skip_unless_static_cache  # noqa: E402
from .test_generation import WritesAtCachePosition, expected_static_positions  # noqa: E402

HAS_GPU = torch.cuda.is_available()


@pytest.fixture
def static_cache():
    """Skips where transformers builds no ``StaticCache`` as the package does (4.50-4.55), after checking that a
    forced static generate is refused there, with the reason (not run)."""
    ids, mask = left_pad(random_prompts([3], seed=1))
    skip_unless_static_cache(lambda: _lm(1, False).generate(ids, attention_mask=mask, max_new_tokens=2,
                                                            cache_implementation="static"),
                             make_base(), make_value())


def _lm(terms: int, mapped: bool, device="cpu", dtype=torch.float32, backend="torch"):
    base = make_base().to(device, dtype)
    value = make_value().to(device, dtype)
    vmap = random_map(seed=3).to(device) if mapped else None
    if terms == 1:
        return GuidedCausalLM(base, value, alpha=0.8, vocab_map=vmap, backend=backend)
    anti = make_value(seed=9).to(device, dtype)
    return GuidedCausalLM(base, [GuidanceTerm(value, 1.0, vmap), GuidanceTerm(anti, -0.5, vmap)], backend=backend)


def _generate(lm, ids, mask, **kw):
    return lm.generate(ids, attention_mask=mask, max_new_tokens=7, return_dict_in_generate=True,
                       output_logits=True, **kw)


@pytest.mark.parametrize("terms", [1, 2], ids=["one-term", "two-terms"])
@pytest.mark.parametrize("mapped", [False, True], ids=["identity", "map"])
@pytest.mark.usefixtures("static_cache")
def test_static_cache_matches_dynamic(terms, mapped):
    lm = _lm(terms, mapped)
    ids, mask = left_pad(random_prompts([6, 2, 9], seed=11))
    dyn = _generate(lm, ids, mask)
    sta = _generate(lm, ids, mask, cache_implementation="static")
    assert torch.equal(dyn.sequences, sta.sequences)
    for a, b in zip(dyn.logits, sta.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("static_cache")
def test_static_cache_with_a_prompt_per_term_and_sampling():
    lm = _lm(2, False)
    ids, mask = left_pad(random_prompts([5, 8], seed=2))
    own_ids, own_mask = left_pad(random_prompts([11, 4], vocab=VALUE_VOCAB, seed=4))
    kw = dict(term_inputs=[{"input_ids": own_ids, "attention_mask": own_mask}, None], do_sample=True, top_k=20)
    dyn = _generate(lm, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    sta = _generate(lm, ids, mask, generator=torch.Generator().manual_seed(0), cache_implementation="static", **kw)
    assert torch.equal(dyn.sequences, sta.sequences)
    for a, b in zip(dyn.logits, sta.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("static_cache")
def test_static_decode_step_reads_no_value_on_the_host():
    """Every host read during a static generate is the prompt's (eager, transformers' mask construction) or the
    EOS check: the decode steps themselves read none, in ivl_kernels or in transformers. (No map here: a CPU map is
    range-checked on every call by design; a CUDA map once per tensor, and never inside a capture.)"""
    lm = _lm(2, False)
    ids, mask = left_pad(random_prompts([6, 2, 9], seed=11))
    counts = {}
    for steps in (3, 8):
        lm.clear_decode_cache()  # both calls fresh: a reused set resets its caches in the (eager) prompt phase
        with torch.no_grad(), _ScalarReads() as reads:
            out = lm.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=10_000,
                              cache_implementation="static")
        assert out.shape[1] == ids.shape[1] + steps
        counts[steps] = reads.by_origin
    extra = {k: counts[8][k] - counts[3].get(k, 0) for k in counts[8] if counts[8][k] != counts[3].get(k, 0)}
    # Five more steps: five EOS checks (guided.py), nothing else.
    assert sum(extra.values()) == 5 and all("guided.py" in k for k in extra), extra


def test_static_cache_errors():
    lm = _lm(1, False)
    ids, mask = left_pad(random_prompts([3], seed=1))
    with pytest.raises(ValueError, match="cache_implementation must be 'dynamic' or 'static'"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="paged")
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, cuda_graph=True)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.usefixtures("static_cache")
def test_cuda_graph_decode_matches_eager(backend):
    lm = _lm(2, True, device="cuda", dtype=torch.bfloat16, backend=backend)
    ids, mask = left_pad(random_prompts([6, 2, 9], seed=11))
    ids, mask = ids.cuda(), mask.cuda()
    eager = _generate(lm, ids, mask, cache_implementation="static", cuda_graph=False)
    graph = _generate(lm, ids, mask, cache_implementation="static")
    default = _generate(lm, ids, mask)       # CUDA default: static + graph, the graph captured above replayed
    dyn = _generate(lm, ids, mask, cache_implementation="dynamic")
    assert torch.equal(eager.sequences, graph.sequences) and torch.equal(graph.sequences, default.sequences)
    for a, b, c in zip(eager.logits, graph.logits, default.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same kernels, replayed
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    # bf16 models: the dynamic cache's attention may differ in rounding; the first step (the prompt) must agree.
    torch.testing.assert_close(dyn.logits[0], eager.logits[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_no_transformers_deprecation_warnings(cache, request):
    """transformers announced ``past_key_values=`` for removal (5.40) where ``cache=`` exists: the package passes
    the keyword each model's forward names (``_common.cache_kwarg``), so neither decode path warns."""
    import warnings

    if cache == "static":
        request.getfixturevalue("static_cache")
    lm = _lm(2, True)
    ids, mask = left_pad(random_prompts([5, 3], seed=2))
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _generate(lm, ids, mask, **kw)
    ours = [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and ("past_key_values" in str(w.message) or "ivl_kernels" in (w.filename or ""))]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


@pytest.mark.usefixtures("static_cache")
def test_static_runners_are_reused_across_calls_with_fresh_results():
    """A second static call of the same batch size and bucketed lengths reuses the runners (and, on CUDA, the
    captured graph): caches reset and buffers rewritten in place, so its tokens and logits equal a fresh model's,
    for another prompt of the same batch size too."""
    lm = _lm(2, True)
    a_ids, a_mask = left_pad(random_prompts([6, 2, 9], seed=11))
    b_ids, b_mask = left_pad(random_prompts([3, 8, 5], seed=12))
    first = _generate(lm, a_ids, a_mask, cache_implementation="static")
    runners = lm._decode_cache[1]
    again = _generate(lm, b_ids, b_mask, cache_implementation="static")
    assert lm._decode_cache[1] is runners
    lm.clear_decode_cache()
    fresh = _generate(lm, b_ids, b_mask, cache_implementation="static")
    dyn = _generate(lm, b_ids, b_mask)
    assert torch.equal(again.sequences, fresh.sequences) and torch.equal(again.sequences, dyn.sequences)
    for x, y in zip(again.logits, fresh.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert first.sequences.shape[0] == 3


@pytest.mark.usefixtures("static_cache")
def test_static_runners_give_the_columns_they_write():
    """transformers 4.5x writes a ``StaticCache`` column where the forward's ``cache_position`` says and estimates
    it, given none, from the non-zero key rows of batch row 0: a left-padded row 0 whose padding keys are zero
    (pad id 0: a zero embedding row; Llama's k_proj has no bias) made it short and the static tokens silently
    differed from the dynamic ones. Emulated on any release (``WritesAtCachePosition``): every runner gives each
    call the columns it writes, and tokens and logits are the dynamic cache's."""
    why = WritesAtCachePosition.emulable()
    if why:
        pytest.skip(f"cannot emulate transformers 4.5x's static cache here: {why}")
    lm = _lm(2, True)
    lm._base_backbone = WritesAtCachePosition(lm._base_backbone)
    for term in lm._prepared:
        term.backbone = WritesAtCachePosition(term.backbone)
    wrappers = [lm._base_backbone] + [t.backbone for t in lm._prepared]
    ids, mask = left_pad(random_prompts([6, 2, 9], seed=11))
    dyn = _generate(lm, ids, mask)
    assert all(w.positions == [] for w in wrappers)
    sta = _generate(lm, ids, mask, cache_implementation="static")
    for w in wrappers:
        assert w.positions == expected_static_positions(ids.shape[1], 6)  # 7 new tokens: the prompt + 6 steps
    assert torch.equal(dyn.sequences, sta.sequences)
    for a, b in zip(dyn.logits, sta.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_default_cache_is_dynamic_on_cpu_and_static_on_cuda(monkeypatch, caplog):
    """The default decode mode: dynamic on CPU; on CUDA static with a graph when every model supports a
    StaticCache, else dynamic, said once at INFO level. Explicit arguments force either."""
    import logging

    from ivl_kernels.hf import _static

    lm = _lm(1, False)
    owners = [lm.base_model] + list(lm.value_models)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # Static by default where every model declares support (transformers 4.50's Llama and Qwen2 do not).
    supported = not any(_static.static_supported(o) for o in owners)
    assert lm._decode_mode(None, None, cpu, owners) == (False, False)
    assert lm._decode_mode(None, None, cuda, owners) == (supported, supported)
    assert lm._decode_mode(None, False, cuda, owners) == (False, False)
    assert lm._decode_mode("dynamic", None, cuda, owners) == (False, False)
    assert lm._decode_mode("static", False, cuda, owners) == (True, False)
    assert lm._decode_mode("static", None, cpu, owners) == (True, False)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        lm._decode_mode("dynamic", True, cuda, owners)
    with pytest.raises(TypeError, match="cuda_graph must be"):
        lm._decode_mode(None, "yes", cuda, owners)
    monkeypatch.setattr(type(lm.base_model), "_can_compile_fullgraph", False, raising=False)
    monkeypatch.setattr(_static, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="ivl_kernels.hf"):
        assert lm._decode_mode(None, None, cuda, owners) == (False, False)
        assert lm._decode_mode(None, None, cuda, owners) == (False, False)
    said = [r.getMessage() for r in caplog.records if "dynamic cache" in r.getMessage()]
    assert len(said) == 1 and "_can_compile_fullgraph" in said[0]

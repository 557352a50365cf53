"""GuidedCausalLM(pack_heads=True): both LM heads become views of one buffer, the fused head and the guided loss
recognise them (one GEMM from GEMM_MIN_ROWS rows on the Triton backend), and every output equals the unpacked
model's: logits, loss, generated tokens; tied embeddings stay tied; refusals."""

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels._triton import HAS_TRITON, interpreter_enabled  # noqa: E402
from ivl_kernels.hf import GuidedCausalLM  # noqa: E402
from ivl_kernels.ops import guided_logits as gl  # noqa: E402
from ivl_kernels.ops.packed_heads import packed_view  # noqa: E402

from ._models import make_base, make_value, random_map  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and interpreter_enabled() else [])


def _pair(backend, pack):
    # Fresh models for each side: packing replaces the models' head parameters.
    return GuidedCausalLM(make_base(), make_value(), alpha=0.7, fill=-1.5, backend=backend, pack_heads=pack)


def _ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 256, (B, T), generator=g)


def test_heads_become_views_of_one_buffer_and_ties_hold():
    model = _pair("torch", True)
    base_w, value_w = model.base_model.lm_head.weight, model.value_models[0].lm_head.weight
    assert model._base_weight is base_w and model._prepared[0].head.weight is value_w
    assert base_w.untyped_storage().data_ptr() == value_w.untyped_storage().data_ptr()
    assert packed_view(base_w, value_w, min(base_w.shape[0], value_w.shape[0])) is not None
    # The value model ties its input embeddings to its head: still one parameter, read from the buffer.
    assert model.value_models[0].get_input_embeddings().weight is value_w
    assert model.base_model.get_input_embeddings().weight is not base_w  # untied base stays untied
    ref = _pair("torch", False)
    torch.testing.assert_close(base_w, ref.base_model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(value_w, ref.value_models[0].lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_logits_and_loss_equal_unpacked(backend, monkeypatch):
    calls = []
    real = gl._launch._launch_packed
    monkeypatch.setattr(gl._launch, "_launch_packed", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ids = _ids(3, 50)                       # 150 rows >= GEMM_MIN_ROWS: the head's GEMM path
    assert ids.numel() >= gl.GEMM_MIN_ROWS
    out = {}
    for pack in (False, True):
        model = _pair(backend, pack)
        # With labels the loss comes from the fused loss (no logits built); without, the logits from the head.
        out[pack] = (model(input_ids=ids).logits, model(input_ids=ids, labels=ids).loss)
    assert torch.isfinite(out[True][0]).all()
    for name, a, b in zip(("logits", "loss"), out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)
    if backend == "triton":
        assert calls, "the packed GEMM path was not taken"


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreter)")
def test_trained_value_head_gets_the_unpacked_gradient_through_the_fused_loss():
    # Training reads the heads as GuidedCausalLM packed them: the guided loss's combined path (one GEMM per chunk
    # over the packed buffer) must give the value head the same gradient as unpacked heads.
    import ivl_kernels as ivl

    ids = _ids(2, 40, seed=2)
    grads, losses = {}, {}
    for pack in (False, True):
        model = _pair("triton", pack)
        value = model.value_models[0]
        for p in value.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            bh = model._base_backbone(input_ids=ids).last_hidden_state.flatten(0, 1)
        vh = model._prepared[0].backbone(input_ids=ids).last_hidden_state.flatten(0, 1)
        loss = ivl.fused_guided_cross_entropy(vh, value.lm_head.weight, ids.flatten(), base_hidden=bh,
                                              base_weight=model._base_weight.detach(), alpha=0.7, fill=-1.5,
                                              backend="triton")
        loss.backward()
        losses[pack], grads[pack] = loss.detach(), value.lm_head.weight.grad.clone()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-5 * grads[False].abs().max().item())


def test_generate_tokens_equal_unpacked():
    ids = _ids(2, 7, seed=1)
    seqs = [_pair("torch", pack).generate(ids, max_new_tokens=6, do_sample=False) for pack in (False, True)]
    assert torch.equal(seqs[0], seqs[1])


def test_refusals_name_pack_heads():
    with pytest.raises(TypeError, match="pack_heads"):
        GuidedCausalLM(make_base(), make_value(), pack_heads="yes")
    with pytest.raises(ValueError, match="pack_heads=True needs the first guidance term without a vocabulary map"):
        GuidedCausalLM(make_base(), make_value(), vocab_map=random_map(), pack_heads=True)
    base = make_base()
    before = base.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="one dtype on one device"):
        GuidedCausalLM(base, make_value().to(torch.float64), pack_heads=True)
    assert torch.equal(base.lm_head.weight, before)  # refused before anything was replaced

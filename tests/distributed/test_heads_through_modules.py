"""``IVLForCausalLM`` reads its models' weights through their modules (one process, no spawn).

What DDP / FSDP2 / DeepSpeed ZeRO-3 rely on, checked without them: both models' root forwards and both LM heads'
module calls run (with every hook registered on them), the loss is the tensor the roots return (where wrappers
register their pre-backward hooks), an LM head whose weight holds its values only while the head module runs
(forward, and backward after a hook on its output, as ZeRO-3 does) gives the unwrapped result, accelerate's hook
on a head still runs, and the heads' own forwards are back after every call, failed ones included.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import _dist_harness as H  # noqa: E402
from ivl_kernels.hf import IVLForCausalLM  # noqa: E402


class GatheredOnlyInside:
    """A ZeRO-3-like head weight: empty outside the head module's forward; its values are put back by a forward
    pre-hook, and for the backward pass by a hook on the head's output (the output must be where the gradient
    comes from, or the backward reads an empty weight)."""

    def __init__(self, head):
        self.full = head.weight.data
        self.calls = 0
        head.weight.data = torch.empty(0)
        head.register_forward_pre_hook(self.pre)
        head.register_forward_hook(self.post)

    def pre(self, module, args):
        self.calls += 1
        module.weight.data = self.full

    def post(self, module, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            def regather(grad):
                module.weight.data = self.full
                return grad

            out.register_hook(regather)
        module.weight.data = torch.empty(0)


def _value_grads(model):
    return {n: p.grad.clone() for n, p in model.value_model.named_parameters()}


def test_weights_that_exist_only_inside_their_modules():
    base, value = H.make_base(), H.make_value(tie=False)
    ids, mask, labels = H.batch(0)
    want = IVLForCausalLM(base, value, vocab_map=H.random_map(), backend="torch")
    want_loss = want(input_ids=ids, attention_mask=mask, labels=labels).loss
    want_loss.backward()
    want_grads = _value_grads(want)
    value.zero_grad()
    with torch.no_grad():
        want_logits = want(input_ids=ids, attention_mask=mask).logits

    gathers = [GatheredOnlyInside(m.lm_head) for m in (base, value)]
    model = IVLForCausalLM(base, value, vocab_map=H.random_map(), backend="torch")
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert base.lm_head.weight.numel() == 0 and value.lm_head.weight.numel() == 0
    loss.backward()
    H.check_close("loss", loss.detach(), want_loss.detach())
    got = _value_grads(model)
    for n in want_grads:
        H.check_close(n, got[n], want_grads[n])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, want_logits)
    assert [g.calls for g in gathers] == [2, 2]


def test_roots_and_heads_run_and_the_loss_is_what_the_roots_return():
    base, value = H.make_base(), H.make_value()
    calls, outputs = [], {}
    for name, m in (("base", base), ("value", value), ("base.lm_head", base.lm_head),
                    ("value.lm_head", value.lm_head)):
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
        m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out))
    ids, mask, labels = H.batch(1)
    loss = IVLForCausalLM(base, value, backend="torch")(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert calls == ["base", "base.lm_head", "value", "value.lm_head"]  # value nested in the base head's call
    assert outputs["base"].logits is loss and outputs["value"].logits is loss
    assert outputs["base.lm_head"] is loss and outputs["value.lm_head"] is loss
    assert loss.dim() == 0 and loss.requires_grad


def test_heads_restored_after_a_failing_forward():
    base, value = H.make_base(), H.make_value()
    model = IVLForCausalLM(base, value, backend="torch")

    def boom(module, args):
        raise RuntimeError("boom")

    handle = value.model.layers[1].register_forward_pre_hook(boom)
    ids, mask, labels = H.batch(0)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert "forward" not in base.lm_head.__dict__ and "forward" not in value.lm_head.__dict__
    handle.remove()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss)


def test_accelerate_hook_on_a_head_still_runs():
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    class Count(accelerate_hooks.ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    base, value = H.make_base(), H.make_value()
    ids, mask, labels = H.batch(0)
    want = IVLForCausalLM(base, value, backend="torch")(input_ids=ids, attention_mask=mask, labels=labels).loss
    accelerate_hooks.add_hook_to_module(base.lm_head, Count())
    wrapper = base.lm_head.forward
    got = IVLForCausalLM(base, value, backend="torch")(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert Count.n == 1
    torch.testing.assert_close(got, want)
    assert base.lm_head.forward is wrapper and "forward" not in value.lm_head.__dict__


def test_base_parameters_requiring_grad_are_refused():
    base, value = H.make_base(), H.make_value()
    model = IVLForCausalLM(base, value, backend="torch")
    base.lm_head.weight.requires_grad_(True)
    ids, mask, labels = H.batch(0)
    with pytest.raises(ValueError, match="base_model has parameters that require grad"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():  # evaluation: nothing to protect
        assert model(input_ids=ids, attention_mask=mask, labels=labels).loss.isfinite()


def test_no_tokens_by_vocab_tensor_in_forward_and_backward(monkeypatch):
    """Every tensor an op creates during forward + backward (the torch backend, chunked to 4 rows here) is smaller
    than ``N x V``: no logits of either model exist."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import ivl_kernels.ops.guided_cross_entropy as gce

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    base, value = H.make_base(), H.make_value(tie=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, H.BASE_VOCAB, (4, 24), generator=g)
    N, V = ids.numel(), min(H.BASE_VOCAB, H.VALUE_VOCAB)
    monkeypatch.setitem(gce._torch_backend.CHUNK_ELEMS, "cpu", 4 * H.BASE_VOCAB)
    model = IVLForCausalLM(base, value, vocab_map=H.random_map(), backend="torch")
    with Largest():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
    assert all(p.grad is not None for p in value.parameters())
    assert 0 < Largest.numel < N * V, (Largest.numel, N * V)

"""``IVLForCausalLM``'s defaults reproduce IVL's released training loss.

The released loss, re-implemented here in plain torch from its definition (residual value network, alpha = 1):

    logits = base_logits + value_logits                 (both from a plain ``model(input_ids, attention_mask)``)
    loss   = CE(logits[:, :-1], labels[:, 1:], ignore_index=-100)                 (mean over kept labels)
             + l1_coef * mean over every position (b, t) of ||value_logits[b, t]||_1 / V     (l1_coef = 1)

The L1 mean runs over all ``B * T`` positions: padding, prompt tokens (label -100) and the last position (no
next-token label) included. The batch is right-padded, so transformers' default positions (``0..T-1``) are the
ones the module uses at every position, padding included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from ivl_kernels._triton import HAS_TRITON, interpreter_enabled  # noqa: E402
from ivl_kernels.hf import IVLForCausalLM  # noqa: E402

VOCAB = 96


def _llama(seed, hidden, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _right_padded_batch(lengths=(11, 6, 9), prompt=(3, 2, 4), seed=7):
    """``ids, mask, labels [B, T]``: right padding; labels are the ids with -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros((len(lengths), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, p) in enumerate(zip(lengths, prompt)):
        ids[i, :n] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, mask, labels


def released_ivl_loss(base, value, ids, mask, labels, l1_coef=1.0):
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    value_logits = value(input_ids=ids, attention_mask=mask).logits
    logits = base_logits + value_logits
    V = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    l1 = value_logits.abs().sum(-1).div(value_logits.shape[-1]).mean()
    return ce + l1_coef * l1


def _value_grads(model, loss):
    model.value_model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.value_model.named_parameters()}


# The models live on the CPU: Triton runs them only under the interpreter (the GPU run covers the fused loss's
# "all" reduction in tests/ops/test_guided_cross_entropy.py).
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and interpreter_enabled() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_loss_and_value_gradients_equal_released_ivl(backend):
    base, value = _llama(0, 48, tie=False), _llama(1, 32, tie=True)
    ids, mask, labels = _right_padded_batch()
    model = IVLForCausalLM(base, value, backend=backend)      # defaults: alpha=1, l1_coef=1, l1_reduction="all"
    ours = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = _value_grads(model, ours)
    expected = released_ivl_loss(base, value, ids, mask, labels)
    want = _value_grads(model, expected)

    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for n, w in want.items():
        # fp32: gradients summed over many positions cancel, so compare in norm, not elementwise.
        err = (got[n] - w).norm().item()
        assert err <= 1e-4 * w.norm().item() + 1e-7, f"{n}: |diff| {err:.3g} vs |grad| {w.norm():.3g}"
    assert all(p.grad is None for p in base.parameters())

    # The padding and the last position count: the L1 term over the kept labels only is another loss.
    kept_only = IVLForCausalLM(base, value, l1_reduction="kept", backend=backend)
    with torch.no_grad():
        other = kept_only(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert (other - expected).abs().item() > 1e-3


def test_released_l1_weight_depends_on_padding():
    """Appending padding leaves the cross-entropy unchanged but rescales the L1 term (by the old ``B * T`` over
    the new one, up to the padding positions' own L1): the documented padding dependence of ``"all"``."""
    base, value = _llama(0, 48, tie=False), _llama(1, 32, tie=True)
    ids, mask, labels = _right_padded_batch()
    extra = 5
    pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], 1)  # noqa: E731
    ids2, mask2, labels2 = pad(ids, 0), pad(mask, 0), pad(labels, -100)
    with torch.no_grad():
        kept = [IVLForCausalLM(base, value, l1_reduction="kept")(input_ids=i, attention_mask=m, labels=lab).loss
                for i, m, lab in ((ids, mask, labels), (ids2, mask2, labels2))]
        full = [IVLForCausalLM(base, value)(input_ids=i, attention_mask=m, labels=lab).loss
                for i, m, lab in ((ids, mask, labels), (ids2, mask2, labels2))]
        released = released_ivl_loss(base, value, ids2, mask2, labels2)
    torch.testing.assert_close(kept[0], kept[1], rtol=1e-5, atol=1e-6)   # "kept": independent of padding
    torch.testing.assert_close(full[1], released, rtol=1e-5, atol=1e-5)
    assert (full[0] - full[1]).abs().item() > 1e-4

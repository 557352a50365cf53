"""``IVLGuidedForCausalLM._pack_heads`` on stand-in modules (no vLLM needed: runs in every venv): where it packs
(one rank, the first term without a map, plain heads of one dtype and device), that every holder of a head
parameter (a tied input embedding) gets the packed view with the old parameter's attributes, and where it
refuses. ``test_vllm_engine.py`` checks the same on vLLM's own models, serving."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ivl_kernels.ops.packed_heads import packed_view
from ivl_kernels.vllm.model import IVLGuidedForCausalLM


class _LM(nn.Module):
    def __init__(self, vocab, hidden, tie, dtype=torch.float32):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden, dtype=dtype)
        self.lm_head = self.embed_tokens if tie else nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        self.lm_head.weight.weight_loader = "loader"  # as vLLM sets on its parameters


def _stub(*, tp=1, vocab_map=None, value_dtype=torch.float32):
    base, value = _LM(50, 8, tie=False), _LM(40, 6, tie=True, dtype=value_dtype)
    plan = SimpleNamespace(terms=[SimpleNamespace(vocab_map=vocab_map)])
    return SimpleNamespace(tp=tp, plan=plan, _heads=[base.lm_head, value.lm_head], base=base, terms=[value])


def test_packs_the_heads_and_every_holder_reads_the_buffer(monkeypatch):
    monkeypatch.setenv("IVL_KERNELS_VLLM_PACK_HEADS", "1")  # CPU stand-ins: "auto" packs on CUDA devices only
    m = _stub()
    base_w, value_w = m._heads[0].weight.detach().clone(), m._heads[1].weight.detach().clone()
    assert IVLGuidedForCausalLM._pack_heads(m) is True
    bw, vw = m.base.lm_head.weight, m.terms[0].lm_head.weight
    assert packed_view(bw, vw, 40) is not None
    assert torch.equal(bw, base_w) and torch.equal(vw, value_w)
    assert m.terms[0].embed_tokens.weight is vw          # tied: the embedding reads the packed rows
    assert m.base.embed_tokens.weight is not bw          # untied stays untied
    assert bw.weight_loader == vw.weight_loader == "loader" and not bw.requires_grad
    ids = torch.tensor([[0, 3, 39]])
    assert torch.equal(m.terms[0].embed_tokens(ids), value_w[ids])


@pytest.mark.parametrize("why", ["disabled", "auto_on_cpu", "tensor_parallel", "map", "dtypes"])
def test_leaves_the_heads_apart(why, monkeypatch):
    monkeypatch.setenv("IVL_KERNELS_VLLM_PACK_HEADS", {"disabled": "0", "auto_on_cpu": "auto"}.get(why, "1"))
    m = _stub(tp=2 if why == "tensor_parallel" else 1,
              vocab_map=torch.arange(50, dtype=torch.int32) % 40 if why == "map" else None,
              value_dtype=torch.float64 if why == "dtypes" else torch.float32)
    heads = [m._heads[0].weight, m._heads[1].weight]
    assert IVLGuidedForCausalLM._pack_heads(m) is False
    assert m.base.lm_head.weight is heads[0] and m.terms[0].lm_head.weight is heads[1]


def test_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setenv("IVL_KERNELS_VLLM_PACK_HEADS", "yes")
    m = _stub()
    with pytest.raises(ValueError, match="IVL_KERNELS_VLLM_PACK_HEADS must be one of auto, 0, 1; got 'yes'"):
        IVLGuidedForCausalLM._pack_heads(m)

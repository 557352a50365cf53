"""``IVLForCausalLM``: train a value network on top of a frozen base model (Inverse Value Learning).

    loss = mean_{kept t} CE(base_logits[t] + alpha * remap(value_logits[t]), labels[t + 1])
           + l1_coef * mean_{t in L1 rows} ||value_logits[t]||_1 / Vv

with the L1 rows every position of ``input_ids`` (``l1_reduction="all"``, the default: IVL's released training,
padding and the last position included) or the positions with a kept label (``"kept"``). Computed by
``fused_guided_cross_entropy`` from hidden states and LM head weights, so no ``[tokens, vocab]`` logits tensor
exists on the fused backends. The base runs under ``torch.no_grad`` (frozen, eval mode always); gradients reach
the value network only. Works in a plain PyTorch loop and with ``transformers.Trainer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._validate import check_l1_reduction
from ..ops import guided_cross_entropy as _gce
from ..ops.guided_logits import fused_guided_logits
from ._common import (BaseToValueIds, fallback_input_id, input_vocab_size, position_ids_from_mask,
                      resolve_vocab_map, split_causal_lm)

try:
    from transformers.utils import ModelOutput
except Exception:  # pragma: no cover
    ModelOutput = object


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position ids: ``position_ids_from_mask`` for real tokens and leading padding; a padding
    position after a real token continues counting from the last real token before it (``0..T-1`` on a
    right-padded batch, transformers' default positions)."""
    pos = position_ids_from_mask(mask)
    real = mask != 0
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(pos)
    last = torch.where(real, idx, torch.full_like(idx, -1)).cummax(-1).values
    after = pos.gather(-1, last.clamp(min=0)) + (idx - last)
    return torch.where(real | (last < 0), pos, after)


@dataclass
class IVLOutput(ModelOutput):
    """``loss``: scalar (or ``None`` without labels); ``logits``: ``[B, T, Vb]`` guided logits, only computed
    when no labels are given (training never materialises them)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class IVLForCausalLM(nn.Module):
    """Frozen ``base_model`` + trainable ``value_model``; ``forward`` returns the fused guided loss.

    Args:
        base_model: transformers causal LM; frozen here (``requires_grad=False``, kept in eval mode even when
            ``.train()`` is called on this wrapper).
        value_model: transformers causal LM or a PEFT model wrapping one (e.g. LoRA on the backbone).
        alpha: guidance strength in the loss (IVL trains with 1).
        l1_coef: weight of IVL's L1 regulariser on the value logits (1.0, as in IVL's released code).
        l1_reduction: the positions the L1 term is averaged over. ``"all"`` (default, as IVL's released code):
            every position of ``input_ids``, padding, prompt (label -100) and the last position (which has no
            next-token label) included. The L1 term is then normalised by ``B * T`` while the cross-entropy is
            normalised by the number of kept labels, so **the L1 weight relative to the cross-entropy depends on
            the batch's padding** (and on its masked prompt tokens): more padding, weaker relative L1 per kept
            token, yet the padding positions' value logits are still pushed towards 0. ``"kept"``: only the
            positions with a kept label, normalised like the cross-entropy (independent of padding).
        vocab_map: base id -> value id (``VocabMap`` or int tensor ``[Vb]``), ``None`` = identity.
        label_smoothing, fill, backend: passed to ``fused_guided_cross_entropy``.

    With the defaults (``alpha=1``, ``l1_coef=1``, ``l1_reduction="all"``, identity map, no label smoothing) the
    loss is that of IVL's released training of a residual value network on a right-padded batch (whose
    transformers default positions are ``0..T-1``: see ``forward`` for the positions used). It is not the same
    loss with another ``l1_reduction``, ``alpha`` or label smoothing.
    """

    supports_gradient_checkpointing = False

    def __init__(self, base_model: nn.Module, value_model: nn.Module, *, alpha: float = 1.0, l1_coef: float = 1.0,
                 l1_reduction: str = "all", vocab_map=None, label_smoothing: float = 0.0, fill: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.l1_reduction = check_l1_reduction(l1_reduction)
        self.base_model = base_model
        self.value_model = value_model
        self.alpha = float(alpha)
        self.l1_coef = float(l1_coef)
        self.label_smoothing = float(label_smoothing)
        self.fill = float(fill)
        self.backend = backend
        base_model.requires_grad_(False)
        base_model.eval()
        self._base_backbone, self._base_weight = split_causal_lm(base_model, "base")
        self._value_backbone, _ = split_causal_lm(value_model, "value")
        Vb = self._base_weight.shape[0]
        vmap = resolve_vocab_map(vocab_map, Vb, self._value_weight().shape[0], self._base_weight.device)
        # A buffer so .to(device) moves it; not persistent: save_pretrained saves the value network only.
        self.register_buffer("vocab_map", vmap, persistent=False)
        self._translate = BaseToValueIds(vmap, input_vocab_size(value_model), fallback_input_id(value_model))

    def _value_weight(self) -> torch.Tensor:
        # Looked up on every call: PEFT / Trainer may wrap or move the value model after construction.
        return split_causal_lm(self.value_model, "value")[1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_model.eval()  # frozen: dropout and the like stay off in the base
        return self

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None) -> IVLOutput:
        """``input_ids [B, T]``, ``attention_mask [B, T]`` (left or right padding), ``labels [B, T]``
        (unshifted, as for ``*ForCausalLM``: position ``t`` predicts ``labels[t+1]``; -100 ignored; positions
        with ``attention_mask == 0`` ignored too). Returns ``IVLOutput(loss=scalar)``: the cross-entropy's mean
        over kept labels plus the L1 term over the positions ``l1_reduction`` names (all ``B * T`` for ``"all"``).

        Positions: a real token's is the number of real tokens before it (left padding does not shift them); a
        padding position after a real token continues counting from the last real one, a leading padding
        position gets 0. On a right-padded batch that is ``0..T-1``, transformers' default, so the value logits
        at padding positions (which the ``"all"`` L1 term reads) are those of a plain ``model(input_ids,
        attention_mask)`` call."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = _positions(attention_mask)
        with torch.no_grad():
            base_hidden = self._base_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=pos, use_cache=False).last_hidden_state
        value_hidden = self._value_backbone(input_ids=self._translate(input_ids), attention_mask=attention_mask,
                                            position_ids=pos, use_cache=False).last_hidden_state
        value_weight = self._value_weight()
        if labels is None:
            with torch.no_grad():
                logits = fused_guided_logits(value_hidden.detach(), value_weight.detach(),
                                             base_hidden=base_hidden, base_weight=self._base_weight,
                                             vocab_map=self.vocab_map, alpha=self.alpha, fill=self.fill,
                                             backend=self.backend)
            return IVLOutput(loss=None, logits=logits.view(*input_ids.shape, -1))
        # Every position is a row of the loss: position t's target is labels[t + 1]; the last position has none
        # (-100) but is still a row, so that l1_reduction="all" counts it, as IVL's released code does.
        target = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        target = torch.cat([target, target.new_full((target.shape[0], 1), -100)], dim=1)
        Hv, Hb = value_hidden.shape[-1], base_hidden.shape[-1]
        loss = _gce.fused_guided_cross_entropy(
            value_hidden.reshape(-1, Hv), value_weight, target.reshape(-1),
            base_hidden=base_hidden.reshape(-1, Hb).detach(), base_weight=self._base_weight.detach(),
            vocab_map=self.vocab_map, alpha=self.alpha, fill=self.fill, l1_coef=self.l1_coef,
            l1_reduction=self.l1_reduction, ignore_index=-100, label_smoothing=self.label_smoothing,
            reduction="mean", backend=self.backend)
        return IVLOutput(loss=loss)

    # ---- persistence: the value network only -------------------------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the value network (``value_model.save_pretrained``: full weights, or the adapter for PEFT)."""
        os.makedirs(save_directory, exist_ok=True)
        self.value_model.save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, value_path: str, *, value_base_model: Optional[nn.Module] = None,
                        is_trainable: bool = True, **kwargs) -> "IVLForCausalLM":
        """Attach the value network saved at ``value_path`` to ``base_model``.

        A PEFT adapter directory (``adapter_config.json``) is loaded onto ``value_base_model`` (the model the
        adapter was trained on); a full model with ``AutoModelForCausalLM``. ``kwargs`` go to the constructor.
        """
        if os.path.exists(os.path.join(value_path, "adapter_config.json")):
            from peft import PeftModel

            if value_base_model is None:
                raise ValueError(f"{value_path} holds a PEFT adapter: pass value_base_model= (the model it adapts)")
            value = PeftModel.from_pretrained(value_base_model, value_path, is_trainable=is_trainable)
        else:
            from transformers import AutoModelForCausalLM

            value = AutoModelForCausalLM.from_pretrained(value_path)
        return cls(base_model, value, **kwargs)

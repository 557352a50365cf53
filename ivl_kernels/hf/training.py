"""``IVLForCausalLM``: train a value network on top of a frozen base model (Inverse Value Learning).

    loss = CE(base_logits + alpha * remap(value_logits), next token) + l1_coef * mean_rows(||value_logits||_1) / Vv

computed by ``fused_guided_cross_entropy`` from hidden states and LM head weights, so no ``[tokens, vocab]``
logits tensor exists on the fused backends. The base runs under ``torch.no_grad`` (frozen, eval mode always);
gradients reach the value network only. Works in a plain PyTorch loop and with ``transformers.Trainer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..ops import guided_cross_entropy as _gce
from ..ops.guided_logits import fused_guided_logits
from ._common import (BaseToValueIds, fallback_input_id, input_vocab_size, position_ids_from_mask,
                      resolve_vocab_map, split_causal_lm)

try:
    from transformers.utils import ModelOutput
except Exception:  # pragma: no cover
    ModelOutput = object


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
        l1_coef: IVL's L1 regulariser on the value logits (1.0 in the paper's code).
        vocab_map: base id -> value id (``VocabMap`` or int tensor ``[Vb]``), ``None`` = identity.
        label_smoothing, fill, backend: passed to ``fused_guided_cross_entropy``.
    """

    supports_gradient_checkpointing = False

    def __init__(self, base_model: nn.Module, value_model: nn.Module, *, alpha: float = 1.0, l1_coef: float = 0.0,
                 vocab_map=None, label_smoothing: float = 0.0, fill: float = 0.0, backend: str = "auto"):
        super().__init__()
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
        with ``attention_mask == 0`` ignored too). Returns ``IVLOutput(loss=scalar mean over kept tokens)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = position_ids_from_mask(attention_mask)
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
        target = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        Hv, Hb = value_hidden.shape[-1], base_hidden.shape[-1]
        loss = _gce.fused_guided_cross_entropy(
            value_hidden[:, :-1].reshape(-1, Hv), value_weight, target.reshape(-1),
            base_hidden=base_hidden[:, :-1].reshape(-1, Hb).detach(), base_weight=self._base_weight.detach(),
            vocab_map=self.vocab_map, alpha=self.alpha, fill=self.fill, l1_coef=self.l1_coef, ignore_index=-100,
            label_smoothing=self.label_smoothing, reduction="mean", backend=self.backend)
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

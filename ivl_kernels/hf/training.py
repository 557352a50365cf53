"""``IVLForCausalLM``: train a value network on top of a frozen base model (Inverse Value Learning).

    loss = mean_{kept t} CE(base_logits[t] + alpha * remap(value_logits[t]), labels[t + 1])
           + l1_coef * mean_{t in L1 rows} ||value_logits[t]||_1 / Vv

with the L1 rows every position of ``input_ids`` (``l1_reduction="all"``, the default: IVL's released training,
padding and the last position included) or the positions with a kept label (``"kept"``). Computed by
``fused_guided_cross_entropy`` from hidden states and LM head weights, so no ``[tokens, vocab]`` logits tensor
exists on the fused backends. The base is frozen (``requires_grad=False``, so it records no autograd graph; eval
mode always); gradients reach the value network only. Works in a plain PyTorch loop and with ``transformers.Trainer``
(``ivl_kernels.hf.trainer.IVLTrainer`` saves and resumes the value network only).

Distributed training: the weights are read **through the modules**, so the parameter gathering of DDP, FSDP2
(``fully_shard``), DeepSpeed ZeRO-3 and accelerate's offload hooks applies unchanged. ``forward`` calls each
model's *root* forward (``base_model(...)``, ``value_model(...)``: every hook of every wrapper runs) with the
``forward`` of its output head (``get_output_embeddings()``, the module itself and its hooks untouched) replaced
for the duration of the call by a function that receives the final hidden states while that head's weight is
gathered: the base head's stand-in records the base hidden states and runs the value model's root forward, whose
head stand-in computes the fused loss from both hidden states and both (gathered) head weights and returns it as
the "logits". The loss thus comes out of both roots' forwards, and the hooks the wrappers register on forward
outputs (FSDP2's and ZeRO-3's pre-backward re-gathering) are on it; the value head's gradient lands in the head's
own parameter, where FSDP2 / ZeRO-3 reduce-scatter it and DDP all-reduces it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .._validate import check_alpha_float, check_l1_reduction
from ..ops import guided_cross_entropy as _gce
from ..ops.guided_logits import fused_guided_logits
from ..guidance import BaseToValueIds
from ._common import (fallback_input_id, forward_parameters, input_vocab_size, padded_positions,
                      resolve_vocab_map, split_causal_lm, unwrap_causal_lm)

try:
    from transformers.utils import ModelOutput
except Exception:  # pragma: no cover
    ModelOutput = object


def _output_head(model: nn.Module, role: str) -> nn.Module:
    """The LM head module of a causal LM (through a PEFT wrapper): the module whose forward is replaced."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else getattr(lm, "lm_head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{role} model {type(model).__name__}: cannot find its LM head module "
                         f"(get_output_embeddings)")
    return head


def _head_shape(head: nn.Module) -> tuple:
    """``(V, H)`` of an LM head, read without its (possibly sharded or partitioned) values: the global shape of an
    FSDP2 DTensor, DeepSpeed ZeRO-3's ``ds_shape`` of a partitioned parameter, else ``nn.Linear``'s sizes."""
    w = head.weight
    shape = getattr(w, "ds_shape", None)
    if shape is None and isinstance(head, nn.Linear):
        shape = (head.out_features, head.in_features)
    if shape is None:
        shape = w.shape
    return int(shape[0]), int(shape[1])


_MISSING = object()


@contextmanager
def _head_forward_replaced(head: nn.Module, fn: Callable):
    """Within the block, calling ``head`` (``head(hidden_states)``, as a causal LM's forward does) runs ``fn``
    instead of the head's own forward. The module object, its parameters and every hook on it stay (FSDP2's,
    DeepSpeed ZeRO-3's pre-forward gathering, accelerate's device / offload hook): only the innermost forward is
    swapped, an instance attribute removed again on exit whatever happens."""
    # accelerate's add_hook_to_module sets ``forward`` to a wrapper that runs its hook around ``_old_forward``.
    attr = "_old_forward" if hasattr(head, "_hf_hook") and "_old_forward" in head.__dict__ else "forward"
    if getattr(head.__dict__.get(attr), "_ivl_head_stand_in", False):
        raise RuntimeError("IVLForCausalLM: the LM head is already being replaced (re-entrant forward, or the base "
                           "and value models share an LM head module)")
    fn._ivl_head_stand_in = True
    saved = head.__dict__.get(attr, _MISSING)
    head.__dict__[attr] = fn
    try:
        yield
    finally:
        if saved is _MISSING:
            del head.__dict__[attr]
        else:
            head.__dict__[attr] = saved


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the causal LM's forward (through a PEFT wrapper) takes the keyword ``name``."""
    return name in forward_parameters(unwrap_causal_lm(model))


def _logits_of(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    return logits


def shifted_targets(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: position ``t``'s target ``labels[t + 1]``, -100 where none is scored.

    Every position is a row of the loss: the last position has no target (-100) but is still a row, so that
    ``l1_reduction="all"`` counts it, as IVL's released code does. A padding position predicts nothing, and nothing
    predicts a padding position (left padding: the last pad before a row's first real token would be scored on it,
    from a state that attended to no real token)."""
    target = labels[:, 1:].masked_fill((attention_mask[:, 1:] == 0) | (attention_mask[:, :-1] == 0), -100)
    return torch.cat([target, target.new_full((labels.shape[0], 1), -100)], dim=1)


def num_kept_targets(labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The number of targets ``IVLForCausalLM.forward`` scores in a batch (``labels`` and ``attention_mask``
    ``[B, T]`` as given to it): what ``num_items_in_batch`` sums over the micro-batches of one optimizer step."""
    if attention_mask is None:
        attention_mask = torch.ones_like(labels)
    return (shifted_targets(labels, attention_mask) != -100).sum()


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

    Distributed: wrap this module in ``DistributedDataParallel``; or shard with FSDP2 (``fully_shard`` on the
    decoder layers, then on each model and/or on this module); or hand it to ``deepspeed.initialize`` with ZeRO-3
    (models built under ``zero.Init`` too, as ``from_pretrained`` does under a ZeRO-3 config). The value network
    may be a PEFT model in each case. Both heads' weights are gathered by the wrappers' own hooks (module
    docstring); tested on 2 CPU processes against one (tests/distributed).

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
        self.alpha = check_alpha_float("alpha", alpha)  # a NaN would only surface as a NaN loss
        self.l1_coef = check_alpha_float("l1_coef", l1_coef)  # the loss's own check, here at construction
        if self.l1_coef < 0:
            raise ValueError(f"l1_coef must be a finite float >= 0, got {self.l1_coef}")
        self.label_smoothing = float(label_smoothing)
        self.fill = float(fill)
        self.backend = backend
        base_model.requires_grad_(False)
        base_model.eval()
        # The checks of the fused heads (no bias, no logit softcapping or scale, no adapter on the head). Nothing
        # is kept: the weights are read through the head modules on every call (see the module docstring).
        split_causal_lm(base_model, "base")
        split_causal_lm(value_model, "value")
        Vb, _ = _head_shape(_output_head(base_model, "base"))
        Vv, _ = _head_shape(_output_head(value_model, "value"))
        vmap = resolve_vocab_map(vocab_map, Vb, Vv, _output_head(base_model, "base").weight.device)
        # A buffer so .to(device) moves it; not persistent: save_pretrained saves the value network only.
        self.register_buffer("vocab_map", vmap, persistent=False)
        self._translate = BaseToValueIds(vmap, input_vocab_size(value_model), fallback_input_id(value_model))
        # logits_to_keep=0 (transformers >= 4.50: keep every position) passed explicitly where the forward takes
        # it, so no configuration slices the hidden states the heads' stand-ins receive.
        self._base_kwargs = {"logits_to_keep": 0} if _accepts(base_model, "logits_to_keep") else {}
        self._value_kwargs = {"logits_to_keep": 0} if _accepts(value_model, "logits_to_keep") else {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_model.eval()  # frozen: dropout and the like stay off in the base
        return self

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, num_items_in_batch=None) -> IVLOutput:
        """``input_ids [B, T]``, ``attention_mask [B, T]`` (left or right padding), ``labels [B, T]``
        (unshifted, as for ``*ForCausalLM``: position ``t`` predicts ``labels[t+1]``; -100 ignored; positions
        with ``attention_mask == 0`` ignored too). Returns ``IVLOutput(loss=scalar)``: the cross-entropy's mean
        over kept labels plus the L1 term over the positions ``l1_reduction`` names (all ``B * T`` for ``"all"``).
        Without labels, ``IVLOutput(logits=[B, T, Vb])``: the guided logits (no gradient).

        ``num_items_in_batch`` (int or 0-d tensor, with labels): the number of kept targets in the whole batch this
        call is a part of (gradient accumulation: every micro-batch of one optimizer step, on every process;
        ``num_kept_targets`` counts them), as ``IVLTrainer`` passes it. The loss is then this call's mean times
        ``kept / num_items_in_batch`` (``kept``: this call's kept targets): the cross-entropy (and a ``"kept"``
        L1 term) is its sum over the kept targets divided by the whole batch's count, so summing the calls' losses
        gives the whole batch's mean whatever the micro-batches' padding; an ``"all"`` L1 term is this call's mean
        over its positions weighted by its share of the kept targets. ``None``: this call's mean.

        Positions: a real token's is the number of real tokens before it (left padding does not shift them); a
        padding position after a real token continues counting from the last real one, a leading padding
        position gets 0. On a right-padded batch that is ``0..T-1``, transformers' default, so the value logits
        at padding positions (which the ``"all"`` L1 term reads) are those of a plain ``model(input_ids,
        attention_mask)`` call.

        The models run through their root forwards with their output heads' forwards replaced (module docstring):
        the base model's forward runs in the caller's grad mode (so that wrappers register their backward hooks
        on the loss it returns); its parameters are frozen, so it records no autograd graph."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.base_model.parameters()):
            raise ValueError("IVLForCausalLM: base_model has parameters that require grad, but the base is frozen in "
                             "IVL training (it gets no gradient): call base_model.requires_grad_(False)")
        pos = padded_positions(attention_mask)
        B, T = input_ids.shape
        base_head = _output_head(self.base_model, "base")
        value_head = _output_head(self.value_model, "value")
        target = None if labels is None else shifted_targets(labels, attention_mask).reshape(-1)
        base = {}

        def rows(hidden: torch.Tensor, role: str) -> torch.Tensor:
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, T):
                raise RuntimeError(f"IVLForCausalLM: the {role} model's LM head received hidden states of shape "
                                   f"{list(hidden.shape)}, expected [{B}, {T}, H] (one row per input position)")
            return hidden.reshape(B * T, hidden.shape[-1])

        def value_head_forward(hidden, *args, **kwargs):
            # Inside the value model's root forward (its head's weight gathered), itself inside the base model's
            # (the base head's weight gathered too).
            value_hidden, value_weight = rows(hidden, "value"), value_head.weight
            if target is None:
                with torch.no_grad():
                    logits = fused_guided_logits(value_hidden.detach(), value_weight.detach(),
                                                 base_hidden=base["hidden"], base_weight=base["weight"],
                                                 vocab_map=self.vocab_map, alpha=self.alpha, fill=self.fill,
                                                 backend=self.backend)
                return logits.view(B, T, -1)
            # The parameter itself, not a detached alias: its gradient accumulates where the wrappers read it,
            # and a saved reference sees the weight that pre-backward hooks gather again for the backward pass.
            return _gce.fused_guided_cross_entropy(
                value_hidden, value_weight, target, base_hidden=base["hidden"], base_weight=base["weight"],
                vocab_map=self.vocab_map, alpha=self.alpha, fill=self.fill, l1_coef=self.l1_coef,
                l1_reduction=self.l1_reduction, ignore_index=-100, label_smoothing=self.label_smoothing,
                reduction="mean", backend=self.backend)

        def base_head_forward(hidden, *args, **kwargs):
            base["hidden"] = rows(hidden, "base").detach()
            # The parameter itself (see above); frozen, so it requires grad only under torch.no_grad (checked in
            # grad mode), where a detached alias is as good.
            weight = base_head.weight
            base["weight"] = weight.detach() if weight.requires_grad else weight
            try:
                out = self.value_model(input_ids=self._translate(input_ids), attention_mask=attention_mask,
                                       position_ids=pos, use_cache=False, **self._value_kwargs)
            finally:
                base.clear()
            return _logits_of(out)

        with _head_forward_replaced(base_head, base_head_forward), \
                _head_forward_replaced(value_head, value_head_forward):
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                  use_cache=False, **self._base_kwargs)
        result = _logits_of(out)
        if target is None:
            return IVLOutput(loss=None, logits=result)
        if result.numel() != 1:
            raise RuntimeError(f"IVLForCausalLM: the models' forwards turned the loss into a tensor of shape "
                               f"{list(result.shape)}")
        # The tensor the roots returned (or computed from it): wrappers' backward hooks are registered on it.
        loss = result if result.dim() == 0 else result.reshape(())
        if num_items_in_batch is not None:
            # mean * kept / N: the CE (and a "kept" L1 term) summed over this batch's kept targets, divided by
            # the whole accumulated batch's count; an "all" L1 term is this batch's mean weighted by its share of
            # the kept targets. No host read: the scale stays on the device.
            # In float32: a bf16 ratio of two counts is off by up to 0.4 % (and every gradient with it).
            kept = (target != -100).sum().float()
            total = torch.as_tensor(num_items_in_batch, device=loss.device).float()
            loss = (loss.float() * (kept / total.clamp(min=1))).to(loss.dtype)
        return IVLOutput(loss=loss)

    # ---- persistence: the value network only -------------------------------------------------------------
    def save_pretrained(self, save_directory: str, *, overwrite: bool = False, **kwargs) -> None:
        """Save the value network (``value_model.save_pretrained``: full weights, or the adapter for PEFT).

        ``save_directory`` must not be where the base or value model was loaded from (nor inside it), and an
        existing non-empty directory is refused unless ``overwrite=True`` (then same-named files are replaced).
        Written whole or not at all (a temporary sibling, then a rename)."""
        from .._atomic import atomic_dir, check_not_input, check_output_dir
        from .checkpoint import reference_of

        check_not_input(save_directory, [("base model", reference_of(self.base_model)),
                                         ("value model", reference_of(self.value_model))], flag="save_directory")
        check_output_dir(save_directory, overwrite=overwrite, what="save_directory", flag="overwrite=True")
        with atomic_dir(save_directory) as tmp:
            self.value_model.save_pretrained(tmp, **kwargs)

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

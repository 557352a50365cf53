"""The transformers-model side of ``GuidedCausalLM``: its ``config``, the methods ``PreTrainedModel`` users and
tools (lm-evaluation-harness, ``AutoModelForCausalLM``) call, ``forward`` over whole sequences (guided logits,
guided loss) and ``log_probs`` (per-token guided log-probabilities through the fused cross-entropy).

A sequence forward runs every model's backbone once over the whole batch (no KV cache), each term reading the
base ids translated through its map, at the positions ``padded_positions`` gives (left or right padding never
shifts a row: a padded batch scores as its rows one by one), and combines the hidden states with the same
``GuidedCausalLM._guided_logits`` the decode loop uses, so the guidance rule (terms, maps, fill) lives once.
Ids a padded head suppresses (``suppress_ids_from`` / the tokenizer's length) get ``-inf`` logits and, in the
loss and the log-probabilities, log-probability ``-inf``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import List, Optional, Tuple

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..guidance import resolve_suppress_from, suppress_ids_
from ..ops.guided_cross_entropy import fused_guided_cross_entropy
from ._common import input_vocab_size, padded_positions
from .config import IVLGuidedConfig

# Multi-term loss: rows per chunk are chosen so that one chunk of the partial guided logits (base + every term
# but the last) holds about this many float32 elements (128 MiB); the last term is fused into the loss.
_SCORE_CHUNK_ELEMS = 1 << 25

# What AutoModelForCausalLM.from_pretrained (and harnesses calling it) pass along that is about finding the
# guided checkpoint itself, not about loading its models: dropped. ``revision``: a guided checkpoint is a local
# directory, which has none (lm-eval always passes revision="main").
_AUTO_BOOKKEEPING = ("_from_auto", "adapter_kwargs", "code_revision", "revision", "_commit_hash")
# Loading options that cannot apply to a guided checkpoint: accepted only when empty.
_REFUSED_LOAD_KWARGS = {
    "gguf_file": "a guided checkpoint names its models; load a GGUF model as the base or a term instead",
    "quantization_config": "the fused heads read each LM head's weight: quantize the backbones in the models' own "
                           "checkpoints (their LM heads unquantized) instead",
    "subfolder": "a guided checkpoint is a directory of its own: pass that directory",
}

_FORWARD_UNSUPPORTED = {
    "inputs_embeds": "each model reads its own embedding of the token ids: pass input_ids",
    "past_key_values": "forward keeps no KV cache (every model has its own): use generate() for incremental "
                       "decoding, or pass the whole sequence",
    "cache": "forward keeps no KV cache (every model has its own): use generate() for incremental decoding, or "
             "pass the whole sequence",
    "output_attentions": "each model runs its backbone only",
    "output_hidden_states": "each model runs its backbone only (the guided model has no single hidden state)",
}


def loading_kwargs(model_kwargs: dict) -> dict:
    """The keyword arguments of ``GuidedCausalLM.from_pretrained`` that reach each model's
    ``AutoModelForCausalLM.from_pretrained`` (dtype, device_map, hub options, ...); ``ValueError`` naming an
    option that cannot apply. ``dtype=`` is taken on every release: where transformers reads only ``torch_dtype``
    (4.50-4.55, found by capability: their configs carry no ``dtype``) it is passed on as that."""
    kwargs = {k: v for k, v in model_kwargs.items() if k not in _AUTO_BOOKKEEPING}
    for name, why in _REFUSED_LOAD_KWARGS.items():
        if kwargs.pop(name, None):
            raise ValueError(f"{name}={model_kwargs[name]!r} is not supported for a guided checkpoint: {why}")
    if "dtype" in kwargs and "torch_dtype" not in kwargs and dtype_keyword() == "torch_dtype":
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    return kwargs


def dtype_keyword() -> str:
    """The keyword ``from_pretrained`` loads weights in a dtype with, by capability: ``dtype`` where transformers'
    configs carry a ``dtype`` (4.56 on: ``PretrainedConfig`` takes and stores ``dtype``, ``torch_dtype`` being a
    deprecated alias that warns, and ``from_pretrained`` reads ``dtype``; both came in one release), else
    ``torch_dtype`` (4.50-4.55, which read only that and hand any other keyword on to the model's ``__init__``:
    "unexpected keyword argument 'dtype'"). The probe looks for the new name, so a release that drops the
    deprecated alias still gets ``dtype``."""
    from transformers import PretrainedConfig

    return "dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype"


def _check_int_tensor(name: str, t, shape=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int64/int32 tensor [B, T], got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} {list(t.shape)} must have the shape of input_ids {list(shape)}")
    return t


class GuidedModelAPI:
    """Mixed into ``GuidedCausalLM`` (which provides ``base_model``, ``terms``, ``_prepared``, ``_base_backbone``,
    ``_base_weight``, ``_guided_logits``, ``fill``, ``backend``, ``tokenizer``, ``suppress_ids_from``)."""

    config_class = IVLGuidedConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _auto_class = None

    # ---- what PreTrainedModel users and tools call -----------------------------------------------------------
    @classmethod
    def can_generate(cls) -> bool:
        return True  # its own generate(): guided greedy / sampling decoding

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Not used: ``generate`` is the guided model's own (every model keeps its own KV cache). Defined because
        transformers' loader of ``trust_remote_code`` classes reads it (``add_generation_mixin_to_remote_model``;
        4.50 without checking that it exists)."""
        raise NotImplementedError(f"{type(self).__name__} decodes with its own generate(); transformers' "
                                  f"generation loop does not drive it")

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """As ``PreTrainedModel.register_for_auto_class`` (called by ``AutoModelForCausalLM`` when it loads
        the class through a checkpoint's ``auto_map``): records the auto class name."""
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__

    @property
    def dtype(self) -> torch.dtype:
        return self._base_weight.dtype

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

    @property
    def generation_config(self):
        """The base model's generation config: ``generate`` reads its defaults (EOS, pad, max length) from it."""
        return getattr(self.base_model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.base_model.generation_config = value

    def get_input_embeddings(self):
        """The base model's input embedding (each term embeds the translated ids with its own)."""
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self):
        """``None``: the guided logits are no single linear map of one hidden state (as for a model without an
        LM head, tools that would resize or re-tie the output layer leave it alone)."""
        return None

    def tie_weights(self, *args, **kwargs) -> None:
        """Each model ties its own input and output embeddings (if its config says so); nothing is shared
        across models."""
        for model in [self.base_model] + [t.model for t in self.terms]:
            tie = getattr(model, "tie_weights", None)
            if callable(tie):
                tie()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of every model (shared tensors once)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    # ---- sequence forward --------------------------------------------------------------------------------------
    def _suppress_limit(self) -> Optional[int]:
        return resolve_suppress_from(self.suppress_ids_from, self.tokenizer, self.vocab_size)

    def _check_sequences(self, input_ids, attention_mask, labels, position_ids, caller: str):
        """``(ids, mask, labels, position_ids)`` on the model's device, checked before any model runs."""
        if input_ids is None:
            raise ValueError(f"{caller}: input_ids is required (each model embeds the token ids itself)")
        _check_int_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"{caller}: input_ids must be a non-empty [B, T] tensor, got shape "
                             f"{list(input_ids.shape)}")
        shape = input_ids.shape
        device = self.device
        ids = input_ids.to(device).long()
        size = input_vocab_size(self.base_model)
        lo, hi = int(ids.min()), int(ids.max())  # one host read: an out-of-range id would index past an embedding
        if lo < 0 or hi >= size:
            raise ValueError(f"{caller}: input_ids holds id {lo if lo < 0 else hi}, outside the base model's "
                             f"[0, {size})")
        if attention_mask is None:
            mask = torch.ones_like(ids)  # as transformers' forward: no mask = every token real
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"{caller}: attention_mask must be a tensor [B, T], got {type(attention_mask).__name__}")
            if tuple(attention_mask.shape) != tuple(shape):
                raise ValueError(f"{caller}: attention_mask {list(attention_mask.shape)} must have the shape of "
                                 f"input_ids {list(shape)}")
            mask = attention_mask.to(device).long()
        if labels is not None:
            labels = _check_int_tensor("labels", labels, shape).to(device).long()
            bad = (labels != -100) & ((labels < 0) | (labels >= self.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"{caller}: labels must be base ids in [0, {self.vocab_size}) or -100 (ignored), "
                                 f"got {int(labels[bad][0])}")
        if position_ids is None:
            position_ids = padded_positions(mask)
        else:
            if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[0] == 1:
                position_ids = position_ids.expand(shape[0], -1)  # one row for every sequence, as transformers takes
            position_ids = _check_int_tensor("position_ids", position_ids, shape).to(device).long()
        for i, t in enumerate(self.terms):
            if t.prompt_template is not None:
                raise ValueError(f"{caller}: {self._role(i)} has a prompt_template, which only generate() applies "
                                 f"(a sequence forward scores every model on the same tokens); build the model "
                                 f"without it to score")
        return ids, mask, labels, position_ids

    def _sequence_hidden(self, ids, mask, position_ids) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Final hidden states ``[B, T, H]`` of the base and of each term (reading its translated ids)."""
        kw = dict(attention_mask=mask, position_ids=position_ids, use_cache=False)
        base = self._base_backbone(input_ids=ids, **kw).last_hidden_state
        return base, [t.backbone(input_ids=t.translate(ids), **kw).last_hidden_state for t in self._prepared]

    def _next_token_nll(self, base_hidden, value_hiddens, target) -> torch.Tensor:
        """``-log p_guided(target[n])`` for rows ``base_hidden [N, Hb]``, ``value_hiddens[i] [N, Hv_i]``,
        ``target [N]`` (every row kept), through the fused cross-entropy: float32 ``[N]``."""
        heads, base_weight = [t.head for t in self._prepared], self._base_weight.detach()  # frozen base: no grad
        limit = self._suppress_limit()
        suppressed = None
        if limit is not None:
            # Suppressed ids have -inf guided logits, which add nothing to the log-sum-exp: the loss over the first
            # `limit` rows of the base head (and of each map) is the loss over the suppressed distribution, and a
            # suppressed target has log-probability -inf.
            base_weight = base_weight[:limit]
            heads = [replace(h, vocab_map=None if h.vocab_map is None else h.vocab_map[:limit]) for h in heads]
            suppressed = target >= limit
            target = target.masked_fill(suppressed, -100)
        *first, last = heads
        w = last.weight
        common = dict(vocab_map=last.vocab_map, alpha=last.alpha, fill=self.fill, reduction="none",
                      backend=self.backend)
        if not first:  # one term: base head and value head fused in the loss, no [N, V] tensor anywhere
            nll = fused_guided_cross_entropy(value_hiddens[0], w.detach(), target, base_hidden=base_hidden,
                                             base_weight=base_weight, **common)
        else:
            # The loss op fuses one value head: the other terms' sum is computed per chunk of rows, so memory
            # stays at one chunk of [rows, V] whatever N.
            step = max(1, _SCORE_CHUNK_ELEMS // base_weight.shape[0])
            chunks = []
            for s in range(0, target.shape[0], step):
                rows = slice(s, s + step)
                partial = self._guided_logits(base_hidden[rows], [h[rows] for h in value_hiddens[:-1]],
                                              heads=first, base_weight=base_weight)
                chunks.append(fused_guided_cross_entropy(value_hiddens[-1][rows], w.detach(), target[rows],
                                                         base_logits=partial, **common))
            nll = torch.cat(chunks) if chunks else base_hidden.new_zeros((0,), dtype=torch.float32)
        nll = nll.float()
        return nll if suppressed is None else nll.masked_fill(suppressed, float("inf"))

    def _shifted_nll(self, ids, mask, labels, position_ids):
        """``(nll [B, T], kept [B, T] bool)``: row ``(b, t)`` is ``-log p(labels[b, t + 1] | ids[b, :t + 1])``,
        kept where both tokens are real (mask 1) and the label is not -100; 0 elsewhere."""
        B, T = ids.shape
        kept = torch.zeros((B, T), dtype=torch.bool, device=ids.device)
        kept[:, :-1] = (labels[:, 1:] != -100) & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        nll = torch.zeros((B, T), dtype=torch.float32, device=ids.device)
        rows = kept.view(-1).nonzero().squeeze(1)
        if rows.numel():
            base, values = self._sequence_hidden(ids, mask, position_ids)
            pick = lambda h: h.reshape(B * T, h.shape[-1]).index_select(0, rows)  # noqa: E731
            target = labels[:, 1:].reshape(B, T - 1)
            target = torch.cat([target, target.new_full((B, 1), -100)], 1).view(-1).index_select(0, rows)
            nll.view(-1).index_copy_(0, rows, self._next_token_nll(pick(base), [pick(v) for v in values], target))
        return nll, kept

    @torch.no_grad()
    def log_probs(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                  labels: Optional[torch.LongTensor] = None,
                  position_ids: Optional[torch.LongTensor] = None) -> torch.Tensor:
        """Per-token guided log-probabilities ``[B, T]`` (float32), without ``[B, T, V]`` logits.

        ``out[b, t] = log p_guided(labels[b, t] | input_ids[b, :t])`` (``labels`` default: ``input_ids``), the
        scored positions being those with ``t >= 1``, ``labels[b, t] != -100`` and ``attention_mask`` 1 at ``t``
        and ``t - 1`` (left- or right-padded rows score as alone); every other entry is 0. Computed by
        ``fused_guided_cross_entropy(reduction="none")`` on the scored rows only (the base head and one term
        fused; further terms added per chunk of rows), so memory grows with ``B * T * H``, not ``B * T * V``.
        A sequence's log-likelihood is ``out.sum(1)``; ids suppressed for the tokenizer score ``-inf``."""
        ids, mask, labels, pos = self._check_sequences(input_ids, attention_mask, labels, position_ids,
                                                       "log_probs")
        nll, _ = self._shifted_nll(ids, mask, ids if labels is None else labels, pos)
        out = torch.zeros_like(nll)
        out[:, 1:] = -nll[:, :-1]
        return out

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, labels: Optional[torch.LongTensor] = None,
                logits_to_keep=0, return_logits: Optional[bool] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, num_items_in_batch=None, **kwargs):
        """The guided causal LM over whole sequences (no KV cache; inference only: runs under ``no_grad``).

        Args:
            input_ids: ``[B, T]`` base token ids; ``attention_mask [B, T]`` (left or right padding; ``None`` = no
                padding). Positions count each row's real tokens, so a padded row scores as it would alone.
            labels: ``[B, T]``, unshifted as for ``*ForCausalLM`` (position ``t`` predicts ``labels[t + 1]``;
                -100 and padding ignored). ``loss`` = mean guided cross-entropy over the kept labels (divided
                by ``num_items_in_batch`` when given, as transformers' Trainer does; 0 when none is kept),
                computed by the fused loss op: no ``[B, T, V]`` tensor.
            logits_to_keep: as transformers: an int ``k`` (the last ``k`` positions; 0 = all) or a 1-D tensor of
                positions.
            return_logits: whether to compute the guided logits (float32 ``[B, k, V]``); default: only when no
                ``labels`` are given, so that a loss call never builds them.
        Returns ``CausalLMOutputWithPast(loss, logits)`` (a tuple with ``return_dict=False``). Ids suppressed
        for the tokenizer have ``-inf`` logits. ``inputs_embeds``, a KV cache, ``use_cache=True``,
        ``output_attentions`` / ``output_hidden_states`` raise ``ValueError``.
        """
        for name in ("inputs_embeds", "past_key_values", "cache"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"GuidedCausalLM.forward: {name} is not supported: {_FORWARD_UNSUPPORTED[name]}")
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, None):
                raise ValueError(f"GuidedCausalLM.forward: {name}=True is not supported: {_FORWARD_UNSUPPORTED[name]}")
        if use_cache:
            raise ValueError(f"GuidedCausalLM.forward: use_cache=True is not supported: "
                             f"{_FORWARD_UNSUPPORTED['cache']}")
        if kwargs.pop("cache_position", None) is not None:
            raise ValueError("GuidedCausalLM.forward: cache_position is not supported: forward keeps no KV cache; "
                             "pass the whole sequence (position_ids for explicit positions)")
        if kwargs:
            raise TypeError(f"GuidedCausalLM.forward() got unsupported arguments: {sorted(kwargs)}")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)) or \
                (isinstance(logits_to_keep, int) and logits_to_keep < 0):
            raise TypeError(f"logits_to_keep must be an int >= 0 or a 1-D tensor of positions, got {logits_to_keep!r}")
        ids, mask, labels, pos = self._check_sequences(input_ids, attention_mask, labels, position_ids, "forward")
        want_logits = labels is None if return_logits is None else bool(return_logits)
        loss = logits = None
        if labels is not None:
            nll, kept = self._shifted_nll(ids, mask, labels, pos)
            denom = num_items_in_batch if num_items_in_batch is not None else kept.sum()
            denom = torch.as_tensor(denom, device=nll.device, dtype=torch.float32)
            loss = torch.where(denom > 0, nll.sum() / denom.clamp(min=1), nll.new_zeros(()))
        if want_logits:
            # Recomputed when labels were given too: the loss path keeps only the scored rows' hidden states.
            base, values = self._sequence_hidden(ids, mask, pos)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep.to(ids.device)
            base, values = base[:, keep], [v[:, keep] for v in values]
            one = base.dim() == 2  # a 0-d tensor: one position, logits [B, V] (as transformers' indexing gives)
            if one:
                base, values = base[:, None], [v[:, None] for v in values]
            B, K = base.shape[:2]
            flat = lambda h: h.reshape(B * K, h.shape[-1])  # noqa: E731
            logits = suppress_ids_(self._guided_logits(flat(base), [flat(v) for v in values]), self._suppress_limit())
            logits = logits.view(B, K, -1)[:, 0] if one else logits.view(B, K, -1)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        return out.to_tuple() if return_dict is False else out


def config_for(model) -> IVLGuidedConfig:
    """The config of a ``GuidedCausalLM`` built in memory: the guided checkpoint's ``config.json`` that
    ``save_pretrained`` would write (references as each model records them, ``""`` when it records none)."""
    from ..checkpoint_format import guided_config_dict, map_file
    from .checkpoint import reference_of

    terms = [{"model": reference_of(t.model) or "", "alpha": p.head.alpha,
              "map": None if p.head.vocab_map is None else map_file(i)}
             for i, (t, p) in enumerate(zip(model.terms, model._prepared))]
    doc = guided_config_dict(reference_of(model.base_model) or "", terms, fill=model.fill,
                             suppress_ids_from=model.suppress_ids_from, base_config=model.base_model.config)
    return IVLGuidedConfig.from_dict(doc)


def guided_config_of(directory: str, config) -> IVLGuidedConfig:
    """The config of a loaded guided checkpoint: ``config`` when ``AutoModelForCausalLM`` already read it."""
    if config is None:
        return IVLGuidedConfig.from_pretrained(directory)
    if not isinstance(config, IVLGuidedConfig):
        raise TypeError(f"config must be the guided checkpoint's IVLGuidedConfig, got {type(config).__name__} "
                        f"(model_type {getattr(config, 'model_type', None)!r})")
    if not getattr(config, "_name_or_path", None):
        config._name_or_path = os.fspath(directory)
    return config

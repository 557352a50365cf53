"""``GuidedCausalLM``: a base model plus guidance terms, decoding with one fused LM head for both projections.

    logits = base_hidden @ base_lm_head.T + sum_i alpha_i * remap_i(value_hidden_i @ value_lm_head_i.T)

The first term is fused with the base head (``fused_guided_logits(value_hidden, value_w, base_hidden=...,
base_weight=...)``); further terms (proxy-tuning: expert +alpha, anti-expert -alpha) are added in place with
``out=`` aliasing ``base_logits``. Every model runs its backbone only, incrementally, with its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from ..ops.guided_logits import fused_guided_logits
from ._common import (BaseToValueIds, check_generate_kwargs, fallback_input_id, input_vocab_size,
                      resolve_vocab_map, split_causal_lm)
from ._value_state import ValueRunner


@dataclass
class GuidanceTerm:
    """One guidance model: its logits, remapped by ``vocab_map`` (base id -> its id, -1 = unmapped; ``None``
    = identity), are added with weight ``alpha`` (negative for an anti-expert)."""

    model: nn.Module
    alpha: float = 1.0
    vocab_map: Any = None


class GuidedCausalLM(nn.Module):
    """``base_model`` guided by one or several value networks; ``generate()`` decodes with the fused head.

    Args:
        base_model: a transformers causal LM (bias-free LM head, no logit softcapping).
        value_model: a causal LM (with ``alpha`` / ``vocab_map``), or a list of ``GuidanceTerm``.
        alpha, vocab_map: for a single ``value_model``; see ``GuidanceTerm``.
        fill: value logit for unmapped base ids.
        backend: ``fused_guided_logits`` backend.

    Every model reads the same base token ids (translated through its map when it has one). Models that
    tokenise differently need ``IVLLogitsProcessor`` with both tokenizers (text re-tokenisation).
    """

    def __init__(self, base_model: nn.Module, value_model: Union[nn.Module, Sequence[GuidanceTerm]], *,
                 alpha: float = 1.0, vocab_map=None, fill: float = 0.0, backend: str = "auto"):
        super().__init__()
        if isinstance(value_model, GuidanceTerm):
            terms = [value_model]
        elif isinstance(value_model, (list, tuple)):
            terms = list(value_model)
            if not terms or not all(isinstance(t, GuidanceTerm) for t in terms):
                raise TypeError("value_model as a list must be a non-empty list of GuidanceTerm(model, alpha, vocab_map)")
        else:
            terms = [GuidanceTerm(value_model, alpha, vocab_map)]
        self.base_model = base_model
        self.value_models = nn.ModuleList([t.model for t in terms])
        self.terms = terms
        self.fill = float(fill)
        self.backend = backend
        self._base_backbone, self._base_weight = split_causal_lm(base_model, "base")
        Vb = self._base_weight.shape[0]
        self._parts = []
        for i, t in enumerate(terms):
            backbone, weight = split_causal_lm(t.model, f"guidance term {i}" if len(terms) > 1 else "value")
            vmap = resolve_vocab_map(t.vocab_map, Vb, weight.shape[0], self._base_weight.device,
                                     role=f"guidance term {i}" if len(terms) > 1 else "value")
            self._parts.append((backbone, weight, vmap, float(t.alpha),
                                BaseToValueIds(vmap, input_vocab_size(t.model), fallback_input_id(t.model))))

    @property
    def vocab_size(self) -> int:
        return self._base_weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self._base_weight.device

    def _guided_logits(self, base_hidden: torch.Tensor, value_hiddens: List[torch.Tensor]) -> torch.Tensor:
        """``[B, Vb]`` float32 guided logits from ``base_hidden [B, Hb]`` and each term's ``[B, Hv_i]``."""
        _, w0, map0, a0, _ = self._parts[0]
        out = fused_guided_logits(value_hiddens[0], w0, base_hidden=base_hidden, base_weight=self._base_weight,
                                  vocab_map=map0, alpha=a0, fill=self.fill, backend=self.backend)
        for (_, w, vmap, a, _), h in zip(self._parts[1:], value_hiddens[1:]):
            fused_guided_logits(h, w, base_logits=out, out=out, vocab_map=vmap, alpha=a, fill=self.fill,
                                backend=self.backend)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: Optional[int] = None, min_new_tokens: int = 0, do_sample: Optional[bool] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id=None, pad_token_id: Optional[int] = None, streamer=None, logits_processor=None,
                 generator: Optional[torch.Generator] = None, generation_config=None, **kwargs) -> torch.LongTensor:
        """Guided decoding; returns ``[B, T + new]`` token ids (prompt included), like ``model.generate``.

        Args:
            input_ids: ``[B, T]`` prompts, left-padded; ``attention_mask [B, T]`` (``None`` = no padding).
            max_new_tokens / min_new_tokens: limits on generated tokens (EOS is suppressed before the minimum).
            do_sample, temperature, top_k, top_p: sampling (transformers' warpers); greedy by default.
            eos_token_id, pad_token_id: int or list; finished rows are padded with ``pad_token_id`` and
                generation stops when every row has finished. Defaults from the base generation config.
            streamer: an object with ``put(ids)`` / ``end()`` (e.g. ``transformers.TextStreamer``); batch 1.
            logits_processor: extra transformers logits processors, applied after the guidance.
            generator: ``torch.Generator`` for sampling.
        Beam search, assisted decoding and other modes raise ``ValueError`` before anything runs.
        """
        from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                  TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        gc = generation_config or getattr(self.base_model, "generation_config", None)
        check_generate_kwargs(kwargs, gc)
        unknown = set(kwargs) - {"num_beams", "num_return_sequences", "use_cache", "return_dict_in_generate",
                                 "output_scores"} - set(_unsupported_names())
        if unknown:
            raise TypeError(f"GuidedCausalLM.generate() got unsupported arguments: {sorted(unknown)}")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("return_dict_in_generate is not supported: generate() returns the token ids")

        def cfg(name, value, default):
            if value is not None:
                return value
            v = getattr(gc, name, None) if gc is not None else None
            return default if v is None else v

        max_new_tokens = int(cfg("max_new_tokens", max_new_tokens, 20))
        do_sample = bool(cfg("do_sample", do_sample, False))
        eos = cfg("eos_token_id", eos_token_id, None)
        eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        pad = pad_token_id if pad_token_id is not None else getattr(gc, "pad_token_id", None)
        if pad is None:
            pad = eos_list[0] if eos_list else 0
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        B, T = input_ids.shape
        device = self.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(mask.shape)} must have the shape of input_ids {list(input_ids.shape)}")
        if streamer is not None and B != 1:
            raise ValueError("streamers support batch size 1 only (as in transformers)")

        procs = LogitsProcessorList()
        if min_new_tokens and eos_list:
            procs.append(MinNewTokensLengthLogitsProcessor(T, int(min_new_tokens), eos_list, device=device))
        if logits_processor:
            procs.extend(logits_processor)
        if do_sample:
            t = float(cfg("temperature", temperature, 1.0))
            if t <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {t}")
            if t != 1.0:
                procs.append(TemperatureLogitsWarper(t))
            k = int(cfg("top_k", top_k, 0) or 0)
            if k > 0:
                procs.append(TopKLogitsWarper(k))
            p = float(cfg("top_p", top_p, 1.0))
            if p < 1.0:
                procs.append(TopPLogitsWarper(p))

        base_runner = ValueRunner(self._base_backbone)
        runners = [ValueRunner(part[0]) for part in self._parts]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        seqs = input_ids
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos_list, device=device) if eos_list else None
        step_ids, step_mask = input_ids, mask
        for _ in range(max_new_tokens):
            bh = base_runner.feed(step_ids, step_mask)
            vhs = [runner.feed(part[4](step_ids), step_mask) for runner, part in zip(runners, self._parts)]
            scores = self._guided_logits(bh, vhs)
            if len(procs):
                scores = procs(seqs, scores)
            if do_sample:
                probs = torch.softmax(scores, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            seqs = torch.cat([seqs, next_tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if eos_t is not None:
                unfinished &= ~torch.isin(next_tokens, eos_t)
                if not bool(unfinished.any()):
                    break
            # Finished rows keep feeding (pad) tokens with mask 1, as transformers does: their outputs are unused.
            step_ids = next_tokens[:, None]
            step_mask = torch.ones((B, 1), dtype=torch.long, device=device)
        if streamer is not None:
            streamer.end()
        return seqs

    def forward(self, *args, **kwargs):
        raise NotImplementedError("GuidedCausalLM is for decoding: use .generate(); train with IVLForCausalLM")


def _unsupported_names():
    from ._common import UNSUPPORTED_GENERATE_KWARGS

    return UNSUPPORTED_GENERATE_KWARGS.keys()

"""What ``GuidedCausalLM.generate`` needs beside the models: its arguments checked and resolved against the
generation config (``resolve_settings`` -> ``Settings``), the outputs it collects (``Outputs``,
``GuidedGenerateOutput``) and the choice of the next token (``choose``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from transformers.generation import GenerateDecoderOnlyOutput

from .._validate import check_int
from ..guidance import resolve_suppress_from
from ._common import UNSUPPORTED_GENERATE_KWARGS, check_generate_kwargs, infer_attention_mask


@dataclass
class GuidedGenerateOutput(GenerateDecoderOnlyOutput):
    """``GuidedCausalLM.generate(return_dict_in_generate=True)``: transformers' decoder-only output
    (``sequences``, ``scores``, ``logits``) plus ``term_logits``: one entry per generated token, each a tuple
    ``(base_logits, term_1_logits, ..., term_n_logits)`` of float32 ``[B, Vb]`` tensors, every term's logits
    remapped onto the base vocabulary (``fill`` where unmapped) and not scaled by its alpha, so that
    ``logits[t] == term_logits[t][0] + sum_i alpha_i * term_logits[t][i]`` (ids suppressed for the tokenizer
    are ``-inf`` in ``logits`` and ``scores`` only)."""

    term_logits: Optional[Tuple[Tuple[torch.Tensor, ...], ...]] = None


@dataclass
class Settings:
    """``GuidedCausalLM.generate``'s arguments, checked and resolved against the generation config."""

    input_ids: torch.Tensor          # [B, T] long, on the model's device
    mask: torch.Tensor               # [B, T] long
    tokenizer: Any
    max_new_tokens: int
    do_sample: bool
    pad: int
    pad_finished: bool               # finished rows get pad (an EOS is known)
    limit: Optional[int]             # ids >= limit are suppressed
    procs: Any                       # LogitsProcessorList
    criteria: Any                    # StoppingCriteriaList
    return_dict: bool
    want_scores: bool
    want_logits: bool
    want_terms: bool
    eos_ids: Optional[torch.Tensor] = None
    cache_implementation: Optional[str] = None
    eos: List[int] = field(default_factory=list)


class Outputs:
    """What ``generate`` returns: the sequences, grown in a buffer sized for the whole run (a view per step, no
    per-step concatenation), and on request each step's scores, guided logits and term logits. ``copy``: the
    decoder's outputs are buffers it reuses (a CUDA graph's), so kept tensors are copies."""

    def __init__(self, s: Settings, term_logits, copy: bool):
        B, T = s.input_ids.shape
        self.s, self.term_logits, self.copy = s, term_logits, copy
        self.buf = s.input_ids.new_empty((B, T + s.max_new_tokens))
        self.buf[:, :T] = s.input_ids
        self.sequences = self.buf[:, :T]
        self.scores = () if s.want_scores else None
        self.logits = () if s.want_logits else None
        self.terms = () if s.want_terms else None

    def add_step(self, base_hidden, value_hiddens, logits: torch.Tensor) -> torch.Tensor:
        """Record one step; return the processed scores the next token is chosen from."""
        procs = self.s.procs
        if self.terms is not None:
            self.terms += (self.term_logits(base_hidden, value_hiddens),)
        if self.logits is not None:
            self.logits += (logits.clone() if len(procs) or self.copy else logits,)
        scores = procs(self.sequences, logits) if len(procs) else logits
        if self.scores is not None:
            self.scores += (scores.clone() if self.copy and scores is logits else scores,)
        return scores

    def append(self, tokens: torch.Tensor) -> None:
        n = self.sequences.shape[1]
        self.buf[:, n] = tokens
        self.sequences = self.buf[:, : n + 1]

    def result(self):
        seqs = self.sequences if self.sequences.shape[1] == self.buf.shape[1] else self.sequences.clone()
        if self.s.return_dict:
            return GuidedGenerateOutput(sequences=seqs, scores=self.scores, logits=self.logits, term_logits=self.terms)
        return seqs


def choose(scores: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
    """The next token per row: sampled from ``softmax(scores)`` or the argmax."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


def resolve_settings(model, input_ids, attention_mask, *, max_new_tokens, min_new_tokens, max_length, do_sample,
                     temperature, top_k, top_p, eos_token_id, pad_token_id, streamer, logits_processor,
                     stopping_criteria, stop_strings, max_time, tokenizer, generation_config,
                     return_dict_in_generate, output_scores, output_logits, output_term_logits,
                     suppress_ids_from, cache_implementation, kwargs) -> Settings:
    """Every argument of ``GuidedCausalLM.generate`` (``model``) checked and resolved against the generation config."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, StoppingCriteriaList,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    explicit_gc = generation_config is not None
    gc = generation_config or getattr(model.base_model, "generation_config", None)
    check_generate_kwargs(kwargs, gc)
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name):
            raise ValueError(f"{name}=True is not supported by GuidedCausalLM.generate (each model runs its "
                             f"backbone only); use output_scores, output_logits or output_term_logits")
    unknown = set(kwargs) - {"num_beams", "num_return_sequences", "use_cache", "output_attentions",
                             "output_hidden_states"} - set(UNSUPPORTED_GENERATE_KWARGS)
    if unknown:
        raise TypeError(f"GuidedCausalLM.generate() got unsupported arguments: {sorted(unknown)}")

    def cfg(name, value, default):
        if value is not None:
            return value
        v = getattr(gc, name, None) if gc is not None else None
        return default if v is None else v

    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int64/int32 tensor [B, T], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): every row needs at least one "
                         f"prompt token (e.g. the tokenizer's BOS)")
    if max_new_tokens is None and max_length is None and explicit_gc and gc.max_new_tokens is None:
        max_length = getattr(gc, "max_length", None)
    if max_new_tokens is None and max_length is not None:
        max_length = check_int("max_length", max_length)
        if max_length <= T:
            raise ValueError(f"max_length={max_length} leaves no room for new tokens after the {T}-token prompt; "
                             f"pass max_new_tokens instead")
        max_new_tokens = max_length - T
    max_new_tokens = check_int("max_new_tokens", cfg("max_new_tokens", max_new_tokens, 20))
    min_new_tokens = check_int("min_new_tokens", min_new_tokens or 0, minimum=0)
    do_sample = bool(cfg("do_sample", do_sample, False))
    eos = cfg("eos_token_id", eos_token_id, None)
    eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = pad_token_id if pad_token_id is not None else getattr(gc, "pad_token_id", None)
    if pad is None:
        pad = eos_list[0] if eos_list else 0
    return_dict = bool(cfg("return_dict_in_generate", return_dict_in_generate, False))
    want_scores = return_dict and bool(cfg("output_scores", output_scores, False))
    want_logits = return_dict and bool(cfg("output_logits", output_logits, False))
    want_terms = return_dict and bool(output_term_logits)
    if output_term_logits and not return_dict:
        raise ValueError("output_term_logits=True needs return_dict_in_generate=True")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    limit = resolve_suppress_from(suppress_ids_from if suppress_ids_from is not None else model.suppress_ids_from,
                                  tokenizer, model.vocab_size)

    device = model.device
    input_ids = input_ids.to(device).long()
    if attention_mask is None:
        mask = infer_attention_mask(input_ids, pad_token_id if pad_token_id is not None else
                                    getattr(gc, "pad_token_id", None), eos_list)
    else:
        mask = attention_mask.to(device).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(mask.shape)} must have the shape of input_ids {list(input_ids.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of input_ids has no real token (attention_mask all 0): every prompt needs at least "
                         "one token")
    if streamer is not None and B != 1:
        raise ValueError("streamers support batch size 1 only (as in transformers)")

    criteria = StoppingCriteriaList()
    if stopping_criteria is not None:
        criteria.extend(stopping_criteria if isinstance(stopping_criteria, (list, tuple)) else [stopping_criteria])
    max_time = cfg("max_time", max_time, None)
    if max_time is not None:
        from transformers import MaxTimeCriteria

        criteria.append(MaxTimeCriteria(max_time=float(max_time)))
    stop_strings = cfg("stop_strings", stop_strings, None)
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer) or "
                             "GuidedCausalLM(..., tokenizer=tokenizer)")
        from transformers import StopStringCriteria

        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    # Finished rows are padded when an EOS is known, as transformers does (its EosTokenCriteria).
    pad_finished = bool(eos_list) or any(hasattr(c, "eos_token_id") for c in criteria)

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

    return Settings(input_ids=input_ids, mask=mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                     do_sample=do_sample, eos=eos_list, pad=pad, pad_finished=pad_finished, limit=limit,
                     procs=procs, criteria=criteria, return_dict=return_dict, want_scores=want_scores,
                     want_logits=want_logits, want_terms=want_terms,
                     eos_ids=torch.tensor(eos_list, device=device) if eos_list else None,
                     cache_implementation=cfg("cache_implementation", cache_implementation, None))

"""What ``GuidedCausalLM.generate`` needs beside the models: its arguments checked and resolved against the
generation config (``resolve_settings`` -> ``Settings``), the outputs it collects (``Outputs``,
``GuidedGenerateOutput``) and the choice of the next token (``choose``)."""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from transformers.generation import GenerateDecoderOnlyOutput

from .._validate import check_int
from ..guidance import resolve_suppress_from
from ._common import UNSUPPORTED_GENERATE_KWARGS, check_generate_kwargs, infer_attention_mask, input_vocab_size
from ._static import _log_once

logger = logging.getLogger("ivl_kernels.hf")

# Generation-config fields applied as transformers applies them (through its own logits processors), whether
# they come from a keyword argument, the ``generation_config`` passed or the base model's.
CONFIG_PROCESSOR_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
                           "suppress_tokens", "begin_suppress_tokens", "min_p", "typical_p")
# Fields transformers would apply that guided decoding does not: a keyword argument is refused (TypeError), a
# value set in a generation config is said once (WARNING) and not applied.
NOT_APPLIED_FIELDS = ("sequence_bias", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                      "exponential_decay_length_penalty", "epsilon_cutoff", "eta_cutoff", "top_h",
                      "watermarking_config", "renormalize_logits", "guidance_scale", "token_healing")


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


def merged_generation_config(model_gc, passed):
    """The generation config a call runs with, as transformers builds it: the ``generation_config`` passed, its
    unset fields taken from the model's (transformers >= 5: ``update(defaults_only=True)``; before, the passed
    one replaces the model's), or the model's own. A copy: the caller's objects are not modified."""
    if passed is None:
        return copy.deepcopy(model_gc)
    gc = copy.deepcopy(passed)
    if model_gc is not None and "defaults_only" in inspect.signature(gc.update).parameters:
        gc.update(**model_gc.to_dict(), defaults_only=True)
    return gc


def _global_defaults(gc) -> dict:
    """transformers' values for fields a config leaves unset (>= 5: ``None`` fields, e.g. ``top_k`` 50 when
    sampling); before 5 a config holds its defaults itself."""
    get = getattr(gc, "_get_default_generation_params", None)
    try:
        return dict(get()) if callable(get) else {}
    except Exception:
        return {}


def _eos_list(eos) -> List[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(e) for e in eos.reshape(-1).tolist()]
    if isinstance(eos, int):
        return [int(eos)]
    return [int(e) for e in eos]


def resolve_settings(model, input_ids, attention_mask, *, max_new_tokens, min_new_tokens, max_length, do_sample,
                     temperature, top_k, top_p, eos_token_id, pad_token_id, streamer, logits_processor,
                     stopping_criteria, stop_strings, max_time, tokenizer, generation_config,
                     return_dict_in_generate, output_scores, output_logits, output_term_logits,
                     suppress_ids_from, cache_implementation, kwargs) -> Settings:
    """Every argument of ``GuidedCausalLM.generate`` (``model``) checked and resolved against the generation config."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                              NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, StoppingCriteriaList,
                              SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

    gc = merged_generation_config(getattr(model.base_model, "generation_config", None), generation_config)
    check_generate_kwargs(kwargs, gc)
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name):
            raise ValueError(f"{name}=True is not supported by GuidedCausalLM.generate (each model runs its "
                             f"backbone only); use output_scores, output_logits or output_term_logits")
    unknown = set(kwargs) - {"num_beams", "num_return_sequences", "use_cache", "output_attentions",
                             "output_hidden_states"} - set(UNSUPPORTED_GENERATE_KWARGS) - set(CONFIG_PROCESSOR_FIELDS)
    if unknown:
        raise TypeError(f"GuidedCausalLM.generate() got unsupported arguments: {sorted(unknown)}")
    defaults = _global_defaults(gc)

    def cfg(name, value, default):
        """The argument, else the generation config's value, else transformers' default, else ``default``."""
        if value is not None:
            return value
        v = getattr(gc, name, None) if gc is not None else None
        if v is None:
            v = defaults.get(name)
        return default if v is None else v

    ignored = [n for n in NOT_APPLIED_FIELDS if gc is not None and getattr(gc, n, None) not in
               (None, False, defaults.get(n))]
    if ignored:
        _log_once("GuidedCausalLM.generate does not apply these generation-config settings: "
                  + ", ".join(f"{n}={getattr(gc, n)!r}" for n in ignored), logging.WARNING)

    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int64/int32 tensor [B, T], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): every row needs at least one "
                         f"prompt token (e.g. the tokenizer's BOS)")
    if max_new_tokens is None and max_length is None and gc is not None and gc.max_new_tokens is None:
        # A max_length the config sets (not transformers' default of 20, which means 20 new tokens there too).
        from transformers import GenerationConfig

        set_length = getattr(gc, "max_length", None)
        if set_length is not None and set_length != GenerationConfig().max_length:
            max_length = set_length
    if max_new_tokens is None and max_length is not None:
        max_length = check_int("max_length", max_length)
        if max_length <= T:
            raise ValueError(f"max_length={max_length} leaves no room for new tokens after the {T}-token prompt; "
                             f"pass max_new_tokens instead")
        max_new_tokens = max_length - T
    max_new_tokens = check_int("max_new_tokens", cfg("max_new_tokens", max_new_tokens, 20))
    min_new_tokens = cfg("min_new_tokens", min_new_tokens, None)
    if min_new_tokens is None:  # min_length counts the prompt (transformers: min_new_tokens takes precedence)
        min_new_tokens = max(0, check_int("min_length", cfg("min_length", kwargs.get("min_length"), 0),
                                          minimum=0) - T)
    min_new_tokens = check_int("min_new_tokens", min_new_tokens, minimum=0)
    do_sample = bool(cfg("do_sample", do_sample, False))
    eos_list = _eos_list(cfg("eos_token_id", eos_token_id, None))
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
    size = input_vocab_size(model.base_model)
    # Every check of the prompt in one host read, before decoding.
    lo, hi, every_row_real, last_real = torch.stack([input_ids.min(), input_ids.max(), mask.any(dim=1).all(),
                                                     mask[:, -1].all()]).tolist()
    if lo < 0 or hi >= size:
        raise ValueError(f"input_ids must be in [0, {size}) (the base model's input embedding), padding included; "
                         f"got [{lo}, {hi}]")
    if not every_row_real:
        raise ValueError("a row of input_ids has no real token (attention_mask all 0): every prompt needs at least "
                         "one token")
    if not last_real:
        if attention_mask is not None:
            raise ValueError("attention_mask: every row's last token must be real (1): pad prompts on the left "
                             "(tokenizer.padding_side = 'left')")
        logger.warning("GuidedCausalLM.generate: a prompt ends with the pad token: right padding gives wrong "
                       "tokens; pad on the left (tokenizer.padding_side = 'left') and pass attention_mask")
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

    # transformers' order: its processors, the caller's, then the sampling warpers.
    procs = LogitsProcessorList()
    penalty = float(cfg("repetition_penalty", kwargs.get("repetition_penalty"), 1.0))
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    ngram = int(cfg("no_repeat_ngram_size", kwargs.get("no_repeat_ngram_size"), 0) or 0)
    if ngram > 0:
        procs.append(NoRepeatNGramLogitsProcessor(ngram))
    bad_words = cfg("bad_words_ids", kwargs.get("bad_words_ids"), None)
    if bad_words is not None:
        procs.append(NoBadWordsLogitsProcessor(bad_words, eos_token_id=eos_list or None))
    if min_new_tokens and eos_list:
        procs.append(MinNewTokensLengthLogitsProcessor(T, int(min_new_tokens), eos_list, device=device))
    suppress = cfg("suppress_tokens", kwargs.get("suppress_tokens"), None)
    if suppress is not None:
        procs.append(SuppressTokensLogitsProcessor(suppress, device=device))
    begin_suppress = cfg("begin_suppress_tokens", kwargs.get("begin_suppress_tokens"), None)
    if begin_suppress is not None:
        procs.append(SuppressTokensAtBeginLogitsProcessor(begin_suppress, T, device=device))
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
        min_p = cfg("min_p", kwargs.get("min_p"), None)
        if min_p is not None:
            procs.append(MinPLogitsWarper(float(min_p)))
        typical = float(cfg("typical_p", kwargs.get("typical_p"), 1.0))
        if typical < 1.0:
            procs.append(TypicalLogitsWarper(mass=typical))

    return Settings(input_ids=input_ids, mask=mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                     do_sample=do_sample, eos=eos_list, pad=pad, pad_finished=pad_finished, limit=limit,
                     procs=procs, criteria=criteria, return_dict=return_dict, want_scores=want_scores,
                     want_logits=want_logits, want_terms=want_terms,
                     eos_ids=torch.tensor(eos_list, device=device) if eos_list else None,
                     cache_implementation=_cache_implementation(cache_implementation, gc))


def _cache_implementation(argument, gc) -> Optional[str]:
    """The argument (checked by the decoder), else the config's when it is one guided decoding has: a config's
    ``"hybrid"`` / ``"sliding_window"``... (Gemma's ship one; transformers 5 drops ``"hybrid"``) leaves the default."""
    if argument is not None:
        return argument
    value = getattr(gc, "cache_implementation", None) if gc is not None else None
    if value in (None, "dynamic", "static"):
        return value
    _log_once(f"GuidedCausalLM.generate: the generation config's cache_implementation={value!r} is not one of "
              f"'dynamic' / 'static'; the default cache is used")
    return None

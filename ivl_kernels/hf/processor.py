"""``IVLLogitsProcessor``: attach a value network to any ``model.generate()`` as a logits processor.

    guided[b, :] = scores[b, :] + alpha * remap(value_logits[b, :])        (one fused kernel call per step)

The value model runs incrementally with its own KV cache (one new token per step, never a recompute), batched,
left padding respected. On CUDA (by default, when the value model supports a ``StaticCache`` and both models share
a tokenizer) that cache is static and the value model's decode step is captured in a CUDA graph and replayed
(``ivl_kernels.hf._static``), as ``GuidedCausalLM.generate`` does; the fused head then runs on the replayed
hidden state. The kernel gets the value model's last hidden state and its LM head weight and does the
head, the remap and the add in one pass: the value model's ``[B, Vv]`` logits are never materialised. The guided
scores are a new tensor, as every transformers logits processor returns: ``scores`` is left as it was (with
``output_logits=True`` transformers keeps it as the step's raw logits).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .._validate import check_alpha_float, check_int
from ..ops.guided_logits import fused_guided_logits
from ..checkpoint_format import tokenizer_difference
from ..guidance import BaseToValueIds, resolve_suppress_from, suppress_ids_
from ._common import (check_caller_generation_mode, check_prompt_batch, fallback_input_id, input_vocab_size,
                      resolve_vocab_map, split_causal_lm)
from ._value_state import DynamicRunner

try:  # subclass transformers' LogitsProcessor when available (generate() accepts any callable in the list)
    from transformers import LogitsProcessor as _LogitsProcessorBase
except Exception:  # pragma: no cover
    _LogitsProcessorBase = object


_ANCHOR = "a"

# Tests only: run the CUDA comparison (device flag, host copy, event) on CPU tensors, with ``_CopyDone`` as the event.
_DEFER_ON_CPU = False


def _complete_text(text: str) -> str:
    """``text`` without a trailing U+FFFD: a base token that ends in the middle of a multi-byte character decodes
    to a replacement character, which the value model would read; its bytes are held back until the character is
    complete (as transformers' ``TextStreamer`` does)."""
    return text.rstrip("\ufffd")


def _mismatch_error(detail: str) -> ValueError:
    return ValueError(
        f"IVLLogitsProcessor {detail}: either a new prompt batch (call processor.reset(attention_mask=...) first) "
        f"or a decoding mode that rewinds or reorders sequences (beam search, assisted decoding), which is not "
        f"supported")


class _CopyDone:
    """The event of a copy that is done when it returns (CPU tensors, under ``_DEFER_ON_CPU``)."""

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class _ContinuationCheck:
    """Whether each decode call continues the sequence the value cache has read: its ``input_ids[:, :-1]`` must be
    the previous call's ``input_ids`` (``read``, kept by reference: transformers makes a new tensor each step). A
    processor reused without ``reset()`` for a new prompt batch of exactly ``seen + 1`` tokens has the right shape
    but not the right tokens; unchecked, the stale cache would guide the whole generation, silently.

    CPU tensors are compared exactly, at the call (``torch.equal``, which reads no scalar through
    ``aten::_local_scalar_dense``). On CUDA that read would stall the launch queue every decode step, so the
    comparison runs on the device: a sticky flag, copied (``non_blocking``) into pinned host memory, then an event.
    ``failed()`` reads the host flag only once the event says the copy has landed (``query()``, no wait): a mismatch
    is raised one call late, after one step guided by the stale cache (the next call in practice: transformers
    reads a value on the host each step, its EOS check). One found at a generate's last call is raised by the
    processor's next call, and warned about by ``reset()``. Once found, every call raises until ``reset()``.
    """

    def __init__(self):
        self.read: Optional[torch.Tensor] = None  # the input_ids the value cache has read: the previous call's
        self.reported = False                     # a mismatch was raised
        self._failed = False                      # a mismatch was found (sticky)
        self._flag = self._host = self._event = None  # deferred (CUDA): device flag, its host copy, the copy's event

    def advance(self, input_ids: torch.Tensor) -> None:
        """The value cache has now read ``input_ids``. The deferred comparison's buffers are made at the prompt's
        call, not at a decode step (a first pinned allocation may synchronise)."""
        self.read = input_ids
        if self._flag is None and (input_ids.is_cuda or _DEFER_ON_CPU):
            cuda = input_ids.is_cuda
            self._flag = torch.zeros((), dtype=torch.bool, device=input_ids.device)
            self._host = torch.zeros((), dtype=torch.bool, pin_memory=cuda)
            self._event = torch.cuda.Event() if cuda else _CopyDone()

    def continues(self, input_ids: torch.Tensor) -> bool:
        """``False`` when ``input_ids[:, :-1]`` is not ``read`` (CPU). Deferred (CUDA): ``True`` now; a mismatch
        is seen by a later ``failed()``."""
        if self._flag is None:
            if not torch.equal(input_ids[:, :-1], self.read):
                self._failed = True
            return not self._failed
        self._flag |= (input_ids[:, :-1] != self.read).any()
        self._host.copy_(self._flag, non_blocking=True)
        self._event.record(torch.cuda.current_stream(input_ids.device) if input_ids.is_cuda else None)
        return True

    def failed(self, wait: bool = False) -> bool:
        """Whether a mismatch was found: the device's flag counts once its copy has landed (``wait``: wait for it;
        never during decoding)."""
        if not self._failed and self._flag is not None:
            if wait:
                self._event.synchronize()
            if wait or self._event.query():
                self._failed = bool(self._host)
        return self._failed


class IVLLogitsProcessor(_LogitsProcessorBase):
    """Guide ``base_model.generate()`` with a value network: ``scores += alpha * remap(value_logits)``.

    Args:
        value_model: a transformers causal LM (or a PEFT model wrapping one) whose LM head is a plain
            bias-free linear map (tied or not).
        alpha: guidance strength.
        vocab_map: ``VocabMap`` or int tensor ``[Vb]`` (base id -> value id, -1 = unmapped). ``None`` =
            identity (value vocabulary ``Vv <= Vb``; base ids ``>= Vv`` unmapped).
        attention_mask: ``[B, T]`` the prompt mask given to ``generate`` (left padding). ``None`` = no padding.
        value_tokenizer, base_tokenizer: give both when the two models tokenise differently: the value model
            then reads the generated text re-tokenised with its own tokenizer (cache reused for the unchanged
            prefix), and ``vocab_map`` is required to carry its logits onto the base vocabulary.
        fill: the value logit used for unmapped base ids.
        backend: ``fused_guided_logits`` backend (``"auto" | "cuda" | "triton" | "torch"``).
        value_input_ids, value_attention_mask: the value model's own prompt ``[B, T_v]`` (its own token ids,
            left-padded), e.g. the prompt in its chat format (proxy-tuning's expert); the value model then reads
            the generated tokens after it (re-tokenising: the generated text, re-tokenised, after it). ``None``:
            it reads the base prompt.
        suppress_ids_from: base ids ``>=`` this get ``-inf`` (never generated); default ``len(base_tokenizer)``
            when ``base_tokenizer`` is given: LM heads padded past their tokenizer (Qwen2.5: 152064 rows,
            151665 tokens) then never emit an id the tokenizer cannot decode.
        cache_implementation: the value model's cache. ``None`` (default): on CUDA ``"static"`` when the value
            model supports a ``StaticCache`` and no re-tokenising is needed (else ``"dynamic"``, said once at INFO
            level); on CPU ``"dynamic"``. ``"static"``: a ``StaticCache`` of the prompt plus ``max_new_tokens``
            columns (rounded up to 64; without ``max_new_tokens``, 256 more, doubled by re-reading the sequence
            when it fills), its decode step captured in a CUDA graph on CUDA (``cuda_graph``: ``None``/``True``
            capture, ``False`` runs it eagerly). Same tokens as the dynamic cache.
        compile_step: ``True``: the value model's decode forward runs through ``torch.compile`` (static cache,
            chosen on CPU too; compiled on its first decode step, then captured in the CUDA graph on CUDA), as
            ``GuidedCausalLM.generate(compile_step=True)``. Needs a model that supports ``StaticCache`` and one
            shared tokenizer. Off by default.
        max_new_tokens: the ``max_new_tokens`` given to ``generate`` (sizes the static cache; optional).

    Call shapes (transformers' contract): ``input_ids [B, t]`` (prompt + tokens so far), ``scores [B, Vb]``;
    returns the guided scores, a new ``[B, Vb]`` tensor (``scores`` is not modified). Supported: greedy search and sampling. Beam search, assisted
    decoding, contrastive search... raise ``ValueError`` on the first call, before any token is chosen. One
    processor serves one prompt batch: call ``reset(attention_mask=...)`` before reusing it for another (the same
    prompt batch generated again restarts by itself). Each call must continue the previous one's ``input_ids`` by
    one token; one that does not (a new prompt batch without ``reset()``) raises ``ValueError``: at that call on
    CPU, at the next call on CUDA (compared on the device, read without a sync), and so on until ``reset()``.
    """

    def __init__(self, value_model: nn.Module, *, alpha: float = 1.0, vocab_map=None,
                 attention_mask: Optional[torch.Tensor] = None, value_tokenizer=None, base_tokenizer=None,
                 fill: float = 0.0, backend: str = "auto", value_input_ids: Optional[torch.Tensor] = None,
                 value_attention_mask: Optional[torch.Tensor] = None, suppress_ids_from: Optional[int] = None,
                 cache_implementation: Optional[str] = None, cuda_graph: Optional[bool] = None,
                 max_new_tokens: Optional[int] = None, compile_step: bool = False):
        from ._static import static_supported

        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be None, 'dynamic' or 'static', got {cache_implementation!r}")
        if cuda_graph not in (None, True, False):
            raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        if cuda_graph and cache_implementation == "dynamic":
            raise ValueError("cuda_graph=True needs the static cache (cache_implementation='static' or None)")
        if not isinstance(compile_step, bool):
            raise TypeError(f"compile_step must be True or False, got {compile_step!r}")
        if compile_step and cache_implementation == "dynamic":
            raise ValueError("compile_step=True compiles the static cache's decode step: it needs "
                             "cache_implementation='static' (or None), not 'dynamic'")
        self.compile_step = compile_step
        # What the value tokenizer takes, found on first use (re-tokenising only): split_special_tokens, and the ids
        # of the continuation anchor.
        self._split_special: Optional[bool] = None
        self._anchor_ids: Optional[list] = None
        self.cache_implementation = cache_implementation
        self.cuda_graph = cuda_graph
        self.max_new_tokens = None if max_new_tokens is None else check_int("max_new_tokens", max_new_tokens)
        self.value_model = value_model
        self.backbone, self.value_weight = split_causal_lm(value_model, "value")
        # A number is checked here, a per-row tensor by the op (once per tensor version on a GPU).
        self.alpha = alpha if isinstance(alpha, torch.Tensor) else check_alpha_float("alpha", alpha)
        self.fill = float(fill)
        self.backend = backend
        self.value_tokenizer = value_tokenizer
        self.base_tokenizer = base_tokenizer
        if (value_tokenizer is None) != (base_tokenizer is None):
            raise ValueError("give both value_tokenizer and base_tokenizer (to re-tokenise for the value model), "
                             "or neither (both models share one tokenizer)")
        # Same vocabulary and class: the value model reads the base ids; else the text, re-tokenised.
        self.retokenize = tokenizer_difference(base_tokenizer, value_tokenizer, exact=True) is not None
        if self.retokenize and vocab_map is None:
            raise ValueError("the base and value tokenizers differ but no vocab_map was given: pass "
                             "vocab_map=VocabMap.from_tokenizers(base_tokenizer, value_tokenizer) so value logits "
                             "can be carried onto the base vocabulary")
        if self.retokenize and compile_step:
            raise ValueError("compile_step=True needs one tokenizer for both models: re-tokenising runs the value "
                             "model on a dynamic cache")
        self._vocab_map_arg = vocab_map
        self.suppress_ids_from = suppress_ids_from
        resolve_suppress_from(suppress_ids_from, base_tokenizer)  # type / range check now
        if vocab_map is not None:
            index = vocab_map if isinstance(vocab_map, torch.Tensor) else getattr(vocab_map, "index", None)
            if isinstance(index, torch.Tensor) and index.dim() == 1:
                # The base vocabulary size is known from the map: check it now, not at the first step.
                resolve_vocab_map(vocab_map, index.shape[0], self.value_weight.shape[0], self.value_weight.device)
            if base_tokenizer is not None and isinstance(index, torch.Tensor) and len(base_tokenizer) > index.shape[0]:
                raise ValueError(f"vocab_map has {index.shape[0]} entries but the base tokenizer has "
                                 f"{len(base_tokenizer)} tokens: it must have one entry per base id")
        # What this transformers and model can do, after every argument check (a wrong argument is named first).
        if compile_step and static_supported(value_model):
            raise ValueError(f"compile_step=True needs a static cache: {static_supported(value_model)}")
        self.reset(attention_mask=attention_mask, value_input_ids=value_input_ids,
                   value_attention_mask=value_attention_mask)

    def reset(self, attention_mask: Optional[torch.Tensor] = None, value_input_ids: Optional[torch.Tensor] = None,
              value_attention_mask: Optional[torch.Tensor] = None) -> None:
        """Forget the value cache; the next call starts a new prompt batch with this prompt mask (and this value
        prompt: see ``value_input_ids`` in the class docstring)."""
        if value_input_ids is None and value_attention_mask is not None:
            raise ValueError("value_attention_mask given without value_input_ids")
        check = getattr(self, "_check", None)
        if check is not None and not check.reported and check.failed(wait=True):
            warnings.warn("IVLLogitsProcessor: a call since the last reset() got input_ids that did not continue "
                          "the sequence its value cache had read (found on the device, after that call): its guided "
                          "scores came from a stale value cache. Call reset() before each new prompt batch.",
                          RuntimeWarning, stacklevel=2)
        self.attention_mask = attention_mask
        self.value_input_ids = value_input_ids
        self.value_attention_mask = value_attention_mask
        self._restart()

    def _restart(self) -> None:
        self._runner = DynamicRunner(self.backbone, pad_id=fallback_input_id(self.value_model))
        self._static = None   # (runner, decoder) while the static path runs this batch
        self._vocab_map = None
        self._translate = None
        self._prompt = None
        self._seen = 0
        self._own = None      # (ids [B, T_v], mask [B, T_v]) of the value prompt, checked
        self._limit = None
        self._check = _ContinuationCheck()

    def check_base_vocab(self, base_vocab_size: int) -> None:
        """Raise ``ValueError`` now if the value model cannot guide a base with ``base_vocab_size`` ids."""
        self._vocab_map = resolve_vocab_map(self._vocab_map_arg, base_vocab_size, self.value_weight.shape[0],
                                            self.value_weight.device)

    # ------------------------------------------------------------------------------------------------------
    def _start(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        check_caller_generation_mode()
        B, T = input_ids.shape
        mask = self.attention_mask
        if mask is not None:
            if mask.shape[0] != B:
                raise ValueError(
                    f"the prompt attention_mask has batch size {mask.shape[0]} but generate() runs {B} sequences: "
                    f"num_beams > 1 (beam search) and num_return_sequences > 1 are not supported by "
                    f"IVLLogitsProcessor; repeat prompts in the batch for several samples per prompt")
            if mask.shape[1] != T:
                raise ValueError(f"attention_mask must be the prompt mask given to generate(): it has "
                                 f"{mask.shape[1]} columns but the prompt has {T} tokens")
        self.check_base_vocab(scores.shape[-1])
        self._limit = resolve_suppress_from(self.suppress_ids_from, self.base_tokenizer, scores.shape[-1])
        if self.value_input_ids is not None:
            self._own = check_prompt_batch(self.value_input_ids, self.value_attention_mask, B,
                                           input_vocab_size(self.value_model), "value_input_ids", input_ids.device)
        self._translate = BaseToValueIds(self._vocab_map, input_vocab_size(self.value_model),
                                         fallback_input_id(self.value_model))
        self._prompt = input_ids.clone()
        self._seen = T

    # ---- the static path ---------------------------------------------------------------------------------
    def _value_prompt(self, input_ids: torch.Tensor) -> tuple:
        """``(ids, mask)``: what the value model reads first (its own prompt, or the base prompt translated)."""
        if self._own is not None:
            return self._own
        mask = self.attention_mask if self.attention_mask is not None else torch.ones_like(input_ids)
        return self._translate(input_ids), mask.to(input_ids.device).long()

    def _static_columns(self, T: int) -> int:
        from ._static import bucketed

        return bucketed(T + (self.max_new_tokens or 256))

    def _use_static(self, device: torch.device, columns: int) -> bool:
        """Whether the value model runs on a static cache of ``columns`` columns for this batch."""
        from ._static import _log_once, forced_static_error, static_supported, static_window_fits

        mode = self.cache_implementation
        forced = self.compile_step or mode == "static"
        if not forced and (mode == "dynamic" or device.type != "cuda" or self.cuda_graph is False):
            return False
        window = static_window_fits(self.value_model, columns)
        if window and forced:
            raise forced_static_error("IVLLogitsProcessor", window, self.compile_step)
        why = window or ("" if forced else static_supported(self.value_model))
        if why:
            _log_once(f"IVLLogitsProcessor: dynamic cache for the value model ({why})")
            return False
        return True

    def _static_prefill(self, ids: torch.Tensor, mask: torch.Tensor, columns: Optional[int] = None) -> torch.Tensor:
        """Build (or reuse) the static runner for ``columns`` cache columns and read the value prompt."""
        from ._static import StaticDecoder, StaticRunner, bucketed, model_dtype, reuse_or_build

        B, T = ids.shape
        graph = ids.device.type == "cuda" and self.cuda_graph is not False
        size = bucketed(columns) if columns is not None else self._static_columns(T)

        def build():
            runner = StaticRunner(self.backbone, self.value_model, size, compiled=self.compile_step)
            return runner, StaticDecoder([runner], lambda hs: hs[0], use_graph=graph,
                                         graph_required=bool(self.cuda_graph))

        # The model's dtype too: after ``value_model.to(dtype)`` the kept cache would no longer fit.
        key = (B, size, graph, ids.device, model_dtype(self.backbone), self.compile_step)
        runner, decoder = reuse_or_build(self, "_static_kept", key, build)
        self._static = (runner, decoder)
        return decoder.prefill([(ids, mask)])

    def _static_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ._static import _log_once, static_window_fits

        runner, decoder = self._static
        if runner.columns >= runner.max_len:
            # Full: a cache twice the size, filled by reading the whole value sequence again (prompt + tokens).
            ids, mask = self._value_prompt(self._prompt)
            new = self._translate(input_ids[:, self._prompt.shape[1]:])
            ids = torch.cat([ids, new], 1)
            mask = torch.cat([mask, torch.ones_like(new)], 1)
            why = static_window_fits(self.value_model, 2 * runner.max_len)
            if why:
                # The rest of this batch on the dynamic cache (it has no window limit), from the whole sequence.
                _log_once(f"IVLLogitsProcessor: the value model's static cache is full and cannot grow ({why}); "
                          f"the rest of the batch runs on the dynamic cache")
                self._static = None
                return self._runner.feed(ids, mask)
            return self._static_prefill(ids, mask, columns=2 * runner.max_len)
        return decoder.step([self._translate(input_ids[:, -1:])])

    def _value_sequences(self, input_ids: torch.Tensor) -> list:
        """Re-tokenise each row's text (prompt without padding + generated tokens) with the value tokenizer."""
        T0 = self._prompt.shape[1]
        rows = []
        for r in range(input_ids.shape[0]):
            ids = input_ids[r]
            if self.attention_mask is not None:
                keep = torch.cat([self.attention_mask[r].to(ids.device).bool(),
                                  torch.ones(ids.shape[0] - T0, dtype=torch.bool, device=ids.device)])
                ids = ids[keep]
            ids = ids.tolist()
            n_prompt = len(ids) - (input_ids.shape[1] - T0)
            text = _complete_text(self.base_tokenizer.decode(ids, skip_special_tokens=True))
            if self._own is not None:
                # Its own prompt, then the generated text re-tokenised after it. The generated text is the whole
                # row's decoded text past the prompt's (decoding the new tokens alone loses a leading space under a
                # SentencePiece decoder), read as a continuation (a tokenizer's dummy prefix is not added again).
                own_ids, own_mask = self._own
                prompt_text = self.base_tokenizer.decode(ids[:n_prompt], skip_special_tokens=True)
                if text.startswith(prompt_text):
                    new = text[len(prompt_text):]
                else:
                    new = _complete_text(self.base_tokenizer.decode(ids[n_prompt:], skip_special_tokens=True))
                rows.append(own_ids[r][own_mask[r].bool()].tolist() + self._continuation_ids(new))
                continue
            rows.append(self._encode(text, add_special_tokens=True))
        return rows

    def _encode(self, text: str, add_special_tokens: bool) -> list:
        """The value tokenizer's ids of ``text`` read as plain text: a special token's string in generated text
        (``<s>``, ``[INST]``, ``<|im_end|>``) stays characters (``split_special_tokens``, where the tokenizer takes
        it; the base's own special tokens were dropped by ``skip_special_tokens``)."""
        tok = self.value_tokenizer
        if self._split_special is None:
            try:
                tok("a", add_special_tokens=False, split_special_tokens=True)
                self._split_special = True
            except (TypeError, ValueError):  # e.g. MistralCommonBackend, which never parses special tokens
                self._split_special = False
        kw = {"split_special_tokens": True} if self._split_special else {}
        return list(tok(text, add_special_tokens=add_special_tokens, **kw)["input_ids"])

    def _continuation_ids(self, text: str) -> list:
        """``text`` tokenised as the continuation of earlier text: a SentencePiece tokenizer's dummy prefix would
        read ``" paris"`` alone as ``["▁", "▁paris"]``; encoded after an anchor (``"a"``) whose own ids it starts
        with, the anchor's ids are dropped. Without that prefix match, ``text`` alone."""
        if not text:
            return []
        if self._anchor_ids is None:
            self._anchor_ids = self._encode(_ANCHOR, add_special_tokens=False)
        anchor = self._anchor_ids
        both = self._encode(_ANCHOR + text, add_special_tokens=False)
        if anchor and both[:len(anchor)] == anchor:
            return both[len(anchor):]
        return self._encode(text, add_special_tokens=False)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, T = input_ids.shape
        if self._prompt is not None:
            new_prompt = (T == self._prompt.shape[1] and B == self._prompt.shape[0]
                          and torch.equal(input_ids, self._prompt.to(input_ids.device)))
            # An earlier call's mismatch (CUDA: read one call late; waited for before a restart forgets it).
            if self._check.failed(wait=new_prompt):
                self._check.reported = True
                raise _mismatch_error("got, at an earlier call, input_ids that did not continue the sequence its "
                                      "value cache had read (on CUDA this is found one call late: that call's "
                                      "guided scores came from a stale value cache)")
            if new_prompt:
                self._restart()  # the same prompt generated again
            elif B != self._prompt.shape[0] or T != self._seen + 1:
                raise ValueError(
                    f"IVLLogitsProcessor expected {self._prompt.shape[0]} sequences of {self._seen + 1} tokens "
                    f"(one new token per call) but got input_ids of shape {[B, T]}: either a new prompt batch "
                    f"(call processor.reset(attention_mask=...) first) or a decoding mode that rewinds or "
                    f"reorders sequences (beam search, assisted decoding), which is not supported")
        if self._prompt is None:
            self._start(input_ids, scores)
            if self.retokenize:
                hidden = self._runner.sync(self._value_sequences(input_ids), input_ids.device)
            else:
                prompt = self._value_prompt(input_ids)
                if self._use_static(input_ids.device, self._static_columns(prompt[0].shape[1])):
                    hidden = self._static_prefill(*prompt)
                else:
                    hidden = self._runner.feed(*prompt)
        else:
            if not self._check.continues(input_ids):
                self._check.reported = True
                raise _mismatch_error(f"got input_ids of shape {[B, T]} whose first {T - 1} tokens are not the "
                                      f"sequence its value cache has read (the previous call's input_ids)")
            self._seen = T
            if self.retokenize:
                hidden = self._runner.sync(self._value_sequences(input_ids), input_ids.device)
            elif self._static is not None:
                hidden = self._static_step(input_ids)
            else:
                hidden = self._runner.feed(self._translate(input_ids[:, -1:]),
                                           torch.ones((B, 1), dtype=torch.long, device=input_ids.device),
                                           every_row_fed=True)
        self._check.advance(input_ids)
        # Not in place: transformers keeps ``scores`` as the step's raw logits (output_logits=True).
        guided = fused_guided_logits(hidden, self.value_weight, base_logits=scores, vocab_map=self._vocab_map,
                                     alpha=self.alpha, fill=self.fill, backend=self.backend)
        return suppress_ids_(guided, self._limit)

"""``GuidedCausalLM``: a base model plus guidance terms, decoding with one fused LM head for both projections.

    logits = base_hidden @ base_lm_head.T + sum_i alpha_i * remap_i(value_hidden_i @ value_lm_head_i.T)

The first term is fused with the base head (``fused_guided_logits(value_hidden, value_w, base_hidden=...,
base_weight=...)``); further terms (proxy-tuning: expert +alpha, anti-expert -alpha) are added in place with
``out=`` aliasing ``base_logits``. Every model runs its backbone only, incrementally, with its own KV cache.
Each term may read its own prompt (proxy-tuning's chat-formatted expert); all continue with the same tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._validate import check_alpha_float
from ..guidance import BaseToValueIds, TermHead, guided_logits, resolve_suppress_from, suppress_ids_
from ..ops.guided_logits import fused_guided_logits
from ..ops.packed_heads import install_parameter, pack_head_weights
from ._model_api import GuidedModelAPI, config_for, guided_config_of, loading_kwargs
from ._common import (check_prompt_batch, decode_prompts, fallback_input_id, input_vocab_size, left_pad_rows,
                      render_prompt, resolve_vocab_map, split_causal_lm)
from ._generate import GuidedGenerateOutput, Outputs, Settings, choose, resolve_settings
from ._value_state import DynamicDecoder


@dataclass
class GuidanceTerm:
    """One guidance model: its logits, remapped by ``vocab_map`` (base id -> its id, -1 = unmapped; ``None``
    = identity), are added with weight ``alpha`` (negative for an anti-expert).

    By default the term reads the base model's prompt. ``prompt_template`` gives it its own prompt, built from
    each row's prompt text and tokenised with ``tokenizer`` (default: the base tokenizer given to
    ``GuidedCausalLM`` / ``generate``): ``"chat"`` (the tokenizer's chat template, with ``system_prompt`` as a
    system message when given), a string such as ``"[INST] {prompt} [/INST]"`` (``{system_prompt}`` is
    replaced too), or a callable ``text -> str``. ``generate(term_inputs=...)`` gives prompt ids directly.
    """

    model: nn.Module
    alpha: float = 1.0
    vocab_map: Any = None
    prompt_template: Any = None
    tokenizer: Any = None
    system_prompt: Optional[str] = None


@dataclass
class PreparedTerm:
    """A guidance term ready to run: its ``backbone`` (final hidden states), its ``head`` as the fused op reads it
    (LM head weight, checked map, alpha) and ``translate`` (base ids -> the ids it reads)."""

    backbone: nn.Module
    head: TermHead
    translate: BaseToValueIds


class GuidedCausalLM(GuidedModelAPI, nn.Module):
    """``base_model`` guided by one or several value networks; ``generate()`` decodes with the fused head.

    It is also a transformers causal LM (``ivl_kernels.hf._model_api``): ``config`` (the guided checkpoint's
    ``IVLGuidedConfig``), ``forward(input_ids, attention_mask, labels, logits_to_keep)`` returning guided logits
    and the fused guided loss, ``log_probs(...)`` (per-token guided log-probabilities without ``[B, T, V]``), and
    ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it.

    Args:
        base_model: a transformers causal LM (bias-free LM head, no logit softcapping).
        value_model: a causal LM (with ``alpha`` / ``vocab_map``), or a list of ``GuidanceTerm``.
        alpha, vocab_map: for a single ``value_model``; see ``GuidanceTerm``.
        fill: value logit for unmapped base ids.
        backend: ``fused_guided_logits`` backend.
        tokenizer: the base model's tokenizer (optional). When known, ids ``>= len(tokenizer)`` (rows of an LM
            head padded past the tokenizer, e.g. Qwen2.5's 152064 vs 151665) are never generated; it also
            serves ``stop_strings`` and the terms' ``prompt_template``.
        suppress_ids_from: ids ``>=`` this are never generated (logits ``-inf``); overrides the tokenizer's length.
        pack_heads: copy the base's and the first term's LM heads into one buffer (``ivl.pack_head_weights``;
            the models' head parameters become views of it, tied input embeddings stay tied), so that from
            ``GEMM_MIN_ROWS`` rows (prefill, scoring, ``forward``, big batches) the fused head is one GEMM over
            ``[X_b | alpha X_v]``. Needs the first term without a vocabulary map and both heads of one dtype on
            one device. The sub-models' own ``save_pretrained`` refuses strided shared weights afterwards
            (``GuidedCausalLM.save_pretrained`` writes references only and is unaffected). Default ``False``.

    Every model reads the same base token ids (translated through its map when it has one), after its own
    prompt when it has one. Models that tokenise differently need ``IVLLogitsProcessor`` with both tokenizers
    (text re-tokenisation).
    """

    def __init__(self, base_model: nn.Module, value_model: Union[nn.Module, Sequence[GuidanceTerm]], *,
                 alpha: float = 1.0, vocab_map=None, fill: float = 0.0, backend: str = "auto", tokenizer=None,
                 suppress_ids_from: Optional[int] = None, pack_heads: bool = False):
        super().__init__()
        if pack_heads not in (True, False):
            raise TypeError(f"pack_heads must be True or False, got {pack_heads!r}")
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
        self.tokenizer = tokenizer
        self._base_backbone, self._base_weight = split_causal_lm(base_model, "base")
        Vb = self._base_weight.shape[0]
        self.suppress_ids_from = suppress_ids_from
        resolve_suppress_from(suppress_ids_from, tokenizer, Vb)  # check now
        self._prepared: List[PreparedTerm] = []
        for i, t in enumerate(terms):
            tpl = t.prompt_template
            ok = callable(tpl) or (isinstance(tpl, str) and (tpl == "chat" or "{prompt}" in tpl))
            if tpl is not None and not ok:
                raise ValueError(f"{self._role(i)}: prompt_template must be 'chat', a str with a '{{prompt}}' "
                                 f"placeholder, or a callable text -> str; got {tpl!r}")
            # A NaN / overflowing alpha would only be refused by the op after the prompt's forward: check it here.
            check_alpha_float(f"{self._role(i)} alpha", t.alpha)
            backbone, weight = split_causal_lm(t.model, self._role(i))
            vmap = resolve_vocab_map(t.vocab_map, Vb, weight.shape[0], self._base_weight.device, role=self._role(i))
            self._prepared.append(PreparedTerm(
                backbone, TermHead(weight, vmap, float(t.alpha)),
                BaseToValueIds(vmap, input_vocab_size(t.model), fallback_input_id(t.model))))
        if pack_heads:
            self._pack_heads()
        self.config = config_for(self)  # from_pretrained replaces it with the checkpoint's own

    def _pack_heads(self) -> None:
        """The base head and the first term's head as views of one buffer (``pack_head_weights``), installed in
        both models in place of their head parameters (and of input embeddings tied to them)."""
        first = self._prepared[0].head
        base_w, value_w = self._base_weight, first.weight
        if first.vocab_map is not None:
            raise ValueError(f"pack_heads=True needs the first guidance term without a vocabulary map (the packed "
                             f"GEMM aligns value column b with base column b); {self._role(0)} has one")
        if base_w.dtype != value_w.dtype or base_w.device != value_w.device:
            raise ValueError(f"pack_heads=True needs both LM heads of one dtype on one device, got base "
                             f"{base_w.dtype} on {base_w.device}, {self._role(0)} {value_w.dtype} on {value_w.device}")
        new_base, new_value = pack_head_weights(base_w.detach(), value_w.detach())
        params = []
        for model, old, view in ((self.base_model, base_w, new_base), (self.terms[0].model, value_w, new_value)):
            param = nn.Parameter(view, requires_grad=old.requires_grad)
            install_parameter(model, old, param)  # the head, and an input embedding tied to it
            params.append(param)
        self._base_weight, self._prepared[0].head.weight = params

    def _role(self, i: int) -> str:
        return f"guidance term {i}" if len(self.terms) > 1 else "value"

    @property
    def vocab_size(self) -> int:
        return self._base_weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self._base_weight.device

    def _guided_logits(self, base_hidden: torch.Tensor, value_hiddens: List[torch.Tensor],
                       heads: Optional[List[TermHead]] = None,
                       base_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, Vb]`` float32 guided logits (``guidance.guided_logits``, no suppression) from ``base_hidden
        [B, Hb]`` and each term's ``[B, Hv_i]``. ``heads`` / ``base_weight`` (default: every term, the whole base
        head): a subset of the terms or a vocabulary prefix, for the sequence loss (``_model_api``)."""
        heads = [t.head for t in self._prepared] if heads is None else heads
        base_weight = self._base_weight if base_weight is None else base_weight
        return guided_logits(base_hidden, base_weight, value_hiddens, heads, fill=self.fill, backend=self.backend)

    def _term_logits(self, base_hidden: torch.Tensor, value_hiddens: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """``(base, term_1, ..., term_n)``: each ``[B, Vb]`` float32, terms remapped, unscaled (analysis output)."""
        first = self._prepared[0].head
        # alpha = 0: the base head alone, with the same float32 accumulation as the guided logits.
        base = self._guided_logits(base_hidden, value_hiddens[:1], [replace(first, alpha=0.0)])
        out = [base]
        for t, h in zip(self._prepared, value_hiddens):
            zero = torch.zeros_like(base)
            out.append(fused_guided_logits(h, t.head.weight, base_logits=zero, out=zero, vocab_map=t.head.vocab_map,
                                           alpha=1.0, fill=self.fill, backend=self.backend))
        return tuple(out)

    def _term_prompts(self, term_inputs, prompt_texts, tokenizer, input_ids, mask) -> list:
        """Per term: ``None`` (reads the base prompt) or its own ``(ids [B, T_i], mask [B, T_i])``."""
        n, B = len(self.terms), input_ids.shape[0]
        if term_inputs is not None:
            if isinstance(term_inputs, (torch.Tensor, Mapping)) or not isinstance(term_inputs, (list, tuple)):
                raise TypeError("term_inputs must be a list with one entry per guidance term: None (the base prompt), "
                                "an int tensor [B, T] of that model's prompt ids, or a dict with 'input_ids' and "
                                "'attention_mask' (left-padded)")
            if len(term_inputs) != n:
                raise ValueError(f"term_inputs has {len(term_inputs)} entries but there are {n} guidance terms "
                                 f"(use None for a term that reads the base prompt)")
        if prompt_texts is not None:
            if isinstance(prompt_texts, str) or len(prompt_texts) != B:
                raise ValueError(f"prompt_texts must be a list of {B} strings (one per row of input_ids)")
        texts = list(prompt_texts) if prompt_texts is not None else None
        out = []
        for i, term in enumerate(self.terms):
            role = self._role(i)
            entry = term_inputs[i] if term_inputs is not None else None
            size = input_vocab_size(term.model)
            if entry is not None:
                if isinstance(entry, Mapping):
                    if "input_ids" not in entry:
                        raise ValueError(f"term_inputs[{i}] has no 'input_ids'")
                    ids, m = entry["input_ids"], entry.get("attention_mask")
                else:
                    ids, m = entry, None
                out.append(check_prompt_batch(ids, m, B, size, f"term_inputs[{i}] ({role})", self.device))
            elif term.prompt_template is not None:
                term_tok = term.tokenizer if term.tokenizer is not None else tokenizer
                if texts is None:
                    if tokenizer is None:
                        raise ValueError(f"{role} has a prompt_template: pass prompt_texts=[...] (each row's prompt "
                                         f"text) or tokenizer= (to decode input_ids) to generate()")
                    texts = decode_prompts(tokenizer, input_ids, mask)
                rows = [render_prompt(term.prompt_template, t, tokenizer=term_tok, system_prompt=term.system_prompt)
                        for t in texts]
                pad = getattr(term_tok, "pad_token_id", None)
                pad = pad if isinstance(pad, int) and 0 <= pad < size else fallback_input_id(term.model)
                ids, m = left_pad_rows(rows, pad, self.device)
                out.append(check_prompt_batch(ids, m, B, size, f"{role} (prompt_template)", self.device))
            else:
                out.append(None)
        return out

    def _decode_mode(self, cache_implementation, cuda_graph, device, owners, compile_step: bool = False,
                     sizes: Optional[Sequence[int]] = None) -> Tuple[bool, bool]:
        """``(static cache, CUDA graph)`` for one call. Default (``None``): on CUDA, static caches and a captured
        step when every model supports a ``StaticCache`` of its size in ``sizes`` (else the dynamic cache, said
        once at INFO level); on CPU the dynamic cache. ``cache_implementation`` / ``cuda_graph`` force either;
        ``compile_step=True`` needs (and with the default cache, chooses) the static one. A static cache that
        cannot hold a call (a sliding window shorter than it) is an error when forced."""
        from ._static import _log_once, forced_static_error, static_supported, static_window_fits

        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        if cuda_graph not in (None, True, False):
            raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        if not isinstance(compile_step, bool):
            raise TypeError(f"compile_step must be True or False, got {compile_step!r}")
        if cuda_graph and (cache_implementation == "dynamic" or device.type != "cuda"):
            raise ValueError("cuda_graph=True needs cache_implementation='static' and CUDA models")
        if compile_step and cache_implementation == "dynamic":
            raise ValueError("compile_step=True compiles the static cache's decode step: it needs "
                             "cache_implementation='static' (or None), not 'dynamic'")
        why = next((w for w in map(static_supported, owners) if w), "")
        if compile_step and why:
            raise ValueError(f"compile_step=True needs a static cache for every model: {why}")
        if sizes is not None and cache_implementation != "dynamic" and (device.type == "cuda" or compile_step
                                                                        or cache_implementation == "static"):
            window = next((w for w in map(static_window_fits, owners, sizes) if w), "")
            if window and (compile_step or cache_implementation == "static"):
                raise forced_static_error("GuidedCausalLM.generate", window, compile_step)
            why = why or window
        if cache_implementation is None and not compile_step:
            if device.type != "cuda" or cuda_graph is False:
                return False, False
            if why:
                _log_once(f"GuidedCausalLM.generate: dynamic cache ({why}); pass cache_implementation='static' to "
                          f"force the static one")
                return False, False
            return True, True
        static = cache_implementation != "dynamic"
        return static, static and device.type == "cuda" and cuda_graph is not False

    def _decoder(self, s: Settings, own_prompts: list, cuda_graph, compile_step: bool = False):
        """The decoder for one call (``DynamicDecoder`` or ``StaticDecoder``: one interface, ``prefill(prompts)``
        and ``step(ids)``, each returning ``(base_hidden, [term hidden], guided logits)``).

        Static runners (one per model) and their decoder are reused from the previous call when the batch size,
        the bucketed cache lengths and the graph choice match: a captured graph is replayed across calls, not
        captured again. One set is kept (its static caches hold the previous request's memory; the next request
        of another shape replaces it)."""
        from ._static import StaticDecoder, StaticRunner, bucketed, model_dtype, reuse_or_build

        owners = [self.base_model] + list(self.value_models)
        backbones = [self._base_backbone] + [t.backbone for t in self._prepared]
        T = s.input_ids.shape[1]
        lengths = [T] + [T if own is None else own[0].shape[1] for own in own_prompts]
        sizes = tuple(bucketed(n + s.max_new_tokens) for n in lengths)
        static, graph = self._decode_mode(s.cache_implementation, cuda_graph, self.device, owners, compile_step,
                                          sizes=sizes)
        if not static:
            return DynamicDecoder(backbones, self._combine)
        graph_required = bool(cuda_graph)

        def build():
            runners = [StaticRunner(bb, owner, n, compiled=compile_step)
                       for bb, owner, n in zip(backbones, owners, sizes)]
            return runners, StaticDecoder(runners, self._combine, use_graph=graph, graph_required=graph_required)

        # The models' device and dtypes too: a static cache is allocated in them (after ``model.to(...)`` the
        # kept one would no longer fit).
        key = (s.input_ids.shape[0], sizes, graph, graph_required, compile_step, self.device,
               tuple(model_dtype(bb) for bb in backbones))
        return reuse_or_build(self, "_decode_cache", key, build)[1]

    def _combine(self, hidden: List[torch.Tensor]) -> tuple:
        """A decoder's output from every model's final hidden state: ``(base, [terms], guided logits)``."""
        return hidden[0], hidden[1:], self._guided_logits(hidden[0], hidden[1:])

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: Optional[int] = None, min_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
                 do_sample: Optional[bool] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id=None, pad_token_id: Optional[int] = None, streamer=None,
                 logits_processor=None, stopping_criteria=None, stop_strings=None, max_time: Optional[float] = None,
                 tokenizer=None, generator: Optional[torch.Generator] = None, generation_config=None,
                 return_dict_in_generate: Optional[bool] = None, output_scores: Optional[bool] = None,
                 output_logits: Optional[bool] = None, output_term_logits: bool = False, term_inputs=None,
                 prompt_texts: Optional[Sequence[str]] = None, suppress_ids_from: Optional[int] = None,
                 cache_implementation: Optional[str] = None, cuda_graph: Optional[bool] = None,
                 compile_step: bool = False, **kwargs) -> Union[torch.LongTensor, GuidedGenerateOutput]:
        """Guided decoding; returns ``[B, T + new]`` token ids (prompt included), like ``model.generate``.

        Args:
            input_ids: ``[B, T]`` prompts, left-padded, ids in the base's input embedding; ``attention_mask
                [B, T]`` (``None`` = inferred from the pad token as transformers does; a mask whose last column
                is not all 1, i.e. right padding, is an error).
            max_new_tokens / min_new_tokens: limits on generated tokens (EOS is suppressed before the minimum).
                ``max_length`` / ``min_length`` (a keyword): prompt + new tokens (when ``max_new_tokens`` /
                ``min_new_tokens`` is not given). Default: 20 new tokens.
            do_sample, temperature, top_k, top_p: sampling (transformers' warpers; as there, ``top_k`` is 50
                unless set, ``top_k=0`` keeps every id); greedy by default.
            eos_token_id, pad_token_id: int, list or tensor; finished rows are padded with ``pad_token_id`` and
                generation stops when every row has finished.
            generation_config: a ``GenerationConfig``; its unset fields come from the base model's (as in
                transformers 5). Every argument left ``None`` takes the config's value. The config's (or a
                keyword's) ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``, ``suppress_tokens``,
                ``begin_suppress_tokens``, ``min_p`` and ``typical_p`` are applied with transformers' own
                processors, in its order (before ``logits_processor``; the warpers after it). Settings it has that
                guided decoding does not apply (``sequence_bias``, ``forced_eos_token_id``...) are said once at
                WARNING level; as keywords they are a ``TypeError``. A config's ``cache_implementation`` other than
                ``"dynamic"`` / ``"static"`` (Gemma's ``"hybrid"``) leaves the default.
            streamer: an object with ``put(ids)`` / ``end()`` (e.g. ``transformers.TextStreamer``); batch 1.
            logits_processor: extra transformers logits processors, applied after the guidance.
            stopping_criteria: a ``StoppingCriteriaList`` (or list of callables ``(input_ids, scores) -> bool
                [B]``), called after each token as transformers does; ``stop_strings`` (str or list, needs
                ``tokenizer``) and ``max_time`` (seconds) add transformers' own criteria. As in transformers,
                finished rows are padded with ``pad_token_id`` only when an EOS is set; otherwise they run on
                until every row has finished.
            tokenizer: the base tokenizer (default: the constructor's): ``stop_strings``, suppression of ids
                ``>= len(tokenizer)``, and the prompt text for terms with a ``prompt_template``.
            suppress_ids_from: ids ``>=`` this are never generated (overrides the tokenizer's length).
            return_dict_in_generate: return a ``GuidedGenerateOutput`` (``sequences``, and on request
                ``scores`` = the processed scores per step (``output_scores``), ``logits`` = the guided logits
                before the logits processors (``output_logits``), ``term_logits`` = per step the base logits and
                each term's remapped logits (``output_term_logits``)), each a tuple of ``[B, Vb]`` float32 tensors.
            term_inputs: one entry per guidance term: ``None`` (reads the base prompt, or builds its own from its
                ``prompt_template``), an int tensor ``[B, T_i]`` or a dict with ``input_ids`` / ``attention_mask``
                (left-padded): that term's own prompt, in its own token ids. Every term then reads the same
                generated tokens.
            prompt_texts: each row's prompt text, for terms with a ``prompt_template`` (default: decoded from
                ``input_ids`` with the tokenizer).
            generator: ``torch.Generator`` for sampling.
            cache_implementation: ``None`` (default: on CUDA ``"static"`` with a CUDA graph when every model
                supports a ``StaticCache``, else ``"dynamic"``, said once at INFO level on the ``ivl_kernels.hf``
                logger; on CPU ``"dynamic"``), ``"dynamic"`` (transformers' ``DynamicCache`` per model) or
                ``"static"``: a ``StaticCache`` per model sized for its prompt plus ``max_new_tokens`` (rounded up
                to 64 columns), and a decode step that reads no tensor value on the host
                (``ivl_kernels.hf._static``). On CUDA that step (every backbone and the fused head) is captured in
                a CUDA graph after one warm-up step and replayed per token; the caches and the graph are kept for
                the next call of the same batch size and bucketed lengths (one set: ``clear_decode_cache()`` frees
                it). ``cuda_graph``: ``None`` (default: a graph on CUDA; if capturing fails, the step runs without
                one, said once), ``True`` (a failed capture raises), ``False`` (no graph; with the default cache,
                the dynamic one). Same tokens on every path. Models must support ``StaticCache`` (Llama, Qwen2,
                Mistral, ...) of the call's size: a sliding-window layer (Mistral, Gemma 2/3) whose window is
                shorter than the cache makes the default the dynamic cache (said once) and a forced static one a
                ``ValueError``.
            compile_step: ``True``: each model's decode forward runs through ``torch.compile`` (static cache; with
                the default ``cache_implementation`` the static one is chosen, on CPU too), compiled on the first
                decode step of each batch size and bucketed length, then captured in the CUDA graph on CUDA; as
                transformers compiles its static-cache generate. The prompt stays eager. A failed compile raises
                (with the cause). Off by default until a GPU run measures it (benchmarks/bench_generate.py,
                ``guided-compiled``). Generation runs without autograd, as transformers' ``generate``.
        Beam search, assisted decoding and other modes raise ``ValueError`` before anything runs.
        """
        s = resolve_settings(
            self, input_ids, attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            max_length=max_length, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, stop_strings=stop_strings, max_time=max_time, tokenizer=tokenizer,
            generation_config=generation_config, return_dict_in_generate=return_dict_in_generate,
            output_scores=output_scores, output_logits=output_logits, output_term_logits=output_term_logits,
            suppress_ids_from=suppress_ids_from, cache_implementation=cache_implementation, kwargs=kwargs)
        own_prompts = self._term_prompts(term_inputs, prompt_texts, s.tokenizer, s.input_ids, s.mask)
        decoder = self._decoder(s, own_prompts, cuda_graph, compile_step)
        prompts = [(s.input_ids, s.mask)] + [own if own is not None else (t.translate(s.input_ids), s.mask)
                                             for t, own in zip(self._prepared, own_prompts)]
        if streamer is not None:
            streamer.put(s.input_ids.cpu())
        out = Outputs(s, self._term_logits, copy=decoder.reuses_outputs)
        unfinished = torch.ones(s.input_ids.shape[0], dtype=torch.bool, device=self.device)
        for step in range(s.max_new_tokens):
            if step == 0:
                bh, vhs, logits = decoder.prefill(prompts)
            else:  # a replayed graph's outputs are its buffers: consumed (or copied) before the next step
                bh, vhs, logits = decoder.step([ids] + [t.translate(ids) for t in self._prepared])
            scores = out.add_step(bh, vhs, suppress_ids_(logits, s.limit))
            next_tokens = choose(scores, s.do_sample, generator)
            if s.pad_finished:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, s.pad))
            out.append(next_tokens)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if s.eos_ids is not None:
                unfinished &= ~torch.isin(next_tokens, s.eos_ids)
            if len(s.criteria):
                # As transformers: the criteria see the sequences so far and the scores collected (or None).
                unfinished &= ~s.criteria(out.sequences, out.scores).to(device=self.device, dtype=torch.bool)
            if (s.eos_ids is not None or len(s.criteria)) and not bool(unfinished.any()):
                break  # the loop's one host sync: whether every row has finished
            ids = next_tokens[:, None]  # finished rows keep feeding tokens, as transformers does (outputs unused)
        if streamer is not None:
            streamer.end()
        return out.result()

    def clear_decode_cache(self) -> None:
        """Free the static caches and the captured decode graph kept from the last static ``generate`` call."""
        self._decode_cache = None

    # ---- the guided checkpoint (``ivl_kernels.hf.checkpoint``): references, alphas and maps, no weights --------
    def save_pretrained(self, save_directory: str, *, base: Optional[str] = None,
                        terms: Optional[Sequence[str]] = None, references_as_given: bool = False,
                        overwrite: bool = False) -> None:
        """Write a guided checkpoint naming the models (not copying them), the alphas, the maps and the base's
        tokenizer; ``GuidedCausalLM.from_pretrained`` and vLLM (``ivl_kernels.vllm``) load it.

        ``save_directory`` must not be a model it names (nor inside one); an existing directory that holds
        anything but an earlier guided checkpoint is refused unless ``overwrite=True``. Written whole or not at
        all (a temporary sibling, then a rename).

        ``base`` / ``terms``: where the models are (directories or hub ids); default: where they were loaded from
        (``config._name_or_path``). A model built in memory has no such record: save it first
        (``model.save_pretrained(path)``) and pass ``path``.
        """
        from .checkpoint import reference_of, vocab_map_object, write_guided_checkpoint

        refs = list(terms) if terms is not None else [reference_of(t.model) for t in self.terms]
        if len(refs) != len(self.terms):
            raise ValueError(f"terms= has {len(refs)} entries for {len(self.terms)} guidance terms")
        base_ref = base if base is not None else reference_of(self.base_model)
        for role, r in [("base", base_ref)] + [(self._role(i), r) for i, r in enumerate(refs)]:
            if not r:
                raise ValueError(f"the {role} model records no path it was loaded from (built in memory?): save it "
                                 f"with save_pretrained(path) and pass that path (base= / terms=)")
        Vb = self.vocab_size
        specs = [{"model": r, "alpha": p.head.alpha,  # the term's own VocabMap keeps its tokenizer fingerprints
                  "map": None if p.head.vocab_map is None else vocab_map_object(
                      t.vocab_map if t.vocab_map is not None else p.head.vocab_map, Vb, p.head.weight.shape[0])}
                 for r, p, t in zip(refs, self._prepared, self.terms)]
        write_guided_checkpoint(save_directory, base_ref, specs, fill=self.fill,
                                suppress_ids_from=self.suppress_ids_from, tokenizer=self.tokenizer,
                                references_as_given=references_as_given, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, directory: str, *model_args, backend: str = "auto", config=None,
                        pack_heads: bool = False, **model_kwargs) -> "GuidedCausalLM":
        """Load a guided checkpoint (``ivl-kernels compose`` / ``save_pretrained``): every model with
        ``AutoModelForCausalLM.from_pretrained(ref, **model_kwargs)`` (e.g. ``dtype=``, ``device_map=``;
        PEFT adapter directories onto the model they name), the maps, and the tokenizer saved with it.
        ``AutoModelForCausalLM.from_pretrained(directory, ...)`` lands here (``config``: the checkpoint's config it
        read; its bookkeeping arguments are dropped, ``gguf_file`` / ``quantization_config`` refused;
        ``pack_heads``: as in the constructor)."""
        from ..vocab import VocabMap
        from .checkpoint import load_causal_lm, load_checkpoint_tokenizer, read_guided_checkpoint, resolve_for_loading

        if model_args:
            raise TypeError(f"GuidedCausalLM.from_pretrained takes the checkpoint directory and keyword arguments "
                            f"only, got {len(model_args)} extra positional arguments")
        model_kwargs = loading_kwargs(model_kwargs)
        spec = read_guided_checkpoint(directory)
        # Every reference and the tokenizer are checked before any model is loaded (minutes for a large base).
        refs = [resolve_for_loading(spec, spec.base, "base")] + \
            [resolve_for_loading(spec, t.model, f"guidance term {i}") for i, t in enumerate(spec.terms)]
        tokenizer = load_checkpoint_tokenizer(spec)
        base = load_causal_lm(refs[0], "base", **model_kwargs)
        terms = []
        for i, (t, ref) in enumerate(zip(spec.terms, refs[1:])):
            model = load_causal_lm(ref, f"guidance term {i}", **model_kwargs)
            path = spec.map_path(t)
            terms.append(GuidanceTerm(model, t.alpha, None if path is None else VocabMap.load(path)))
        model = cls(base, terms, fill=spec.fill, backend=backend, tokenizer=tokenizer,
                    suppress_ids_from=spec.suppress_ids_from, pack_heads=pack_heads)
        model.config = guided_config_of(directory, config)
        return model

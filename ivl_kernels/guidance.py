"""The guidance rule, shared by every integration (``ivl_kernels.hf``, ``ivl_kernels.vllm``, scoring).

    logits = base_hidden @ base_weight.T + sum_i alpha_i * remap_i(value_hidden_i @ value_weight_i.T)

then ids ``>= suppress_from`` set to ``-inf`` (rows of an LM head padded past its tokenizer). The first term is
fused with the base head in one ``fused_guided_logits`` pass; further terms (proxy-tuning's expert +alpha and
anti-expert -alpha) are added in place with ``out=`` aliasing the running sum. Each model reads the base token
ids translated into its own ids (``BaseToValueIds``).

This module is framework-free: it imports torch and ``ivl_kernels.ops`` only, never transformers nor vLLM (a
test imports it with both blocked). The integrations keep what is specific to their framework (finding a
model's backbone and head, caches, schedulers) and call these functions for the rule itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .ops.guided_logits import fused_guided_logits

# Config attributes (transformers' names, which vLLM reads too) that transform the logits after the LM head:
# Gemma 2/3's softcapping, Cohere's scale, Granite's / HyperCLOVA X's scaling, Falcon-H1's multiplier, Muse's
# output multiplier. The fused kernels apply a plain bias-free linear head, so a model with any of them (a scale
# other than 1) is refused.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_multiplier")


@dataclass
class TermHead:
    """One guidance term as the fused head sees it: its LM head ``weight [Vv, Hv]``, its ``vocab_map`` (int
    ``[Vb]``: base id -> its id, ``-1`` = unmapped; ``None`` = identity) and its ``alpha`` (a float, or a
    ``[M]`` tensor: one strength per row)."""

    weight: torch.Tensor
    vocab_map: Optional[torch.Tensor] = None
    alpha: Union[float, torch.Tensor] = 1.0


def guided_logits(base_hidden: torch.Tensor, base_weight: torch.Tensor, value_hiddens: Sequence[torch.Tensor],
                  terms: Sequence[TermHead], *, fill: float = 0.0, backend: str = "auto",
                  suppress_from: Optional[int] = None) -> torch.Tensor:
    """``[M, Vb]`` float32 guided logits from ``base_hidden [M, Hb]``, the base head ``base_weight [Vb, Hb]``
    and each term's ``value_hiddens[i] [M, Hv_i]``: the first term fused with the base head, the others added
    in place; then ``suppress_ids_(..., suppress_from)``.

    ``base_weight`` may be a prefix (or a shard) of the base head, with each map sliced to the same base ids."""
    if not terms or len(terms) != len(value_hiddens):
        raise ValueError(f"guided_logits needs one hidden state per term (at least one), got {len(value_hiddens)} "
                         f"hidden states for {len(terms)} terms")
    first, *rest = terms
    out = fused_guided_logits(value_hiddens[0], first.weight, base_hidden=base_hidden, base_weight=base_weight,
                              vocab_map=first.vocab_map, alpha=first.alpha, fill=fill, backend=backend)
    for term, h in zip(rest, value_hiddens[1:]):
        fused_guided_logits(h, term.weight, base_logits=out, out=out, vocab_map=term.vocab_map, alpha=term.alpha,
                            fill=fill, backend=backend)
    return suppress_ids_(out, suppress_from)


def tokenizer_size(tokenizer) -> int:
    """Token ids a tokenizer can produce: ``len(tokenizer)`` (Hugging Face: added tokens included), else its
    ``vocab_size`` / ``n_vocab`` (tiktoken) / ``get_piece_size()`` (sentencepiece)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        pass
    for attr in ("vocab_size", "n_vocab"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    get = getattr(tokenizer, "get_piece_size", None)
    if callable(get):
        return int(get())
    raise TypeError(f"cannot tell the vocabulary size of tokenizer {type(tokenizer).__name__}: pass "
                    f"suppress_ids_from=<number of token ids> instead")


def resolve_suppress_from(suppress_ids_from, tokenizer, vocab_size: Optional[int] = None) -> Optional[int]:
    """First id to suppress (``-inf``) in the guided logits, or ``None`` (nothing to suppress).

    An explicit ``suppress_ids_from`` wins; else a known tokenizer gives ``tokenizer_size(tokenizer)``: a head
    padded past its tokenizer (Qwen2.5-7B: 152064 rows, 151665 tokens) must not emit ids no tokenizer can decode.
    ``None`` when the limit is at or past ``vocab_size`` (nothing to do)."""
    if suppress_ids_from is not None:
        if isinstance(suppress_ids_from, bool) or not isinstance(suppress_ids_from, int):
            raise TypeError(f"suppress_ids_from must be an int (ids >= it are never generated), got "
                            f"{type(suppress_ids_from).__name__}")
        if suppress_ids_from < 1:
            raise ValueError(f"suppress_ids_from={suppress_ids_from} would suppress every token id; it must be >= 1")
        limit = suppress_ids_from
    elif tokenizer is not None:
        limit = tokenizer_size(tokenizer)
        if limit < 1:
            raise ValueError("the tokenizer has no tokens")
    else:
        return None
    if vocab_size is not None and limit >= vocab_size:
        return None
    return int(limit)


def suppress_ids_(scores: torch.Tensor, start: Optional[int]) -> torch.Tensor:
    """``scores[..., start:] = -inf`` in place (``start=None``: nothing)."""
    if start is not None and start < scores.shape[-1]:
        scores[..., start:] = float("-inf")
    return scores


class BaseToValueIds:
    """Translate base token ids into ids a guidance model reads, when both share one tokenizer (or a map).

    With a map, base id ``b`` is read as value id ``map[b]``; without one, as ``b`` itself. Ids with no
    counterpart (``map[b] == -1``, or ``b >= `` the value embedding size) are read as ``fallback_id`` (the
    value config's ``pad_token_id``, else 0): the value model sees *some* token there, and its logits for
    such base ids are ``fill`` anyway.
    """

    def __init__(self, vocab_map: Optional[torch.Tensor], value_input_size: int, fallback_id: int):
        self.map = vocab_map.long() if vocab_map is not None else None
        self.size = int(value_input_size)
        self.fallback = int(fallback_id)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.map is not None:
            if self.map.device != ids.device:
                self.map = self.map.to(ids.device)
            out = self.map[ids]
            # An entry the value embedding cannot hold (-1, or one written after the map was checked) reads
            # the fallback id: never an out-of-range embedding lookup.
            return torch.where((out >= 0) & (out < self.size), out, self.fallback)
        return torch.where(ids < self.size, ids, self.fallback)

    def table(self, base_vocab_size: int, device=None) -> torch.Tensor:
        """The translation of every base id, ``[base_vocab_size]`` long: a lookup table (vLLM's input path)."""
        device = device if device is not None else (self.map.device if self.map is not None else None)
        return self(torch.arange(int(base_vocab_size), device=device))


def fallback_id(pad_token_id, vocab_size: Optional[int] = None) -> int:
    """The id a model reads for a base id it has no counterpart for: its ``pad_token_id`` when that is a valid
    id (``0 <= pad < vocab_size`` when the size is given), else 0."""
    ok = isinstance(pad_token_id, int) and not isinstance(pad_token_id, bool) and pad_token_id >= 0
    if ok and vocab_size is not None:
        ok = pad_token_id < vocab_size
    return int(pad_token_id) if ok else 0


def logit_transform(text_config) -> Optional[str]:
    """``None`` when a model's (text) config applies nothing after the LM head, else a description of the first
    transform the fused head would not apply (final-logit softcapping, a logit scale other than 1)."""
    for attr in LOGIT_TRANSFORMS:
        v = getattr(text_config, attr, None)
        if v is not None and not (attr != "final_logit_softcapping" and float(v) == 1.0):
            return f"{attr}={v} transforms the logits after the LM head"
    return None


def head_problem(head) -> Optional[str]:
    """``None`` when ``head`` (an LM head module) is a plain linear map the fused kernels can read
    (``head.weight``, no bias), else what is wrong with it."""
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return "it has no LM head weight the fused head can read"
    if getattr(head, "bias", None) is not None:
        return "its LM head has a bias"
    return None


__all__ = ["TermHead", "guided_logits", "suppress_ids_", "resolve_suppress_from", "tokenizer_size", "BaseToValueIds", "fallback_id", "logit_transform",
           "head_problem", "LOGIT_TRANSFORMS"]

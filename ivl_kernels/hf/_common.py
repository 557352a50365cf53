"""Shared plumbing of the transformers integration: splitting a causal LM into backbone + LM head weight,
vocabulary checks, position ids from a padding mask. The guidance rule itself (the guided sum, suppression,
base-id -> value-id translation, the head checks) is ``ivl_kernels.guidance``'s; its names used here are
re-exported for the modules of this package.
"""

from __future__ import annotations

import inspect
import sys
from typing import Optional, Tuple

import torch
from torch import nn

from .._validate import check_vocab_map
from ..guidance import fallback_id, head_problem, logit_transform

# Generation modes whose caller reorders or rewinds sequences between logits-processor calls (beam search
# reorders beams, assisted decoding verifies several candidate tokens and rolls back): a value KV cache fed one
# token per call cannot follow them. Detected by the name of the generation method on the call stack.
UNSUPPORTED_GENERATION_METHODS = {
    "_beam_search": "beam search (num_beams > 1)",
    "_group_beam_search": "group beam search",
    "_constrained_beam_search": "constrained beam search",
    "_assisted_decoding": "assisted / speculative decoding (assistant_model, prompt_lookup_num_tokens)",
    "get_candidates": "assisted / speculative decoding (assistant_model, prompt_lookup_num_tokens)",
    "_contrastive_search": "contrastive search",
    "_dola_decoding": "DoLa decoding",
}

# generate() kwargs that select a mode the guided decoders do not support, with the reason.
UNSUPPORTED_GENERATE_KWARGS = {
    "num_beams": "beam search is not supported (the value network's KV cache is not reordered with the beams); "
                 "use greedy or sampling",
    "assistant_model": "assisted / speculative decoding is not supported",
    "prompt_lookup_num_tokens": "prompt-lookup (assisted) decoding is not supported",
    "penalty_alpha": "contrastive search is not supported",
    "num_beam_groups": "group beam search is not supported",
    "constraints": "constrained beam search is not supported",
    "force_words_ids": "constrained beam search is not supported",
    "dola_layers": "DoLa decoding is not supported",
}


_FORWARD_PARAMETERS: dict = {}


def forward_parameters(model: nn.Module) -> frozenset:
    """The parameter names of ``type(model).forward`` (read once per class): what a transformers release's model
    takes, found by capability rather than by version."""
    cls = type(model)
    if cls not in _FORWARD_PARAMETERS:
        try:
            params = frozenset(inspect.signature(cls.forward).parameters)
        except (TypeError, ValueError):
            params = frozenset()
        _FORWARD_PARAMETERS[cls] = params
    return _FORWARD_PARAMETERS[cls]


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache, by capability (its signature), not by version:
    ``cache`` where transformers has it (``past_key_values`` is deprecated there, to be removed in 5.40), else
    ``past_key_values`` (transformers <= 5.2x; the GPU machines' 5.17)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def output_cache(out, default=None):
    """The KV cache a forward returned (``out.cache`` or, before the rename, ``out.past_key_values``)."""
    for name in ("cache", "past_key_values"):
        found = getattr(out, name, None)
        if found is not None:
            return found
    return default


def check_generate_kwargs(kwargs: dict, generation_config=None) -> None:
    """Raise ``ValueError`` for generate() arguments that select an unsupported decoding mode."""
    for name, why in UNSUPPORTED_GENERATE_KWARGS.items():
        value = kwargs.get(name)
        if value is None and generation_config is not None and name in ("num_beams", "num_beam_groups",
                                                                          "penalty_alpha", "prompt_lookup_num_tokens"):
            value = getattr(generation_config, name, None)
        if value is None or value is False:
            continue
        if name in ("num_beams", "num_beam_groups") and int(value) <= 1:
            continue
        raise ValueError(f"{name}={value!r}: {why}. Guided decoding supports greedy search and sampling.")
    nrs = kwargs.get("num_return_sequences", getattr(generation_config, "num_return_sequences", None))
    if nrs is not None and int(nrs) > 1:
        raise ValueError(f"num_return_sequences={nrs} is not supported: repeat the prompts in the batch instead")


def check_caller_generation_mode() -> None:
    """Raise ``ValueError`` when called (at any depth) from a generation method that reorders or rewinds the
    sequences (beam search, assisted decoding...). Called once, on a logits processor's first call: it runs
    after the base model's prompt forward but before any token is chosen."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_name
        if name in UNSUPPORTED_GENERATION_METHODS and "transformers" in frame.f_code.co_filename:
            raise ValueError(
                f"IVLLogitsProcessor does not support {UNSUPPORTED_GENERATION_METHODS[name]}: the value network "
                f"is run incrementally with its own KV cache, one token per step, which cannot follow reordered "
                f"or rewound sequences. Use greedy search or sampling (num_beams=1, no assistant model).")
        frame = frame.f_back


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers are injected in place, so running
    the unwrapped model's backbone runs the adapters too); other models are returned as they are."""
    get_base = getattr(model, "get_base_model", None)
    # Any class in the MRO: FSDP2's fully_shard swaps in a subclass (``FSDPPeftModelForCausalLM``).
    if callable(get_base) and any(c.__name__.startswith("Peft") for c in type(model).__mro__):
        return get_base()
    return model


def text_config_of(model: nn.Module):
    """The text config of a transformers model (``config.get_text_config()`` for a multimodal one)."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def split_causal_lm(model: nn.Module, role: str = "value") -> Tuple[nn.Module, torch.Tensor]:
    """``(backbone, lm_head_weight [V, H])`` of a transformers causal LM.

    The backbone (``get_decoder()``, e.g. ``LlamaModel``) returns the final (normed) hidden states
    ``[B, T, H]``; the fused kernels apply the LM head themselves, so heads that are not a plain bias-free
    linear map (a bias, final-logit softcapping, a logit scale) are rejected with ``ValueError``.
    Tied embeddings need nothing special: ``lm_head.weight`` is the embedding matrix then.
    """
    lm = unwrap_causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else None
    if backbone is None or backbone is lm:  # transformers 4.56.0/4.56.1: get_decoder() of a *ForCausalLM is None
        backbone = getattr(lm, "model", None)
    if backbone is None or backbone is lm:
        raise ValueError(f"{role} model {type(model).__name__}: cannot find its backbone (expected a transformers "
                         f"*ForCausalLM with get_decoder() or .model)")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else getattr(lm, "lm_head", None)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{role} model {type(model).__name__}: cannot find its LM head weight (get_output_embeddings)")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise ValueError(f"{role} model: an adapter on the LM head is not supported (the fused kernel reads "
                         f"lm_head.weight directly); target the backbone's modules only")
    problem = head_problem(head) or logit_transform(text_config_of(lm))
    if problem is not None:
        raise ValueError(f"{role} model {type(model).__name__}: {problem}, which the fused guided kernels do not "
                         f"apply; not supported")
    return backbone, head.weight


def input_vocab_size(model: nn.Module) -> int:
    """Rows of the model's input embedding: the token ids it can read."""
    emb = unwrap_causal_lm(model).get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)  # DeepSpeed ZeRO-3 partitions the weight: its .shape is empty
    return int(n) if isinstance(n, int) else emb.weight.shape[0]


def resolve_vocab_map(vocab_map, Vb: int, Vv: int, device, *, role: str = "value") -> Optional[torch.Tensor]:
    """Check a (base -> value) vocabulary map against the two vocabulary sizes; ``ValueError`` when it cannot
    work. Returns the int ``[Vb]`` index tensor on ``device`` (``None`` = identity).

    Without a map, base id ``b`` reads value id ``b``: that needs ``Vv <= Vb`` (a value head scoring ids the
    base cannot emit means another vocabulary); base ids ``>= Vv`` are unmapped (the Qwen2.5-7B/0.5B case).
    """
    if vocab_map is None:
        if Vv > Vb:
            raise ValueError(
                f"the {role} model's vocabulary ({Vv} ids) does not fit the base vocabulary ({Vb} ids) without a "
                f"map: pass vocab_map=VocabMap.from_tokenizers(base_tokenizer, value_tokenizer) (or an int tensor "
                f"[{Vb}] of value ids, -1 = unmapped)")
        return None
    index = vocab_map if isinstance(vocab_map, torch.Tensor) else getattr(vocab_map, "index", None)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"vocab_map must be a VocabMap or an int tensor [Vb], got {type(vocab_map).__name__}")
    if isinstance(vocab_map, torch.Tensor):
        vocab_map = vocab_map.to(device)
    # The kernels' own check (shape, dtype, range, a VocabMap's recorded sizes), once, before generation.
    return check_vocab_map(vocab_map, Vb, Vv, torch.device(device))


def fallback_input_id(model: nn.Module) -> int:
    """The id ``model`` reads for a base id it has no counterpart for (``guidance.fallback_id``)."""
    cfg = getattr(unwrap_causal_lm(model), "config", None)
    return fallback_id(getattr(cfg, "pad_token_id", None) if cfg is not None else None)


def position_ids_from_mask(mask: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T]`` positions: the count of real (mask 1) tokens before each one (plus ``offset [B]``), as
    transformers' generate() does, so left padding does not shift positions. Padding positions get 0."""
    pos = mask.long().cumsum(-1) - 1
    if offset is not None:
        pos = pos + offset.long().unsqueeze(1)
    return pos.masked_fill(mask == 0, 0).clamp_(min=0)


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position ids: ``position_ids_from_mask`` for real tokens and leading padding; a padding
    position after a real token continues counting from the last real token before it (``0..T-1`` on a
    right-padded batch, transformers' default positions). Every sequence-level forward (training, scoring)
    uses these, so a row scores the same padded left, padded right or alone."""
    pos = position_ids_from_mask(mask)
    real = mask != 0
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(pos)
    last = torch.where(real, idx, torch.full_like(idx, -1)).cummax(-1).values
    after = pos.gather(-1, last.clamp(min=0)) + (idx - last)
    return torch.where(real | (last < 0), pos, after)


# ---- a prompt per guidance term -----------------------------------------------------------------------------------
def check_prompt_batch(ids, mask, batch_size: int, input_size: int, role: str, device):
    """Validate one term's own prompt (``ids [B, T]`` in that model's ids, ``mask [B, T]`` left-padded); returns
    ``(ids, mask)`` as long tensors on ``device``."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"{role}: input_ids must be an integer tensor [B, T], got {ids.dtype} {list(ids.shape)}")
    if ids.shape[0] != batch_size:
        raise ValueError(f"{role}: its prompt batch has {ids.shape[0]} rows but input_ids has {batch_size}: give "
                         f"one prompt per row, in the same order")
    if ids.shape[1] == 0:
        raise ValueError(f"{role}: empty prompt (0 tokens)")
    ids = ids.to(device).long()
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(mask).to(device).long()
        if mask.shape != ids.shape:
            raise ValueError(f"{role}: attention_mask {list(mask.shape)} must have the shape of its input_ids "
                             f"{list(ids.shape)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{role}: attention_mask must hold 0/1")
        if not bool(mask[:, -1].all()):
            raise ValueError(f"{role}: every row's last token must be real (attention_mask 1): pad prompts on the "
                             f"left (tokenizer.padding_side = 'left')")
    real = ids[mask.bool()]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= input_size):
        raise ValueError(f"{role}: prompt ids must be in [0, {input_size}) (the model's input embedding); got "
                         f"[{int(real.min())}, {int(real.max())}]")
    return ids.masked_fill(mask == 0, 0), mask


def render_prompt(template, text: str, *, tokenizer, system_prompt: Optional[str] = None) -> list:
    """Token ids of ``text`` in a term's prompt format.

    ``template``: ``"chat"`` (``tokenizer.apply_chat_template`` with a user message, after a system message when
    ``system_prompt`` is given, and the generation prompt; the rendered text is tokenised without adding
    special tokens: the template writes them), a string with ``{prompt}`` (and optionally ``{system_prompt}``)
    placeholders, or a callable ``text -> str``; those two are tokenised with the tokenizer's special tokens
    (BOS for Llama), as ``tokenizer(text)`` does.
    """
    import re

    if tokenizer is None:
        raise ValueError("a prompt_template needs a tokenizer (GuidanceTerm(tokenizer=...) or generate(tokenizer=...))")
    if isinstance(template, str) and template == "chat":
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
                   [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if isinstance(template, str):
        if "{prompt}" not in template:
            raise ValueError(f"prompt_template {template!r} has no '{{prompt}}' placeholder (or use 'chat' for the "
                             f"tokenizer's chat template, or a callable)")
        values = {"prompt": text, "system_prompt": system_prompt or ""}
        rendered = re.sub(r"\{(prompt|system_prompt)\}", lambda m: values[m.group(1)], template)
    elif callable(template):
        rendered = template(text)
        if not isinstance(rendered, str):
            raise TypeError(f"prompt_template callable must return a str, got {type(rendered).__name__}")
    else:
        raise TypeError(f"prompt_template must be 'chat', a str with '{{prompt}}', or a callable; got "
                        f"{type(template).__name__}")
    return list(tokenizer(rendered)["input_ids"])


def left_pad_rows(rows, pad_id: int, device):
    """``(ids [B, T], mask [B, T])`` from lists of ids, padded on the left."""
    T = max(len(r) for r in rows)
    if T == 0:
        raise ValueError("a prompt rendered to no tokens")
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"row {i}: the prompt rendered to no tokens")
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def decode_prompts(tokenizer, input_ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Each row's prompt text (padding dropped, special tokens skipped)."""
    return [tokenizer.decode(input_ids[r][mask[r].bool()].tolist(), skip_special_tokens=True)
            for r in range(input_ids.shape[0])]


def infer_attention_mask(input_ids: torch.Tensor, pad_token_id, eos_token_ids) -> torch.Tensor:
    """The attention mask transformers' ``generate`` infers when none is given: ``input_ids != pad_token_id`` when
    a pad token is known, occurs in the batch, and is not an EOS token (then it could be a real token); else all
    ones. Without it a left-padded batch would attend to its padding and give other tokens than with its mask."""
    if isinstance(pad_token_id, (list, tuple)):
        pad_token_id = pad_token_id[0] if pad_token_id else None
    if pad_token_id is None or isinstance(pad_token_id, bool):
        return torch.ones_like(input_ids)
    pad = int(pad_token_id)
    if pad in set(int(e) for e in (eos_token_ids or [])):
        return torch.ones_like(input_ids)
    is_pad = input_ids == pad
    if not bool(is_pad.any()):  # one host read, before decoding starts
        return torch.ones_like(input_ids)
    return (~is_pad).long()

"""Everything checked before vLLM builds a guided model, in one place (``check_guided_config``).

It runs twice: in the front-end process, from vLLM's per-architecture config hook (``VllmConfig.__post_init__``,
before any engine process starts, so a bad checkpoint fails ``vllm.LLM(...)`` / the server's start with this
module's message), and again in the worker where the model is built (cheap: configs, maps and the tokenizer).
Nothing here needs a model's weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..checkpoint_format import (GUIDED_ARCHITECTURE, MAP_PATTERN, GuidedSpec, load_checkpoint_tokenizer,
                                 looks_like_path, read_guided_checkpoint, tokenizer_difference_of)
from .._validate import check_alpha_float
from ..guidance import fallback_id, logit_transform, resolve_suppress_from

_TRANSFORMERS_PATH = ("serve this pair with the transformers path instead: "
                      "ivl_kernels.hf.IVLLogitsProcessor(value_model, vocab_map=..., base_tokenizer=..., "
                      "value_tokenizer=...) re-tokenises the text for the value model")


@dataclass
class ModelPlan:
    role: str
    ref: str                       # resolved path or hub id
    hf_config: object
    vocab_size: int
    alpha: float = 1.0
    vocab_map: Optional[torch.Tensor] = None   # int32 [Vb] (base id -> this model's id, -1 = unmapped), or None
    fallback_id: int = 0           # the value input id read for base ids with no counterpart


@dataclass
class GuidedPlan:
    spec: GuidedSpec
    base: ModelPlan
    terms: List[ModelPlan] = field(default_factory=list)
    fill: float = 0.0
    suppress_from: Optional[int] = None


def _checkpoint_directory(model_config) -> str:
    model = model_config.model
    if os.path.isdir(model):
        return model
    try:  # a guided checkpoint on the hub: its small files only (it holds no weights)
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=getattr(model_config, "revision", None),
                                 allow_patterns=["*.json", MAP_PATTERN, "*.model", "*.txt"])
    except Exception as exc:
        raise ValueError(f"guided checkpoint {model!r}: not a directory, and it cannot be fetched from the hub "
                         f"({type(exc).__name__}: {exc})") from None


def _read_config(ref: str, role: str, directory: str, trust_remote_code: bool):
    if looks_like_path(ref) and not os.path.exists(ref):
        raise ValueError(f"guided checkpoint {directory}: the {role} model directory {ref!r} does not exist "
                         f"(references are relative to the checkpoint directory; re-run `ivl-kernels compose` if the "
                         f"models moved)")
    try:
        from vllm.transformers_utils.config import get_config

        return get_config(ref, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ValueError(f"guided checkpoint {directory}: cannot read the {role} model's config from {ref!r} "
                         f"({type(exc).__name__}: {exc}); give a model directory (with config.json) or a hub "
                         f"id") from None


def _architectures(cfg) -> List[str]:
    archs = list(getattr(cfg, "architectures", None) or [])
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(cfg, "model_type", None))
        archs = [name] if name else []
    return archs


def _text(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _quant(cfg):
    q = getattr(cfg, "quantization_config", None) or getattr(_text(cfg), "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else dict(vars(q))
    return q


# Speculative methods tested with a guided target (tests/vllm/test_vllm_speculative.py): the drafter is its own
# model and the target's verification reads compute_logits, i.e. the guided logits.
_SPECULATIVE_METHODS = ("draft_model",)


def _check_speculative(vllm_config, where: str) -> None:
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return
    method = getattr(spec, "method", None)
    if method not in _SPECULATIVE_METHODS:
        raise ValueError(f"{where}: speculative decoding method {method!r} is not supported by the guided "
                         f"architecture (it reads the target's own hidden states or heads); use "
                         f"speculative_config={{'method': 'draft_model', 'model': DRAFT, ...}}")
    draft = getattr(spec, "draft_model_config", None)
    if draft is not None and GUIDED_ARCHITECTURE in (getattr(draft, "architectures", None) or []):
        raise ValueError(f"{where}: the draft model is itself a guided checkpoint; draft with a plain model (e.g. "
                         f"the base, or a smaller model with the same vocabulary)")


# What vLLM's Transformers backend (vllm/model_executor/models/transformers/base.py) sizes its attention layers
# with: fields of ``model_config.model_arch_config``, which ``init_vllm_registered_model(hf_config=...)`` builds
# from the sub-model's config but the engine's *text* config (the guided checkpoint's: the base's), not the
# sub-model's own. A native vLLM class reads its own config instead.
_BACKEND_READS = ("total_num_attention_heads", "head_size", "total_num_kv_heads", "per_layer_overrides")


def _transformers_backend_class(model_config, archs: List[str]) -> Optional[str]:
    """The Transformers-backend class vLLM builds for a model of these architectures, or None where it builds a
    native class: asked of vLLM's registry (the first architecture it registers, ``resolve_model_cls``'s order),
    without importing the class."""
    from vllm.model_executor.models import registry as reg

    backend = {cls for _module, cls in getattr(reg, "_TRANSFORMERS_BACKEND_MODELS", {}).values()}
    models = getattr(reg.ModelRegistry, "models", {})
    for arch in archs:
        entry = models.get(arch)
        if entry is None:
            continue
        name = getattr(entry, "class_name", None) or getattr(getattr(entry, "model_cls", None), "__name__", "")
        module = getattr(entry, "module_name", None) or getattr(getattr(entry, "model_cls", None), "__module__", "")
        if name in backend or module.endswith(".models.transformers"):
            return name
        return "TransformersForCausalLM" if getattr(model_config, "model_impl", "auto") == "transformers" else None
    return None


def _transformers_backend_problem(vllm_config, cfg, trust_remote_code: bool) -> Optional[str]:
    """Why a model served through vLLM's Transformers backend cannot be a sub-model here, or None: the attention
    shapes it would read (``_BACKEND_READS``) differ from its own (its first request would fail inside the
    engine), or the transformers class it wraps has a biased LM head (the backend registers the bias only while
    loading weights; the fused head cannot apply it)."""
    from vllm.transformers_utils.config import get_hf_text_config

    # One copy serves both questions: ``with_hf_config`` deep-copies the engine's model config, sets its
    # ``hf_config`` and builds its ``model_arch_config`` then (a new object of plain values, from the engine's text
    # config: what init_vllm_registered_model gives). Its fields are read before ``hf_text_config`` is rebound on
    # that copy (which mutates no object they came from; ``get_model_arch_config`` builds a new object and stores
    # nothing), so they are what a second, untouched copy would give.
    sub = vllm_config.with_hf_config(cfg).model_config
    got = {f: getattr(sub.model_arch_config, f, None) for f in _BACKEND_READS}
    sub.hf_text_config = get_hf_text_config(cfg)
    need = sub.get_model_arch_config()  # what vLLM reads serving this model alone
    diff = [f"{f}={got[f]} instead of its {getattr(need, f, None)}" for f in _BACKEND_READS
            if got[f] != getattr(need, f, None)]
    if diff:
        return (f"as a sub-model, vLLM's Transformers backend would size its attention layers from the guided "
                f"checkpoint's text config (the base's): {', '.join(diff)}; its first request would fail inside "
                f"the engine")
    try:  # the class the backend wraps, built on the meta device (no memory, no weights)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        head = hf_model.get_output_embeddings()
    except Exception:  # not buildable here: load_weights checks the heads again once they exist
        return None
    if getattr(head, "bias", None) is not None:
        return "its LM head has a bias, which the fused guided head cannot apply"
    return None


def check_guided_config(vllm_config) -> GuidedPlan:
    """Validate a guided checkpoint against the engine's configuration; ``ValueError`` with the reason and the fix
    for anything that could fail later (while serving), else the resolved plan the model is built from."""
    from vllm.model_executor.models import ModelRegistry

    model_config = vllm_config.model_config
    directory = _checkpoint_directory(model_config)
    spec = read_guided_checkpoint(directory)
    where = f"guided checkpoint {directory}"

    par = vllm_config.parallel_config
    pp = int(getattr(par, "pipeline_parallel_size", 1))
    if pp > 1:
        raise ValueError(
            f"{where}: pipeline_parallel_size={pp}: pipeline parallelism is not supported by the guided architecture "
            f"(every stage would hold a slice of every model's layers); use tensor_parallel_size instead")
    if getattr(vllm_config, "lora_config", None) is not None:
        raise ValueError(f"{where}: LoRA adapters (enable_lora) are not supported by the guided architecture; merge "
                         f"an adapter into its model, or reference a PEFT adapter directory from the transformers path")
    _check_speculative(vllm_config, where)
    if getattr(model_config, "enable_prompt_embeds", False):
        raise ValueError(f"{where}: enable_prompt_embeds is not supported (each model embeds its own token ids)")

    trust = bool(getattr(model_config, "trust_remote_code", False))
    supported = set(ModelRegistry.get_supported_archs())
    max_len = getattr(model_config, "max_model_len", None)

    def build(role, stored_ref, alpha=1.0):
        ref = spec.resolve(stored_ref)
        cfg = _read_config(ref, role, directory, trust)
        archs = _architectures(cfg)
        if GUIDED_ARCHITECTURE in archs:
            raise ValueError(f"{where}: the {role} model {ref!r} is itself a guided checkpoint; list its terms "
                             f"directly")
        if not any(a in supported for a in archs):
            raise ValueError(f"{where}: the {role} model {ref!r} has architecture {archs or '(none)'}, which vLLM "
                             f"does not implement; serve the checkpoint with the transformers path "
                             f"(ivl_kernels.hf.GuidedCausalLM.from_pretrained)")
        text = _text(cfg)
        size = getattr(text, "vocab_size", None)
        if not isinstance(size, int):
            raise ValueError(f"{where}: the {role} model's config ({ref!r}) has no vocab_size")
        transform = logit_transform(text)
        if transform is not None:
            raise ValueError(f"{where}: the {role} model ({ref!r}) has {transform}; the fused guided head does not "
                             f"apply it: not supported")
        mpe = getattr(text, "max_position_embeddings", None)
        if isinstance(max_len, int) and isinstance(mpe, int) and mpe < max_len:
            raise ValueError(f"{where}: the {role} model ({ref!r}) has max_position_embeddings={mpe}, below the "
                             f"engine's max_model_len={max_len}: it would be run past its positions. Pass "
                             f"max_model_len={mpe} (or less)")
        backend = _transformers_backend_class(model_config, archs)
        if backend is not None:
            problem = _transformers_backend_problem(vllm_config, cfg, trust)
            if problem is not None:
                raise ValueError(f"{where}: the {role} model ({ref!r}) has architecture {archs[0]}, which vLLM "
                                 f"serves through its Transformers backend ({backend}), and {problem}: not "
                                 f"supported. Use a model of an architecture vLLM implements natively, or serve "
                                 f"the checkpoint with the transformers path "
                                 f"(ivl_kernels.hf.GuidedCausalLM.from_pretrained)")
        pad = getattr(text, "pad_token_id", None)
        return ModelPlan(role=role, ref=ref, hf_config=cfg, vocab_size=size, alpha=float(alpha),
                         fallback_id=fallback_id(pad, size))

    base = build("base", spec.base)
    Vb = base.vocab_size
    stored_vb = (spec.text_config or {}).get("vocab_size")
    if isinstance(stored_vb, int) and stored_vb != Vb:
        raise ValueError(f"{where}: the base model's vocabulary is now {Vb} ids but the checkpoint was composed for "
                         f"{stored_vb}: re-run `ivl-kernels compose`")
    qb = _quant(base.hf_config)
    plan = GuidedPlan(spec=spec, base=base, fill=float(spec.fill))
    for i, t in enumerate(spec.terms):
        role = f"term {i}" if len(spec.terms) > 1 else "value"
        try:  # the package's one rule (finite in float32: the kernels compute in float32)
            check_alpha_float(f"{role}'s alpha", t.alpha)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        m = build(role, t.model, t.alpha)
        qt = _quant(m.hf_config)
        if qt != qb:
            desc = lambda q: "unquantized" if q is None else f"quantized ({q.get('quant_method', q)})"
            raise ValueError(f"{where}: the base model is {desc(qb)} and the {role} model is {desc(qt)}: vLLM builds "
                             f"every sub-model with one quantization config (the base's), which would be applied to "
                             f"the {role} model's layers too. Use models with the same quantization (or none)")
        path = spec.map_path(t)
        if path is not None:
            from ..vocab import VocabMap

            vmap = VocabMap.load(path)
            try:
                vmap.check_compatible(Vb, m.vocab_size)
            except ValueError as exc:
                raise ValueError(f"{where}: {role}'s map {t.map!r} does not fit: {exc}") from None
            index = vmap.index.to(torch.int32)
            lo, hi = int(index.min()), int(index.max())
            if index.shape != (Vb,) or lo < -1 or hi >= m.vocab_size:
                raise ValueError(f"{where}: {role}'s map {t.map!r} must hold {Vb} entries in [-1, {m.vocab_size})")
            m.vocab_map = index
        else:
            if m.vocab_size > Vb:
                raise ValueError(f"{where}: the {role} model's vocabulary ({m.vocab_size} ids) does not fit the base's "
                                 f"({Vb}) without a map: build one (`ivl-kernels map`) and compose with it")
            diff = tokenizer_difference_of(base.ref, m.ref)
            if diff is not None:
                raise ValueError(f"{where}: the base and the {role} model tokenise differently ({diff}) and the "
                                 f"checkpoint has no map for it: such a pair needs text re-tokenisation, which the "
                                 f"vLLM path does not do; {_TRANSFORMERS_PATH}")
        plan.terms.append(m)
    # A tokenizer whose files are there but do not load is an error (naming the directory), never "no
    # tokenizer": that would silently turn padded-head suppression off.
    tokenizer = load_checkpoint_tokenizer(spec)
    plan.suppress_from = resolve_suppress_from(spec.suppress_ids_from, tokenizer, Vb)
    return plan


def use_base_generation_config(vllm_config, plan: GuidedPlan) -> None:
    """Point vLLM's ``generation_config`` (EOS ids, default sampling parameters) at the base model when the guided
    checkpoint directory has no ``generation_config.json`` (``compose`` writes none): ``GuidedCausalLM`` generates
    with the base's, and so does vLLM serving the base alone. Only when the engine was left at ``"auto"``: a
    directory the user gave, or ``"vllm"`` (neutral defaults), is kept. Nothing is copied into the checkpoint."""
    model_config = vllm_config.model_config
    if getattr(model_config, "generation_config", None) != "auto":
        return
    if os.path.isfile(os.path.join(plan.spec.directory, "generation_config.json")):
        return
    # vLLM reads a generation_config other than "auto" / "vllm" as a directory or hub id: the base's file, else
    # (as transformers does) the base's config.json.
    model_config.generation_config = plan.base.ref


def verify_hook():
    """vLLM's per-architecture config hook class (``MODELS_CONFIG_MAP``): runs ``check_guided_config`` in the
    front-end, before any engine process starts."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class IVLGuidedVerify(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            plan = check_guided_config(vllm_config)
            use_base_generation_config(vllm_config, plan)
            from ._per_request import enable_per_request_alpha

            why_not = enable_per_request_alpha(vllm_config, [t.alpha for t in plan.terms])
            if why_not:
                import logging

                logging.getLogger(__name__).warning("guided checkpoint: %s", why_not)

    return IVLGuidedVerify

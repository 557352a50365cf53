"""Writing and loading guided checkpoints with transformers (the format: ``ivl_kernels.checkpoint_format``).

Besides the format's files (``config.json``, ``map_I.pt``, the base's tokenizer), the transformers writers add
    DIR/configuration_ivl_guided.py, DIR/modeling_ivl_guided.py
                         one-line shims importing the installed package, named by ``config.json``'s ``auto_map``
                         (``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``)

``write_guided_checkpoint`` checks what can be checked from the configs before anything is written: every
reference resolves to a causal LM config, a term without a map does not score ids the base cannot emit, a map fits
both vocabularies, and (when both tokenizers load) models sharing ids without a map share a tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

# The format itself (constants, spec, reading, references, tokenizer rule) is ``ivl_kernels.checkpoint_format``'s,
# shared with the vLLM plugin; these names are re-exported here, where they were first defined.
from ..checkpoint_format import (CONFIG_NAME, FORMAT_VERSION, GUIDED_ARCHITECTURE, GUIDED_MODEL_TYPE,  # noqa: F401
                                 TRAINED_MAP, GuidedSpec, TermSpec, guided_config_dict, has_tokenizer,
                                 is_guided_checkpoint, load_checkpoint_tokenizer, load_tokenizer_files,
                                 looks_like_path, map_file, read_guided_checkpoint, reference_for,
                                 resolve_for_loading, resolve_reference, tokenizer_difference,
                                 tokenizer_difference_of)

# ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` in a process that has not imported
# ivl_kernels (``lm_eval --model hf``): the checkpoint names two shim modules, each one import of the installed
# package, so the checkpoint carries no copy of the code (which would go stale when the package is upgraded).
AUTO_MAP = {"AutoConfig": "configuration_ivl_guided.IVLGuidedConfig",
            "AutoModelForCausalLM": "modeling_ivl_guided.GuidedCausalLM"}
_SHIM_HEADER = "# Written by ivl-kernels: the guided checkpoint's classes come from the installed package.\n"
SHIMS = {"configuration_ivl_guided.py": _SHIM_HEADER + "from ivl_kernels.hf.config import IVLGuidedConfig  # noqa: F401\n",
         "modeling_ivl_guided.py": _SHIM_HEADER + "from ivl_kernels.hf.guided import GuidedCausalLM  # noqa: F401\n"}


def _adapter_parent(ref: str) -> Optional[str]:
    """For a PEFT adapter directory (``ivl-kernels train --lora-r``), the model it adapts (``""`` when it names
    none); ``None`` for anything else."""
    path = os.path.join(ref, "adapter_config.json")
    if not (os.path.isdir(ref) and os.path.isfile(path)):
        return None
    with open(path) as f:
        return json.load(f).get("base_model_name_or_path") or ""


def _config(ref: str, role: str):
    from transformers import AutoConfig

    ref = _adapter_parent(ref) or ref  # an adapter: its base's config
    try:
        cfg = AutoConfig.from_pretrained(ref)
    except Exception as exc:
        raise ValueError(f"{role}: cannot read a model config from {ref!r} ({type(exc).__name__}: {exc}); "
                         f"give a model directory (with config.json) or a hub id") from None
    check_causal_lm_config(cfg, ref, role)
    return cfg


def check_causal_lm_config(cfg, ref: str, role: str) -> None:
    """``ValueError`` unless ``cfg`` is a decoder-only causal LM's: an encoder-decoder (T5, BART) or an encoder
    (BERT) has no next-token head over the prompt for the guidance to add to, and would fail only when loaded."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False) or model_type == GUIDED_MODEL_TYPE or \
            (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(cfg, "auto_map", None)):
        kind = ("an encoder-decoder model" if getattr(cfg, "is_encoder_decoder", False) else
                "a guided checkpoint (list its terms instead)" if model_type == GUIDED_MODEL_TYPE else
                "not a causal LM")
        raise ValueError(f"{role}: {ref!r} is {kind} (model_type {model_type!r}); guidance needs decoder-only "
                         f"causal LMs (AutoModelForCausalLM)")


def _vocab_size(cfg) -> int:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    size = getattr(text, "vocab_size", None)
    if not isinstance(size, int):
        raise ValueError(f"the config of {getattr(cfg, '_name_or_path', '?')!r} has no vocab_size")
    return size


def is_own_checkpoint_dir(directory: str) -> bool:
    """Whether ``directory`` holds only what a guided-checkpoint writer writes (a guided ``config.json``, maps,
    tokenizer files): writing a new guided checkpoint there destroys nothing else. A directory that also holds
    weights, or any other model, is not one."""
    from .._atomic import WEIGHT_FILE

    if not is_guided_checkpoint(directory):
        return False
    return not any(WEIGHT_FILE.match(n) or os.path.isdir(os.path.join(directory, n)) for n in os.listdir(directory))


def check_guided_output(directory: str, base: str, models: Sequence[str], *, overwrite: bool,
                        flag: str = "overwrite=True") -> None:
    """The output checks of every guided-checkpoint writer (``compose``, ``GuidedCausalLM.save_pretrained``):
    never one of the models it references (nor inside one), never a directory of someone else's files unless
    ``overwrite``."""
    from .._atomic import check_not_input, check_output_dir

    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise TypeError(f"the checkpoint directory must be a non-empty path, got {directory!r}")
    check_not_input(directory, [("base model", base)] + [(f"term {i} model", m) for i, m in enumerate(models)],
                    flag="the checkpoint directory")
    check_output_dir(directory, overwrite=overwrite, ours=is_own_checkpoint_dir, what="checkpoint directory",
                     flag=flag)


def write_guided_checkpoint(directory: str, base: str, terms: Sequence[dict], *, fill: float = 0.0,
                            suppress_ids_from: Optional[int] = None, tokenizer=None,
                            references_as_given: bool = False, overwrite: bool = False,
                            overwrite_flag: str = "overwrite=True") -> GuidedSpec:
    """Write a guided checkpoint (see the module docstring) and return its spec.

    Everything is checked before anything is written; the directory appears whole or not at all (written into a
    temporary sibling, then renamed).

    Args:
        directory: created if missing. It must not be (or lie inside) a model it references; an existing
            directory may only hold an earlier guided checkpoint (replaced) unless ``overwrite=True`` (then the
            checkpoint's files replace same-named ones; other files are left alone).
        base: the base model (directory or hub id).
        terms: ``[{"model": path_or_id, "alpha": float, "map": VocabMap | path | None}, ...]``; a term
            directory written by ``ivl-kernels train`` brings its own map (``vocab_map.pt``) when none is given.
        fill, suppress_ids_from: as ``GuidedCausalLM``.
        tokenizer: a tokenizer object to save; default: the base model's, loaded from ``base`` (skipped, with no
            error, when it has none).
        references_as_given: store ``base`` / term models exactly as given (default: local directories are
            stored relative to ``directory``).
    """
    from .._atomic import atomic_dir
    from .._validate import check_alpha_float, check_finite_float
    from ..vocab import VocabMap

    if not terms:
        raise ValueError("a guided checkpoint needs at least one guidance term")
    check_guided_output(directory, base, [t["model"] for t in terms], overwrite=overwrite, flag=overwrite_flag)
    fill = check_finite_float("fill", fill, float32=True)  # JSON has no infinity; the ops need float32's range
    if suppress_ids_from is not None and (isinstance(suppress_ids_from, bool) or not isinstance(suppress_ids_from, int)
                                          or suppress_ids_from < 1):
        raise ValueError(f"suppress_ids_from must be an int >= 1 or None, got {suppress_ids_from!r}")
    ref = (lambda r: r) if references_as_given else (lambda r: reference_for(r, directory))
    base_cfg = _config(base, "base")
    Vb = _vocab_size(base_cfg)
    specs, maps = [], []
    for i, t in enumerate(terms):
        role = f"term {i} ({t['model']})"
        alpha = check_alpha_float(f"{role}: alpha", t.get("alpha", 1.0))
        Vv = _vocab_size(_config(t["model"], role))
        vmap = t.get("map")
        trained_map = os.path.join(t["model"], TRAINED_MAP)
        if vmap is None and os.path.isfile(trained_map):
            vmap = trained_map  # `ivl-kernels train` saved the map it trained with beside the value network
        if vmap is None:
            if Vv > Vb:
                raise ValueError(f"{role}: its vocabulary ({Vv} ids) does not fit the base's ({Vb}) without a map: "
                                 f"build one with `ivl-kernels map` and pass it")
            diff = tokenizer_difference_of(base, t["model"])
            if diff is not None:
                raise ValueError(f"{role}: the base and this model tokenise differently ({diff}); without a map "
                                 f"they cannot share ids: build one with `ivl-kernels map`")
        else:
            vmap = vmap if isinstance(vmap, VocabMap) else VocabMap.load(vmap)
            vmap.check_compatible(Vb, Vv)
        maps.append(vmap)
        specs.append(TermSpec(model=ref(t["model"]), alpha=alpha, map=None if vmap is None else map_file(i)))
    if tokenizer is None and os.path.isdir(base) and has_tokenizer(base):
        tokenizer = load_tokenizer_files(base, "the base model's tokenizer")
    elif tokenizer is None and not os.path.isdir(base):
        try:  # a hub id: its tokenizer when it has one (models without tokenizer files exist there)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base)
        except Exception:
            tokenizer = None
    doc = guided_config_dict(ref(base), [{"model": s.model, "alpha": s.alpha, "map": s.map} for s in specs],
                             fill=fill, suppress_ids_from=suppress_ids_from, base_config=base_cfg)
    doc["auto_map"] = dict(AUTO_MAP)
    with atomic_dir(directory) as tmp:
        for i, vmap in enumerate(maps):
            if vmap is not None:
                vmap.save(os.path.join(tmp, map_file(i)))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        for name, source in SHIMS.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return read_guided_checkpoint(directory)


def load_causal_lm(ref: str, role: str, **kwargs):
    """A transformers causal LM from a directory or hub id; a PEFT adapter directory (``adapter_config.json``) is
    loaded onto the base model it names."""
    from transformers import AutoModelForCausalLM

    parent = _adapter_parent(ref)
    if parent is not None:
        from peft import PeftModel

        if not parent:
            raise ValueError(f"{role}: the adapter at {ref!r} names no base_model_name_or_path")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parent, **kwargs), ref)
    if looks_like_path(ref) and not os.path.exists(ref):
        raise FileNotFoundError(f"{role}: model directory {ref!r} does not exist")
    if os.path.isdir(ref) and os.path.isfile(os.path.join(ref, "config.json")):
        from transformers import AutoConfig

        check_causal_lm_config(AutoConfig.from_pretrained(ref), ref, role)
    try:
        return AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"{role}: cannot load a model from {ref!r} ({exc})") from None
    except ValueError as exc:  # the hub client's HFValidationError for a name that is neither a path nor an id
        if os.path.exists(ref):
            raise
        raise FileNotFoundError(f"{role}: {ref!r} is neither a local directory nor a valid hub id ({exc})") from None


def reference_of(model) -> Optional[str]:
    """Where a loaded transformers model came from (``config._name_or_path``), if it says."""
    cfg = getattr(model, "config", None)
    ref = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return ref or None


def vocab_map_object(index, Vb: int, Vv: int):
    """A ``VocabMap`` for an int ``[Vb]`` index tensor (or the VocabMap itself)."""
    from ..vocab import VocabMap

    if isinstance(index, VocabMap):
        return index
    return VocabMap(index.detach().to("cpu"), Vb, Vv)


"""The guided checkpoint: a directory that names a base model and its guidance terms, without copying weights.

    DIR/config.json      {"model_type": "ivl_guided", "architectures": ["IVLGuidedForCausalLM"],
                          "ivl_guided": {"format_version": 1, "base": REF, "fill": 0.0, "suppress_ids_from": null,
                                         "terms": [{"model": REF, "alpha": 1.0, "map": "map_0.pt" | null}, ...]},
                          "text_config": {the base model's config}, plus its vocab_size / max_position_embeddings}
    DIR/map_I.pt         term I's vocabulary map (``VocabMap.save``), when it has one
    DIR/tokenizer*       the base model's tokenizer (what a server detokenises with)
    DIR/configuration_ivl_guided.py, DIR/modeling_ivl_guided.py
                         one-line shims importing the installed package, named by ``config.json``'s ``auto_map``
                         (``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``)

A model reference ``REF`` is resolved, in order: an absolute path; a path relative to ``DIR`` (``compose`` writes
local models this way, so a directory tree that holds the checkpoint and its models can move as a whole); else a
Hugging Face hub id. ``text_config`` and the top-level copies of its sizes let tools that read ``config.json``
(vLLM's engine arguments, ``max_model_len``) see the base model's limits.

``write_guided_checkpoint`` checks what can be checked from the configs before anything is written: every
reference resolves to a causal LM config, a term without a map does not score ids the base cannot emit, a map fits
both vocabularies, and (when both tokenizers load) models sharing ids without a map share a tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

GUIDED_MODEL_TYPE = "ivl_guided"
GUIDED_ARCHITECTURE = "IVLGuidedForCausalLM"
FORMAT_VERSION = 1
# ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` in a process that has not imported
# ivl_kernels (``lm_eval --model hf``): the checkpoint names two shim modules, each one import of the installed
# package, so the checkpoint carries no copy of the code (which would go stale when the package is upgraded).
AUTO_MAP = {"AutoConfig": "configuration_ivl_guided.IVLGuidedConfig",
            "AutoModelForCausalLM": "modeling_ivl_guided.GuidedCausalLM"}
_SHIM_HEADER = "# Written by ivl-kernels: the guided checkpoint's classes come from the installed package.\n"
SHIMS = {"configuration_ivl_guided.py": _SHIM_HEADER + "from ivl_kernels.hf.config import IVLGuidedConfig  # noqa: F401\n",
         "modeling_ivl_guided.py": _SHIM_HEADER + "from ivl_kernels.hf.guided import GuidedCausalLM  # noqa: F401\n"}
TRAINED_MAP = "vocab_map.pt"  # the map file `ivl-kernels train` writes into its output directory


@dataclass
class TermSpec:
    model: str                      # the reference as stored
    alpha: float = 1.0
    map: Optional[str] = None       # file name inside the checkpoint directory


@dataclass
class GuidedSpec:
    base: str
    terms: List[TermSpec]
    fill: float = 0.0
    suppress_ids_from: Optional[int] = None
    directory: str = ""
    text_config: dict = field(default_factory=dict)

    def resolve(self, ref: str) -> str:
        """The path (or hub id) a stored reference points to."""
        return resolve_reference(ref, self.directory)

    def map_path(self, term: TermSpec) -> Optional[str]:
        return None if term.map is None else os.path.join(self.directory, term.map)


def resolve_reference(ref: str, directory: str) -> str:
    if os.path.isabs(ref):
        return ref
    local = os.path.normpath(os.path.join(directory, ref))
    return local if os.path.exists(local) else ref


def _reference_for(path_or_id: str, directory: str) -> str:
    """How ``compose`` stores a model given on its command line: relative to the checkpoint when local."""
    if os.path.isdir(path_or_id):
        return os.path.relpath(os.path.abspath(path_or_id), os.path.abspath(directory))
    return path_or_id


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def has_tokenizer(ref: str) -> bool:
    """Whether ``ref`` has tokenizer files (a hub id: assumed). transformers 5 builds a one-token tokenizer for a
    model directory with none, which must not be compared, saved, nor give the number of ids to keep."""
    return not os.path.isdir(ref) or any(os.path.isfile(os.path.join(ref, f)) for f in _TOKENIZER_FILES)


def _same_tokenizer_ids(base_ref: str, value_ref: str) -> Optional[str]:
    """``None`` when the two tokenizers agree on every id they share (or one cannot be loaded: nothing to check),
    else a description of the first difference."""
    if not (has_tokenizer(base_ref) and has_tokenizer(value_ref)):
        return None
    try:
        from transformers import AutoTokenizer

        tb, tv = AutoTokenizer.from_pretrained(base_ref), AutoTokenizer.from_pretrained(value_ref)
    except Exception:
        return None
    return tokenizer_id_difference(tb, tv)


def tokenizer_id_difference(base_tok, value_tok) -> Optional[str]:
    """``None`` when every id both tokenizers have is the same token in both (ids only one has, such as added
    tokens past the shared vocabulary or a padded head's, are fine: the identity map holds), else the first
    difference."""
    vb = {i: t for t, i in base_tok.get_vocab().items()}
    vv = {i: t for t, i in value_tok.get_vocab().items()}
    common = sorted(set(vb) & set(vv))
    if not common:
        return "the two tokenizers have no id in common"
    for i in common:
        if vb[i] != vv[i]:
            return f"id {i} is {vb[i]!r} for the base and {vv[i]!r} for the value model"
    return None


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
    fill = check_finite_float("fill", fill)
    if suppress_ids_from is not None and (isinstance(suppress_ids_from, bool) or not isinstance(suppress_ids_from, int)
                                          or suppress_ids_from < 1):
        raise ValueError(f"suppress_ids_from must be an int >= 1 or None, got {suppress_ids_from!r}")
    ref = (lambda r: r) if references_as_given else (lambda r: _reference_for(r, directory))
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
            diff = _same_tokenizer_ids(base, t["model"])
            if diff is not None:
                raise ValueError(f"{role}: the base and this model tokenise differently ({diff}); without a map "
                                 f"they cannot share ids: build one with `ivl-kernels map`")
        else:
            vmap = vmap if isinstance(vmap, VocabMap) else VocabMap.load(vmap)
            vmap.check_compatible(Vb, Vv)
        maps.append(vmap)
        specs.append(TermSpec(model=ref(t["model"]), alpha=alpha, map=None if vmap is None else f"map_{i}.pt"))
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
                vmap.save(os.path.join(tmp, f"map_{i}.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(doc, f, indent=2, default=str)
        for name, source in SHIMS.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return read_guided_checkpoint(directory)


def guided_config_dict(base: str, terms: Sequence[dict], *, fill: float, suppress_ids_from: Optional[int],
                       base_config) -> dict:
    """The ``config.json`` document of a guided checkpoint (without ``auto_map``): what the writers store and
    what ``GuidedCausalLM.config`` holds for a model built in memory. ``terms``: ``{"model", "alpha", "map"}``
    with the references and map file names as stored."""
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    text = text.to_dict()
    return {
        "model_type": GUIDED_MODEL_TYPE,
        "architectures": [GUIDED_ARCHITECTURE],
        "ivl_guided": {
            "format_version": FORMAT_VERSION,
            "base": base,
            "terms": [{"model": t["model"], "alpha": t["alpha"], "map": t["map"]} for t in terms],
            "fill": float(fill),
            "suppress_ids_from": None if suppress_ids_from is None else int(suppress_ids_from),
        },
        "text_config": text,
        "vocab_size": text.get("vocab_size"),
        "max_position_embeddings": text.get("max_position_embeddings"),
        "torch_dtype": str(text.get("torch_dtype") or text.get("dtype") or "float32").replace("torch.", ""),
    }


def load_tokenizer_files(directory: str, what: str):
    """The tokenizer saved in ``directory`` (which has tokenizer files, ``has_tokenizer``); ``ValueError`` naming
    the directory when they do not load: a corrupted tokenizer must not pass for "no tokenizer", which would
    silently turn padded-head suppression off."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise ValueError(f"{what} in {directory!r} does not load ({type(exc).__name__}: {str(exc)[:300]}); "
                         f"repair or remove its tokenizer files") from None


def is_guided_checkpoint(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return json.load(f).get("model_type") == GUIDED_MODEL_TYPE
    except (OSError, ValueError):
        return False


def read_guided_checkpoint(directory: str) -> GuidedSpec:
    """The spec of a guided checkpoint; ``ValueError`` naming the file and the key for anything malformed (a
    hand-edited alpha of ``"nan"`` or ``true`` is refused, not read as a number)."""
    from .._validate import check_alpha_float, check_finite_float

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no guided checkpoint at {directory!r}: {path} does not exist")
    with open(path, "rb") as f:
        try:
            doc = json.loads(f.read().decode("utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: not UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("model_type") != GUIDED_MODEL_TYPE or "ivl_guided" not in doc:
        found = doc.get("model_type") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: not a guided checkpoint (model_type {found!r}, expected "
                         f"{GUIDED_MODEL_TYPE!r}); write one with `ivl-kernels compose` or GuidedCausalLM.save_pretrained")
    g = doc["ivl_guided"]
    if not isinstance(g, dict):
        raise ValueError(f"{path}: 'ivl_guided' must be an object, got {type(g).__name__}")
    if g.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: guided checkpoint format {g.get('format_version')} is not supported "
                         f"(expected {FORMAT_VERSION})")

    def field_error(key, expected, got):
        return ValueError(f"{path}: ivl_guided.{key} must be {expected}, got {got!r}")

    def number(key, value):
        try:
            check = check_alpha_float if "alpha" in key else check_finite_float
            return check(f"ivl_guided.{key}", value)
        except (TypeError, ValueError):
            raise field_error(key, "a finite number", value) from None

    if not isinstance(g.get("base"), str) or not g["base"]:
        raise field_error("base", "the base model's path or hub id (a non-empty string)", g.get("base"))
    raw_terms = g.get("terms")
    if not isinstance(raw_terms, list) or not raw_terms:
        raise field_error("terms", "a non-empty list of {'model', 'alpha', 'map'} objects", raw_terms)
    terms = []
    for i, t in enumerate(raw_terms):
        if not isinstance(t, dict):
            raise field_error(f"terms[{i}]", "an object with 'model', 'alpha' and 'map'", t)
        if not isinstance(t.get("model"), str) or not t["model"]:
            raise field_error(f"terms[{i}].model", "a model path or hub id (a non-empty string)", t.get("model"))
        m = t.get("map")
        if m is not None and (not isinstance(m, str) or os.path.isabs(m) or ".." in m.replace("\\", "/").split("/")):
            raise field_error(f"terms[{i}].map", "null or a file name inside the checkpoint directory", m)
        terms.append(TermSpec(model=t["model"], alpha=number(f"terms[{i}].alpha", t.get("alpha", 1.0)), map=m))
    sif = g.get("suppress_ids_from")
    if sif is not None and (isinstance(sif, bool) or not isinstance(sif, int) or sif < 1):
        raise field_error("suppress_ids_from", "null or an integer >= 1", sif)
    text_config = doc.get("text_config") or {}
    if not isinstance(text_config, dict):
        raise ValueError(f"{path}: text_config must be an object, got {type(text_config).__name__}")
    spec = GuidedSpec(base=g["base"], terms=terms, fill=number("fill", g.get("fill", 0.0)),
                      suppress_ids_from=sif, directory=os.path.abspath(directory), text_config=text_config)
    for t in terms:
        p = spec.map_path(t)
        if p is not None and not os.path.isfile(p):
            raise ValueError(f"{path}: term {t.model!r} names the map {t.map!r}, which is missing from {directory}")
    return spec


def looks_like_path(ref: str) -> bool:
    """Whether a stored reference can only be a local path: a hub id is ``name`` or ``org/name`` (no leading
    dot, no ``..``, at most one ``/``)."""
    parts = ref.replace("\\", "/").split("/")
    return (os.path.isabs(ref) or ref.startswith(".") or len(parts) > 2 or any(p in ("", ".", "..") for p in parts))


def resolve_for_loading(spec: GuidedSpec, stored: str, role: str) -> str:
    """``spec.resolve(stored)``, or ``FileNotFoundError`` naming the checkpoint and the path looked for when the
    reference is a local path that no longer exists (models moved apart from the checkpoint), instead of the hub
    client's complaint about an invalid repo id."""
    resolved = spec.resolve(stored)
    if looks_like_path(stored) and not os.path.exists(resolved):
        looked = resolved if os.path.isabs(resolved) else os.path.normpath(os.path.join(spec.directory, stored))
        raise FileNotFoundError(f"{os.path.join(spec.directory, 'config.json')}: the {role} model {stored!r} is not "
                                f"at {looked} (moved or deleted?): put it back, or rewrite the checkpoint with "
                                f"`ivl-kernels compose`")
    return resolved


def load_checkpoint_tokenizer(spec: GuidedSpec):
    """The tokenizer saved with a guided checkpoint, ``None`` when it has none; ``ValueError`` when its files
    are there but do not load."""
    if not has_tokenizer(spec.directory):
        return None
    return load_tokenizer_files(spec.directory, "the guided checkpoint's tokenizer")


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


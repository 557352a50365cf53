"""The guided checkpoint: a directory that names a base model and its guidance terms, without copying weights.

    DIR/config.json      {"model_type": "ivl_guided", "architectures": ["IVLGuidedForCausalLM"],
                          "ivl_guided": {"format_version": 1, "base": REF, "fill": 0.0, "suppress_ids_from": null,
                                         "terms": [{"model": REF, "alpha": 1.0, "map": "map_0.pt" | null}, ...]},
                          "text_config": {the base model's config}, plus its vocab_size / max_position_embeddings}
    DIR/map_I.pt         term I's vocabulary map (``VocabMap.save``), when it has one
    DIR/tokenizer*       the base model's tokenizer (what a server detokenises with)

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
        return AutoConfig.from_pretrained(ref)
    except Exception as exc:
        raise ValueError(f"{role}: cannot read a model config from {ref!r} ({type(exc).__name__}: {exc}); "
                         f"give a model directory (with config.json) or a hub id") from None


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


def write_guided_checkpoint(directory: str, base: str, terms: Sequence[dict], *, fill: float = 0.0,
                            suppress_ids_from: Optional[int] = None, tokenizer=None,
                            references_as_given: bool = False) -> GuidedSpec:
    """Write a guided checkpoint (see the module docstring) and return its spec.

    Args:
        directory: created if missing; an existing ``config.json`` there is replaced.
        base: the base model (directory or hub id).
        terms: ``[{"model": path_or_id, "alpha": float, "map": VocabMap | path | None}, ...]``; a term
            directory written by ``ivl-kernels train`` brings its own map (``vocab_map.pt``) when none is given.
        fill, suppress_ids_from: as ``GuidedCausalLM``.
        tokenizer: a tokenizer object to save; default: the base model's, loaded from ``base`` (skipped, with no
            error, when it has none).
        references_as_given: store ``base`` / term models exactly as given (default: local directories are
            stored relative to ``directory``).
    """
    from ..vocab import VocabMap

    if not terms:
        raise ValueError("a guided checkpoint needs at least one guidance term")
    os.makedirs(directory, exist_ok=True)
    ref = (lambda r: r) if references_as_given else (lambda r: _reference_for(r, directory))
    base_cfg = _config(base, "base")
    Vb = _vocab_size(base_cfg)
    specs, maps = [], []
    for i, t in enumerate(terms):
        role = f"term {i} ({t['model']})"
        alpha = float(t.get("alpha", 1.0))
        if alpha != alpha or alpha in (float("inf"), float("-inf")):
            raise ValueError(f"{role}: alpha must be finite, got {alpha}")
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
    for i, vmap in enumerate(maps):
        if vmap is not None:
            vmap.save(os.path.join(directory, f"map_{i}.pt"))
    text = base_cfg.get_text_config().to_dict() if hasattr(base_cfg, "get_text_config") else base_cfg.to_dict()
    doc = {
        "model_type": GUIDED_MODEL_TYPE,
        "architectures": [GUIDED_ARCHITECTURE],
        "ivl_guided": {
            "format_version": FORMAT_VERSION,
            "base": ref(base),
            "terms": [{"model": s.model, "alpha": s.alpha, "map": s.map} for s in specs],
            "fill": float(fill),
            "suppress_ids_from": None if suppress_ids_from is None else int(suppress_ids_from),
        },
        "text_config": text,
        "vocab_size": Vb,
        "max_position_embeddings": text.get("max_position_embeddings"),
        "torch_dtype": str(text.get("torch_dtype") or text.get("dtype") or "float32").replace("torch.", ""),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(doc, f, indent=2, default=str)
    if tokenizer is None and has_tokenizer(base):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base)
        except Exception:
            tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return read_guided_checkpoint(directory)


def is_guided_checkpoint(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return json.load(f).get("model_type") == GUIDED_MODEL_TYPE
    except (OSError, ValueError):
        return False


def read_guided_checkpoint(directory: str) -> GuidedSpec:
    """The spec of a guided checkpoint; ``ValueError`` naming the file for anything malformed."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no guided checkpoint at {directory!r}: {path} does not exist")
    with open(path) as f:
        try:
            doc = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
    if doc.get("model_type") != GUIDED_MODEL_TYPE or "ivl_guided" not in doc:
        raise ValueError(f"{path}: not a guided checkpoint (model_type {doc.get('model_type')!r}, expected "
                         f"{GUIDED_MODEL_TYPE!r}); write one with `ivl-kernels compose` or GuidedCausalLM.save_pretrained")
    g = doc["ivl_guided"]
    if g.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: guided checkpoint format {g.get('format_version')} is not supported "
                         f"(expected {FORMAT_VERSION})")
    terms = [TermSpec(model=t["model"], alpha=float(t.get("alpha", 1.0)), map=t.get("map")) for t in g["terms"]]
    if not terms:
        raise ValueError(f"{path}: no guidance terms")
    spec = GuidedSpec(base=g["base"], terms=terms, fill=float(g.get("fill", 0.0)),
                      suppress_ids_from=g.get("suppress_ids_from"), directory=os.path.abspath(directory),
                      text_config=doc.get("text_config") or {})
    for t in terms:
        p = spec.map_path(t)
        if p is not None and not os.path.isfile(p):
            raise ValueError(f"{path}: term {t.model!r} names the map {t.map!r}, which is missing from {directory}")
    return spec


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
    if os.path.isabs(ref) and not os.path.exists(ref):
        raise FileNotFoundError(f"{role}: model directory {ref!r} does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"{role}: cannot load a model from {ref!r} ({exc})") from None


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


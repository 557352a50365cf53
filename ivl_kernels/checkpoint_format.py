"""The guided checkpoint's format: what a guided checkpoint directory holds, how it is read, and the rules every
reader and writer shares (``ivl_kernels.hf`` writes and loads it, ``ivl_kernels.vllm`` serves it).

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

Importable without transformers or vLLM: the functions that load a tokenizer import transformers when called.
The writer and the model loading (transformers-specific) are in ``ivl_kernels.hf.checkpoint``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

GUIDED_MODEL_TYPE = "ivl_guided"
GUIDED_ARCHITECTURE = "IVLGuidedForCausalLM"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
MAP_PATTERN = "map_*.pt"      # term I's map: map_file(I)
TRAINED_MAP = "vocab_map.pt"  # the map file `ivl-kernels train` writes beside the value network it trains


def map_file(i: int) -> str:
    """The file name of term ``i``'s map inside a guided checkpoint."""
    return f"map_{int(i)}.pt"


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


def reference_for(path_or_id: str, directory: str) -> str:
    """How ``compose`` stores a model given on its command line: relative to the checkpoint when local."""
    if os.path.isdir(path_or_id):
        return os.path.relpath(os.path.abspath(path_or_id), os.path.abspath(directory))
    return path_or_id


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def has_tokenizer(ref: str) -> bool:
    """Whether ``ref`` has tokenizer files (a hub id: assumed). transformers 5 builds a one-token tokenizer for a
    model directory with none, which must not be compared, saved, nor give the number of ids to keep."""
    return not os.path.isdir(ref) or any(os.path.isfile(os.path.join(ref, f)) for f in _TOKENIZER_FILES)


def tokenizer_difference(base_tok, value_tok, *, exact: bool = False) -> Optional[str]:
    """The one tokenizer-compatibility rule: ``None`` when a guidance model may read the base's token ids as
    they are, else a description of the first difference. ``None`` when either tokenizer is ``None`` or both are
    one object (nothing to compare).

    ``exact=False`` (what a checkpoint needs to pair models without a map): every id both tokenizers have is the
    same token in both. Ids only one has (added tokens past the shared vocabulary, a padded head's) are fine: the
    identity map holds for the rest.

    ``exact=True`` (what decoding needs to skip re-tokenising the text, ``IVLLogitsProcessor``): the same
    vocabulary, every token at the same id, and the same tokenizer class; else the two may split a text
    differently, and the value model must read the text re-tokenised with its own tokenizer.
    """
    if base_tok is None or value_tok is None or base_tok is value_tok:
        return None
    vb, vv = _vocab_of(base_tok), _vocab_of(value_tok)
    if exact:
        if type(base_tok).__name__ != type(value_tok).__name__:
            return f"tokenizer classes differ ({type(base_tok).__name__} vs {type(value_tok).__name__})"
        if vb != vv:
            return f"the vocabularies differ ({len(vb)} vs {len(vv)} tokens, or tokens at other ids)"
        return None
    by_id_b = {i: t for t, i in vb.items()}
    by_id_v = {i: t for t, i in vv.items()}
    common = sorted(set(by_id_b) & set(by_id_v))
    if not common:
        return "the two tokenizers have no id in common"
    for i in common:
        if by_id_b[i] != by_id_v[i]:
            return f"id {i} is {by_id_b[i]!r} for the base and {by_id_v[i]!r} for the value model"
    return None


def _vocab_of(tokenizer) -> dict:
    get = getattr(tokenizer, "get_vocab", None)
    return get() if callable(get) else {}


def tokenizer_difference_of(base_ref: str, value_ref: str) -> Optional[str]:
    """``tokenizer_difference`` (``exact=False``) of the tokenizers saved with two models (directories or hub
    ids); ``None`` when either has no tokenizer or one does not load (nothing to check)."""
    if not (has_tokenizer(base_ref) and has_tokenizer(value_ref)):
        return None
    try:
        from transformers import AutoTokenizer

        tb, tv = AutoTokenizer.from_pretrained(base_ref), AutoTokenizer.from_pretrained(value_ref)
    except Exception:
        return None
    return tokenizer_difference(tb, tv)


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
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return json.load(f).get("model_type") == GUIDED_MODEL_TYPE
    except (OSError, ValueError):
        return False


def read_guided_checkpoint(directory: str) -> GuidedSpec:
    """The spec of a guided checkpoint; ``ValueError`` naming the file and the key for anything malformed (a
    hand-edited alpha of ``"nan"`` or ``true`` is refused, not read as a number)."""
    from ._validate import check_alpha_float

    path = os.path.join(directory, CONFIG_NAME)
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
            # An alpha or the fill: finite in float32, the range the ops compute them in.
            return check_alpha_float(f"ivl_guided.{key}", value)
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
    return (os.path.isabs(ref) or ref.startswith((".", "~")) or len(parts) > 2 or any(p in ("", ".", "..") for p in parts))


def resolve_for_loading(spec: GuidedSpec, stored: str, role: str) -> str:
    """``spec.resolve(stored)``, or ``FileNotFoundError`` naming the checkpoint and the path looked for when the
    reference is a local path that no longer exists (models moved apart from the checkpoint), instead of the hub
    client's complaint about an invalid repo id."""
    resolved = spec.resolve(stored)
    if looks_like_path(stored) and not os.path.exists(resolved):
        looked = resolved if os.path.isabs(resolved) else os.path.normpath(os.path.join(spec.directory, stored))
        raise FileNotFoundError(f"{os.path.join(spec.directory, CONFIG_NAME)}: the {role} model {stored!r} is not "
                                f"at {looked} (moved or deleted?): put it back, or rewrite the checkpoint with "
                                f"`ivl-kernels compose`")
    return resolved


def load_checkpoint_tokenizer(spec: GuidedSpec):
    """The tokenizer saved with a guided checkpoint, ``None`` when it has none; ``ValueError`` when its files
    are there but do not load."""
    if not has_tokenizer(spec.directory):
        return None
    return load_tokenizer_files(spec.directory, "the guided checkpoint's tokenizer")


__all__ = ["GUIDED_MODEL_TYPE", "GUIDED_ARCHITECTURE", "FORMAT_VERSION", "CONFIG_NAME", "MAP_PATTERN", "TRAINED_MAP",
           "map_file", "TermSpec", "GuidedSpec", "resolve_reference", "reference_for", "has_tokenizer",
           "tokenizer_difference", "tokenizer_difference_of", "guided_config_dict", "load_tokenizer_files",
           "is_guided_checkpoint", "read_guided_checkpoint", "looks_like_path", "resolve_for_loading",
           "load_checkpoint_tokenizer"]



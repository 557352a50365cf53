"""Cross-vocabulary maps: ``VocabMap`` sends each base-model token id to one value-model token id (or -1).

The map is the ``vocab_map`` argument of :func:`ivl_kernels.fused_guided_logits` /
:func:`ivl_kernels.fused_guided_cross_entropy`: ``guided[b] = base[b] + alpha * value[map[b]]``, and base
tokens with ``map[b] == -1`` get ``fill`` instead of a value logit.

Building a map
--------------
``VocabMap.from_tokenizers(base, value, method="exact" | "dtw", corpus=None)``.  Tokenizers of any supported
kind (see :func:`tokenizer_vocab`) are reduced to the byte string each id decodes to; raw token strings
(``▁the``, ``Ġthe``, ``<0x0A>``) are never compared.  Special, control, unknown and unused tokens are never
mapped (``-1``) and are never chosen as targets.

``method="exact"``: ``map[b]`` is the value token with exactly the same bytes.  When several value tokens decode
to the same bytes (SentencePiece's ``<0x41>`` byte-fallback piece and the ordinary piece ``A``; duplicate added
tokens), the choice is: an ordinary piece before a byte-fallback piece, then the lowest id.  The value model
emits the ordinary piece in practice, so its logit is the informative one.

``method="dtw"``: the IVL paper's corpus co-alignment.  The corpus is streamed and cut into chunks of whole lines (up
to ``_vocab_dtw.CHUNK_CHARS`` characters; a longer line is cut into pieces at whitespace) and each chunk is
tokenised by both tokenizers.  The two token sequences are aligned by dynamic time warping whose local cost is the
Levenshtein distance between the tokens' byte strings, with steps (diagonal, up, left) and that tie order on the way
back, as in the paper's code (FuseLLM's ``dtw``).  Every cell of the warping path counts one co-alignment
``count[base_tok, value_tok] += 1``.  Each base token then keeps the value token with the highest row-normalised
count ``count[b, v] / sum_v count[b, v]`` (ties: the smaller Levenshtein distance divided by the longer token's
length, then the lower id).  Base tokens that never occur in the corpus take the exact map's entry (so ``-1`` when
they have no exact counterpart either); base tokens that occur keep their DTW choice even where the exact map
disagrees.

Speed: both tokenisations cover the same bytes, so the DTW is restricted to a band around the byte-offset
diagonal: row ``i`` only visits value tokens whose byte spans overlap base token ``i``'s span, widened by
``DTW_MARGIN`` tokens on each side.  Tokens spanning different bytes have large edit costs and rarely lie on
the optimal path, so the banded map equals the full-matrix one on the test corpus and differs on about 0.1% of
the seen base tokens on 150 KB of code and documentation, while costing O(tokens)
instead of O(tokens^2) per chunk: 10-23 MB of text per minute on one CPU core
(measured on a 1 MB sample of Python code and documentation).

Saved format
------------
``save(path)`` writes ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    {"format": "ivl-kernels.vocab-map", "version": 1,
     "index": int32 tensor [Vb], "base_vocab_size": int, "value_vocab_size": int,
     "base_fingerprint": str | None, "value_fingerprint": str | None,   # TokenizerVocab.fingerprint
     "method": str, "meta": dict}
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from ._tokenizers import TokenizerVocab, load_tokenizer, tokenizer_vocab
from ._vocab_dtw import DTW_MARGIN, corpus_texts, dtw_index

__all__ = ["VocabMap", "InverseVocabMap", "TokenizerVocab", "load_tokenizer", "tokenizer_vocab"]

_FORMAT = "ivl-kernels.vocab-map"
_VERSION = 1


class InverseVocabMap(NamedTuple):
    """CSR view of a map from value ids to the base ids that map to them.

    ``base_ids[crow_indices[v] : crow_indices[v + 1]]`` are the base ids ``b`` with ``map[b] == v``, ascending.
    Unpacks as a tuple ``(crow_indices, base_ids)``.

    Attributes:
        crow_indices: int64 ``[Vv + 1]``.
        base_ids: int32 ``[nnz]`` with ``nnz`` the number of mapped base ids.
    """

    crow_indices: torch.Tensor
    base_ids: torch.Tensor


class VocabMap:
    """A many-to-one map from base token ids to value token ids.

    Args:
        index: integer ``[Vb]`` tensor / array / sequence; entries in ``[-1, value_vocab_size)``; ``-1`` unmapped.
        base_vocab_size: ``Vb``; defaults to ``len(index)`` and must equal it when given.
        value_vocab_size: ``Vv`` (required): the value model's vocabulary size.
        base_fingerprint, value_fingerprint: optional :attr:`TokenizerVocab.fingerprint` strings recorded when
            the map was built from tokenizers; :meth:`load` checks tokenizers against them.
        method: how the map was made (``"exact"``, ``"dtw"``, ``"custom"``...).
        meta: free-form JSON-like dict saved along (statistics, corpus hash).

    Raises:
        TypeError: non-integer ``index``.
        ValueError: wrong rank, size mismatch, or an entry outside ``[-1, value_vocab_size)``.
    """

    def __init__(self, index, base_vocab_size: Optional[int] = None, value_vocab_size: Optional[int] = None, *,
                 base_fingerprint: Optional[str] = None, value_fingerprint: Optional[str] = None,
                 method: str = "custom", meta: Optional[dict] = None):
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(np.asarray(index))
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"VocabMap index must be an integer tensor, got dtype {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"VocabMap index must be 1-D [base_vocab_size], got shape {tuple(index.shape)}")
        if value_vocab_size is None:
            raise ValueError("VocabMap needs value_vocab_size (the value model's vocabulary size)")
        n = index.numel()
        if base_vocab_size is None:
            base_vocab_size = n
        base_vocab_size, value_vocab_size = int(base_vocab_size), int(value_vocab_size)
        if base_vocab_size != n:
            raise ValueError(f"VocabMap index has {n} entries but base_vocab_size={base_vocab_size}")
        if value_vocab_size <= 0:
            raise ValueError(f"value_vocab_size must be positive, got {value_vocab_size}")
        if n:
            lo, hi = int(index.min()), int(index.max())
            if lo < -1 or hi >= value_vocab_size:
                raise ValueError(f"VocabMap entries must lie in [-1, {value_vocab_size}) "
                                 f"(value_vocab_size={value_vocab_size}); found range [{lo}, {hi}]")
        self._index = index.detach().to(device="cpu", dtype=torch.int32).contiguous()
        self.base_vocab_size = base_vocab_size
        self.value_vocab_size = value_vocab_size
        self.base_fingerprint = base_fingerprint
        self.value_fingerprint = value_fingerprint
        self.method = method
        self.meta = dict(meta or {})
        self._device_index: dict = {}

    # ---------------------------------------------------------------------------------------------------------
    # properties

    @property
    def index(self) -> torch.Tensor:
        """int32 ``[Vb]`` CPU tensor, entries in ``[-1, Vv)``: the kernels' ``vocab_map`` (move it with ``.to``)."""
        return self._index

    def on(self, device) -> torch.Tensor:
        """``index`` on ``device``, copied once per device and then reused: a decoding loop that passes this map
        every step hands the kernels one tensor, whose range check is cached, instead of a new copy (and a host
        sync to check it) per step."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._index
        if device not in self._device_index:
            self._device_index[device] = self._index.to(device)
        return self._device_index[device]

    @property
    def coverage(self) -> float:
        """Fraction of base ids (of all ``Vb``, special ids included) that are mapped."""
        if self.base_vocab_size == 0:
            return 0.0
        return float((self._index >= 0).sum()) / self.base_vocab_size

    @property
    def num_mapped(self) -> int:
        return int((self._index >= 0).sum())

    def __len__(self) -> int:
        return self.base_vocab_size

    def __repr__(self) -> str:
        return (f"VocabMap(base_vocab_size={self.base_vocab_size}, value_vocab_size={self.value_vocab_size}, "
                f"method={self.method!r}, coverage={self.coverage:.4f})")

    # ---------------------------------------------------------------------------------------------------------
    # derived maps

    def inverse(self) -> InverseVocabMap:
        """Value id -> base ids, as CSR (:class:`InverseVocabMap`: ``crow_indices`` int64 ``[Vv+1]``,
        ``base_ids`` int32 ``[nnz]``, base ids ascending within each value id)."""
        idx = self._index.long()
        base = torch.nonzero(idx >= 0).flatten()
        targets = idx[base]
        order = torch.argsort(targets, stable=True)  # stable: base ids stay ascending inside a row
        counts = torch.bincount(targets, minlength=self.value_vocab_size)
        crow = torch.zeros(self.value_vocab_size + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=crow[1:])
        return InverseVocabMap(crow, base[order].to(torch.int32))

    def check_compatible(self, base_vocab_size: int, value_vocab_size: int) -> None:
        """Raise ``ValueError`` naming both pairs of sizes unless the map fits a base model with
        ``base_vocab_size`` logits and a value model with ``value_vocab_size`` logits."""
        if int(base_vocab_size) == self.base_vocab_size and int(value_vocab_size) == self.value_vocab_size:
            return
        hint = ""
        if int(base_vocab_size) >= self.base_vocab_size and int(value_vocab_size) >= self.value_vocab_size:
            hint = (" (the models' heads are padded beyond the tokenizers: use "
                    f"map.pad_to({int(base_vocab_size)}, {int(value_vocab_size)}))")
        raise ValueError(
            f"vocab map built for base vocab size {self.base_vocab_size} and value vocab size "
            f"{self.value_vocab_size} used with base vocab size {int(base_vocab_size)} and value vocab size "
            f"{int(value_vocab_size)}{hint}"
        )

    def pad_to(self, base_vocab_size: Optional[int] = None, value_vocab_size: Optional[int] = None) -> "VocabMap":
        """A copy sized for padded model heads (e.g. Qwen2.5-7B's 152064 logits over a 151665-id tokenizer):
        extra base ids map to -1, extra value ids are never targets.  Fingerprints are kept (they only cover
        ids that have bytes)."""
        vb = self.base_vocab_size if base_vocab_size is None else int(base_vocab_size)
        vv = self.value_vocab_size if value_vocab_size is None else int(value_vocab_size)
        if vb < self.base_vocab_size or vv < self.value_vocab_size:
            raise ValueError(f"pad_to cannot shrink a vocab map of sizes ({self.base_vocab_size}, "
                             f"{self.value_vocab_size}) to ({vb}, {vv})")
        idx = torch.full((vb,), -1, dtype=torch.int32)
        idx[: self.base_vocab_size] = self._index
        return VocabMap(idx, vb, vv, base_fingerprint=self.base_fingerprint,
                        value_fingerprint=self.value_fingerprint, method=self.method, meta=self.meta)

    # ---------------------------------------------------------------------------------------------------------
    # construction from tokenizers

    @classmethod
    def from_tokenizers(cls, base, value, method: str = "exact", corpus=None, *,
                        _band: Optional[int] = DTW_MARGIN) -> "VocabMap":
        """Build a map from two tokenizers (any kind :func:`tokenizer_vocab` accepts, or paths to tokenizer files).

        Args:
            base, value: the base model's and the value model's tokenizers.
            method: ``"exact"`` (byte-identical tokens) or ``"dtw"`` (corpus co-alignment; see the module doc).
            corpus: for ``"dtw"`` only: the text itself (``str``), a file (``os.PathLike``, read as UTF-8), or an
                iterable of ``str`` documents.

        Raises:
            ValueError: unknown method, a corpus with ``"exact"``, a missing or empty corpus with ``"dtw"``.
            TypeError: unsupported tokenizer objects.
        """
        if method not in ("exact", "dtw"):
            raise ValueError(f"unknown VocabMap method {method!r}; expected 'exact' or 'dtw'")
        if method == "exact" and corpus is not None:
            raise ValueError("corpus is only used by method='dtw'")
        bv, vv = tokenizer_vocab(base), tokenizer_vocab(value)
        exact = _exact_index(bv, vv)
        meta = {"base_name": bv.name, "value_name": vv.name, "base_kind": bv.kind, "value_kind": vv.kind}
        if method == "exact":
            index = exact
        else:
            if corpus is None:
                raise ValueError("method='dtw' needs a corpus (text, a text file path, or an iterable of texts)")
            texts, corpus_desc = corpus_texts(corpus)
            index, stats = dtw_index(bv, vv, texts, exact, band=_band, corpus_desc=corpus_desc)
            meta.update(stats)
        return cls(torch.from_numpy(index), bv.size, vv.size, base_fingerprint=bv.fingerprint,
                   value_fingerprint=vv.fingerprint, method=method, meta=meta)

    # ---------------------------------------------------------------------------------------------------------
    # persistence

    def save(self, path) -> None:
        """Write the map (format in the module docstring); ``path`` is any file name, ``.pt`` by convention.

        Raises:
            TypeError: a field :meth:`load` would refuse (a ``meta`` value that is not JSON-like: nested dicts,
                lists, tuples, sets, ``str``, ``int``, ``float``, ``bool``, ``None``; a ``Path``
                or a numpy scalar is not), named, before anything is written.
        """
        _check_saved_fields(self.base_fingerprint, self.value_fingerprint, self.method, self.meta)
        torch.save({
            "format": _FORMAT, "version": _VERSION, "index": self._index.clone(),
            "base_vocab_size": self.base_vocab_size, "value_vocab_size": self.value_vocab_size,
            "base_fingerprint": self.base_fingerprint, "value_fingerprint": self.value_fingerprint,
            "method": self.method, "meta": self.meta,
        }, os.fspath(path))

    @classmethod
    def load(cls, path, base=None, value=None) -> "VocabMap":
        """Read a map written by :meth:`save`.

        Args:
            path: the file.
            base, value: optional tokenizers (anything :func:`tokenizer_vocab` accepts); when given, their
                fingerprints must match the recorded ones.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: not a saved vocab map, a damaged one (a missing or mistyped field, entries out of range;
                the message names the file and the field), or a tokenizer that is not the one the map was built
                for (the message names the file and both vocabulary sizes).
        """
        p = Path(os.fspath(path))
        if not p.is_file():
            raise FileNotFoundError(f"vocab map file not found: {p}")
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]  # torch's own message goes on for a page
            raise ValueError(f"{p}: not a saved VocabMap ({type(e).__name__}: {first})") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{p}: not a saved VocabMap (missing format tag {_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise ValueError(f"{p}: VocabMap format version {d.get('version')} is not supported (expected {_VERSION})")
        vm = _from_saved(cls, d, p)
        for side, tok, fp, size in (("base", base, vm.base_fingerprint, vm.base_vocab_size),
                                    ("value", value, vm.value_fingerprint, vm.value_vocab_size)):
            if tok is None:
                continue
            tv = tokenizer_vocab(tok)
            if fp is None:
                raise ValueError(f"{p}: the map records no {side} vocabulary fingerprint, cannot verify "
                                 f"the {side} tokenizer {tv.name!r} (size {tv.size})")
            if tv.fingerprint != fp:
                raise ValueError(
                    f"{p}: {side} tokenizer {tv.name!r} (vocab size {tv.size}, fingerprint {tv.fingerprint[:12]}) "
                    f"is not the one this map was built for (vocab size {size}, fingerprint {fp[:12]}); "
                    f"map sizes: base {vm.base_vocab_size}, value {vm.value_vocab_size}"
                )
        return vm


# -------------------------------------------------------------------------------------------------------------
# the saved format's fields


_META_SCALARS = (str, int, float, bool, type(None))  # exact types: numpy's float64 subclasses float, yet
# torch.load(weights_only=True) refuses it


def _check_meta_value(v, where: str) -> None:
    if type(v) in (dict, OrderedDict):
        for k, x in v.items():
            if type(k) not in _META_SCALARS:
                raise TypeError(f"VocabMap {where}: key {k!r} is a {type(k).__module__}.{type(k).__qualname__}, "
                                f"which VocabMap.load cannot read back; use str keys")
            _check_meta_value(x, f"{where}[{k!r}]")
    elif type(v) in (list, tuple, set):
        for i, x in enumerate(sorted(v, key=repr) if type(v) is set else v):
            _check_meta_value(x, f"{where}[{i}]" if type(v) is not set else f"{where} (a set) element")
    elif type(v) not in _META_SCALARS:
        raise TypeError(f"VocabMap {where} is a {type(v).__module__}.{type(v).__qualname__} ({repr(v)[:80]}), which "
                        f"VocabMap.load (torch.load with weights_only=True) cannot read back; a saved map holds "
                        f"JSON-like values only (dict, list, tuple, set, str, int, float, bool, None): "
                        f"convert it (str(path), int(x), float(x))")


def _check_saved_fields(base_fingerprint, value_fingerprint, method, meta) -> None:
    """``TypeError`` naming the first field (and meta key) that :meth:`VocabMap.load` would refuse."""
    for name, fp in (("base_fingerprint", base_fingerprint), ("value_fingerprint", value_fingerprint)):
        if fp is not None and type(fp) is not str:
            raise TypeError(f"VocabMap {name} must be a str or None, got {type(fp).__name__} {fp!r}")
    if type(method) is not str:
        raise TypeError(f"VocabMap method must be a str, got {type(method).__name__} {method!r}")
    if type(meta) is not dict:
        raise TypeError(f"VocabMap meta must be a dict, got {type(meta).__name__}")
    _check_meta_value(meta, "meta")


def _from_saved(cls, d: dict, p: Path) -> "VocabMap":
    """The map in a loaded dict; ``ValueError`` naming the file and the damaged field."""
    def damaged(what: str):
        return ValueError(f"{p}: damaged VocabMap file: {what}")

    for key in ("index", "base_vocab_size", "value_vocab_size"):
        if key not in d:
            raise damaged(f"missing field {key!r}")
    index = d["index"]
    if not isinstance(index, torch.Tensor):
        raise damaged(f"'index' must be an integer tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise damaged(f"'index' must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1:
        raise damaged(f"'index' must be 1-D [base_vocab_size], got shape {tuple(index.shape)}")
    for key in ("base_vocab_size", "value_vocab_size"):
        v = d[key]
        if type(v) is not int:
            raise damaged(f"{key!r} must be an int, got {type(v).__name__} {v!r}")
    meta = d.get("meta")
    meta = {} if meta is None else meta
    try:
        _check_saved_fields(d.get("base_fingerprint"), d.get("value_fingerprint"), d.get("method", "custom"), meta)
        return cls(index, d["base_vocab_size"], d["value_vocab_size"], base_fingerprint=d.get("base_fingerprint"),
                   value_fingerprint=d.get("value_fingerprint"), method=d.get("method", "custom"), meta=meta)
    except (TypeError, ValueError) as e:
        raise damaged(str(e)) from None


# -------------------------------------------------------------------------------------------------------------
# exact map


def _exact_index(bv: TokenizerVocab, vv: TokenizerVocab) -> np.ndarray:
    """int32 ``[Vb]``: value id with the same bytes (ordinary before byte-fallback pieces, then lowest id)."""
    lookup: dict = {}
    fb = vv.byte_fallback
    # Walk ids from high to low so lower ids overwrite; ordinary pieces are written after all fallback ones.
    for i in range(vv.size - 1, -1, -1):
        p = vv.pieces[i]
        if p is not None and i in fb:
            lookup[p] = i
    for i in range(vv.size - 1, -1, -1):
        p = vv.pieces[i]
        if p is not None and i not in fb:
            lookup[p] = i
    get = lookup.get
    return np.fromiter((-1 if p is None else get(p, -1) for p in bv.pieces), dtype=np.int32, count=bv.size)

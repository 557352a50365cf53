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

``method="dtw"``: the IVL paper's corpus co-alignment.  The corpus is cut into chunks of whole lines (up to
``_DTW_CHUNK_CHARS`` characters) and each chunk is tokenised by both tokenizers.  The two token sequences are
aligned by dynamic time warping whose local cost is the Levenshtein distance between the tokens' byte strings,
with steps (diagonal, up, left) and that tie order on the way back, as in the paper's code (FuseLLM's ``dtw``).
Every cell of the warping path counts one co-alignment ``count[base_tok, value_tok] += 1``.  Each base token
then keeps the value token with the highest row-normalised count ``count[b, v] / sum_v count[b, v]`` (ties: the
smaller Levenshtein distance divided by the longer token's length, then the lower id).  Base tokens that never
occur in the corpus take the exact map's entry (so ``-1`` when they have no exact counterpart either); base
tokens that occur keep their DTW choice even where the exact map disagrees.

Speed: both tokenisations cover the same bytes, so the DTW is restricted to a band around the byte-offset
diagonal: row ``i`` only visits value tokens whose byte spans overlap base token ``i``'s span, widened by
``_DTW_MARGIN`` tokens on each side.  Tokens spanning different bytes have large edit costs and rarely lie on
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

import hashlib
import os
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from ._tokenizers import TokenizerVocab, load_tokenizer, tokenizer_vocab

__all__ = ["VocabMap", "InverseVocabMap", "TokenizerVocab", "load_tokenizer", "tokenizer_vocab"]

_FORMAT = "ivl-kernels.vocab-map"
_VERSION = 1
_DTW_CHUNK_CHARS = 1024
_DTW_MARGIN = 2
_FLUSH_KEYS = 1 << 21
_MAX_COST_CACHE = 1 << 22


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
                        _band: Optional[int] = _DTW_MARGIN) -> "VocabMap":
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
            texts, corpus_desc = _corpus_texts(corpus)
            index, stats = _dtw_index(bv, vv, texts, exact, band=_band, corpus_desc=corpus_desc)
            meta.update(stats)
        return cls(torch.from_numpy(index), bv.size, vv.size, base_fingerprint=bv.fingerprint,
                   value_fingerprint=vv.fingerprint, method=method, meta=meta)

    # ---------------------------------------------------------------------------------------------------------
    # persistence

    def save(self, path) -> None:
        """Write the map (format in the module docstring); ``path`` is any file name, ``.pt`` by convention."""
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
            ValueError: not a saved vocab map, or a tokenizer that is not the one the map was built for (the
                message names the file and both vocabulary sizes).
        """
        p = Path(os.fspath(path))
        if not p.is_file():
            raise FileNotFoundError(f"vocab map file not found: {p}")
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{p}: not a saved VocabMap ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{p}: not a saved VocabMap (missing format tag {_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise ValueError(f"{p}: VocabMap format version {d.get('version')} is not supported (expected {_VERSION})")
        vm = cls(d["index"], d["base_vocab_size"], d["value_vocab_size"], base_fingerprint=d.get("base_fingerprint"),
                 value_fingerprint=d.get("value_fingerprint"), method=d.get("method", "custom"),
                 meta=d.get("meta") or {})
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


# -------------------------------------------------------------------------------------------------------------
# DTW map


def _corpus_texts(corpus) -> tuple:
    if isinstance(corpus, os.PathLike):
        p = Path(corpus)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read corpus file {p} as UTF-8 text: {e}") from None
        texts, desc = [text], str(p)
    elif isinstance(corpus, str):
        texts, desc = [corpus], "<str>"
    elif isinstance(corpus, (bytes, bytearray)):
        raise TypeError("corpus must be str text, a path, or an iterable of str; decode bytes first")
    else:
        try:
            texts = list(corpus)
        except TypeError:
            raise TypeError(f"corpus must be str text, a path, or an iterable of str, got {type(corpus).__name__}") from None
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("corpus must be str text, a path, or an iterable of str; the iterable yielded a non-str")
        desc = f"<{len(texts)} texts>"
    if not any(t.strip() for t in texts):
        raise ValueError(f"corpus {desc} is empty (no non-whitespace text): DTW needs text to align")
    return texts, desc


def _chunks(texts: list, max_chars: int = _DTW_CHUNK_CHARS):
    """Whole lines grouped up to ``max_chars`` (longer lines alone); whitespace-only chunks dropped."""
    for text in texts:
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            if size and size + len(line) > max_chars:
                chunk = "".join(buf)
                if chunk.strip():
                    yield chunk
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        chunk = "".join(buf)
        if chunk.strip():
            yield chunk


def _levenshtein(a: bytes, b: bytes) -> int:
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _band(a_lens: np.ndarray, b_lens: np.ndarray, margin: Optional[int]) -> tuple:
    """Per-row column range ``[lo[i], hi[i]]`` of the DTW band (full rows when ``margin is None``)."""
    n, m = len(a_lens), len(b_lens)
    if margin is None:
        return [0] * n, [m - 1] * n
    # Positions as fractions of each side's total so a SentencePiece dummy-prefix space (one extra byte on one
    # side) or normalisation drift shifts spans by a fraction of a token, which the margin absorbs.
    a_end = np.cumsum(np.maximum(a_lens, 1), dtype=np.float64)
    b_end = np.cumsum(np.maximum(b_lens, 1), dtype=np.float64)
    a_end /= a_end[-1]
    b_end /= b_end[-1]
    a_start = np.concatenate(([0.0], a_end[:-1]))
    b_start = np.concatenate(([0.0], b_end[:-1]))
    eps = 1e-9
    lo = np.searchsorted(b_end, a_start + eps, side="left")        # first j with b_end[j] > a_start[i]
    hi = np.searchsorted(b_start, a_end - eps, side="left") - 1    # last j with b_start[j] < a_end[i]
    lo = np.clip(lo - margin, 0, m - 1)
    hi = np.clip(np.maximum(hi, lo) + margin, 0, m - 1)
    hi = np.maximum.accumulate(hi)
    lo = np.minimum(lo, hi)
    lo[1:] = np.minimum(lo[1:], hi[:-1] + 1)  # consecutive rows touch: a monotone path always exists
    lo[0] = 0
    hi[-1] = m - 1
    return lo.tolist(), hi.tolist()


def _dtw_path(a: list, b: list, lo: list, hi: list, cost) -> list:
    """Banded DTW (FuseLLM semantics); returns the warping path as ``(i, j)`` pairs, last cell first."""
    inf = float("inf")
    rows = []
    prow, plo, phi = None, 0, -1
    for i, ai in enumerate(a):
        l, h = lo[i], hi[i]
        row = []
        left = inf
        for j in range(l, h + 1):
            if prow is None:
                best = 0.0 if j == 0 else left
            else:
                up = prow[j - plo] if plo <= j <= phi else inf
                diag = prow[j - 1 - plo] if plo <= j - 1 <= phi else inf
                best = up if up < diag else diag
                if left < best:
                    best = left
            left = cost(ai, b[j]) + best
            row.append(left)
        rows.append(row)
        prow, plo, phi = row, l, h
    # Backtrack from the last cell; ties prefer diagonal, then up, then left (np.argmin order in the paper).
    i, j = len(a) - 1, len(b) - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = up = left = inf
        if i > 0:
            pl, ph, pr = lo[i - 1], hi[i - 1], rows[i - 1]
            if j > 0 and pl <= j - 1 <= ph:
                diag = pr[j - 1 - pl]
            if pl <= j <= ph:
                up = pr[j - pl]
        if j > 0 and lo[i] <= j - 1:
            left = rows[i][j - 1 - lo[i]]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    return path


def _lengths(v: TokenizerVocab) -> np.ndarray:
    return np.fromiter((0 if p is None else len(p) for p in v.pieces), dtype=np.int64, count=v.size)


def _dtw_counts(bv: TokenizerVocab, vv: TokenizerVocab, texts: list, band: Optional[int]) -> tuple:
    """Co-alignment counts over the corpus: ``(pair keys b * Vv + v, counts, cost cache, chars, chunks)``."""
    if bv.encode is None or vv.encode is None:
        raise ValueError("method='dtw' needs tokenizers that can encode text")
    pb = [p if p is not None else b"" for p in bv.pieces]
    pv = [p if p is not None else b"" for p in vv.pieces]
    lb = np.fromiter((len(p) for p in pb), dtype=np.int64, count=len(pb))
    lv = np.fromiter((len(p) for p in pv), dtype=np.int64, count=len(pv))
    vsize = vv.size
    cache: dict = {}

    def cost(x: int, y: int) -> int:
        key = x * vsize + y
        c = cache.get(key)
        if c is None:
            c = cache[key] = _levenshtein(pb[x], pv[y])
        return c

    keys: list = []
    uniq = np.zeros(0, dtype=np.int64)
    counts = np.zeros(0, dtype=np.int64)

    def flush():
        # Fold the pending path cells into the sparse (key, count) arrays so memory follows the number of
        # distinct pairs, not the corpus length.
        nonlocal uniq, counts, keys
        if keys:
            allk = np.concatenate([uniq, np.asarray(keys, dtype=np.int64)])
            allc = np.concatenate([counts, np.ones(len(keys), dtype=np.int64)])
            uniq, inv = np.unique(allk, return_inverse=True)
            counts = np.bincount(inv, weights=allc, minlength=len(uniq)).astype(np.int64)
            keys = []

    nchars = nchunks = 0
    for chunk in _chunks(texts):
        a = list(bv.encode(chunk))
        b = list(vv.encode(chunk))
        if not a or not b:
            continue
        nchunks += 1
        nchars += len(chunk)
        lo, hi = _band(lb[a], lv[b], band)
        keys.extend(a[i] * vsize + b[j] for i, j in _dtw_path(a, b, lo, hi, cost))
        if len(keys) > _FLUSH_KEYS:
            flush()
        if len(cache) > _MAX_COST_CACHE:  # bounded memory on huge corpora; costs are cheap to recompute
            cache.clear()
    flush()
    if not len(uniq):
        raise ValueError("corpus produced no tokens to align")
    return uniq, counts, cache, nchars, nchunks


def _dtw_index(bv: TokenizerVocab, vv: TokenizerVocab, texts: list, exact: np.ndarray, *, band: Optional[int],
               corpus_desc: str) -> tuple:
    import time

    t0 = time.perf_counter()
    uniq, counts, cache, nchars, nchunks = _dtw_counts(bv, vv, texts, band)
    vsize = vv.size
    rows, cols = uniq // vsize, uniq % vsize
    # Special tokens never occur in plain encodings, but unknown pieces (None bytes) can: never map through them.
    ok = np.fromiter((bv.pieces[r] is not None and vv.pieces[c] is not None for r, c in zip(rows.tolist(), cols.tolist())),
                     dtype=bool, count=len(rows))
    rows, cols, counts, uniq = rows[ok], cols[ok], counts[ok], uniq[ok]
    # Ties (frequent on small corpora, where most pairs are seen once) go to the closest string relative to the
    # longer token: a long base token aligned once with a long and once with a short neighbour has equal raw
    # edit distances to both, but the long one is the real counterpart.
    dist = np.fromiter((cache[k] if k in cache else _levenshtein(bv.pieces[k // vsize], vv.pieces[k % vsize])
                        for k in uniq.tolist()), dtype=np.float64, count=len(uniq))
    longest = np.maximum(_lengths(bv)[rows], _lengths(vv)[cols]).clip(min=1)
    rel = dist / longest
    # Row-normalised frequency count / row total; its argmax per row equals the count's argmax.
    order = np.lexsort((cols, rel, -counts, rows))
    rows_s = rows[order]
    first = np.unique(rows_s, return_index=True)[1]
    best_rows, best_cols = rows_s[first], cols[order][first]
    index = exact.copy()
    index[best_rows] = best_cols
    both = (exact[best_rows] >= 0)
    agree = int((exact[best_rows][both] == best_cols[both]).sum())
    seconds = time.perf_counter() - t0
    corpus_hash = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    stats = {
        "corpus": corpus_desc, "corpus_sha256": corpus_hash, "corpus_chars": nchars, "corpus_chunks": nchunks,
        "dtw_band": band, "dtw_base_tokens_seen": int(len(best_rows)),
        "dtw_seen_with_exact": int(both.sum()), "dtw_agree_with_exact": agree,
        "dtw_seconds": round(seconds, 3),
    }
    return index.astype(np.int32), stats

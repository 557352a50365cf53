"""The IVL paper's DTW co-alignment of two tokenizations (``VocabMap.from_tokenizers(method="dtw")``, whose
docstring states the rule): corpus chunks, banded dynamic time warping under the Levenshtein distance of the
tokens' byte strings, co-alignment counts and each base token's choice."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ._tokenizers import TokenizerVocab

# Characters per corpus chunk (whole lines); tokens of band margin around the byte-offset diagonal.
CHUNK_CHARS = 1024
DTW_MARGIN = 2
# Co-alignment keys held before they are folded into the counts, and edit distances cached: bounded memory on
# huge corpora (both are cheap to recompute).
_FLUSH_KEYS = 1 << 21
_MAX_COST_CACHE = 1 << 22


def corpus_texts(corpus) -> tuple:
    if isinstance(corpus, os.PathLike):
        p = Path(corpus)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
        try:
            with open(p, encoding="utf-8", newline="") as f:  # "\r\n" stays: text given as a str keeps it too
                text = f.read()
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
            raise TypeError(f"corpus must be str text, a path, or an iterable of str, "
                            f"got {type(corpus).__name__}") from None
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("corpus must be str text, a path, or an iterable of str; the iterable yielded a non-str")
        desc = f"<{len(texts)} texts>"
    if not any(t.strip() for t in texts):
        raise ValueError(f"corpus {desc} is empty (no non-whitespace text): DTW needs text to align")
    return texts, desc


def _chunks(texts: list, max_chars: int = CHUNK_CHARS):
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


def dtw_index(bv: TokenizerVocab, vv: TokenizerVocab, texts: list, exact: np.ndarray, *, band: Optional[int],
               corpus_desc: str) -> tuple:
    import time

    t0 = time.perf_counter()
    uniq, counts, cache, nchars, nchunks = _dtw_counts(bv, vv, texts, band)
    vsize = vv.size
    rows, cols = uniq // vsize, uniq % vsize
    # Special tokens never occur in plain encodings, but unknown pieces (None bytes) can: never map through them.
    ok = np.fromiter((bv.pieces[r] is not None and vv.pieces[c] is not None
                      for r, c in zip(rows.tolist(), cols.tolist())), dtype=bool, count=len(rows))
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

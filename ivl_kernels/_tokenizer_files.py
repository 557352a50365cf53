"""Reading a tokenizer from a file or directory, its kind detected from the content (:func:`load_tokenizer`).

Used by :meth:`ivl_kernels.vocab.VocabMap.from_tokenizers` and the ``ivl-kernels map`` CLI through
``_tokenizers.tokenizer_vocab``, which accepts a path wherever it accepts a tokenizer object.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Optional

# cl100k_base's split pattern with single digits, as used by Qwen's tiktoken files.  A bare ranks file carries no
# pattern; it only matters for `encode` (DTW), never for the exact map.
DEFAULT_TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+\d+\r?$")


def _load_tiktoken_file(path: Path, data: bytes, pat_str: Optional[str]):
    import tiktoken

    ranks: dict = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: line {lineno} is not '<base64 token> <rank>'")
        try:
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except Exception as e:
            raise ValueError(f"{path}: line {lineno} is not '<base64 token> <rank>' ({e})") from None
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken ranks file")
    return tiktoken.Encoding(path.name.split(".")[0] or "tiktoken", pat_str=pat_str or DEFAULT_TIKTOKEN_PATTERN,
                             mergeable_ranks=ranks, special_tokens={})


def _load_json_tokenizer(path: Path, data: bytes):
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("vocab"), list) and isinstance(obj.get("config"), dict):
        try:
            from mistral_common.tokens.tokenizers.tekken import Tekkenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path} is a Tekken tokenizer; reading it needs `pip install mistral-common`") from e
        try:
            return Tekkenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: invalid Tekken tokenizer file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "model" in obj:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"{path} is a Hugging Face tokenizer.json; reading it needs `pip install tokenizers`") from e
        try:
            return Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:
            raise ValueError(f"{path}: invalid Hugging Face tokenizer.json ({e})") from None
    raise ValueError(f"{path}: JSON file is neither a Hugging Face tokenizer.json nor a Tekken tokenizer")


def load_tokenizer(path, *, pat_str: Optional[str] = None):
    """Load a tokenizer from a file or directory, detecting its kind from the content.

    * ``tokenizer.json`` (Hugging Face ``tokenizers``)  -> ``tokenizers.Tokenizer``
    * Tekken ``.json`` (mistral-common)                   -> ``mistral_common ... Tekkenizer``
    * tiktoken ranks file (``<base64> <rank>`` per line)  -> ``tiktoken.Encoding`` without special tokens, split
      pattern ``pat_str`` (default: cl100k/Qwen's pattern; only DTW encoding depends on it)
    * SentencePiece model (any name, e.g. ``tokenizer.model.v3``) -> ``sentencepiece.SentencePieceProcessor``
    * a directory: its ``tokenizer.json``, ``tekken*.json``, ``tokenizer.model*`` or ``*.tiktoken`` (first found in
      that order), else ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be read or is no known tokenizer format (the message names the file).
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    if p.is_dir():
        for pattern in ("tokenizer.json", "tekken*.json", "tokenizer.model*", "*.tiktoken"):
            found = sorted(p.glob(pattern))
            if found:
                return load_tokenizer(found[0], pat_str=pat_str)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"{p}: directory holds no tokenizer.json, tekken*.json, tokenizer.model or "
                             "*.tiktoken file (and transformers is not installed)") from None
        try:
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise ValueError(f"{p}: no tokenizer could be loaded from this directory ({e})") from None
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read tokenizer file {p}: {e.strerror or e}") from None
    if not data.strip():
        raise ValueError(f"{p}: empty file is not a tokenizer")
    head = data[:4096].lstrip()
    if head.startswith(b"{"):
        return _load_json_tokenizer(p, data)
    first = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first):
        return _load_tiktoken_file(p, data, pat_str)
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover
        sentencepiece = None
    if sentencepiece is not None:
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception:
            sp = None
        if sp is not None and sp.get_piece_size() > 0:
            sp._ivl_name = p.name
            return sp
    raise ValueError(
        f"{p}: unrecognised tokenizer file (not a Hugging Face tokenizer.json, Tekken JSON, tiktoken ranks file "
        "or SentencePiece model)"
    )

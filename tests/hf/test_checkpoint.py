"""The guided checkpoint: ``ivl-kernels compose`` and ``GuidedCausalLM.save_pretrained`` write it,
``GuidedCausalLM.from_pretrained`` loads it and decodes exactly as the models built in memory."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.cli import main as cli  # noqa: E402
from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM  # noqa: E402
from ivl_kernels.hf.checkpoint import read_guided_checkpoint  # noqa: E402
from ivl_kernels.vocab import VocabMap  # noqa: E402

from ._models import (BASE_VOCAB, CORPUS, VALUE_VOCAB, left_pad, make_base, make_value, random_map,  # noqa: E402
                      random_prompts, train_bpe_tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved tiny models: a base with a tokenizer, a value network of the same vocabulary (same tokenizer), an
    anti-expert, and a value network of a smaller vocabulary that needs a map."""
    root = tmp_path_factory.mktemp("models")
    tok = train_bpe_tokenizer(BASE_VOCAB, CORPUS)
    paths = {}
    for name, model in (("base", make_base()), ("value", make_value(vocab=BASE_VOCAB, seed=1)),
                        ("anti", make_value(vocab=BASE_VOCAB, seed=7)), ("small", make_value(seed=2))):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        if name != "small":
            tok.save_pretrained(paths[name])
    vmap = VocabMap(random_map(), BASE_VOCAB, VALUE_VOCAB)
    paths["map"] = str(root / "small.map.pt")
    vmap.save(paths["map"])
    return paths


def _tokens(lm, seed=4):
    ids, mask = left_pad(random_prompts([5, 9, 3], seed=seed))
    return lm.generate(ids, attention_mask=mask, max_new_tokens=6)


def _in_memory(paths, terms):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(paths["base"])
    return GuidedCausalLM(base, [GuidanceTerm(AutoModelForCausalLM.from_pretrained(paths[n]), a,
                                              None if m is None else VocabMap.load(m)) for n, a, m in terms])


def test_compose_one_term_loads_and_decodes_as_in_memory(models, tmp_path):
    out = str(tmp_path / "guided")
    assert cli(["compose", models["base"], models["value"], "-o", out, "--alpha", "0.7"]) == 0
    doc = json.load(open(os.path.join(out, "config.json")))
    assert doc["model_type"] == "ivl_guided" and doc["architectures"] == ["IVLGuidedForCausalLM"]
    assert doc["ivl_guided"]["base"] == os.path.relpath(models["base"], out)   # no weights, relative reference
    assert doc["text_config"]["vocab_size"] == BASE_VOCAB and doc["max_position_embeddings"] == 256
    assert not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(out))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    lm = GuidedCausalLM.from_pretrained(out, backend="torch")
    assert lm.tokenizer is not None and lm.terms[0].alpha == 0.7
    assert torch.equal(_tokens(lm), _tokens(_in_memory(models, [("value", 0.7, None)])))


def test_compose_proxy_tuning_terms_and_a_map(models, tmp_path):
    out = str(tmp_path / "proxy")
    assert cli(["compose", models["base"], "-o", out, "--term", f"{models['value']}:1.0",
                "--term", f"{models['anti']}:-0.5", "--term", f"{models['small']}:0.3:{models['map']}"]) == 0
    spec = read_guided_checkpoint(out)
    assert [t.alpha for t in spec.terms] == [1.0, -0.5, 0.3]
    assert [t.map for t in spec.terms] == [None, None, "map_2.pt"]
    lm = GuidedCausalLM.from_pretrained(out)
    want = _in_memory(models, [("value", 1.0, None), ("anti", -0.5, None), ("small", 0.3, models["map"])])
    assert torch.equal(_tokens(lm), _tokens(want))


def test_the_checkpoint_moves_with_its_models(models, tmp_path):
    """References to local models are relative: copying the tree keeps it loadable."""
    tree = tmp_path / "tree"
    for name in ("base", "value"):
        shutil.copytree(models[name], tree / name)
    assert cli(["compose", str(tree / "base"), str(tree / "value"), "-o", str(tree / "guided")]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(tree, moved)
    shutil.rmtree(tree)
    lm = GuidedCausalLM.from_pretrained(str(moved / "guided"))
    assert lm.vocab_size == BASE_VOCAB


def test_save_pretrained_round_trip(models, tmp_path):
    lm = _in_memory(models, [("value", 0.9, None), ("small", -0.2, models["map"])])
    lm.suppress_ids_from = 290
    out = str(tmp_path / "saved")
    lm.save_pretrained(out)
    again = GuidedCausalLM.from_pretrained(out)
    assert again.suppress_ids_from == 290 and [t.alpha for t in again.terms] == [0.9, -0.2]
    assert torch.equal(_tokens(again), _tokens(lm))
    # The map keeps its recorded vocabulary sizes.
    assert VocabMap.load(os.path.join(out, "map_1.pt")).value_vocab_size == VALUE_VOCAB


def test_compose_into_a_symlink_to_a_directory(models, tmp_path, capsys):
    """-o a link to an empty directory (a scratch disk): before, os.rmdir on the link failed (NotADirectoryError);
    now the checkpoint is written into the directory it points to, the link stays and loads. A link to nothing
    is refused, nothing created."""
    real, link = tmp_path / "disk" / "guided", tmp_path / "guided"
    real.mkdir(parents=True)
    link.symlink_to(real)
    assert cli(["compose", models["base"], models["value"], "-o", str(link)]) == 0
    assert link.is_symlink() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "guided"]
    assert GuidedCausalLM.from_pretrained(str(link)).vocab_size == BASE_VOCAB
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    assert cli(["compose", models["base"], models["value"], "-o", str(dangling)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_in_memory_models_need_paths(tmp_path):
    lm = GuidedCausalLM(make_base(), make_value())
    with pytest.raises(ValueError, match="records no path it was loaded from"):
        lm.save_pretrained(str(tmp_path / "x"))


@pytest.mark.parametrize("case", ["missing-value", "bigger-vocab-no-map", "map-wrong-size", "no-terms",
                                  "fill-beyond-float32"])
def test_compose_refuses_bad_input_before_writing(models, tmp_path, case, capsys):
    out = tmp_path / "bad"
    args = {"missing-value": [models["base"], str(tmp_path / "nope"), "-o", str(out)],
            "bigger-vocab-no-map": [models["small"], models["base"], "-o", str(out)],
            "map-wrong-size": [models["base"], models["value"], "-o", str(out), "--map", models["map"]],
            "no-terms": [models["base"], "-o", str(out)],
            "fill-beyond-float32": [models["base"], models["value"], "-o", str(out), "--fill", "1e39"]}[case]
    if case == "no-terms":
        with pytest.raises(SystemExit):
            cli(["compose", *args])
    else:
        assert cli(["compose", *args]) == 2
        err = capsys.readouterr().err
        assert {"missing-value": "cannot read a model config", "bigger-vocab-no-map": "does not fit",
                "map-wrong-size": "vocab", "fill-beyond-float32": "fill must be finite in float32"}[case].lower() \
            in err.lower()
    assert not (out / "config.json").exists()


def test_compose_refuses_different_tokenizers_without_a_map(models, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(models["value"], other)
    other_corpus = ["xylophone quartz jukebox wizard", "zebra vortex quiz jump", "klutz fjord wyvern myth"] * 20
    train_bpe_tokenizer(BASE_VOCAB, other_corpus).save_pretrained(other)
    assert cli(["compose", models["base"], str(other), "-o", str(tmp_path / "g")]) == 2
    assert "tokenise differently" in capsys.readouterr().err


def test_reading_a_non_guided_directory_fails(models):
    with pytest.raises(ValueError, match="not a guided checkpoint"):
        read_guided_checkpoint(models["base"])


def test_compose_takes_a_lora_adapter_and_its_trained_map(models, tmp_path):
    """What `ivl-kernels train --lora-r` writes: an adapter directory naming its base, with vocab_map.pt beside."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    small = AutoModelForCausalLM.from_pretrained(models["small"])
    lora = peft.get_peft_model(small, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    shutil.copy(models["map"], adapter / "vocab_map.pt")
    out = str(tmp_path / "g")
    assert cli(["compose", models["base"], str(adapter), "-o", out, "--alpha", "0.5"]) == 0
    assert read_guided_checkpoint(out).terms[0].map == "map_0.pt"
    lm = GuidedCausalLM.from_pretrained(out)
    want = GuidedCausalLM(AutoModelForCausalLM.from_pretrained(models["base"]),
                          [GuidanceTerm(lora, 0.5, VocabMap.load(models["map"]))])
    assert torch.equal(_tokens(lm), _tokens(want))


def test_models_without_tokenizer_files(models, tmp_path):
    """transformers 5 builds a one-token tokenizer for a directory without tokenizer files: it must not be
    compared, saved with the checkpoint, nor suppress every id >= 1."""
    bare = tmp_path / "bare"
    shutil.copytree(models["small"], bare)                   # the small value model was saved without a tokenizer
    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    for f in os.listdir(base):
        if "token" in f or f in ("vocab.json", "merges.txt"):
            os.remove(base / f)
    out = str(tmp_path / "g")
    assert cli(["compose", str(base), str(bare), "-o", out, "--map", models["map"]]) == 0
    assert not os.path.exists(os.path.join(out, "tokenizer_config.json"))
    lm = GuidedCausalLM.from_pretrained(out)
    assert lm.tokenizer is None and lm.suppress_ids_from is None
    assert _tokens(lm).shape[1] == 9 + 6

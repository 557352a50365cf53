"""Hostile inputs to the writers and loaders of the transformers integration (issue 17): every case either gives
the right answer or an error of the documented type whose message names the argument or path, and leaves every
input file and directory byte-identical (hashed before and after) with no partial output behind.

Writers: ``ivl-kernels compose`` / ``GuidedCausalLM.save_pretrained``, ``ivl-kernels train`` /
``IVLForCausalLM.save_pretrained``, ``ivl-kernels map``. Loaders: ``GuidedCausalLM.from_pretrained``, the training
data, ``--resume``. Decoding: ``GuidedCausalLM.generate``'s prompt and length arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.cli import main as cli  # noqa: E402
from ivl_kernels.hf import GuidedCausalLM, IVLForCausalLM  # noqa: E402

from ._models import (BASE_VOCAB, CORPUS, left_pad, make_base, make_value, random_prompts,  # noqa: E402
                      train_bpe_tokenizer)


def tree_hash(path) -> str:
    """A digest of every name and byte under ``path`` (a file or a directory)."""
    h = hashlib.sha256()
    path = str(path)
    if os.path.isfile(path):
        h.update(open(path, "rb").read())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + ["/" + d for d in dirs]:
            h.update(os.path.relpath(os.path.join(root, name.lstrip("/")), path).encode() + b"\0")
            if not name.startswith("/"):
                h.update(open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def no_temporaries(directory) -> bool:
    """No temporary sibling (``.NAME.tmp-*``) was left in ``directory``."""
    return not [n for n in os.listdir(directory) if ".tmp-" in n]


class Unchanged:
    """``with Unchanged(a, b): ...`` asserts that the trees ``a``, ``b`` hash the same afterwards."""

    def __init__(self, *paths):
        self.paths = [str(p) for p in paths]

    def __enter__(self):
        self.before = [tree_hash(p) for p in self.paths]
        return self

    def __exit__(self, *exc):
        assert [tree_hash(p) for p in self.paths] == self.before, "an input was modified"
        return False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    tok = train_bpe_tokenizer(BASE_VOCAB, CORPUS)
    paths = {"root": str(root)}
    for name, model in (("base", make_base()), ("value", make_value(vocab=BASE_VOCAB, seed=1))):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    from transformers import T5Config

    paths["t5"] = str(root / "t5")
    T5Config(vocab_size=BASE_VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(paths["t5"])
    paths["data"] = str(root / "d.jsonl")
    with open(paths["data"], "w") as f:
        f.write(json.dumps({"prompt": "hello", "response": "world"}) + "\n")
    return paths


def _copy(models, name, tmp_path):
    dst = str(tmp_path / f"{name}_copy")
    shutil.copytree(models[name], dst)
    return dst


# ---- compose / GuidedCausalLM.save_pretrained ---------------------------------------------------------------------


def test_compose_into_its_value_model_is_refused(models, tmp_path, capsys):
    vcopy = _copy(models, "value", tmp_path)
    with Unchanged(vcopy, models["base"]):
        for extra in ([], ["--overwrite"]):  # never over an input, whatever the flag
            assert cli(["compose", models["base"], vcopy, "-o", vcopy, *extra]) == 2
            err = capsys.readouterr().err
            assert vcopy in err and "term 0 model" in err
    assert no_temporaries(tmp_path)


def test_compose_into_its_base_model_is_refused(models, tmp_path, capsys):
    bcopy = _copy(models, "base", tmp_path)
    with Unchanged(bcopy):
        assert cli(["compose", bcopy, models["value"], "-o", bcopy]) == 2
    assert "base model" in capsys.readouterr().err


def test_save_pretrained_into_the_base_directory_is_refused(models, tmp_path):
    from transformers import AutoModelForCausalLM

    bcopy = _copy(models, "base", tmp_path)
    lm = GuidedCausalLM(AutoModelForCausalLM.from_pretrained(bcopy), AutoModelForCausalLM.from_pretrained(models["value"]))
    with Unchanged(bcopy):
        with pytest.raises(ValueError, match="base model"):
            lm.save_pretrained(bcopy)
        with pytest.raises(ValueError, match="base model"):
            lm.save_pretrained(bcopy, overwrite=True)
    assert no_temporaries(tmp_path)


def test_compose_into_a_directory_of_other_files_needs_overwrite(models, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}')
    (out / "notes.txt").write_text("keep me")
    with Unchanged(out):
        assert cli(["compose", models["base"], models["value"], "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "config.json" in err
    # With --overwrite the checkpoint's files replace same-named ones; the user's other files stay.
    assert cli(["compose", models["base"], models["value"], "-o", str(out), "--overwrite"]) == 0
    assert json.load(open(out / "config.json"))["model_type"] == "ivl_guided"
    assert (out / "notes.txt").read_text() == "keep me" and no_temporaries(tmp_path)


def test_compose_rewrites_its_own_checkpoint(models, tmp_path):
    out = str(tmp_path / "g")
    assert cli(["compose", models["base"], models["value"], "-o", out, "--alpha", "0.5"]) == 0
    assert cli(["compose", models["base"], models["value"], "-o", out, "--alpha", "0.25"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["ivl_guided"]["terms"][0]["alpha"] == 0.25
    assert no_temporaries(tmp_path)


def test_compose_output_path_that_is_a_file(models, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    with Unchanged(f):
        assert cli(["compose", models["base"], models["value"], "-o", str(f), "--overwrite"]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["base", "value"])
def test_compose_refuses_an_encoder_decoder(models, tmp_path, capsys, role):
    out = tmp_path / "g"
    args = [models["t5"], models["value"]] if role == "base" else [models["base"], models["t5"]]
    with Unchanged(models["t5"]):
        assert cli(["compose", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "encoder-decoder" in err and models["t5"] in err
    assert not out.exists() and no_temporaries(tmp_path)  # a failed command leaves nothing behind


def test_compose_failure_while_writing_leaves_nothing(models, tmp_path, monkeypatch):
    from ivl_kernels.hf import checkpoint

    def broken(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.json, "dump", broken)
    out = tmp_path / "g"
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_guided_checkpoint(str(out), models["base"], [{"model": models["value"]}])
    assert not out.exists() and no_temporaries(tmp_path)


# ---- loading a guided checkpoint ----------------------------------------------------------------------------------


@pytest.fixture()
def checkpoint(models, tmp_path):
    out = str(tmp_path / "g")
    assert cli(["compose", models["base"], models["value"], "-o", out]) == 0
    return out


def _edit(path, fn):
    doc = json.load(open(path))
    fn(doc)
    json.dump(doc, open(path, "w"))


@pytest.mark.parametrize("alpha", ["nan", True, None, [1.0], float("inf"), 1e39])
def test_hand_edited_alpha_is_refused(checkpoint, alpha):
    cfg = os.path.join(checkpoint, "config.json")
    _edit(cfg, lambda d: d["ivl_guided"]["terms"][0].update(alpha=alpha))
    with Unchanged(checkpoint):
        with pytest.raises(ValueError, match=r"config\.json.*terms\[0\]\.alpha"):
            GuidedCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize("edit, key", [
    (lambda g: g.pop("terms"), "terms"),
    (lambda g: g.update(terms=[{"alpha": 1.0}]), r"terms\[0\]\.model"),
    (lambda g: g.update(base=7), "base"),
    (lambda g: g.update(fill="0"), "fill"),
    (lambda g: g.update(fill=1e39), "fill"),
    (lambda g: g.update(suppress_ids_from=2.5), "suppress_ids_from"),
    (lambda g: g["terms"][0].update(map="../../etc/passwd"), r"terms\[0\]\.map"),
], ids=["missing-terms", "term-without-model", "base-not-a-string", "fill-a-string", "fill-beyond-float32",
        "suppress-a-float", "map-outside"])
def test_bad_or_missing_key_names_the_file_and_key(checkpoint, edit, key):
    _edit(os.path.join(checkpoint, "config.json"), lambda d: edit(d["ivl_guided"]))
    with pytest.raises(ValueError, match=rf"config\.json: ivl_guided\.{key}"):
        GuidedCausalLM.from_pretrained(checkpoint)


def test_moved_models_name_the_missing_path(models, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copytree(models["base"], tree / "base")
    shutil.copytree(models["value"], tree / "value")
    out = str(tree / "g")
    assert cli(["compose", str(tree / "base"), str(tree / "value"), "-o", out]) == 0
    shutil.move(str(tree / "value"), str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"guidance term 0 model '\.\./value' is not at .*tree/value"):
        GuidedCausalLM.from_pretrained(out)


def test_corrupted_checkpoint_tokenizer_is_an_error(checkpoint):
    with open(os.path.join(checkpoint, "tokenizer.json"), "w") as f:
        f.write("{ not json")
    with pytest.raises(ValueError, match=rf"tokenizer in '{checkpoint}' does not load"):
        GuidedCausalLM.from_pretrained(checkpoint)


# ---- decoding -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return GuidedCausalLM(make_base(), make_value(), alpha=0.7, backend="torch")


def test_left_padded_batch_without_mask_infers_it_from_the_pad_token(lm):
    ids, mask = left_pad(random_prompts([5, 9, 3], seed=4))  # pad id 0 = the base config's pad_token_id
    with_mask = lm.generate(ids, attention_mask=mask, max_new_tokens=5)
    # Attending to the padding gives other tokens: what a missing mask did before it was inferred.
    assert not torch.equal(lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5), with_mask)
    assert torch.equal(lm.generate(ids, max_new_tokens=5), with_mask)
    assert torch.equal(lm.generate(ids, max_new_tokens=5, pad_token_id=0), with_mask)


@pytest.mark.parametrize("value, error", [(2.7, TypeError), ("5", TypeError), (True, TypeError),
                                          (-1, ValueError), (0, ValueError)])
def test_max_new_tokens_must_be_a_positive_int(lm, value, error):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(error, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=value)


@pytest.mark.parametrize("alpha", [float("nan"), 1e39, "1.0", True])
def test_guided_lm_alpha_is_checked_at_construction(alpha):
    with pytest.raises((TypeError, ValueError), match="value alpha"):
        GuidedCausalLM(make_base(), make_value(), alpha=alpha)


def test_empty_prompt_is_refused(lm):
    with pytest.raises(ValueError, match="input_ids is empty"):
        lm.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="no real token"):
        lm.generate(torch.tensor([[0, 0], [5, 6]]), attention_mask=torch.tensor([[0, 0], [1, 1]]), max_new_tokens=2)


def test_float_input_ids_are_refused(lm):
    with pytest.raises(TypeError, match="input_ids"):
        lm.generate(torch.tensor([[5.0, 6.0]]), max_new_tokens=2)


# ---- training: ivl-kernels train, IVLForCausalLM.save_pretrained -------------------------------------------------


def test_train_into_its_base_model_is_refused(models, tmp_path, capsys):
    bcopy = _copy(models, "base", tmp_path)
    with Unchanged(bcopy, models["data"]):
        assert cli(["train", bcopy, models["value"], "--data", models["data"], "-o", bcopy, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert bcopy in err and "base model" in err


def test_train_over_its_data_file_is_refused(models, tmp_path, capsys):
    with Unchanged(models["data"]):
        assert cli(["train", models["base"], models["value"], "--data", models["data"], "-o", models["data"]]) == 2
    assert "--data file" in capsys.readouterr().err


def test_train_into_a_finished_run_needs_overwrite(models, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights of an earlier run")
    (out / "ivl_train.json").write_text("{}")
    with Unchanged(out):
        assert cli(["train", models["base"], models["value"], "--data", models["data"], "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "model.safetensors" in err


def test_train_failure_before_training_leaves_no_output(models, tmp_path, capsys):
    out = tmp_path / "new"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert cli(["train", models["base"], models["value"], "--data", str(bad), "-o", str(out)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err and not out.exists()


def test_non_utf8_training_data_names_the_file(tmp_path):
    from ivl_kernels.hf.train_cli import load_records

    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"prompt": "a", "response": "b"}).encode() + b"\n" +
                     '{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    with Unchanged(data):
        with pytest.raises(ValueError, match=rf"{data}:2: not UTF-8"):
            load_records(str(data))


def _fake_checkpoint(out, step, complete):
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{}")
    if complete:
        from ivl_kernels.hf.train_cli import mark_checkpoint_complete

        (ck / "model.safetensors").write_bytes(b"w")
        mark_checkpoint_complete(str(ck), step)
    return ck


def test_resume_latest_skips_an_interrupted_checkpoint(tmp_path, capsys):
    from ivl_kernels.hf.train_cli import _resolve_resume

    out = tmp_path / "run"
    good = _fake_checkpoint(out, 40, complete=True)
    bad = _fake_checkpoint(out, 52, complete=False)  # SIGINT during the save: only config.json
    with Unchanged(out):
        assert _resolve_resume("latest", str(out), False) == str(good)
    err = capsys.readouterr().err
    assert f"skipping {bad}: incomplete checkpoint" in err


def test_resume_from_a_named_incomplete_checkpoint_is_refused(tmp_path):
    from ivl_kernels.hf.train_cli import UsageError, _resolve_resume

    out = tmp_path / "run"
    bad = _fake_checkpoint(out, 52, complete=False)
    with pytest.raises(UsageError, match=rf"{bad} is an incomplete checkpoint"):
        _resolve_resume("checkpoint-52", str(out), False)
    with pytest.raises(UsageError, match="no checkpoint-N directory .* holds a complete checkpoint"):
        _resolve_resume("latest", str(out), False)


def test_resume_and_overwrite_together_are_refused(models, tmp_path, capsys):
    assert cli(["train", models["base"], models["value"], "--data", models["data"], "-o", str(tmp_path / "o"),
                "--resume", "--overwrite"]) == 2
    assert "--resume" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ivl_save_pretrained_into_the_base_directory_is_refused(models, tmp_path):
    from transformers import AutoModelForCausalLM

    bcopy = _copy(models, "base", tmp_path)
    ivl = IVLForCausalLM(AutoModelForCausalLM.from_pretrained(bcopy), AutoModelForCausalLM.from_pretrained(models["value"]))
    with Unchanged(bcopy):
        with pytest.raises(ValueError, match="save_directory .* base model"):
            ivl.save_pretrained(bcopy, overwrite=True)


def test_ivl_save_pretrained_over_other_files_needs_overwrite(models, tmp_path):
    from transformers import AutoModelForCausalLM

    ivl = IVLForCausalLM(make_base(), make_value(vocab=BASE_VOCAB))
    out = tmp_path / "v"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    with Unchanged(out):
        with pytest.raises(ValueError, match=rf"save_directory '{out}' already exists.*overwrite=True"):
            ivl.save_pretrained(str(out))
    ivl.save_pretrained(str(out), overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == BASE_VOCAB
    assert no_temporaries(tmp_path)


def test_ivl_save_pretrained_interrupted_leaves_nothing(tmp_path, monkeypatch):
    ivl = IVLForCausalLM(make_base(), make_value(vocab=BASE_VOCAB))
    real = ivl.value_model.save_pretrained

    def interrupted(directory, **kw):
        real(directory, **kw)  # the files are written, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(ivl.value_model, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ivl.save_pretrained(str(tmp_path / "v"))
    assert os.listdir(tmp_path) == []


# ---- ivl-kernels map --------------------------------------------------------------------------------------------


def test_map_over_its_own_input_is_refused(models, tmp_path, capsys):
    bcopy = _copy(models, "base", tmp_path)
    target = os.path.join(bcopy, "tokenizer.json")
    with Unchanged(bcopy):
        for extra in ([], ["--overwrite"]):
            assert cli(["map", bcopy, models["value"], "-o", target, *extra]) == 2
            err = capsys.readouterr().err
            assert target in err and "base tokenizer" in err


def test_map_over_an_existing_file_needs_overwrite(models, tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"an earlier map")
    with Unchanged(out):
        assert cli(["map", models["base"], models["value"], "-o", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert cli(["map", models["base"], models["value"], "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"an earlier map" and no_temporaries(tmp_path)


def test_map_beside_its_input_is_fine(models, tmp_path):
    bcopy = _copy(models, "base", tmp_path)
    assert cli(["map", bcopy, models["value"], "-o", os.path.join(bcopy, "map.pt")]) == 0

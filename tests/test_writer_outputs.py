"""The shared output rules of every writer (``ivl_kernels._atomic``): symbolic links, weights of the other kind
left by an earlier save, inputs inside the output, outputs that cannot be written, a directory where a file goes.
(Hostile inputs to the same helpers and ``ivl-kernels bench``'s output directory are in
tests/test_hostile_inputs.py; the writers end to end in tests/hf/test_train_cli.py, test_checkpoint.py and
test_training.py.)"""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from ivl_kernels import _atomic


def _write(d, name, text="new"):
    with open(os.path.join(d, name), "w") as f:
        f.write(text)


# ---- _atomic -------------------------------------------------------------------------------------------------------


def test_atomic_dir_writes_through_a_symlink_to_a_directory(tmp_path):
    """Before: commit_dir did os.rmdir on the link (NotADirectoryError) after all the work was done."""
    real, link = tmp_path / "disk" / "out", tmp_path / "out"
    real.mkdir(parents=True)
    link.symlink_to(real)
    _atomic.check_output_dir(link, overwrite=False)
    with _atomic.atomic_dir(link) as tmp:
        assert os.path.dirname(tmp) == str(real.parent)  # the temporary is made beside the target (its disk)
        _write(tmp, "config.json")
    assert link.is_symlink() and os.listdir(real) == ["config.json"]
    with _atomic.atomic_dir(link) as tmp:  # a non-empty target: files replaced one by one, still through the link
        _write(tmp, "config.json", "again")
    assert link.is_symlink() and (real / "config.json").read_text() == "again"
    assert sorted(os.listdir(tmp_path)) == ["disk", "out"] and os.listdir(tmp_path / "disk") == ["out"]


def test_a_symlink_to_nothing_is_refused(tmp_path):
    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "nowhere")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="symbolic link to .*nowhere.*does not exist"):
            _atomic.check_output_dir(dangling, overwrite=overwrite)
    with pytest.raises(ValueError, match="symbolic link"):
        with _atomic.atomic_dir(dangling):
            pass
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("old, new, gone", [
    (["adapter_config.json", "adapter_model.safetensors", "README.md"], ["config.json", "model.safetensors"],
     ["adapter_config.json", "adapter_model.safetensors"]),
    (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "pytorch_model.bin"], ["adapter_config.json", "adapter_model.safetensors"],
     ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
      "pytorch_model.bin"]),
])
def test_overwrite_removes_weights_of_the_other_kind(tmp_path, old, new, gone):
    """Full weights over an adapter (or the reverse): before, the old kind stayed and loaders, which take an
    adapter whenever adapter_config.json is there, read the old weights. Other files stay."""
    out = tmp_path / "v"
    out.mkdir()
    for name in old:
        _write(out, name, "old")
    with _atomic.atomic_dir(out) as tmp:
        for name in new:
            _write(tmp, name)
    assert sorted(os.listdir(out)) == sorted(set(old) - set(gone) | set(new))


def test_a_directory_where_a_file_goes_is_found_before_anything_moves(tmp_path):
    out = tmp_path / "out"
    (out / "a.csv").mkdir(parents=True)
    _write(out, "b.csv", "old")
    tmp = tempfile.mkdtemp(dir=tmp_path)
    _write(tmp, "a.csv")
    _write(tmp, "b.csv")
    with pytest.raises(ValueError, match="cannot replace the directory .*a.csv.* with a file"):
        _atomic.commit_dir(tmp, str(out))
    assert (out / "b.csv").read_text() == "old" and sorted(os.listdir(tmp)) == ["a.csv", "b.csv"]
    for name in ("a.csv", "b.csv"):
        os.remove(os.path.join(tmp, name))
    os.mkdir(os.path.join(tmp, "b.csv"))  # and the reverse: a directory where a file is
    with pytest.raises(ValueError, match="cannot replace .*b.csv.* with a directory"):
        _atomic.commit_dir(tmp, str(out))
    assert (out / "b.csv").read_text() == "old"


def test_an_input_inside_the_output_is_refused_when_asked(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    inputs = [("value model", str(out / "checkpoint-2"))]
    _atomic.check_not_input(out, inputs)  # the default: a new name inside an input is what is checked
    with pytest.raises(ValueError, match="value model .*checkpoint-2.* lies inside -o .*out"):
        _atomic.check_not_input(out, inputs, inputs_inside=True)
    _atomic.check_not_input(tmp_path / "new", inputs, inputs_inside=True)  # elsewhere: fine


def test_check_writable_names_the_place(tmp_path, monkeypatch):
    _atomic.check_writable(tmp_path / "a" / "b", what="-o")  # missing parents: the nearest existing one is probed
    assert os.listdir(tmp_path) == []

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(ValueError, match=rf"-o '{tmp_path}/out': cannot write in '{tmp_path}' \(Read-only"):
        _atomic.check_writable(tmp_path / "out", what="-o")

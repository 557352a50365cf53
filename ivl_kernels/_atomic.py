"""Safe output for every writer (``compose``, ``train``, ``map``, ``bench``, every ``save_pretrained``).

Two rules, one implementation:

- **Never destroy what the writer did not create.** Before any work, ``check_output_dir`` / ``check_output_file``
  refuse an output that is one of the writer's own inputs (always: reading and writing the same files corrupts
  both, whatever the flag) and an existing output that holds something the writer did not write, unless the user
  passed ``--overwrite`` / ``overwrite=True``. Each writer says what "its own" output looks like (``ours``).
- **Whole or not at all.** ``atomic_dir`` / ``atomic_file`` write into a hidden temporary sibling (same
  filesystem, so the final step is a rename) and move it into place only when everything was written; on any
  error, or an interrupt, the temporary is removed and the destination is as it was.

With ``overwrite`` into an existing directory the new files replace same-named ones one by one (each an atomic
``os.replace``); files the writer does not produce are left alone (never a recursive delete of a directory the
user named: ``-o ~ --overwrite`` must not empty a home directory), except stale weight shards of the same family
as the new weights, which ``transformers``' own ``save_pretrained`` removes too (a loader would mix them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, Optional

# Files a model/tokenizer writer produces; used to tell the user what an existing directory holds.
WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model|tf_model|flax_model)"
                         r"(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?$")


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_within(path, parent) -> bool:
    """Whether ``path`` is ``parent`` or lies inside it (symlinks resolved)."""
    p, q = _real(path), _real(parent)
    return p == q or p.startswith(q.rstrip(os.sep) + os.sep)


def check_not_input(output, inputs: Iterable[tuple], *, flag: str = "-o") -> None:
    """``ValueError`` when ``output`` is one of ``inputs`` (``(role, path)`` pairs; hub ids and ``None`` are
    skipped) or an existing file or directory inside an input directory: a writer never writes over what it reads,
    with or without ``--overwrite``. A new name inside an input directory (``map.pt`` beside ``tokenizer.json``)
    destroys nothing and is allowed."""
    for role, path in inputs:
        if not path or not os.path.exists(os.fspath(path)):
            continue  # a hub id, or nothing there: nothing of the user's to destroy
        if _real(output) == _real(path) or (os.path.isdir(path) and is_within(output, path)
                                            and os.path.lexists(os.fspath(output))):
            raise ValueError(f"{flag} {os.fspath(output)!r} is {'inside ' if _real(output) != _real(path) else ''}"
                             f"the {role} ({os.fspath(path)!r}), an input of this command: writing there would "
                             f"destroy it; choose another output")


def _describe_contents(path: str, limit: int = 5) -> str:
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown


def check_output_dir(path, *, overwrite: bool, ours: Optional[Callable[[str], bool]] = None,
                     what: str = "output", flag: str = "--overwrite") -> None:
    """An output directory may be written when it does not exist, is empty, holds this writer's own earlier
    output (``ours(path)``), or ``overwrite`` is set; else ``ValueError`` naming it and what it holds. A path
    that exists and is not a directory is always refused (``--overwrite`` never turns a file into a directory)."""
    path = os.fspath(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    if not os.path.exists(path):
        return  # created, with missing parents (as save_pretrained does), by atomic_dir
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} exists and is not a directory; choose another path")
    if overwrite or not os.listdir(path) or (ours is not None and ours(path)):
        return
    raise ValueError(f"{what} {path!r} already exists and holds files this command did not write "
                     f"({_describe_contents(path)}); refusing to overwrite them: choose another path, or pass "
                     f"{flag} to replace same-named files")


def check_output_file(path, *, overwrite: bool, what: str = "output", flag: str = "--overwrite") -> None:
    """An output file may be written when it does not exist (its directory must) or ``overwrite`` is set."""
    path = os.fspath(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{what} {path!r}: its directory {parent!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{what} {path!r} already exists; refusing to overwrite it: choose another name, or pass "
                         f"{flag}")


def _temp_sibling(path: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    if kind == "dir":
        return tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    os.close(fd)
    return tmp


def _weight_family(name: str) -> Optional[str]:
    m = WEIGHT_FILE.match(name)
    return None if m is None else f"{m.group(1)}.{m.group(3)}"


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[str]:
    """Yield a temporary sibling directory of ``path`` to write into; on success it becomes ``path`` (a rename
    when ``path`` does not exist or is empty; else its files replace same-named ones, see the module docstring),
    on failure it is removed and ``path`` is untouched. The caller has checked ``path`` (``check_output_dir``)."""
    path = os.path.abspath(os.fspath(path))
    created = []  # missing parents, made here and removed again on failure
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(created):
        os.mkdir(d)
    tmp = _temp_sibling(path, "dir")
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def commit_dir(tmp: str, path: str) -> None:
    """Move the finished directory ``tmp`` to ``path`` (see ``atomic_dir``)."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a directory the user names gets the usual mode
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    written = set(os.listdir(tmp))
    families = {f for f in map(_weight_family, written) if f}
    for name in written:  # every conflict is found before the first file moves
        s, d = os.path.join(tmp, name), os.path.join(path, name)
        if os.path.isdir(d) and not os.path.islink(d) and not os.path.isdir(s):
            raise ValueError(f"cannot replace the directory {d!r} with a file")
    for name in sorted(written):
        s, d = os.path.join(tmp, name), os.path.join(path, name)
        if os.path.isdir(s) and os.path.isdir(d) and not os.path.islink(d):
            commit_dir(s, d)
            continue
        os.replace(s, d)
    for name in os.listdir(path):
        if name not in written and _weight_family(name) in families:
            os.remove(os.path.join(path, name))
    shutil.rmtree(tmp, ignore_errors=True)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which would race with other threads' writes.
_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


@contextlib.contextmanager
def atomic_file(path) -> Iterator[str]:
    """Yield a temporary sibling file name of ``path``; on success it replaces ``path`` in one ``os.replace``,
    on failure it is removed."""
    path = os.path.abspath(os.fspath(path))
    tmp = _temp_sibling(path, "file")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise

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
as the new weights, which ``transformers``' own ``save_pretrained`` removes too (a loader would mix them), and
weights of the other kind: full model weights replace a PEFT adapter (``adapter_model.*`` and
``adapter_config.json``) and an adapter replaces full model weights (``model*`` / ``pytorch_model*``), since a
loader finding both takes the adapter whatever was written last.

An output given as a symbolic link to a directory (a link into a scratch disk) is written into the directory it
points to (the temporary sibling is made beside that directory, on its filesystem); the link stays. A link that
points to nothing is refused.
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


def resolve_output(path) -> str:
    """The absolute path a writer writes to: ``path`` itself, or, when ``path`` is a symbolic link, the directory
    it points to. ``ValueError`` for a link that points to nothing (nor to a directory): writing through it would
    create a file or directory somewhere the user did not name."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.islink(path):
        return path
    target = os.path.realpath(path)
    if not os.path.isdir(target):
        raise ValueError(f"{path!r} is a symbolic link to {target!r}, which "
                         f"{'is not a directory' if os.path.lexists(target) else 'does not exist'}; "
                         f"give a directory (or a link to an existing one)")
    return target


def is_within(path, parent) -> bool:
    """Whether ``path`` is ``parent`` or lies inside it (symlinks resolved)."""
    p, q = _real(path), _real(parent)
    return p == q or p.startswith(q.rstrip(os.sep) + os.sep)


def check_not_input(output, inputs: Iterable[tuple], *, flag: str = "-o", inputs_inside: bool = False) -> None:
    """``ValueError`` when ``output`` is one of ``inputs`` (``(role, path)`` pairs; hub ids and ``None`` are
    skipped) or an existing file or directory inside an input directory: a writer never writes over what it reads,
    with or without ``--overwrite``. A new name inside an input directory (``map.pt`` beside ``tokenizer.json``)
    destroys nothing and is allowed.

    ``inputs_inside=True`` (a writer that replaces or removes what lies inside its output directory, such as
    ``train``'s checkpoints): an input inside the output directory is refused too."""
    for role, path in inputs:
        if not path or not os.path.exists(os.fspath(path)):
            continue  # a hub id, or nothing there: nothing of the user's to destroy
        if _real(output) == _real(path) or (os.path.isdir(path) and is_within(output, path)
                                            and os.path.lexists(os.fspath(output))):
            raise ValueError(f"{flag} {os.fspath(output)!r} is {'inside ' if _real(output) != _real(path) else ''}"
                             f"the {role} ({os.fspath(path)!r}), an input of this command: writing there would "
                             f"destroy it; choose another output")
        if inputs_inside and os.path.isdir(os.fspath(output)) and is_within(path, output):
            raise ValueError(f"the {role} ({os.fspath(path)!r}) lies inside {flag} {os.fspath(output)!r}, which this "
                             f"command writes into (and replaces checkpoints in): the run would overwrite its own "
                             f"input; copy it elsewhere or choose another output")


def check_writable(path, *, what: str = "output") -> None:
    """``ValueError`` unless a writer can put ``path`` in place: a temporary sibling can be made beside it (in the
    nearest existing directory above it when parents are missing) and, when it is an existing directory, files
    can be made inside it. Checked before any work by writers that only write at the end (``train``), so that a
    read-only or foreign directory is found before hours of work, not after."""
    target = resolve_output(path)
    places = [os.path.dirname(target)]
    while not os.path.isdir(places[0]):
        places[0] = os.path.dirname(places[0])
    if os.path.isdir(target):
        places.append(target)
    for place in places:
        try:
            probe = tempfile.mkdtemp(prefix=".ivl-write-test-", dir=place)
            os.rmdir(probe)
        except OSError as e:
            raise ValueError(f"{what} {os.fspath(path)!r}: cannot write in {place!r} "
                             f"({e.strerror or type(e).__name__}); choose another path") from None


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
    if os.path.islink(path):
        try:
            resolve_output(path)  # a link to nothing (or to a file) is refused; a link to a directory is followed
        except ValueError as e:
            raise ValueError(f"{what} {e}") from None
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


_OTHER_KIND = {"full": "adapter", "adapter": "full"}


def _weight_kind(name: str) -> Optional[str]:
    """``"full"`` for a model's own weights (``model*``, ``pytorch_model*``), ``"adapter"`` for a PEFT adapter's
    (``adapter_model*`` and ``adapter_config.json``, which makes loaders take the adapter), else ``None``."""
    if name == "adapter_config.json":
        return "adapter"
    m = WEIGHT_FILE.match(name)
    if m is None:
        return None
    return {"model": "full", "pytorch_model": "full", "adapter_model": "adapter"}.get(m.group(1))


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[str]:
    """Yield a temporary sibling directory of ``path`` to write into; on success it becomes ``path`` (a rename
    when ``path`` does not exist or is empty; else its files replace same-named ones, see the module docstring),
    on failure it is removed and ``path`` is untouched. The caller has checked ``path`` (``check_output_dir``).
    A symbolic link to a directory is written through (see the module docstring)."""
    path = resolve_output(path)
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
    """Move the finished directory ``tmp`` to ``path`` (see ``atomic_dir``; a symbolic link to a directory is
    written through). ``ValueError`` naming the first conflict (a directory where a file goes, or the reverse)
    before anything moves."""
    path = resolve_output(path)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a directory the user names gets the usual mode
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    written = set(os.listdir(tmp))
    families = {f for f in map(_weight_family, written) if f}
    stale_kinds = {_OTHER_KIND[k] for k in map(_weight_kind, written) if k}
    for name in written:  # every conflict is found before the first file moves
        s, d = os.path.join(tmp, name), os.path.join(path, name)
        if os.path.isdir(d) and not os.path.islink(d) and not os.path.isdir(s):
            raise ValueError(f"cannot replace the directory {d!r} with a file")
        if os.path.isdir(s) and os.path.lexists(d) and not (os.path.isdir(d) and not os.path.islink(d)):
            raise ValueError(f"cannot replace {d!r} (not a directory) with a directory")
    for name in sorted(written):
        s, d = os.path.join(tmp, name), os.path.join(path, name)
        if os.path.isdir(s) and os.path.isdir(d) and not os.path.islink(d):
            commit_dir(s, d)
            continue
        os.replace(s, d)
    for name in os.listdir(path):
        if name in written or not os.path.isfile(os.path.join(path, name)):
            continue
        if _weight_family(name) in families or _weight_kind(name) in stale_kinds:
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

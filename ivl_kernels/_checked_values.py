"""Tensors whose values were already checked (a vocabulary map's range, a per-row alpha's finiteness), so that a
decoding loop passing the same CUDA tensors every step pays the check's device synchronisation once."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

# Value checks of a CUDA tensor (a map's range, an alpha's finiteness) cost a device synchronisation; a decoding
# loop passes the same tensors every step, so remember the tensors already checked: keyed on the object itself (a
# weak reference, so a new tensor allocated at a freed one's address is checked again), its version counter
# (in-place edits through torch bump it) and what it was checked against. A CUDA tensor written behind torch's
# back (DLPack, raw pointers) is not seen here; the kernels treat any map entry outside [-1, Vv) as unmapped, so
# memory safety never rests on this check. Servers call the ops from several threads: the cache's
# get/move_to_end/popitem sequences run under one lock (an OrderedDict is not safe under concurrent mutation).
_CHECKED: "OrderedDict[tuple, tuple]" = OrderedDict()
_CHECKED_MAX = 32
_CHECKED_LOCK = threading.Lock()


def already_checked(t: torch.Tensor, what: tuple) -> bool:
    """Whether ``t``, unchanged since, was checked for ``what`` (``("map", Vv)``, ``("alpha",)``)."""
    key = (id(t), what[0])
    with _CHECKED_LOCK:
        entry = _CHECKED.get(key)
        if entry is None:
            return False
        ref, version, checked = entry
        if ref() is not t or version != t._version or checked != what:
            return False
        _CHECKED.move_to_end(key)
        return True


def remember_checked(t: torch.Tensor, what: tuple) -> None:
    """Record that ``t`` at its current version passed the check ``what`` (the 32 most recent are kept)."""
    key = (id(t), what[0])
    with _CHECKED_LOCK:
        _CHECKED[key] = (weakref.ref(t), t._version, what)
        _CHECKED.move_to_end(key)
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)

"""Memory-safety checks for Triton kernels run under the interpreter.

On a GPU an out-of-bounds or misaligned access is a device fault that kills the user's process (the CUDA
context is lost), and ``IVL_KERNELS_GEMM=auto`` launches every candidate kernel on the user's GPU. The
interpreter does not fault: it reads and writes raw host addresses, so a stray lane reads a neighbour's bytes
and the numbers may even come out right. This module makes every interpreted access checkable: while a kernel
runs, each active lane of a load, store or atomic (mask true; masked-off lanes touch no memory on a GPU either)
must address a whole element inside one of the tensors passed to that launch (a tensor's own extent from its
strides, not its whole storage, so a view cannot wander into the rest of its buffer) and be aligned to its
element size. TMA descriptor accesses reach here as masked loads and stores with the hardware's bounds applied,
after the interpreter's own descriptor checks (16-byte base, strides and block offsets).

``install()`` patches the interpreter once; a violation raises ``OutOfBoundsAccess``, a ``BaseException`` like
the fault it stands for: it passes through the interpreter's own ``except Exception`` (which would wrap it in a
``TritonError``) and through the package's "a candidate this GPU cannot build is skipped" handling. It is also
recorded, so a test fails at teardown even if some caller swallowed it.
"""

from __future__ import annotations

import threading

import numpy as np

_state = threading.local()
violations: list[str] = []
launched: list[str] = []  # the name of every interpreted kernel launched, in order (tests may clear it)


class OutOfBoundsAccess(BaseException):
    pass


def _extent(t):
    """``(lo, hi)`` byte range a tensor's elements occupy, or None for an empty tensor."""
    if t.numel() == 0:
        return None
    size = t.element_size()
    lo = hi = 0
    for n, s in zip(t.shape, t.stride()):
        span = (n - 1) * s
        if span < 0:
            lo += span
        else:
            hi += span
    base = t.data_ptr()
    return base + lo * size, base + (hi + 1) * size


def _collect(arg, out):
    from triton.runtime.jit import TensorWrapper
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(arg, TensorWrapper):  # a reinterpreted dtype: the tensor's bytes are the same
        _collect(arg.base, out)
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            _collect(a, out)
    elif isinstance(arg, TensorDescriptor):
        _collect(arg.base, out)
    elif hasattr(arg, "data_ptr") and hasattr(arg, "stride"):
        ext = _extent(arg)
        if ext is not None:
            out.append(ext)


def _check(kind, ptrs, mask):
    ranges = getattr(_state, "ranges", None)
    if ranges is None:  # not inside a launch seen by the patched executor
        return
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
    else:
        addr = addr.reshape(-1)
    if addr.size == 0:
        return
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)  # int1 (bool) occupies a byte
    # Almost every access lies inside one tensor and is aligned: settle that with a min, a max and one pass for
    # the alignment (element sizes are powers of two) before the per-address search that names a violation.
    lo_addr, hi_addr = int(addr.min()), int(addr.max())
    if not np.any(addr & np.uint64(size - 1)) and any(lo <= lo_addr and hi_addr + size <= hi for lo, hi in ranges):
        return
    addr = np.unique(addr)
    ok = np.zeros(addr.shape, dtype=bool)
    for lo, hi in ranges:
        ok |= (addr >= lo) & (addr + size <= hi)
    bad = addr[~ok]
    misaligned = addr[addr % size != 0]
    if bad.size == 0 and misaligned.size == 0:
        return
    name = getattr(_state, "kernel", "?")
    if bad.size:
        first = int(bad[0])
        near = min(ranges, key=lambda r: min(abs(first - r[0]), abs(first - r[1])))
        msg = (f"{name}: {kind} of {bad.size} active address(es) outside every tensor passed to the launch; "
               f"first at byte {first - near[0]:+d} from the nearest tensor's start (its extent is "
               f"{near[1] - near[0]} bytes), element size {size}")
    else:
        msg = f"{name}: {kind} of {misaligned.size} address(es) not aligned to the element size {size}"
    violations.append(msg)
    raise OutOfBoundsAccess(msg)


def install():
    """Patch the interpreter (idempotent). Call only with ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter as it

    if getattr(it, "_ivl_bounds_checked", False):
        return
    builder = it.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def create_atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        _check("atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        _check("atomic_cas", ptr, None)
        return cas(self, ptr, cmp, val, *args, **kwargs)

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    builder.create_atomic_rmw = create_atomic_rmw
    builder.create_atomic_cas = create_atomic_cas

    call = it.GridExecutor.__call__

    def __call__(self, *args, **kwargs):
        ranges = []
        _collect(args, ranges)
        _collect(tuple(kwargs.values()), ranges)
        outer = getattr(_state, "ranges", None), getattr(_state, "kernel", None)
        _state.ranges, _state.kernel = ranges, getattr(self.fn, "__name__", "?")
        launched.append(_state.kernel)
        try:
            return call(self, *args, **kwargs)
        finally:
            _state.ranges, _state.kernel = outer

    it.GridExecutor.__call__ = __call__
    it._ivl_bounds_checked = True

"""The interpreter's memory-safety check (tests/_interp_bounds.py) catches what would fault on a GPU.

Every other interpreter test runs under the check; these kernels plant the faults it must see (a lane one past
the end, a view reading the rest of its buffer, a misaligned element, a stray atomic) and the accesses it must
let through (masked-off lanes, a TMA descriptor's out-of-range block, reinterpreted dtypes).
"""

import pytest
import torch

from ivl_kernels._triton import HAS_TRITON, interpreter_enabled

pytestmark = pytest.mark.skipif(not (HAS_TRITON and interpreter_enabled()), reason="checks the Triton interpreter")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tests import _interp_bounds  # noqa: E402


@triton.jit
def _copy(src, dst, n, extra, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(src + offs, mask=offs < n, other=0.0)
        tl.store(dst + offs, x, mask=offs < n)
    else:
        x = tl.load(src + offs + extra)
        tl.store(dst + offs, x)


@triton.jit
def _misaligned(src, dst):
    p = (src.to(tl.pointer_type(tl.int8)) + 2).to(tl.pointer_type(tl.float32))
    tl.store(dst, tl.load(p))


@triton.jit
def _atomic(dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(dst + offs, 1.0, mask=offs < n)


@triton.jit
def _tma(desc, dst, BLOCK: tl.constexpr):
    x = desc.load([0, 0])
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs[:, None] * BLOCK + offs[None, :], x)


def _raises(fn):
    before = len(_interp_bounds.violations)
    with pytest.raises(_interp_bounds.OutOfBoundsAccess) as err:
        fn()
    del _interp_bounds.violations[before:]  # planted on purpose: not this test's failure
    return str(err.value)


def test_masked_lanes_pass():
    src, dst = torch.randn(5), torch.full((8,), float("nan"))
    _copy[(1,)](src, dst, 5, 0, BLOCK=8, MASKED=True)
    torch.testing.assert_close(dst[:5], src)


def test_a_lane_past_the_end_is_caught():
    src, dst = torch.randn(5), torch.empty(8)
    msg = _raises(lambda: _copy[(1,)](src, dst, 5, 0, BLOCK=8, MASKED=False))
    assert "_copy: load of 3 active address(es) outside every tensor" in msg


def test_a_view_cannot_read_the_rest_of_its_buffer():
    buf = torch.randn(16)
    src, dst = buf[:8], torch.empty(8)
    _copy[(1,)](src, dst, 8, 0, BLOCK=8, MASKED=False)  # its own 8 elements: fine
    msg = _raises(lambda: _copy[(1,)](src, dst, 8, 1, BLOCK=8, MASKED=False))  # element 8 is buf's, not src's
    assert "load of 1 active address" in msg


def test_a_negative_offset_is_caught():
    src, dst = torch.randn(8), torch.empty(8)
    assert "byte -4 from" in _raises(lambda: _copy[(1,)](src, dst, 8, -1, BLOCK=8, MASKED=False))


def test_a_misaligned_element_is_caught():
    src, dst = torch.randn(4), torch.empty(1)
    assert "not aligned to the element size 4" in _raises(lambda: _misaligned[(1,)](src, dst))


def test_atomics_are_checked():
    dst = torch.zeros(4)
    _atomic[(1,)](dst, 4, BLOCK=8)
    assert dst.tolist() == [1.0] * 4
    assert "atomic of 4 active" in _raises(lambda: _atomic[(1,)](dst, 8, BLOCK=8))


def test_a_descriptor_block_past_the_tensor_is_clipped_not_flagged():
    from triton.tools.tensor_descriptor import TensorDescriptor

    src = torch.randn(3, 16)
    dst = torch.full((16, 16), float("nan"))
    _tma[(1,)](TensorDescriptor.from_tensor(src, [16, 16]), dst, BLOCK=16)
    torch.testing.assert_close(dst[:3], src)
    assert (dst[3:] == 0).all()


def test_a_swallowed_fault_is_still_recorded_for_the_teardown_check():
    # tests/conftest.py's _no_stray_accesses fails any test whose violations list grew, even if its code (or the
    # package's fallbacks) swallowed the exception.
    before = len(_interp_bounds.violations)
    try:
        _copy[(1,)](torch.randn(5), torch.empty(8), 5, 0, BLOCK=8, MASKED=False)
    except BaseException:
        pass
    assert len(_interp_bounds.violations) == before + 1
    del _interp_bounds.violations[before:]

"""Bad input to fused_guided_logits: a TypeError/ValueError naming the argument, before anything is written."""

from __future__ import annotations

import pytest
import torch

import ivl_kernels as ivl
from ivl_kernels._triton import HAS_TRITON, interpreter_enabled

BACKENDS = ["torch", "auto"] + (["triton"] if HAS_TRITON and (interpreter_enabled() or torch.cuda.is_available()) else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
M, Hv, Vv, Vb, Hb = 3, 16, 40, 48, 8


def good():
    return dict(
        value_hidden=torch.randn(M, Hv, device=DEV),
        value_weight=torch.randn(Vv, Hv, device=DEV),
        base_logits=torch.randn(M, Vb, device=DEV),
        vocab_map=torch.randint(-1, Vv, (Vb,), device=DEV, dtype=torch.int32),
    )


def _call(kw, backend):
    kw = dict(kw)
    vh, vw = kw.pop("value_hidden"), kw.pop("value_weight")
    return ivl.fused_guided_logits(vh, vw, backend=backend, **kw)


# (id, mutation of the good kwargs, exception type, text the message must contain)
CASES = [
    ("hidden-int", lambda k: k.update(value_hidden=torch.ones(M, Hv, dtype=torch.int64, device=DEV)), TypeError, "value_hidden"),
    ("hidden-not-tensor", lambda k: k.update(value_hidden=[[1.0] * Hv]), TypeError, "value_hidden"),
    ("hidden-1d", lambda k: k.update(value_hidden=torch.randn(Hv, device=DEV)), ValueError, "value_hidden"),
    ("weight-3d", lambda k: k.update(value_weight=torch.randn(1, Vv, Hv, device=DEV)), ValueError, "value_weight"),
    ("weight-wrong-H", lambda k: k.update(value_weight=torch.randn(Vv, Hv + 1, device=DEV)), ValueError, "Hv"),
    ("weight-dtype", lambda k: k.update(value_weight=torch.randn(Vv, Hv, device=DEV).half()), TypeError, "value_weight"),
    ("map-float", lambda k: k.update(vocab_map=torch.zeros(Vb, device=DEV)), TypeError, "vocab_map"),
    ("map-2d", lambda k: k.update(vocab_map=torch.zeros(Vb, 1, dtype=torch.int64, device=DEV)), ValueError, "vocab_map"),
    ("map-length", lambda k: k.update(vocab_map=torch.zeros(Vb - 1, dtype=torch.int64, device=DEV)), ValueError, f"[{Vb}]"),
    ("map-too-big", lambda k: k["vocab_map"].__setitem__(5, Vv), ValueError, f"[-1, {Vv})"),
    ("map-below-minus-one", lambda k: k["vocab_map"].__setitem__(0, -2), ValueError, "min -2"),
    ("both-bases", lambda k: k.update(base_hidden=torch.randn(M, Hb, device=DEV), base_weight=torch.randn(Vb, Hb, device=DEV)), ValueError, "not both"),
    ("no-base", lambda k: k.pop("base_logits"), ValueError, "base term is required"),
    ("hidden-without-weight", lambda k: (k.pop("base_logits"), k.update(base_hidden=torch.randn(M, Hb, device=DEV))), ValueError, "base_weight is missing"),
    ("weight-without-hidden", lambda k: (k.pop("base_logits"), k.update(base_weight=torch.randn(Vb, Hb, device=DEV))), ValueError, "base_hidden is missing"),
    ("base-weight-wrong-H", lambda k: (k.pop("base_logits"), k.update(base_hidden=torch.randn(M, Hb, device=DEV), base_weight=torch.randn(Vb, Hb + 2, device=DEV))), ValueError, "base_weight"),
    ("base-hidden-rows", lambda k: (k.pop("base_logits"), k.update(base_hidden=torch.randn(M + 1, Hb, device=DEV), base_weight=torch.randn(Vb, Hb, device=DEV))), ValueError, "base_hidden"),
    ("base-logits-rows", lambda k: k.update(base_logits=torch.randn(M + 1, Vb, device=DEV)), ValueError, "base_logits"),
    ("base-logits-int", lambda k: k.update(base_logits=torch.zeros(M, Vb, dtype=torch.int32, device=DEV)), TypeError, "base_logits"),
    ("alpha-length", lambda k: k.update(alpha=torch.ones(M + 1, device=DEV)), ValueError, "alpha"),
    ("alpha-nan", lambda k: k.update(alpha=float("nan")), ValueError, "alpha"),
    ("alpha-inf", lambda k: k.update(alpha=float("inf")), ValueError, "alpha"),
    ("alpha-string", lambda k: k.update(alpha="1"), TypeError, "alpha"),
    ("alpha-int-tensor", lambda k: k.update(alpha=torch.ones(M, dtype=torch.int64, device=DEV)), TypeError, "alpha"),
    ("fill-nan", lambda k: k.update(fill=float("nan")), ValueError, "fill"),
    ("fill-string", lambda k: k.update(fill="0"), TypeError, "fill"),
    # A finite fill beyond float32 cannot be represented where alpha * fill is computed (+-inf can: allowed).
    ("fill-beyond-float32", lambda k: k.update(fill=1e39), ValueError, "fill must be finite in float32"),
    ("fill-below-float32", lambda k: k.update(fill=-1e39), ValueError, "or +-inf, got -1e+39"),
    ("fill-int-beyond-float32", lambda k: k.update(fill=2 ** 200), ValueError, "fill must be finite in float32"),
    ("fill-int-beyond-float", lambda k: k.update(fill=10 ** 400), ValueError, "got an int of 1329 bits"),
    ("alpha-beyond-float32", lambda k: k.update(alpha=-1e39), ValueError, "alpha must be finite in float32"),
    ("alpha-int-beyond-float", lambda k: k.update(alpha=10 ** 400), ValueError, "alpha must be finite in float32"),
    ("alpha-int-of-5000-digits", lambda k: k.update(alpha=10 ** 5000), ValueError, "alpha"),
    ("out-shape", lambda k: k.update(out=torch.empty(M, Vb + 1, device=DEV)), ValueError, "out"),
    ("out-dtype", lambda k: k.update(out=torch.empty(M, Vb, dtype=torch.float16, device=DEV)), TypeError, "out"),
    ("unknown-backend", None, ValueError, "backend"),
]
if DEV == "cpu":
    CASES.append(("mixed-devices", lambda k: k.update(value_weight=torch.randn(Vv, Hv, device="meta")), ValueError, "value_weight is on meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,mutate,exc,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_writes_nothing(backend, case_id, mutate, exc, text):
    kw = good()
    if mutate is not None:
        mutate(kw)
    else:
        backend = "gpu-please"
    # In-place call where possible: a failed call must leave base_logits bit-for-bit as it was.
    base = kw.get("base_logits")
    if isinstance(base, torch.Tensor) and "out" not in kw and base.dtype == torch.float32 and base.shape == (M, Vb):
        kw["out"] = base
    before = base.clone() if isinstance(base, torch.Tensor) else None
    with pytest.raises(exc) as info:
        _call(kw, backend)
    assert text in str(info.value), f"message {str(info.value)!r} does not mention {text!r}"
    if before is not None:
        assert torch.equal(base, before)


def test_valid_call_passes_validation():
    out = _call(good(), "torch")
    assert out.shape == (M, Vb)


@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), -3, 3.0e38], ids=["neg_inf", "pos_inf", "int", "near_max"])
def test_fill_accepts_infinities_and_float32_values(fill):
    """+-inf (ban or force the unmapped ids), an int, the edge of float32's range: valid fills."""
    out = _call(dict(good(), fill=fill), "torch")
    assert out.shape == (M, Vb) and not out.isnan().any()


def test_map_range_cache_sees_in_place_edits():
    """A map that was valid and then edited in place is checked again (the cache keys on the version)."""
    kw = good()
    _call(kw, "torch")
    kw["vocab_map"][3] = Vv + 7
    with pytest.raises(ValueError, match="vocab_map"):
        _call(kw, "torch")

"""Argument checks shared by every backend of every op.

Every public op calls one of the ``validate_*`` functions before doing any work, so that a bad call raises a
``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, value or device) naming the argument and what
was expected, and leaves every tensor it was given untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._checked_values import already_checked, remember_checked

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "cuda", "triton", "torch")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT64_MAX = float(torch.finfo(torch.float64).max)
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@dataclass
class GuidedArgs:
    """Validated, flattened arguments of a guided-logits computation.

    ``value_hidden [M, Hv]``, ``value_weight [Vv, Hv]``; exactly one base form (or none, where allowed):
    ``base_logits [M, Vb]`` or ``base_hidden [M, Hb]`` with ``base_weight [Vb, Hb]``. ``vocab_map [Vb]`` or
    ``None`` (identity: ``b -> b`` for ``b < Vv``, else unmapped). ``alpha`` is a float or a ``[M]`` tensor.
    """

    value_hidden: torch.Tensor
    value_weight: torch.Tensor
    base_logits: Optional[torch.Tensor]
    base_hidden: Optional[torch.Tensor]
    base_weight: Optional[torch.Tensor]
    vocab_map: Optional[torch.Tensor]
    alpha: Union[float, torch.Tensor]
    fill: float
    M: int
    Vb: int
    Vv: int
    lead_shape: tuple
    out_dtype: torch.dtype
    device: torch.device

    @property
    def base_mode(self) -> int:
        """0: no base term, 1: ``base_logits``, 2: ``base_hidden . base_weight``."""
        if self.base_logits is not None:
            return 1
        if self.base_hidden is not None:
            return 2
        return 0


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"Tensor(shape={list(t.shape)}, dtype={t.dtype}, device={t.device})"
    return type(t).__name__


def check_tensor(name: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> None:
    """Type/dtype/rank check for one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {list(t.shape)}")


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _shown(x) -> str:
    """``x`` for a message: an int beyond float32's range rounded (``2**200``: ``1.607e+60``), and one too large
    for any float (``10**400``; ``str`` of an int of over 4300 digits even raises) by its size."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > _FLOAT32_MAX:
        return f"{float(x):.4g}" if abs(x) <= _FLOAT64_MAX else f"an int of {x.bit_length()} bits"
    return repr(x)


def check_finite_float(name: str, x, *, allow_inf: bool = False, float32: bool = False) -> float:
    """A real number (a Python int or float, not a bool) as a float: not NaN, finite unless ``allow_inf``, and with
    ``float32`` within float32's finite range (``check_float32_range``; an allowed infinity stays allowed). An int
    beyond the range is a ``ValueError`` as a float beyond it is (``float(10**400)`` would raise ``OverflowError``).
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(x).__name__}")
    limit = _FLOAT32_MAX if float32 else _FLOAT64_MAX
    if isinstance(x, int) and abs(x) > limit:  # compared exactly, before float() could overflow
        raise ValueError(_range_message(name, limit, allow_inf, _shown(x)))
    x = float(x)
    # Comparisons, not math.isnan / math.isinf: under torch.compile a float argument that changes between calls
    # becomes symbolic, and dynamo traces comparisons of it (as guards) but not the math module's tests.
    if x != x or (not allow_inf and abs(x) == math.inf):
        raise ValueError(f"{name} must be {'a float (not NaN)' if allow_inf else 'a finite float'}, got {x}")
    if float32 and abs(x) != math.inf:
        check_float32_range(name, x, allow_inf=allow_inf)
    return x


def check_int(name: str, x, *, minimum: int = 1) -> int:
    """A Python int (or an integer-valued 0-d tensor / numpy integer) ``>= minimum``; a bool, a float (2.7 must not
    become 2) or a string is a ``TypeError``, a smaller value a ``ValueError``, each naming the argument."""
    if isinstance(x, bool) or not (isinstance(x, int) or (hasattr(x, "__index__") and not isinstance(x, str)
                                                          and not isinstance(x, float))):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(x).__name__} {x!r}")
    try:
        x = int(x.__index__())
    except TypeError:  # a float tensor: __index__ refuses it
        raise TypeError(f"{name} must be an int >= {minimum}, got {x!r}") from None
    if x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x}")
    return x


def _range_message(name: str, limit: float, allow_inf: bool, shown: str) -> str:
    where = "finite in float32" if limit == _FLOAT32_MAX else "a finite float"
    return (f"{name} must be {where} (|{name}| <= {limit:.4g}){' or +-inf' if allow_inf else ''}, got {shown}")


def check_float32_range(name: str, x: float, *, allow_inf: bool = False) -> float:
    """A finite Python float that stays finite in float32: the kernels accumulate in float32, where 1e39
    becomes inf and the guided logits NaN/inf without a word (``allow_inf``: the message says an infinity is
    allowed; ``x`` itself must be finite here)."""
    if abs(x) > _FLOAT32_MAX:
        raise ValueError(_range_message(name, _FLOAT32_MAX, allow_inf, repr(x)))
    return x


def check_alpha_float(name: str, x) -> float:
    """A guidance strength given as a number: a real number (not a bool or a string), finite, and finite in
    float32 (the kernels accumulate in float32). One rule for the ops, the models' constructors and the guided
    checkpoint's config."""
    return check_finite_float(name, x, float32=True)


def check_fill(x) -> float:
    """``fill``, the value logit of unmapped base ids: a real number, not NaN, finite in float32 (the kernels
    compute ``alpha * fill`` in float32: 1e39 cannot be represented there) or infinite (``-inf`` bans the unmapped
    ids, ``+inf`` forces them: meaningful, and exact in float32)."""
    return check_finite_float("fill", x, allow_inf=True, float32=True)


def _flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., K] -> [M, K]`` as a view when the strides allow it (no silent copy of big tensors)."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        # Leading dims that cannot be merged by a view: a copy of the activations (small next to weights).
        return t.reshape(-1, t.shape[-1])


def check_alpha_tensor_values(alpha: torch.Tensor) -> None:
    """Every per-row alpha must be finite, and finite in float32 (the kernels accumulate in float32): a NaN alpha
    on one row gives NaN logits there, and in the loss NaN gradients for every row (even an ignored one). Read on
    every call for CPU tensors (no sync), once per tensor and version on a GPU (the decode loop passes the same
    tensor every step), never while a CUDA graph is being captured."""
    if alpha.numel() == 0:
        return
    cached = alpha.device.type != "cpu"
    if cached and (already_checked(alpha, ("alpha",)) or _capturing(alpha.device)):
        return
    bad = ~torch.isfinite(alpha)
    if alpha.dtype == torch.float64:
        bad |= alpha.abs() > _FLOAT32_MAX
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0]) if alpha.dim() == 1 else 0
        raise ValueError(f"alpha tensor entries must be finite (and within float32's range); row {row} is "
                         f"{float(alpha.reshape(-1)[row])}")
    if cached:
        remember_checked(alpha, ("alpha",))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_vocab_map(vocab_map, Vb: int, Vv: int, device: torch.device, check_values: bool = True) -> torch.Tensor:
    """``vocab_map`` must be an int32/int64 ``[Vb]`` tensor with entries in ``[-1, Vv)`` on ``device``.

    Accepts a ``VocabMap`` (anything with an ``.index`` tensor) and returns the index tensor.
    ``check_values=False`` skips the value range (it needs a device sync, impossible while tracing). The range
    is read on every call for CPU maps (no sync), once per tensor and version for CUDA maps, and not at all
    while a CUDA graph is being captured (a sync would break the capture); entries that escape the check are
    treated as unmapped by every backend.
    """
    index = getattr(vocab_map, "index", None)
    if not isinstance(vocab_map, torch.Tensor) and isinstance(index, torch.Tensor):
        check = getattr(vocab_map, "check_compatible", None)
        if check is not None:
            check(Vb, Vv)
        on = getattr(vocab_map, "on", None)
        vocab_map = index if index.device == device else on(device) if callable(on) else index.to(device)
    check_tensor("vocab_map", vocab_map, dtypes=INDEX_DTYPES, ndim=1)
    if vocab_map.shape[0] != Vb:
        raise ValueError(f"vocab_map must have one entry per base token: expected shape [{Vb}], "
                         f"got {list(vocab_map.shape)}")
    if vocab_map.device != device:
        raise ValueError(f"vocab_map is on {vocab_map.device}, expected {device} (the device of value_hidden)")
    if not check_values or Vb == 0:
        return vocab_map
    cached = vocab_map.device.type != "cpu"
    if cached and (already_checked(vocab_map, ("map", Vv)) or _capturing(vocab_map.device)):
        return vocab_map
    lo, hi = torch.aminmax(vocab_map)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= Vv:
        raise ValueError(f"vocab_map entries must lie in [-1, {Vv}) (value vocabulary size {Vv}), "
                         f"got min {lo}, max {hi}")
    if cached:
        remember_checked(vocab_map, ("map", Vv))
    return vocab_map


def assert_map_range_async(vocab_map: torch.Tensor, Vv: int) -> None:
    """While ``torch.compile`` traces (where the eager range check cannot read values): the map's range checked
    on the device by ``torch._assert_async``, traced into the graph (no graph break, no host sync); an entry out
    of ``[-1, Vv)`` raises a ``RuntimeError`` when the compiled code runs (on a GPU a device-side assert)."""
    if vocab_map.numel() == 0:
        return
    ok = ((vocab_map >= -1) & (vocab_map < Vv)).all()
    torch._assert_async(ok, "vocab_map entries must lie in [-1, Vv) (the value vocabulary size), checked on the "
                            "device under torch.compile")


def assert_target_range_async(target: torch.Tensor, Vb: int, ignore_index: int) -> None:
    """As ``assert_map_range_async``, for the loss's targets: each in ``[0, Vb)`` or equal to ``ignore_index``."""
    ok = ((target == ignore_index) | ((target >= 0) & (target < Vb))).all()
    torch._assert_async(ok, f"target entries must lie in [0, Vb) (the base vocabulary size) or equal "
                            f"ignore_index={ignore_index}, checked on the device under torch.compile")


def validate_guided(value_hidden, value_weight, *, base_logits=None, base_hidden=None, base_weight=None,
                    vocab_map=None, alpha=1.0, fill=0.0, base_required: bool = True,
                    check_map_values: bool = True) -> GuidedArgs:
    """Check the arguments of a guided computation and return them flattened to ``[M, ...]``."""
    check_tensor("value_hidden", value_hidden, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_tensor("value_weight", value_weight, dtypes=FLOAT_DTYPES, ndim=2)
    Hv = value_hidden.shape[-1]
    if value_weight.shape[1] != Hv:
        raise ValueError(f"value_weight must be [Vv, Hv] with Hv = value_hidden.shape[-1] = {Hv}, "
                         f"got {list(value_weight.shape)}")
    if value_weight.dtype != value_hidden.dtype:
        raise TypeError(f"value_weight dtype {value_weight.dtype} must match value_hidden dtype "
                        f"{value_hidden.dtype}")
    device = value_hidden.device
    if value_weight.device != device:
        raise ValueError(f"value_weight is on {value_weight.device}, expected {device} (the device of value_hidden)")
    lead_shape = tuple(value_hidden.shape[:-1])
    Vv = value_weight.shape[0]
    if Vv == 0:
        raise ValueError("value_weight must have at least one row (Vv >= 1: the value vocabulary), got shape "
                         f"{list(value_weight.shape)}")

    has_logits = base_logits is not None
    has_hidden = base_hidden is not None or base_weight is not None
    if has_logits and has_hidden:
        raise ValueError("give the base term as base_logits or as base_hidden + base_weight, not both")
    if base_required and not has_logits and not has_hidden:
        raise ValueError("a base term is required: pass base_logits [..., Vb] or base_hidden [..., Hb] "
                         "with base_weight [Vb, Hb]")
    if has_hidden and (base_hidden is None or base_weight is None):
        missing = "base_weight" if base_weight is None else "base_hidden"
        raise ValueError(f"base_hidden and base_weight go together: {missing} is missing")

    if has_logits:
        check_tensor("base_logits", base_logits, dtypes=FLOAT_DTYPES, min_ndim=2)
        if tuple(base_logits.shape[:-1]) != lead_shape:
            raise ValueError(f"base_logits must be [..., Vb] with leading dims {list(lead_shape)} "
                             f"(those of value_hidden), got {list(base_logits.shape)}")
        if base_logits.device != device:
            raise ValueError(f"base_logits is on {base_logits.device}, expected {device} (the device of value_hidden)")
        Vb = base_logits.shape[-1]
        out_dtype = base_logits.dtype
    elif has_hidden:
        check_tensor("base_hidden", base_hidden, dtypes=FLOAT_DTYPES, min_ndim=2)
        check_tensor("base_weight", base_weight, dtypes=FLOAT_DTYPES, ndim=2)
        if tuple(base_hidden.shape[:-1]) != lead_shape:
            raise ValueError(f"base_hidden must be [..., Hb] with leading dims {list(lead_shape)} "
                             f"(those of value_hidden), got {list(base_hidden.shape)}")
        if base_weight.shape[1] != base_hidden.shape[-1]:
            raise ValueError(f"base_weight must be [Vb, Hb] with Hb = base_hidden.shape[-1] = "
                             f"{base_hidden.shape[-1]}, got {list(base_weight.shape)}")
        if base_weight.dtype != base_hidden.dtype:
            raise TypeError(f"base_weight dtype {base_weight.dtype} must match base_hidden dtype {base_hidden.dtype}")
        for name, t in (("base_hidden", base_hidden), ("base_weight", base_weight)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device}, expected {device} (the device of value_hidden)")
        Vb = base_weight.shape[0]
        out_dtype = torch.float32
    else:
        index = vocab_map if isinstance(vocab_map, torch.Tensor) else getattr(vocab_map, "index", None)
        Vb = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() >= 1 else Vv
        out_dtype = torch.float32

    if vocab_map is not None:
        vocab_map = check_vocab_map(vocab_map, Vb, Vv, device, check_values=check_map_values)

    M = math.prod(lead_shape)
    if isinstance(alpha, torch.Tensor):
        check_tensor("alpha", alpha, dtypes=FLOAT_DTYPES)
        if alpha.dim() == 0:
            alpha = alpha.reshape(1).expand(M)
        if alpha.dim() != 1 and tuple(alpha.shape) != lead_shape:
            raise ValueError(f"alpha tensor must be [M] = [{M}] (one strength per row), got {list(alpha.shape)}")
        alpha = alpha.reshape(-1)
        if alpha.shape[0] != M:
            raise ValueError(f"alpha tensor must be [M] = [{M}] (one strength per row), got {list(alpha.shape)}")
        if alpha.device != device:
            raise ValueError(f"alpha is on {alpha.device}, expected {device} (the device of value_hidden)")
        if check_map_values:  # the same rule as the map's range: no value reads while tracing
            check_alpha_tensor_values(alpha)
    else:
        alpha = check_alpha_float("alpha", alpha)
    fill = check_fill(fill)

    return GuidedArgs(
        value_hidden=_flatten_rows(value_hidden),
        value_weight=value_weight,
        base_logits=_flatten_rows(base_logits) if has_logits else None,
        base_hidden=_flatten_rows(base_hidden) if has_hidden else None,
        base_weight=base_weight if has_hidden else None,
        vocab_map=vocab_map,
        alpha=alpha,
        fill=fill,
        M=M, Vb=Vb, Vv=Vv,
        lead_shape=lead_shape,
        out_dtype=out_dtype,
        device=device,
    )


def validate_out(out, args: GuidedArgs) -> Optional[torch.Tensor]:
    """``out`` must hold ``[M, Vb]`` (or the leading dims of ``value_hidden``) in the result dtype.

    Returns a ``[M, Vb]`` view of it that shares its storage, so writes land in the caller's tensor.
    """
    if out is None:
        return None
    check_tensor("out", out)
    expected = [(args.M, args.Vb), args.lead_shape + (args.Vb,)]
    if tuple(out.shape) not in expected:
        raise ValueError(f"out must have shape [M, Vb] = [{args.M}, {args.Vb}] or {list(expected[1])}, "
                         f"got {list(out.shape)}")
    if out.dtype != args.out_dtype:
        raise TypeError(f"out must have dtype {args.out_dtype} (base_logits' dtype, or float32 when the base "
                        f"is given as hidden states), got {out.dtype}")
    if out.device != args.device:
        raise ValueError(f"out is on {out.device}, expected {args.device} (the device of value_hidden)")
    if out.dim() == 2:
        return out
    try:
        return out.view(args.M, args.Vb)
    except RuntimeError:
        raise ValueError("out must be viewable as [M, Vb] without a copy (its leading dims must be mergeable)")


REDUCTIONS = ("mean", "sum", "none")
L1_REDUCTIONS = ("kept", "all")


def check_l1_reduction(l1_reduction) -> str:
    if not isinstance(l1_reduction, str) or l1_reduction not in L1_REDUCTIONS:
        raise ValueError(f"l1_reduction must be one of {L1_REDUCTIONS} (the rows the L1 term is taken over: "
                         f"those with a kept target, or every row), got {l1_reduction!r}")
    return l1_reduction


@dataclass
class CrossEntropyArgs:
    """Validated arguments of ``fused_guided_cross_entropy``: the guided part (``g``, flattened to ``[N, ...]``,
    ``N = g.M``) plus ``target [N]`` (int32/int64, as given, flattened) and the loss options.

    With a ``process_group`` (a ``ProcessGroup``: a ``DeviceMesh`` given by the caller is replaced by its group),
    ``g.Vb`` / ``g.Vv`` are this rank's shard sizes; ``Vb_global`` / ``Vv_global`` the
    sums over the group and ``vocab_offset`` the first global base id of this rank's shard (ranks hold
    contiguous shards in rank order). Without one, global == local and the offset is 0.
    """

    g: GuidedArgs
    target: torch.Tensor
    l1_coef: float
    l1_reduction: str
    ignore_index: int
    label_smoothing: float
    reduction: str
    process_group: object
    Vb_global: int
    Vv_global: int
    vocab_offset: int


def check_process_group(process_group):
    """The ``torch.distributed`` ``ProcessGroup`` a vocabulary-sharded loss communicates over.

    Accepts a ``ProcessGroup`` or a one-dimensional ``DeviceMesh`` (``init_device_mesh(...)`` with one dimension,
    or one dimension of a larger mesh: ``mesh["tp"]``), whose group is returned. A mesh with several dimensions is
    an error that names them: the loss needs the one its vocabulary is sharded over."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without device meshes
        DeviceMesh = ()
    if DeviceMesh and isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            names = process_group.mesh_dim_names
            how = (" or ".join(f'mesh["{n}"]' for n in names) if names else
                   "a 1-D mesh (init_device_mesh with mesh_dim_names, then mesh[name])")
            raise ValueError(f"process_group is a DeviceMesh with {process_group.ndim} dimensions "
                             f"{tuple(names) if names else tuple(process_group.shape)}: pass the one dimension the "
                             f"vocabulary is sharded over ({how}), or its ProcessGroup")
        return process_group.get_group()
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or a one-dimensional DeviceMesh "
                        f"(e.g. mesh[\"tp\"]), got {type(process_group).__name__}")
    return process_group


# What every rank of a vocabulary-sharded loss tells the others, in one all_gather of float64s: whether its own
# checks passed, its shard sizes, and what must agree across ranks (rows, options, replicated inputs).
_RANK_FIELDS = ("error", "Vb", "Vv", "map_is_none", "N", "Hv", "dtype", "base", "Hb", "alpha_kind", "alpha",
                "fill", "l1_coef", "l1_reduction", "ignore_index", "label_smoothing", "reduction", "target")
_AGREE = {  # field -> what the message calls it
    "N": "the number of rows N", "Hv": "value_hidden's width Hv", "dtype": "value_hidden's dtype",
    "base": "the base input (base_logits / base_hidden / none)", "Hb": "base_hidden's width Hb",
    "alpha_kind": "alpha's kind (float or tensor)", "alpha": "alpha", "fill": "fill", "l1_coef": "l1_coef",
    "l1_reduction": "l1_reduction", "ignore_index": "ignore_index", "label_smoothing": "label_smoothing",
    "reduction": "reduction", "target": "target"}
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A float64 scalar that differs, short of a collision, between tensors of other values or order."""
    w = (torch.arange(t.numel(), device=t.device) % 1021 + 1).to(torch.float64)
    return (t.reshape(-1).to(torch.float64) + 1).mul(w).sum()


def _agree_across_ranks(process_group, device, local_error, g, target, options: dict) -> tuple:
    """``(Vb_global, Vv_global, offset)`` of this rank's base shard, after one all_gather in which every rank
    says whether its own checks passed and what it was given. A rank whose checks failed raises its own error
    and every other rank a ``ValueError`` naming it, instead of waiting in the loss's collectives; ranks that
    disagree on what must be replicated (rows, ``target``, ``alpha``, the options) all raise, before a mismatched
    collective aborts the process or returns a loss for other inputs. ``vocab_map=None`` is the rank-local
    identity, which is the global one only where both vocabularies are split at the same boundaries."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    mine = torch.zeros(len(_RANK_FIELDS), dtype=torch.float64, device=device)
    if local_error is not None:
        mine[0] = 1
    else:
        alpha = g.alpha
        host = dict(Vb=g.Vb, Vv=g.Vv, map_is_none=float(g.vocab_map is None), N=g.M, Hv=g.value_hidden.shape[1],
                    dtype=_DTYPE_CODES.index(g.value_hidden.dtype), base=g.base_mode,
                    Hb=g.base_hidden.shape[1] if g.base_hidden is not None else 0,
                    alpha_kind=float(isinstance(alpha, torch.Tensor)),
                    alpha=0.0 if isinstance(alpha, torch.Tensor) else alpha, fill=g.fill,
                    l1_coef=options["l1_coef"], l1_reduction=L1_REDUCTIONS.index(options["l1_reduction"]),
                    ignore_index=options["ignore_index"], label_smoothing=options["label_smoothing"],
                    reduction=REDUCTIONS.index(options["reduction"]))
        mine.copy_(torch.tensor([host.get(f, 0.0) for f in _RANK_FIELDS], dtype=torch.float64))
        mine[_RANK_FIELDS.index("target")] = _fingerprint(target) if target.numel() else 0.0
        if isinstance(alpha, torch.Tensor) and alpha.numel():
            mine[_RANK_FIELDS.index("alpha")] = _fingerprint(alpha)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=process_group)
    rows = torch.stack(rows).cpu()
    col = {f: rows[:, i].tolist() for i, f in enumerate(_RANK_FIELDS)}

    names_of = dict(dtype=_DTYPE_CODES, base=("none", "base_logits", "base_hidden"), reduction=REDUCTIONS,
                    l1_reduction=L1_REDUCTIONS, alpha_kind=("float", "tensor"))
    failed = [r for r in range(world) if col["error"][r]]
    if failed:
        if local_error is not None:
            raise local_error
        raise ValueError(f"rank(s) {failed} of the process group rejected their arguments (the error raised there "
                         f"says why): every rank raises rather than wait for them in the loss's collectives")
    for field, what in _AGREE.items():
        if len(set(col[field])) > 1:
            if field == "target" or (field == "alpha" and any(col["alpha_kind"])):
                shown = "other values on some ranks"
            else:
                names = names_of.get(field)
                shown = "per rank: " + ", ".join(
                    str(names[int(v)]) if names else str(int(v)) if float(v).is_integer() else repr(v)
                    for v in col[field])
            raise ValueError(f"{what} differs across the process group's ranks ({shown}): every rank must pass the "
                             f"same rows, target and alpha (replicated; only the vocabulary is sharded) and the "
                             f"same options")
    Vb = [int(v) for v in col["Vb"]]
    Vv = [int(v) for v in col["Vv"]]
    for r in range(world):
        base_at, value_at = sum(Vb[:r]), sum(Vv[:r])
        if col["map_is_none"][r] and min(Vb[r], Vv[r]) > 0 and base_at != value_at:
            raise ValueError(
                f"vocab_map=None on rank {r} pairs its base shard (ids from {base_at}) with its value shard (ids "
                f"from {value_at}) column by column, which is not the identity between the vocabularies: with "
                f"vocab_map=None both heads must be split at the same boundaries (shard sizes base {Vb}, value "
                f"{Vv}); otherwise pass each rank its local vocab_map")
    return sum(Vb), sum(Vv), sum(Vb[:rank])


def validate_cross_entropy(value_hidden, value_weight, target, *, base_logits=None, base_hidden=None,
                           base_weight=None, vocab_map=None, alpha=1.0, fill=0.0, l1_coef=0.0,
                           l1_reduction="kept", ignore_index=-100, label_smoothing=0.0, reduction="mean",
                           process_group=None, check_values: bool = True) -> CrossEntropyArgs:
    """Checks of ``fused_guided_cross_entropy`` on top of ``validate_guided(..., base_required=False)``.

    ``target``: int32/int64 with the leading shape of ``value_hidden`` (or flat ``[N]``), entries in
    ``[0, Vb)`` (global ``Vb`` under a process group) or equal to ``ignore_index``. Base tensors must not
    require grad (the base is frozen), nor may an ``alpha`` tensor (it is treated as a constant).
    ``check_values=False`` skips the checks that read tensor values (target range, map range): they need a
    device sync, impossible while tracing; while ``torch.compile`` traces, the target range is asserted on the
    device instead (``assert_target_range_async``; the map's range by the public functions, per backend). Under a
    ``process_group`` every rank learns whether the others' checks passed and that they were given the same rows
    and options (``_agree_across_ranks``) before any of them enters the loss's collectives.
    """
    if process_group is not None:
        process_group = check_process_group(process_group)
    local_error = g = None
    try:
        g, target, options = _check_cross_entropy_locally(
            value_hidden, value_weight, target, base_logits=base_logits, base_hidden=base_hidden,
            base_weight=base_weight, vocab_map=vocab_map, alpha=alpha, fill=fill, l1_coef=l1_coef,
            l1_reduction=l1_reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction, check_values=check_values)
    except (ValueError, TypeError) as e:
        if process_group is None:
            raise
        local_error, options = e, {}
    if process_group is not None:
        # the all_gather's device: value_hidden's (the collective's backend needs it), CPU if it is no tensor
        device = value_hidden.device if isinstance(value_hidden, torch.Tensor) else torch.device("cpu")
        Vb_global, Vv_global, offset = _agree_across_ranks(process_group, device, local_error, g, target, options)
    else:
        Vb_global, Vv_global, offset = g.Vb, g.Vv, 0
    target = target.reshape(-1)
    if not check_values and torch.compiler.is_compiling():
        # Traced: the range is asserted on the device (a RuntimeError at run time), instead of a loss in which
        # the row of a bad target counts with a target logit of 0.
        assert_target_range_async(target, Vb_global, ignore_index)
    if check_values and g.M > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= Vb_global))
        if bool(bad.any()):  # target is the same on every rank (checked above): every rank raises
            first = int(target[bad][0])
            raise ValueError(f"target entries must lie in [0, {Vb_global}) (the base vocabulary size"
                             f"{' over the process group' if process_group is not None else ''}) or equal "
                             f"ignore_index={ignore_index}, got {first}")
    return CrossEntropyArgs(g=g, target=target, l1_coef=options["l1_coef"], l1_reduction=options["l1_reduction"],
                            ignore_index=ignore_index, label_smoothing=options["label_smoothing"],
                            reduction=reduction, process_group=process_group,
                            Vb_global=Vb_global, Vv_global=Vv_global, vocab_offset=offset)


def _check_cross_entropy_locally(value_hidden, value_weight, target, *, base_logits, base_hidden, base_weight,
                                 vocab_map, alpha, fill, l1_coef, l1_reduction, ignore_index, label_smoothing,
                                 reduction, check_values):
    """This rank's checks of ``validate_cross_entropy``: ``(GuidedArgs, target, normalised options)``."""
    for name, t in (("base_logits", base_logits), ("base_hidden", base_hidden), ("base_weight", base_weight)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but the base model is frozen in this loss and gets no "
                             f"gradient: pass {name}.detach() (or compute it under torch.no_grad())")
    if isinstance(alpha, torch.Tensor) and alpha.requires_grad:
        raise ValueError("alpha requires grad, but this loss treats alpha as a constant and gives it no "
                         "gradient: pass alpha.detach()")
    g = validate_guided(value_hidden, value_weight, base_logits=base_logits, base_hidden=base_hidden,
                        base_weight=base_weight, vocab_map=vocab_map, alpha=alpha, fill=fill,
                        base_required=False, check_map_values=check_values)
    check_tensor("target", target, dtypes=INDEX_DTYPES)
    if target.shape != torch.Size(g.lead_shape) and tuple(target.shape) != (g.M,):
        raise ValueError(f"target must have shape [N] = [{g.M}] (or the leading dims {list(g.lead_shape)} of "
                         f"value_hidden), one class id per row, got {list(target.shape)}")
    if target.device != g.device:
        raise ValueError(f"target is on {target.device}, expected {g.device} (the device of value_hidden)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be a Python int, got {type(ignore_index).__name__}")
    if not (_INT64_MIN <= ignore_index <= _INT64_MAX):  # compared with int64 targets: 2**70 would overflow there
        raise ValueError(f"ignore_index must be an int64 (in [-2**63, 2**63), as F.cross_entropy's), got "
                         f"{_shown(ignore_index)}")
    if isinstance(l1_coef, bool) or not isinstance(l1_coef, (int, float)):
        raise TypeError(f"l1_coef must be a Python float, got {type(l1_coef).__name__}")
    # Comparisons before float(): exact for an int too large for a float, False for NaN, traced by dynamo (a
    # changing float argument is symbolic under torch.compile: math.isfinite of it is not traced).
    if not (0 <= l1_coef <= _FLOAT32_MAX):
        raise ValueError(f"l1_coef must be a finite float >= 0, and finite in float32 (0 <= l1_coef <= "
                         f"{_FLOAT32_MAX:.4g}: the L1 term is computed in float32), got {_shown(l1_coef)}")
    l1_coef = float(l1_coef)
    l1_reduction = check_l1_reduction(l1_reduction)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a Python float, got {type(label_smoothing).__name__}")
    if not (0 <= label_smoothing < 1):  # before float(): float(10**400) would raise OverflowError
        raise ValueError(f"label_smoothing must lie in [0, 1), got {_shown(label_smoothing)}")
    label_smoothing = float(label_smoothing)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return g, target, dict(l1_coef=l1_coef, l1_reduction=l1_reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)

"""``fused_guided_cross_entropy``: the IVL training loss without materialising ``[N, V]`` logits.

    z[n, b]  = base[n, b] + alpha[n] * (value_hidden[n] . value_weight[map[b]])   (fill where map[b] == -1)
    ce_n     = logsumexp_b z[n, :] - (1 - eps) * z[n, t_n] - (eps / Vb) * sum_b z[n, b]        (eps = label_smoothing)
    l1_n     = l1_coef * sum_j |value_hidden[n] . value_weight[j]| / Vv                       (value vocabulary)

``ce_n`` for kept rows (``t_n != ignore_index``), 0 for ignored rows. With ``eps = 0`` this is
``lse - z[n, t_n]``; the smoothing term is ``torch.nn.functional.cross_entropy``'s. ``l1_reduction`` says which
rows carry ``l1_n``: ``"kept"`` the kept rows (``loss_n = ce_n + l1_n``, reduced like the cross-entropy),
``"all"`` every row (IVL's released code: ``"mean"`` is ``sum ce_n / kept_rows + sum_{all n} l1_n / N``).
Gradients: with ``p = softmax(z[n])``,

    dz[n, b]   = g_n * (p[n, b] - (1 - eps) * [b == t_n] - eps / Vb)
    dvl[n, v]  = alpha[n] * sum_{b: map[b] = v} dz[n, b] + h_n * l1_coef / Vv * sign(value_logit[n, v])
    d value_hidden = dvl @ value_weight,     d value_weight = dvl^T @ value_hidden

with ``g_n`` the cross-entropy weight of row n (the upstream gradient, ``/ kept_rows`` for "mean"; 0 for
ignored rows) and ``h_n`` its L1 weight: ``g_n`` for ``"kept"``; for ``"all"`` the upstream gradient (``/ N``
for "mean"), nonzero for ignored rows too. ``dvl`` exists one chunk of rows at a time.

Backends: ``triton`` (``_chunked.py``: rows in chunks; the base and value heads and the gradient products run
as cuBLAS GEMMs, the row-wise log-sum-exp, target, smoothing, L1 and ``dvl`` in one Triton kernel; gradients in
the forward pass where the row weights are known then; no atomics, bit-reproducible), ``torch``
(``_torch_backend.py``: plain PyTorch chunked over rows, the same one pass where the row weights are known in the
forward, else the logits recomputed in the backward pass). There is no
``cuda`` backend for this op. The ``autograd.Function`` is in ``_autograd.py``.

Distributed (``process_group=`` a ``ProcessGroup`` or a 1-D ``DeviceMesh`` such as ``mesh["tp"]``,
tensor-parallel LM heads): each rank holds a contiguous shard of the base
vocabulary (``base_logits [N, Vb_r]`` columns / ``base_weight [Vb_r, Hb]`` rows, shards in rank order) and a
shard of the value head ``value_weight [Vv_r, Hv]``; ``vocab_map`` (if given) is rank-local: ``[Vb_r]`` entries
index this rank's ``value_weight`` shard (``None`` = local identity). Targets are global base ids;
``value_hidden``, ``target``, ``alpha`` are replicated. Partial log-sum-exps, target logits, smoothing and L1
sums are combined with two ``all_reduce``s; the loss is the same on every rank; ``d value_weight`` is the
rank's shard, ``d value_hidden`` is all-reduced (the full gradient, identical on every rank). The L1 term
divides by the global ``Vv = sum_r Vv_r``.
"""

from __future__ import annotations

from __future__ import annotations

import torch

from ... import _backends
from ..._validate import CrossEntropyArgs, assert_map_range_async, check_backend, validate_cross_entropy
from .._amp import no_autocast
from .._traced import alpha_rows
from ._autograd import Config, GuidedCrossEntropy, graph_anchor
from ._chunked import chunked_loss, launch_bwd, launch_fwd
from ._torch_backend import CHUNK_ELEMS, torch_bwd, torch_chunks, torch_fwd

__all__ = ["fused_guided_cross_entropy", "chunked_loss", "launch_fwd", "launch_bwd", "torch_chunks", "torch_fwd",
           "torch_bwd", "CHUNK_ELEMS"]


def _triton_supports(a: CrossEntropyArgs) -> str:
    g = a.g
    dtypes = {g.value_hidden.dtype}
    for t in (g.base_logits, g.base_hidden):
        if t is not None:
            dtypes.add(t.dtype)
    return _backends.triton_dtype_problem(dtypes)


def fused_guided_cross_entropy(value_hidden, value_weight, target, *, base_logits=None, base_hidden=None,
                               base_weight=None, vocab_map=None, alpha=1.0, fill=0.0, l1_coef=0.0,
                               l1_reduction="kept", ignore_index=-100, label_smoothing=0.0, reduction="mean",
                               backend="auto", process_group=None) -> torch.Tensor:
    """Cross-entropy of guided logits (IVL training loss) without materialising ``[N, V]`` logits.

    ``z[n, b] = base[n, b] + alpha[n] * (value_hidden[n] . value_weight[map[b]])`` (``alpha[n] * fill`` where
    ``map[b] == -1``), ``ce_n = logsumexp_b z[n] - z[n, target_n]`` (label smoothing exactly as
    ``F.cross_entropy``, over the ``Vb`` classes; 0 for ignored rows) and IVL's regulariser
    ``l1_n = l1_coef * sum_j |value_hidden[n] . value_weight[j]| / Vv`` (over the value vocabulary before
    remapping, not scaled by alpha). With ``K`` the number of kept rows and ``N`` the number of rows:

    - ``l1_reduction="kept"`` (default): ``loss_n = ce_n + l1_n`` for kept rows, 0 for ignored rows;
      ``"mean"`` = ``sum_n loss_n / K``, ``"sum"`` = ``sum_n loss_n``, ``"none"`` = ``loss_n``.
    - ``l1_reduction="all"``: the L1 term of every row, ignored rows included;
      ``"mean"`` = ``sum_{n kept} ce_n / K + sum_{all n} l1_n / N``, ``"sum"`` = ``sum_n (ce_n + l1_n)``,
      ``"none"`` = ``ce_n + l1_n`` (``l1_n`` alone for ignored rows).

    (a count of 0 makes its term 0). ``"all"`` is IVL's released training, which averages the L1 term over every
    position of the padded batch: its L1 term is normalised by ``N``, not ``K``, and includes the ignored rows, so
    its weight relative to the cross-entropy depends on how many rows (padding, prompt tokens) are ignored.

    Args:
        value_hidden: ``[..., Hv]`` value-network hidden states (leading dims flattened to ``N``).
        value_weight: ``[Vv, Hv]`` value LM head, same dtype (float16, bfloat16, float32, float64).
        target: int64/int32 ``[N]`` (or the leading dims of ``value_hidden``): base-vocabulary ids in ``[0, Vb)``
            or ``ignore_index``.
        base_logits: ``[..., Vb]`` frozen base logits; or ``base_hidden [..., Hb]`` with ``base_weight [Vb, Hb]``
            (the base LM head fused into the same pass); or neither: value-only fused linear cross-entropy over
            the remapped value head (``Vb = len(vocab_map)``, or ``Vv``). Base tensors must not require grad.
        vocab_map: int32/int64 ``[Vb]`` (or a ``VocabMap``), entries in ``[-1, Vv)``; ``None`` = identity.
            Many-to-one maps are allowed (their gradients add up).
        alpha: float or ``[N]`` tensor; a constant (no gradient; a tensor that requires grad is an error).
        fill: value logit of unmapped base ids: finite in float32, or ``-inf`` (they get probability 0; a target
            on one then has an infinite loss).
        l1_coef: weight (>= 0) of the L1 regulariser.
        l1_reduction: ``"kept"`` (default: the L1 term of the kept rows, normalised like the cross-entropy) or
            ``"all"`` (the L1 term of every row, ignored ones included, averaged over ``N`` for ``"mean"``); see
            above. With ``"all"`` (and ``l1_coef > 0``) ignored rows get the L1 term's gradient.
        ignore_index: rows whose target equals it get no cross-entropy (and, with ``l1_reduction="kept"``, no L1
            term): loss 0, gradient 0.
        label_smoothing: in ``[0, 1)``, as ``F.cross_entropy``.
        reduction: ``"mean"`` (sum over kept rows / number of kept rows; **0 when no row is kept**, where
            ``F.cross_entropy`` gives NaN), ``"sum"`` (0 when no row is kept) or ``"none"`` (``[N]``, 0 for
            ignored rows); with ``l1_reduction="all"`` the L1 term is added as above (a batch with no kept row
            then gives the L1 term alone).
        backend: ``"auto" | "triton" | "torch"`` (``"cuda"`` is not implemented for this op and raises).
        process_group: a ``torch.distributed`` ``ProcessGroup`` over which the vocabulary is sharded, or a
            one-dimensional ``DeviceMesh`` (``mesh["tp"]`` of a larger mesh, or a 1-D mesh: its group is used; a
            mesh with several dimensions is a ``ValueError``). See the module docstring: contiguous
            base-vocabulary shards in rank order, rank-local ``vocab_map``, global target ids; ``d value_hidden``
            is all-reduced. Every rank must call with the same rows, ``target``, ``alpha`` and options; the ranks
            check each other first (one ``all_gather``): a rank whose arguments fail raises its error and the
            others a ``ValueError`` naming it, and ranks that disagree all raise. ``vocab_map=None`` needs both
            vocabularies split at the same boundaries (else a ``ValueError``: pass the local maps).

    Returns:
        The loss in ``value_hidden.dtype`` (a scalar, or ``[N]`` for ``"none"``), computed in float32 (float64
        for float64 inputs). Gradients flow to ``value_hidden`` and ``value_weight`` (input dtype, float32
        accumulation). Memory, never ``[N, V]``: the Triton backend holds one chunk of logits (at most
        ``_chunked.CHUNK_BYTES``, 1.25 GiB on a GPU), a float32 ``[Vv, Hv]`` gradient accumulator and, with a map,
        the value head gathered into base order; the torch backend a few buffers of ``CHUNK_ELEMS`` logits
        (``2**22`` on a CPU, ``2**27`` on a GPU), the ``[Vv, Hv]`` accumulator in the compute dtype and, with a
        map, the value head gathered into base order.
        No second derivative: differentiating gradients taken with ``create_graph=True`` raises.
        Deterministic: the Triton backend uses no atomics (a many-to-one map's gradients are folded with
        ``index_put_``, deterministic under ``torch.use_deterministic_algorithms``); the torch backend neither,
        except on a GPU with both a map and the L1 term (``index_add_``, deterministic in that mode too).
    """
    check_backend(backend)
    a = validate_cross_entropy(value_hidden, value_weight, target, base_logits=base_logits,
                               base_hidden=base_hidden, base_weight=base_weight, vocab_map=vocab_map, alpha=alpha,
                               fill=fill, l1_coef=l1_coef, l1_reduction=l1_reduction, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction, process_group=process_group,
                               check_values=not torch.compiler.is_compiling())
    which = _backends.select(backend, a.g.device, cuda_supports=None, triton_supports=lambda: _triton_supports(a))
    g = a.g
    if g.vocab_map is not None and which != "triton" and torch.compiler.is_compiling():
        # The Triton op checks the map's range when it runs (a ValueError); the torch backend's range is asserted
        # on the device here (the target's in validate_cross_entropy).
        assert_map_range_async(g.vocab_map, g.Vv)
    fp64 = any(t is not None and t.dtype == torch.float64
               for t in (g.value_hidden, g.base_logits, g.base_hidden))
    compute = torch.float64 if fp64 else torch.float32
    alpha_tensor = g.alpha if isinstance(g.alpha, torch.Tensor) else None
    if alpha_tensor is None and torch.compiler.is_compiling():
        # A float alpha as the per-row tensor: one graph for every value of an alpha that changes (_traced.py).
        alpha_tensor = alpha_rows(g.alpha, g.M, compute, g.device)
    alpha_scalar = 0.0 if alpha_tensor is not None else g.alpha
    kept = a.target != a.ignore_index
    # Rows that are ignored, or whose target lies in another rank's shard, get -1 (matches no column).
    local = a.target.long() - a.vocab_offset
    target_local = torch.where(kept & (local >= 0) & (local < g.Vb), local, torch.full_like(local, -1))
    cfg = Config(backend=which, alpha_scalar=float(alpha_scalar), fill=g.fill, Vb=g.Vb, Vb_global=a.Vb_global,
                  Vv_global=a.Vv_global, smoothing=a.label_smoothing, l1_coef=a.l1_coef,
                  l1_all=a.l1_reduction == "all", reduction=a.reduction,
                  process_group=a.process_group, compute=compute, grad_enabled=torch.is_grad_enabled())
    # The inputs' dtypes, float32 accumulation, whatever an ambient torch.autocast asks (_amp.py); the backward
    # disables it as well.
    with no_autocast(g.device):
        loss = GuidedCrossEntropy.apply(g.value_hidden, g.value_weight, g.base_logits, g.base_hidden,
                                         g.base_weight, g.vocab_map, alpha_tensor, target_local, kept,
                                         graph_anchor(g.value_hidden, g.value_weight), cfg)
    loss = loss.to(g.value_hidden.dtype)
    if a.reduction == "none" and len(g.lead_shape) != 1:
        loss = loss.view(g.lead_shape)
    return loss

"""The loss's ``autograd.Function``: per-row statistics to the reduced loss, and the gradients of both backends.

With ``reduction`` "mean"/"sum" and no process group, the weight of every row is known in the forward pass (up
to the scalar upstream gradient), so the forward computes the gradients in the same pass over the logits
(``_chunked.py``, ``_torch_backend.py``) and the backward only scales them. Otherwise the forward gathers the
statistics (all-reduced over the process group) and the backward recomputes the logits chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._amp import no_autocast
from .._traced import host_scalars
from ._torch_backend import torch_chunks


@dataclass(frozen=True)
class Config:
    backend: str
    alpha_scalar: float
    fill: float
    Vb: int              # this rank's base vocabulary
    Vb_global: int
    Vv_global: int
    smoothing: float
    l1_coef: float
    l1_all: bool         # l1_reduction == "all": the L1 term over every row, not only the kept ones
    reduction: str
    process_group: object
    compute: torch.dtype
    grad_enabled: bool = True  # grad mode at the call: without it no backward runs, and no gradient is computed

    @property
    def smooth_self(self) -> float:
        return 1.0 - self.smoothing

    @property
    def smooth_all(self) -> float:
        return self.smoothing / self.Vb_global if self.Vb_global else 0.0

    @property
    def l1_scale(self) -> float:
        return self.l1_coef / self.Vv_global if self.Vv_global else 0.0


def op_floats(cfg: Config) -> tuple:
    """``(fill, smooth_self, smooth_all, l1_scale, scalars)`` for the Triton op: eagerly the numbers and
    ``scalars=None``; while tracing constants and the numbers in ``scalars``, a CPU tensor (``host_scalars``), since
    the op's ``float`` arguments would specialise the graph on a float that changes between calls (``fill``,
    ``l1_coef``, ``label_smoothing``: one compile per value)."""
    scalars = host_scalars(cfg.fill, cfg.smooth_self, cfg.smooth_all, cfg.l1_scale)
    if scalars is None:
        return cfg.fill, cfg.smooth_self, cfg.smooth_all, cfg.l1_scale, None
    return 0.0, 1.0, 0.0, 0.0, scalars


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=op, group=group)
    return t


def row_weights(cfg: Config, kept: torch.Tensor, n_kept: torch.Tensor, grad_out: torch.Tensor) -> tuple:
    """``(g, h)`` float32 ``[N]``: each row's cross-entropy and L1 weight in the gradient, for upstream
    ``grad_out`` (a scalar, or ``[N]`` for "none"). ``h`` is None when the L1 term rides on the kept rows."""
    gf = grad_out.to(torch.float32 if cfg.compute != torch.float64 else torch.float64)
    h = None
    if cfg.l1_all and cfg.l1_coef != 0.0:
        h = gf / max(kept.shape[0], 1) if cfg.reduction == "mean" else gf
        h = h.expand(kept.shape).contiguous()
    if cfg.reduction == "mean":
        gf = gf / n_kept.clamp(min=1).to(gf.dtype)
    g = torch.where(kept, gf.expand(kept.shape), torch.zeros((), dtype=gf.dtype, device=gf.device))
    return g, h


class GuidedCrossEntropy(torch.autograd.Function):
    """Loss from per-row statistics; only ``value_hidden`` and ``value_weight`` get gradients."""

    @staticmethod
    def forward(ctx, value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                target_local, kept, anchor, cfg: Config):
        # (autocast is off here: the public function disables it around this call, ops/_amp.py)
        with_l1 = cfg.l1_coef != 0.0
        need_dvh, need_dvw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_kept = kept.sum()
        # needs_input_grad is True for a parameter even under torch.no_grad() (an evaluation loop): grad mode is
        # read at the call (cfg.grad_enabled), else every evaluation would pay for the gradients too.
        one_pass = (cfg.grad_enabled and cfg.process_group is None and cfg.reduction != "none"
                    and (need_dvh or need_dvw))
        g = h = None
        if one_pass:
            g, h = row_weights(cfg, kept, n_kept, torch.ones((), dtype=cfg.compute, device=kept.device))
        if cfg.backend == "triton":
            fill, smooth_self, smooth_all, l1_scale, scalars = op_floats(cfg)
            st, dvh, dvw = torch.ops.ivl_kernels.guided_ce_chunked(
                value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                cfg.alpha_scalar, fill, target_local, None, g, h, cfg.Vb, with_l1, smooth_self, smooth_all,
                l1_scale, one_pass and need_dvh, one_pass and need_dvw, scalars)
        else:
            st, dvh, dvw = torch_chunks(
                value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                cfg.alpha_scalar, cfg.fill, target_local, cfg.Vb, with_l1, cfg.smooth_self, cfg.smooth_all,
                cfg.l1_scale, cfg.compute, want_stats=True, want_sum=cfg.smoothing != 0.0, g=g, h=h,
                need_dvh=one_pass and need_dvh, need_dvw=one_pass and need_dvw)
        lse, zt, zs, l1 = st[0], st[1], st[2], st[3]
        if cfg.process_group is not None:
            import torch.distributed as dist

            # Global lse = gmax + log(sum_r exp(lse_r - gmax)); one MAX and one SUM all_reduce.
            gmax = _all_reduce(lse.clone(), dist.ReduceOp.MAX, cfg.process_group)
            gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
            packed = torch.stack([torch.exp(lse - gmax), zt, zs, l1])
            _all_reduce(packed, dist.ReduceOp.SUM, cfg.process_group)
            lse = gmax + torch.log(packed[0])
            zt, zs, l1 = packed[1], packed[2], packed[3]
        row = lse - cfg.smooth_self * zt
        if cfg.smoothing:  # skipped at 0: 0 * (-inf) from masked base logits would poison the row
            row = row - (cfg.smoothing / cfg.Vb_global) * zs
        l1_all = with_l1 and cfg.l1_all
        if with_l1:
            l1_row = (cfg.l1_coef / cfg.Vv_global) * l1
            if not l1_all:
                row = row + l1_row
        row = torch.where(kept, row, torch.zeros_like(row))
        if cfg.reduction == "none":
            loss = row + l1_row if l1_all else row
        elif cfg.reduction == "sum":
            loss = (row + l1_row).sum() if l1_all else row.sum()
        else:
            loss = row.sum() / n_kept.clamp(min=1).to(row.dtype)
            if l1_all:
                # IVL's released normaliser: every row passed (N), not the kept ones.
                loss = loss + l1_row.sum() / max(row.shape[0], 1)
        if one_pass:
            ctx.save_for_backward(dvh if need_dvh else None, dvw if need_dvw else None, anchor)
        else:
            ctx.save_for_backward(value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map,
                                  alpha_tensor, target_local, kept, lse, anchor)
        ctx.one_pass = one_pass
        ctx.cfg = cfg
        ctx.n_kept = n_kept
        # Returned in the compute dtype; the public function casts outside this Function. A cast here is a no-op
        # for float32 inputs that returns the *same* tensor object as ``loss``, and torch 2.11's dynamo
        # (pytorch/pytorch#180642, fixed in 2.12) also returns that intermediate as an extra output of the traced
        # forward: autograd then gives the user's tensor the extra output's slot, so under torch.compile this
        # backward got a zero grad_out and returned all-zero gradients. The output must alias nothing else here.
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # The gradients are computed from saved statistics (or saved gradients) as constants: this backward is not
        # differentiable itself. It runs without recording (create_graph=True would otherwise try to record the
        # in-place GEMMs), and under create_graph=True the gradients get a node that raises if they are
        # differentiated. torch.autograd.function.once_differentiable is not enough: its node hangs off grad_out
        # only, which usually does not require grad, and a second derivative then silently misses this op's
        # Hessian term. Ours hangs off ``anchor``, a 0-d tensor that the public function derives from value_hidden
        # and value_weight (``graph_anchor``), so it lies on every path a second derivative takes to them.
        # Autocast off as in the forward: the backward runs under the autocast state of the thread that calls
        # .backward() (inside the autocast region, with some training loops).
        with torch.no_grad(), no_autocast(grad_out.device):
            grads = GuidedCrossEntropy._gradients(ctx, grad_out)
        anchor = ctx.saved_tensors[-1]
        if torch.is_grad_enabled() and anchor is not None:
            grads = _raise_if_differentiated(anchor, grads)
        return grads + (None,)

    @staticmethod
    def _gradients(ctx, grad_out):
        cfg: Config = ctx.cfg
        none = (None,) * 8
        if ctx.one_pass:
            dvh, dvw, _ = ctx.saved_tensors
            # The forward's gradients are for an upstream gradient of 1 (a scalar loss): scale them.
            dvh = dvh * grad_out.to(dvh.dtype) if dvh is not None else None
            dvw = dvw * grad_out.to(dvw.dtype) if dvw is not None else None
            return (dvh, dvw) + none
        (value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor, target_local,
         kept, lse, _) = ctx.saved_tensors
        g, g_l1 = row_weights(cfg, kept, ctx.n_kept, grad_out)
        need_dvh, need_dvw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if cfg.process_group is not None:
            need_dvh = True  # every rank must join the all_reduce below
        if cfg.backend == "triton":
            fill, smooth_self, smooth_all, l1_scale, scalars = op_floats(cfg)
            _, dvh, dvw = torch.ops.ivl_kernels.guided_ce_chunked(
                value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                cfg.alpha_scalar, fill, target_local, lse.float().contiguous(), g.float().contiguous(),
                g_l1.float().contiguous() if g_l1 is not None else None, cfg.Vb, cfg.l1_coef != 0.0,
                smooth_self, smooth_all, l1_scale, need_dvh, need_dvw, scalars)
            dvh = dvh if need_dvh else None
            dvw = dvw if need_dvw else None
        else:
            _, dvh, dvw = torch_chunks(
                value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                cfg.alpha_scalar, cfg.fill, target_local, cfg.Vb, cfg.l1_coef != 0.0, cfg.smooth_self,
                cfg.smooth_all, cfg.l1_scale, cfg.compute, want_stats=False, lse=lse, g=g, h=g_l1,
                need_dvh=need_dvh, need_dvw=need_dvw)
        if cfg.process_group is not None:
            import torch.distributed as dist

            # value_hidden is replicated and every shard's logits depend on it: its gradient is the sum.
            dvh32 = _all_reduce(dvh.to(cfg.compute), dist.ReduceOp.SUM, cfg.process_group)
            dvh = dvh32.to(value_hidden.dtype)
        return (dvh if ctx.needs_input_grad[0] else None, dvw if ctx.needs_input_grad[1] else None) + none



SECOND_DERIVATIVE_ERROR = (
    "fused_guided_cross_entropy has no second derivative: its backward is not differentiable (the gradients of "
    "value_hidden / value_weight were computed with create_graph=True, then differentiated again). For "
    "higher-order derivatives use ivl_kernels.reference.guided_cross_entropy_naive (materialised logits).")


def graph_anchor(value_hidden: torch.Tensor, value_weight: torch.Tensor):
    """A 0-d zero whose autograd graph reaches ``value_hidden`` and ``value_weight`` (the sum of an empty slice of
    each: nothing is saved, no storage is kept alive), or ``None`` when neither can get a gradient at this call."""
    if not torch.is_grad_enabled() or not (value_hidden.requires_grad or value_weight.requires_grad):
        return None
    return value_hidden[:0].sum() + value_weight[:0].sum()


class _RaiseIfDifferentiated(torch.autograd.Function):
    """Passes the gradients a backward returns under ``create_graph=True`` through (as views); differentiating
    them raises ``SECOND_DERIVATIVE_ERROR``."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)


def _raise_if_differentiated(anchor: torch.Tensor, grads: tuple) -> tuple:
    """``grads`` (tensors and ``None``s) with each tensor replaced by its view through ``_RaiseIfDifferentiated``,
    whose node leads to ``anchor``."""
    where = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not where:
        return grads
    wrapped = _RaiseIfDifferentiated.apply(anchor, *(grads[i] for i in where))
    out = list(grads)
    for i, w in zip(where, wrapped if isinstance(wrapped, tuple) else (wrapped,)):
        out[i] = w
    return tuple(out)

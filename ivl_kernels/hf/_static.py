"""Static KV caches and a CUDA-graph-captured decode step for ``GuidedCausalLM.generate(cache_implementation=
"static")``.

Each model (base and every guidance term) gets a transformers ``StaticCache`` sized for its prompt plus the new
tokens. The prompt runs eagerly (any length, any padding). A decode step then has fixed shapes and addresses:

* the new token ids ``[B, 1]``, the position ids ``[B, 1]`` (each row's count of real tokens, so left padding
  never shifts positions) and an additive 4-D attention mask ``[B, 1, 1, L_max]`` (0 for the columns a row may
  attend to, the dtype's minimum elsewhere) are buffers updated in place; a 4-D mask is used by transformers as
  given, so its mask construction (which reads tensor values on the host) never runs;
* the new key/value column goes where the runner's host-side column count says: transformers releases whose model
  ``forward`` takes ``cache_position`` (4.5x) write a ``StaticCache`` column where it says, so the runner passes it
  (``arange(T)`` for the prompt, a ``[1]`` buffer updated in place per step; ``takes_cache_position``); newer
  releases' static layers count their columns on the device themselves and their ``forward`` takes none.

So the step (every backbone, then ``fused_guided_logits``) reads no tensor value on the host and can be captured
once in a CUDA graph and replayed per token: one launch for the whole step instead of hundreds of kernels from
Python. On CPU the same static step runs eagerly (the parity tests).

``compile_step``: each backbone's decode forward also goes through ``torch.compile`` (``fullgraph``, static
shapes, no CUDA graphs of its own: inductor fuses the layers' pointwise work, which a CUDA graph of eager kernels
still runs as separate kernels), as transformers' own fastest generate does for one model. The prompt stays
eager (its length varies). The first decode step compiles; a second eager step shows that nothing recompiles
before the graph is captured, so compiling never happens inside a capture. One compiled entry per batch size and
bucketed cache length (torch.compile's recompile limit bounds how many; past it torch runs that shape eagerly).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ._common import cache_kwarg, forward_parameters, position_ids_from_mask


logger = logging.getLogger("ivl_kernels.hf")
_LOGGED: set = set()


def _log_once(message: str, level: int = logging.INFO) -> None:
    """Say ``message`` on the ``ivl_kernels.hf`` logger the first time only (every module of the integration)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def forced_static_error(who: str, window_problem: str, compile_step: bool) -> ValueError:
    """The error for a static cache the caller forced (``cache_implementation="static"`` / ``compile_step=True``)
    that cannot hold the call (``static_window_fits``'s reason)."""
    return ValueError(f"{who}: a static cache cannot serve this call: {window_problem}. Use "
                      f"cache_implementation='dynamic'" + (" and compile_step=False" if compile_step else ""))


def _static_cache(model: nn.Module, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=int(max_len))


def takes_cache_position(backbone: nn.Module) -> bool:
    """Whether ``backbone.forward`` names ``cache_position`` (capability, read from its signature): then the runner
    gives it the columns it writes. Left out on such a release (transformers 4.5x), the model derives it from the
    cache's ``get_seq_length()``, which a ``StaticLayer`` there estimates by counting the non-zero key rows of batch
    row 0 (``keys[0, 0].any(-1).sum()``): a key that is zero there (a token whose embedding row is zero, e.g. the
    padding id's, under a bias-free ``k_proj``) makes it short, the first step overwrites a prompt column and every
    later step that same column (wrong tokens, no error; transformers' own generate always passes it). Releases
    whose ``forward`` has no ``cache_position`` count the columns in the layer."""
    return "cache_position" in forward_parameters(backbone)


def model_dtype(backbone: nn.Module) -> torch.dtype:
    for p in backbone.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# Static caches are sized in steps of this many columns, so calls of similar lengths share one set of runners
# and one captured graph (GuidedCausalLM keeps the last set): memory stays within a step of the request.
BUCKET = 64


def bucketed(columns: int) -> int:
    return -(-int(columns) // BUCKET) * BUCKET


def reuse_or_build(owner, attr: str, key, build: Callable[[], tuple]) -> tuple:
    """``(runners, decoder)`` kept on ``owner.<attr>`` as ``(key, runners, decoder)``: returned again while
    ``key`` matches (a captured graph is replayed, not captured again), else ``build()``, after dropping the
    previous set so only one set's caches are ever in memory."""
    kept = getattr(owner, attr, None)
    if kept is None or kept[0] != key:
        setattr(owner, attr, None)
        kept = (key, *build())
        setattr(owner, attr, kept)
    return kept[1], kept[2]


def static_supported(model: nn.Module) -> str:
    """``""`` when ``model`` can run on a ``StaticCache`` (transformers marks such models ``_can_compile_fullgraph``),
    else why not."""
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not declare static-cache support (_can_compile_fullgraph)"
    return ""


def static_window_fits(model: nn.Module, max_len: int) -> str:
    """``""`` when every layer of ``model``'s ``StaticCache`` of ``max_len`` columns holds all of them, else why
    not. A sliding-window layer keeps only its window's columns (a rolling buffer), while the decode step gives every
    layer one additive mask as wide as the cache: past the window the two disagree. Read from the cache's layers
    (capability, not a config field: transformers allocates them lazily, so building one costs no memory)."""
    try:
        layers = getattr(_static_cache(model, max_len), "layers", None) or ()
    except Exception as exc:  # a model transformers cannot give a StaticCache: say so, run the dynamic cache
        return f"transformers builds no StaticCache for {type(model).__name__} ({type(exc).__name__}: {exc})"
    short = min((int(getattr(layer, "max_cache_len", max_len)) for layer in layers), default=max_len)
    if short < max_len:
        return (f"{type(model).__name__} has attention layers with a sliding window of {short} tokens, fewer than "
                f"the {max_len} columns this call's static cache needs (prompt + max_new_tokens, in steps of "
                f"{BUCKET})")
    return ""


class StaticRunner:
    """One backbone over a ``StaticCache`` of ``max_len`` columns: ``prefill`` the prompt, then ``decode`` one
    token per row per step from the buffers ``ids`` / ``pos`` / ``bias`` (updated by ``advance``)."""

    def __init__(self, backbone: nn.Module, cache_owner: nn.Module, max_len: int, compiled: bool = False):
        self.backbone = backbone
        self.compiled = bool(compiled)
        # Static shapes: the decode step's are fixed per runner (batch size, cache columns).
        self._compiled = torch.compile(backbone, dynamic=False, fullgraph=True) if compiled else None
        self.cache = _static_cache(cache_owner, max_len)
        self.max_len = int(max_len)
        self.columns = 0                                  # columns written (host-side: known without a sync)
        self.bias: Optional[torch.Tensor] = None          # [B, 1, 1, max_len] additive mask, model dtype
        self.ids: Optional[torch.Tensor] = None           # [B, 1] long
        self.pos: Optional[torch.Tensor] = None           # [B, 1] long: position of the next token per row
        # [1] long: the cache column of the next token, for a forward that takes cache_position (else None).
        self.cache_pos: Optional[torch.Tensor] = None
        self._takes_cache_position = takes_cache_position(backbone)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [B, T]`` (left padding allowed): fill the cache, set up the decode buffers, return each
        row's final hidden state ``[B, H]``."""
        B, T = ids.shape
        if T >= self.max_len:
            raise ValueError(f"the prompt ({T} tokens) leaves no room in a static cache of {self.max_len} columns")
        if self.columns:
            # A runner reused by a later call (a captured graph holds its buffers' addresses): the cache is zeroed
            # in place and every buffer below is written in place, never reallocated.
            self.cache.reset()
        mask = mask.to(device=ids.device, dtype=torch.long)
        full = torch.zeros((B, self.max_len), dtype=torch.long, device=ids.device)
        full[:, :T] = mask
        kwargs = {cache_kwarg(self.backbone): self.cache}
        if self._takes_cache_position:
            kwargs["cache_position"] = torch.arange(T, device=ids.device)
        out = self.backbone(input_ids=ids, attention_mask=full, position_ids=position_ids_from_mask(mask),
                            use_cache=True, **kwargs)
        dtype = model_dtype(self.backbone)
        # Built in the model's dtype (a float32 intermediate cannot hold float64's minimum).
        bias = torch.zeros(full.shape, dtype=dtype, device=full.device).masked_fill_(
            ~full.bool(), torch.finfo(dtype).min)[:, None, None, :]
        pos = mask.sum(1, keepdim=True)
        if self.bias is not None and self.bias.shape == bias.shape and self.bias.dtype == bias.dtype:
            self.bias.copy_(bias)
            self.ids.zero_()
            self.pos.copy_(pos)
        else:
            self.bias = bias.contiguous()
            self.ids = torch.zeros((B, 1), dtype=torch.long, device=ids.device)
            self.pos = pos
        if self._takes_cache_position and (self.cache_pos is None or self.cache_pos.device != ids.device):
            self.cache_pos = torch.zeros((1,), dtype=torch.long, device=ids.device)
        self.columns = T
        return out.last_hidden_state[:, -1]

    def advance(self, ids: torch.Tensor) -> None:
        """Stage the next token ``ids [B, 1]``: its column becomes visible to every row (outside any graph)."""
        if self.columns >= self.max_len:
            raise RuntimeError(f"the static cache of {self.max_len} columns is full")
        self.ids.copy_(ids)
        self.bias[:, :, :, self.columns] = 0.0
        if self.cache_pos is not None:
            self.cache_pos.fill_(self.columns)  # a host int written to the device: no read

    def decode(self) -> torch.Tensor:
        """The captured part: one token per row from the buffers; ``[B, H]`` hidden states."""
        kwargs = dict(input_ids=self.ids, attention_mask=self.bias, position_ids=self.pos, use_cache=True,
                      **{cache_kwarg(self.backbone): self.cache})
        if self.cache_pos is not None:
            kwargs["cache_position"] = self.cache_pos
        if self._compiled is None:
            return self.backbone(**kwargs).last_hidden_state[:, -1]
        try:
            out = self._compiled(**kwargs)
        except Exception as exc:
            raise RuntimeError(f"the torch.compile'd decode step of {type(self.backbone).__name__} failed "
                               f"({type(exc).__name__}: {str(exc)[:500]}); pass compile_step=False to run it "
                               f"uncompiled") from exc
        return out.last_hidden_state[:, -1]

    def finish(self) -> None:
        """After a decode step (outside any graph): the staged column is written, positions move on."""
        self.columns += 1
        self.pos.add_(1)


class StaticDecoder:
    """The decoder interface of guided generation (as ``_value_state.DynamicDecoder``) over static caches:
    ``prefill(prompts)`` runs each runner's prompt eagerly; ``step(ids)`` runs the decode step (every runner's
    ``decode``, then ``combine``: it reads only the runners' buffers) eagerly, or captured in a CUDA graph after
    eager warm-up steps (one; two when a runner is compiled) and replayed from then on. Both return
    ``combine(hidden_states)``. Inference only: the steps run without autograd."""

    reuses_outputs = True  # a replayed graph writes its outputs into the same buffers each step

    def __init__(self, runners: Sequence[StaticRunner], combine: Callable[[List[torch.Tensor]], object],
                 use_graph: bool, graph_required: bool = False):
        self.runners = list(runners)
        self.combine = combine
        self.use_graph = use_graph
        self.graph_required = graph_required
        self.graph = None
        self.outputs = None
        self.steps = 0
        self.warmup = 2 if any(r.compiled for r in self.runners) else 1

    def step_fn(self):
        return self.combine([r.decode() for r in self.runners])

    def prefill(self, prompts: Sequence[tuple]):
        """``prompts[i] = (ids [B, T_i], mask [B, T_i])``: runner ``i``'s prompt (left padding allowed)."""
        return self.combine([r.prefill(ids, mask) for r, (ids, mask) in zip(self.runners, prompts)])

    @torch.no_grad()
    def step(self, translated_ids: List[torch.Tensor]):
        """``translated_ids[i] [B, 1]``: the new token in runner ``i``'s vocabulary. Returns ``combine``'s
        outputs (graph-owned buffers when captured: consume or clone them before the next step)."""
        for runner, ids in zip(self.runners, translated_ids):
            runner.advance(ids)
        if not self.use_graph:
            out = self.step_fn()
        elif self.graph is None and self.steps < self.warmup:
            # Warm-up on a side stream (allocator and library handles settle, torch.compile compiles, before
            # capture), a real step.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(self.graph):
                        self.outputs = self.step_fn()
                except Exception as exc:
                    self.graph = None
                    if self.graph_required:
                        raise RuntimeError(f"capturing the static decode step in a CUDA graph failed "
                                           f"({type(exc).__name__}: {exc}); pass cuda_graph=False to run the static "
                                           f"cache without a graph") from exc
                    # The default fast path: say why once, then run this step and the rest without a graph.
                    _log_once(f"capturing the decode step in a CUDA graph failed ({type(exc).__name__}: {exc}); "
                              f"running the static cache without a graph")
                    self.use_graph = False
            if self.graph is not None:
                self.graph.replay()
                out = self.outputs
            else:
                out = self.step_fn()
        for runner in self.runners:
            runner.finish()
        self.steps += 1
        return out

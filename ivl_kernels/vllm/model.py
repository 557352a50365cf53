"""``IVLGuidedForCausalLM``: the vLLM model of a guided checkpoint (imports vLLM; registered by the plugin).

Each model (the base, then every guidance term) is vLLM's own model class for its architecture, built with
``init_vllm_registered_model`` under its own prefix (``base.``, ``term_a.``, ``term_b.``, ...), so its attention
layers own their slots in vLLM's paged KV cache and follow its scheduler (chunked prefill, prefix caching,
preemption). All models read the same token stream at the same positions: a term reads the base ids translated
into its own ids (its map, else the identity; ids it has no row for read its pad id) before its embedding.

``forward`` returns every model's final hidden states side by side, ``[T, Hb + Hv_0 + ...]``; vLLM selects the
rows it samples from and ``compute_logits`` turns them into the guided logits with ``fused_guided_logits``: the
base LM head fused with the first term, further terms added in place, ids ``>= suppress_from`` set to ``-inf``.
vLLM's sampler, its sampling parameters and returned logprobs then act on the guided distribution.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Set, Tuple

import torch
from torch import nn

from ..guidance import BaseToValueIds, TermHead, guided_logits, head_problem, suppress_ids_
from ..ops.packed_heads import install_parameter, pack_head_weights
from . import _per_request
from ._plan import check_guided_config


def term_attr(i: int) -> str:
    """``term_a``, ``term_b``, ..., ``term_z``, ``term_ba``, ...: a name with no digit for term ``i``."""
    letters = ""
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i //= 26
        if i == 0:
            return "term_" + letters


def _head(sub: nn.Module, role: str):
    head = getattr(sub, "lm_head", None)
    problem = head_problem(head)
    if problem is not None:
        raise ValueError(f"the {role} model ({type(sub).__name__}): {problem}, which the fused guided head cannot "
                         f"apply")
    lp = getattr(sub, "logits_processor", None)
    if lp is not None and (float(getattr(lp, "scale", 1.0)) != 1.0 or getattr(lp, "soft_cap", None) is not None):
        raise ValueError(f"the {role} model scales or soft-caps its logits, which the fused guided head does not apply")
    return head


class IVLGuidedForCausalLM(nn.Module):
    """A base model plus guidance terms, served by vLLM: ``logits = base + sum_i alpha_i * remap_i(term_i)``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        plan = check_guided_config(vllm_config)
        self.plan = plan
        self._load_config = vllm_config.load_config
        self.last_rows: Optional[torch.Tensor] = None  # compute_logits' last input (read by _per_request)
        _per_request.register_model(self, vllm_config)
        self.base = init_vllm_registered_model(vllm_config, hf_config=plan.base.hf_config,
                                               prefix=maybe_prefix(prefix, "base"))
        # Sub-models are attributes named without digits (term_a, term_b, ...): vLLM reads the layer index as the
        # one integer in an attention layer's name.
        self.term_names = [term_attr(i) for i in range(len(plan.terms))]
        for name, t in zip(self.term_names, plan.terms):
            setattr(self, name, init_vllm_registered_model(vllm_config, hf_config=t.hf_config,
                                                           prefix=maybe_prefix(prefix, name)))
        self._check_heads()
        self.vocab_size = plan.base.vocab_size
        self.hidden_sizes = [int(h.weight.shape[1]) for h in self._heads]
        self.alphas = [t.alpha for t in plan.terms]
        self.fill = plan.fill
        self.suppress_from = plan.suppress_from
        self.backend = "auto"
        self.packed_heads = False  # set by load_weights (_pack_heads)
        Vb = self.vocab_size
        base_head = self._heads[0]
        device = base_head.weight.device
        # Tensor parallelism: this rank owns base ids [lo, hi) of the vocabulary-sharded base head (all of them
        # with one rank); the guided logits are computed for those ids only, then gathered once.
        from vllm.distributed import get_tensor_model_parallel_world_size

        self.tp = get_tensor_model_parallel_world_size()
        si = getattr(base_head, "shard_indices", None)
        self.lo, self.hi = (0, Vb) if si is None or self.tp == 1 else (si.org_vocab_start_index,
                                                                     si.org_vocab_end_index)
        self.local_rows = int(base_head.weight.shape[0])
        self._full_heads = [None] * len(plan.terms)  # TP > 1: each term's whole head, gathered once
        base_ids = torch.arange(Vb, device=device)
        for i, t in enumerate(plan.terms):
            vmap = None if t.vocab_map is None else t.vocab_map.to(device)
            # Base id -> the id this model reads: every base id gets an id inside its embedding.
            ids_in = BaseToValueIds(vmap, t.vocab_size, t.fallback_id).table(Vb, device)
            self.register_buffer(f"_input_ids_{i}", ids_in, persistent=False)
            if self.tp > 1:  # the slice of the map for this rank's base ids (identity: -1 past the term's vocabulary)
                full = vmap if vmap is not None else torch.where(base_ids < t.vocab_size, base_ids, -1).to(torch.int32)
                vmap = full[self.lo:self.hi].contiguous()
            self.register_buffer(f"_map_{i}", vmap, persistent=False)

    @property
    def terms(self):
        return [getattr(self, n) for n in self.term_names]

    def _check_heads(self) -> None:
        """Every model's LM head as the fused head reads it (``self._heads``: base, then terms), checked in
        ``__init__`` and again at the end of ``load_weights``: vLLM's Transformers backend registers an LM head's
        bias only while loading weights, which the fused head would silently drop. ``ValueError`` (the engine
        does not start) rather than other logits than the checkpoint's models give."""
        subs = [(self.base, "base")] + [(m, t.role) for m, t in zip(self.terms, self.plan.terms)]
        self._heads = [_head(sub, role) for sub, role in subs]

    # ---- vLLM's model interface ----------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("IVLGuidedForCausalLM embeds each model's own ids inside forward(); input "
                                  "embeddings (prompt embeds, multimodal inputs) are not supported")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("IVLGuidedForCausalLM reads token ids, not input embeddings")
        hs = [self.base(input_ids, positions)]
        for i, term in enumerate(self.terms):
            hs.append(term(getattr(self, f"_input_ids_{i}")[input_ids], positions))
        return torch.cat(hs, dim=-1)

    def _term_weight(self, i: int) -> torch.Tensor:
        """Term ``i``'s LM head ``[Vv, Hv]``: its weight with one rank; with TP its vocabulary shards gathered once
        (the base ids of this rank may read any of its rows through the map)."""
        head, size = self._heads[i + 1], self.plan.terms[i].vocab_size
        if self.tp == 1:
            return head.weight[:size]
        if self._full_heads[i] is None:
            from vllm.distributed import tensor_model_parallel_all_gather

            self._full_heads[i] = tensor_model_parallel_all_gather(head.weight.data.contiguous(), dim=0)[:size]
        return self._full_heads[i]

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        # Per-request alpha: vLLM's logits processor (_per_request) corrects these rows' logits from them.
        self.last_rows = hidden_states
        parts = torch.split(hidden_states, self.hidden_sizes, dim=-1)
        n = self.hi - self.lo
        base_w = self._heads[0].weight[:n]
        heads = [TermHead(self._term_weight(i), getattr(self, f"_map_{i}"), self.alphas[i])
                 for i in range(len(self.alphas))]
        out = guided_logits(parts[0], base_w, parts[1:], heads, fill=self.fill, backend=self.backend)
        if self.tp > 1:
            # One gather of the [M, Vb / tp] shards, as vLLM does for the base alone (None on ranks that get none).
            shard = out.new_full((out.shape[0], self.local_rows), float("-inf"))
            shard[:, :n] = out
            out = self.base.logits_processor._gather_logits(shard)
            if out is None:
                return None
            out = out[:, : self.vocab_size]
        return suppress_ids_(out, self.suppress_from)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """Each model loads its own checkpoint (the directory or hub id its reference resolves to) through vLLM's
        default loader and its own ``load_weights``. ``weights`` (the guided directory's, which holds none) is
        not read."""
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        loader = DefaultModelLoader(self._load_config)
        loaded: Set[str] = set()
        subs = [("base", self.base, self.plan.base)] + list(zip(self.term_names, self.terms, self.plan.terms))
        for name, sub, plan in subs:
            source = DefaultModelLoader.Source(
                plan.ref, revision=None, prefix="",
                fall_back_to_pt=getattr(sub, "fall_back_to_pt_during_load", True),
                allow_patterns_overrides=getattr(sub, "allow_patterns_overrides", None))
            got = sub.load_weights(loader._get_weights_iterator(source))
            if got is None:  # a model that does not track its loaded names: count all of its parameters
                got = {n for n, _ in sub.named_parameters()}
            loaded |= {f"{name}.{n}" for n in got}
        self._check_heads()  # before the heads are gathered or packed
        for i in range(len(self._full_heads)):  # TP: gather the terms' heads now, on every rank
            self._full_heads[i] = None
            if self.tp > 1:
                self._term_weight(i)
        self.packed_heads = self._pack_heads()
        return loaded

    def _pack_heads(self) -> bool:
        """The base head and the first term's head become views of one buffer (``ops.packed_heads``), installed
        wherever their parameters were (a tied input embedding included), so that ``compute_logits`` runs both
        heads as one GEMM from ``GEMM_MIN_ROWS`` rows (batches of concurrent requests, prompt logprobs): the
        hidden states are already side by side (``forward``), so with alpha 1 nothing is copied per call. Where
        it applies: one rank, the first term without a map, both heads plain tensors of one dtype and device.
        ``IVL_KERNELS_VLLM_PACK_HEADS``: ``auto`` (default: on CUDA devices, where the GEMM is cuBLAS's; on a
        CPU the torch backend runs the heads as two GEMMs either way, and strided heads read a little slower),
        ``1`` wherever it applies, ``0`` never. The buffer replaces the two heads (no lasting extra memory); the
        same logits up to the GEMM's accumulation order."""
        mode = os.environ.get("IVL_KERNELS_VLLM_PACK_HEADS", "auto").strip().lower() or "auto"
        if mode not in ("auto", "0", "1"):
            raise ValueError(f"IVL_KERNELS_VLLM_PACK_HEADS must be one of auto, 0, 1; got {mode!r}")
        if mode == "0" or self.tp != 1 or not self.plan.terms or self.plan.terms[0].vocab_map is not None:
            return False
        old_b, old_v = self._heads[0].weight, self._heads[1].weight
        if (type(old_b) not in (torch.Tensor, nn.Parameter) or type(old_v) not in (torch.Tensor, nn.Parameter)
                or old_b is old_v or old_b.dtype != old_v.dtype or old_b.device != old_v.device):
            return False
        if mode == "auto" and old_b.device.type != "cuda":
            return False
        views = pack_head_weights(old_b.detach(), old_v.detach())
        for sub, old, view in ((self.base, old_b, views[0]), (self.terms[0], old_v, views[1])):
            param = nn.Parameter(view, requires_grad=False)
            param.__dict__.update(old.__dict__)  # vLLM's attributes (weight_loader, ...): a reload writes the view
            install_parameter(sub, old, param)
        return True


def worker_info(worker) -> dict:
    """What one vLLM worker built, for ``llm.collective_rpc(worker_info)`` (needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``): the base ids its guided logits cover, the tensor-parallel size,
    the terms' alphas, whether the heads are packed."""
    model = worker.model_runner.model
    return {"lo": model.lo, "hi": model.hi, "tp": model.tp, "alphas": list(model.alphas),
            "vocab_size": model.vocab_size, "packed_heads": model.packed_heads}

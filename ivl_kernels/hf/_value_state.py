"""Incremental runner of one model (the base or a guidance model) over a batch, with its own dynamic KV cache,
and ``DynamicDecoder``: the runners of every model behind the decoder interface ``StaticDecoder`` implements too.

The cache holds one column per fed token; a ``[B, L]`` 0/1 mask says which columns each row may attend to.
Rows may receive different numbers of new tokens in one step (re-tokenised text grows unevenly): the new chunk
is right-aligned per row with masked holes before, so every row's newest token sits in the chunk's last column
and its final hidden state is ``last_hidden_state[:, -1]``. A row whose tail changed (re-tokenisation merged the
last tokens differently) masks its stale columns out; columns stale in every row are cropped from the cache.
Positions count each row's real tokens only, so holes and left padding never shift them.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._common import cache_kwarg, output_cache, position_ids_from_mask


def _dynamic_cache(model: nn.Module):
    from transformers import DynamicCache

    cfg = getattr(model, "config", None)
    try:
        return DynamicCache(config=cfg) if cfg is not None else DynamicCache()
    except TypeError:  # older signatures
        return DynamicCache()


class DynamicRunner:
    """Feeds tokens to ``backbone`` (any causal LM's backbone: the base or a guidance model; returns final hidden
    states) incrementally over a transformers ``DynamicCache``; see the module docstring."""

    def __init__(self, backbone: nn.Module, pad_id: int = 0):
        self.backbone = backbone
        self.pad_id = int(pad_id)
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self._buf: Optional[torch.Tensor] = None         # [B, capacity] long: the cache columns' mask, grown ahead
        self._len = 0                                    # columns in use
        self._count: Optional[torch.Tensor] = None       # [B] long: valid columns per row = next position
        self.tokens: Optional[List[List[int]]] = None   # per row, the tokens in the cache (re-tokenising path)
        self.cols: Optional[List[List[int]]] = None     # per row, their cache columns
        self.last_hidden: Optional[torch.Tensor] = None  # [B, H]

    @property
    def started(self) -> bool:
        return self.cache is not None

    @property
    def mask(self) -> Optional[torch.Tensor]:
        """``[B, L]`` long view: 1 = cache column valid for that row."""
        return None if self._buf is None else self._buf[:, : self._len]

    def _reserve(self, k: int) -> None:
        # Grown geometrically: a decode step writes one column into spare room instead of concatenating the whole
        # mask (an allocation and a copy of every column, each step).
        if self._len + k > self._buf.shape[1]:
            buf = self._buf.new_zeros((self._buf.shape[0], max(2 * self._buf.shape[1], self._len + k + 64)))
            buf[:, : self._len] = self._buf[:, : self._len]
            self._buf = buf

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, mask: torch.Tensor, every_row_fed: bool = False) -> torch.Tensor:
        """Append ``ids [B, k]`` (``mask [B, k]``: 1 = real token, 0 = hole); return ``[B, H]``, each row's final
        hidden state after its newest real token (rows whose chunk is all holes keep their previous one;
        ``every_row_fed=True``: the caller knows every row's last column is a real token, as in a decode step).

        No host sync: positions run on from a per-row count kept on the device, the mask grows in place, and
        rows without a new token are selected on the device."""
        B, k = ids.shape
        if self.cache is None:
            self.cache = _dynamic_cache(self.backbone)
            self._buf = mask.new_zeros((B, k + 64), dtype=torch.long)
            self._len = 0
            self._count = mask.new_zeros((B,), dtype=torch.long)
        self._reserve(k)
        mask = mask.to(torch.long)
        self._buf[:, self._len: self._len + k] = mask
        full_mask = self._buf[:, : self._len + k]
        # A row's next position is its count of valid columns (columns masked out by a rollback do not count).
        pos = position_ids_from_mask(mask, offset=self._count)
        out = self.backbone(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                            **{cache_kwarg(self.backbone): self.cache})
        self.cache = output_cache(out, self.cache)
        hidden = out.last_hidden_state[:, -1]
        if self.last_hidden is not None and not every_row_fed:
            hidden = torch.where(mask[:, -1:].bool(), hidden, self.last_hidden)
        self._len += k
        self._count = self._count + mask.sum(1)
        self.last_hidden = hidden
        return hidden

    # ---- re-tokenising path: per-row token lists, longest-common-prefix reuse ------------------------------
    @torch.no_grad()
    def sync(self, sequences: Sequence[Sequence[int]], device) -> torch.Tensor:
        """Make the cache hold exactly ``sequences[r]`` for each row ``r`` (value-token ids), reusing the
        longest common prefix with what it holds; return the ``[B, H]`` final hidden states."""
        B = len(sequences)
        if self.tokens is None:
            self.tokens = [[] for _ in range(B)]
            self.cols = [[] for _ in range(B)]
        if any(len(s) == 0 for s in sequences):
            raise ValueError("the value tokenizer produced no token for a row: give the value tokenizer a BOS "
                             "token, or start prompts with text")
        new_parts = []
        invalid = []
        for r, seq in enumerate(sequences):
            old = self.tokens[r]
            n = min(len(old), len(seq))
            lcp = 0
            while lcp < n and old[lcp] == seq[lcp]:
                lcp += 1
            if lcp == len(old) == len(seq):
                new_parts.append([])  # unchanged (e.g. a base token that decodes to half a UTF-8 character)
                continue
            # Re-feed at least the last token so its hidden state is recomputed in the new context.
            lcp = min(lcp, len(seq) - 1)
            invalid.append((r, self.cols[r][lcp:]))
            del self.tokens[r][lcp:], self.cols[r][lcp:]
            new_parts.append(list(seq[lcp:]))
        if self._buf is not None:
            mask = self.mask
            for r, cols in invalid:
                if cols:
                    mask[r, cols] = 0
            # Columns that no row uses any more at the end of the cache: crop them (the common suffix).
            valid_any = mask.any(0)
            keep = int(valid_any.nonzero().max()) + 1 if bool(valid_any.any()) else 0
            drop = self._len - keep
            if drop > 0:
                self.cache.crop(-drop)
                self._buf[:, keep: self._len] = 0
                self._len = keep
            self._count = self.mask.sum(1)
        k = max(len(p) for p in new_parts)
        if k == 0:
            return self.last_hidden
        ids = torch.full((B, k), self.pad_id, dtype=torch.long)
        chunk_mask = torch.zeros((B, k), dtype=torch.long)
        L0 = self._len
        for r, part in enumerate(new_parts):
            if part:
                ids[r, k - len(part):] = torch.tensor(part, dtype=torch.long)
                chunk_mask[r, k - len(part):] = 1
                self.tokens[r].extend(part)
                self.cols[r].extend(range(L0 + k - len(part), L0 + k))
        return self.feed(ids.to(device), chunk_mask.to(device))


class DynamicDecoder:
    """The decoder interface of guided generation over dynamic caches: one ``DynamicRunner`` per model.

    ``prefill(prompts)`` reads each model's prompt (``prompts[i] = (ids [B, T_i], mask [B, T_i])``, left padding
    allowed); ``step(ids)`` feeds each model one new token per row (``ids[i] [B, 1]``, in model ``i``'s
    vocabulary). Both return ``combine(hidden_states)``, ``hidden_states[i] [B, H_i]`` being model ``i``'s final
    hidden state. ``StaticDecoder`` (``_static``) is the same interface over static caches and a CUDA graph."""

    reuses_outputs = False  # every call returns new tensors

    def __init__(self, backbones: Sequence[nn.Module], combine: Callable[[List[torch.Tensor]], object]):
        self.runners = [DynamicRunner(bb) for bb in backbones]
        self.combine = combine

    def prefill(self, prompts: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
        return self.combine([r.feed(ids, mask) for r, (ids, mask) in zip(self.runners, prompts)])

    def step(self, ids: Sequence[torch.Tensor]):
        if getattr(self, "_ones", None) is None or self._ones.shape != ids[0].shape:
            self._ones = torch.ones_like(ids[0])
        ones = self._ones
        return self.combine([r.feed(i, ones, every_row_fed=True) for r, i in zip(self.runners, ids)])

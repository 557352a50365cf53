"""Helpers of the vLLM tests (a module name of its own: this directory has no __init__.py, so that nothing here
is ever imported as ``vllm``)."""

from __future__ import annotations

import gc

# Engine arguments shared by the tests: fp32 as GuidedCausalLM's reference, small blocks and a small token budget
# so the prompts below are prefilled in chunks and share cached prefix blocks.
ENGINE = dict(dtype="float32", max_model_len=256, seed=0, enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=32, max_num_seqs=8, block_size=32)


def prompts(lengths, seed=5, prefix=None, vocab=300):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
    return [list(prefix) + r for r in rows] if prefix else rows


def reference(checkpoint, rows, new_tokens):
    """GuidedCausalLM's greedy tokens and float32 guided logits per step for unpadded prompts (one batch, left
    padded)."""
    import torch

    from ivl_kernels.hf import GuidedCausalLM
    from tests.hf._models import left_pad

    lm = GuidedCausalLM.from_pretrained(checkpoint, backend="torch")
    ids, mask = left_pad([torch.tensor(r) for r in rows])
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, return_dict_in_generate=True,
                      output_logits=True)
    tokens = out.sequences[:, ids.shape[1]:].tolist()
    logits = torch.stack(out.logits, dim=1)  # [B, new, V]
    return tokens, logits


def shutdown(llm):
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()

"""Shared pieces of the 2-process CPU (gloo) tests of ``IVLForCausalLM`` under DDP, FSDP2 and DeepSpeed ZeRO-3.

Every rank builds the same seeded tiny models, computes the single-process reference (loss of its own batch, and
the value network's gradients averaged over both ranks' batches, which is what data parallelism computes), then
wraps copies of the models and checks the distributed loss and gradients against it.
"""

from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist

WORLD = 2
BASE_VOCAB, VALUE_VOCAB = 300, 256
RTOL = 1e-5  # fp32, relative (loss; gradients in norm per parameter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def make_value(seed=1, tie=True, lora=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VALUE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    if lora:
        import peft

        # init_lora_weights=False: B is random too, so every LoRA matrix gets a nonzero gradient.
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model


def random_map(seed=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, VALUE_VOCAB, (BASE_VOCAB,), generator=g)
    m[torch.rand(BASE_VOCAB, generator=g) < 0.2] = -1
    return m.to(torch.int32)


def batch(r: int):
    """Rank ``r``'s batch: ``ids, mask, labels [2, 10]``, left-padded, one explicitly ignored label."""
    g = torch.Generator().manual_seed(100 + r)
    lengths = [(10, 6), (7, 10)][r]
    T = max(lengths)
    ids = torch.zeros((len(lengths), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(2, BASE_VOCAB, (n,), generator=g)
        mask[i, T - n:] = 1
    labels = ids.clone()
    labels[0, -3] = -100
    return ids, mask, labels


def ivl_kwargs(case):
    kw = dict(alpha=case.get("alpha", 1.0), backend=case.get("backend", "torch"))
    if case.get("map"):
        kw["vocab_map"] = random_map()
    if "l1_reduction" in case:
        kw["l1_reduction"] = case["l1_reduction"]
    return kw


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 parameters and gradients) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reference(base, value, case):
    """Single process, unwrapped copies: ``(losses [per rank batch], mean value grads {name: tensor},
    logits of batch 0 without labels)``."""
    from ivl_kernels.hf import IVLForCausalLM

    model = IVLForCausalLM(copy.deepcopy(base), copy.deepcopy(value), **ivl_kwargs(case))
    model.train()
    losses, grads = [], {}
    for r in range(WORLD):
        ids, mask, labels = batch(r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    for n, p in model.value_model.named_parameters():
        if p.requires_grad:
            grads[n] = p.grad.detach() / WORLD
    ids, mask, _ = batch(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return losses, grads, logits


def check_close(name, got, want):
    err = (got - want).norm().item()
    scale = want.norm().item()
    if not err <= RTOL * scale + 1e-9:
        raise AssertionError(f"{name}: |got - want| = {err:.3g}, |want| = {scale:.3g} "
                             f"(relative {err / max(scale, 1e-30):.3g})")


def check_grads(named_params, want: dict, where: str):
    got = {n: p for n, p in named_params if p.requires_grad}
    assert set(got) == set(want), f"{where}: trainable parameters differ: {sorted(set(got) ^ set(want))}"
    for n, p in got.items():
        assert p.grad is not None, f"{where}: {n} got no gradient"
        check_close(f"{where} grad {n}", full(p.grad), want[n])


def init(rank: int, init_method: str):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)


def finish(out_dir: str, rank: int):
    with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
        f.write("ok")
    dist.barrier()
    dist.destroy_process_group()
    # Skip C++ static destructors (see tests/ops/test_guided_cross_entropy_distributed.py): a worker that ran
    # Triton's interpreter next to gloo can abort at interpreter shutdown after its work is done.
    os._exit(0)

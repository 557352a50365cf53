"""``ivl-kernels demo``: Inverse Value Learning end to end on toy models, on CPU, in about a minute.

1. Two small frozen "base" models (random-init Llama, different sizes, same vocabulary) are briefly pretrained
   on a related task, COPY (``<s> 3 1 4 1 | 3 1 4 1 </s>``): they know the format but not the target task.
2. A small value network (Qwen2 architecture, h64 x 3) is trained with ``IVLForCausalLM`` on the target task,
   REVERSE (``<s> 3 1 4 1 | 1 4 1 3 </s>``), on top of the frozen first base: the loss is the fused guided
   cross-entropy of ``base_logits + value_logits``.
3. Greedy exact-match accuracy on held-out sequences: base alone vs guided (``GuidedCausalLM``), then the SAME
   value network attached to the second, differently sized base.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4
VOCAB = 16  # 4 specials + 10 digits, rounded up
HONEST = ("This shows the mechanics of IVL training and of attaching a trained value network to another base, "
          "on toy models and a toy task; it says nothing about quality on real language models.")


def _batch(n: int, length: int, task: str, g: torch.Generator) -> torch.Tensor:
    """``[n, 2 * length + 3]`` sequences ``<s> digits | answer </s>``."""
    d = torch.randint(0, 10, (n, length), generator=g) + DIGIT0
    ans = d.flip(1) if task == "reverse" else d
    col = lambda v: torch.full((n, 1), v, dtype=torch.long)  # noqa: E731
    return torch.cat([col(BOS), d, col(SEP), ans, col(EOS)], dim=1)


def _labels(seqs: torch.Tensor, length: int) -> torch.Tensor:
    """Train on the answer and EOS only (the prompt digits are random: nothing to learn there)."""
    labels = seqs.clone()
    labels[:, : length + 2] = -100
    return labels


MAX_POSITIONS = 64
MAX_LENGTH = (MAX_POSITIONS - 3) // 2  # <s> digits | answer </s>


def _llama(hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False))


def _qwen(hidden: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True))


def _pretrain(model, steps, length, g, lr, desc, tqdm, batch):
    """Plain causal-LM training on COPY: the weak base."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=0.5):
        seqs = _batch(batch, length, "copy", g)
        loss = model(input_ids=seqs, labels=_labels(seqs, length)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def _accuracy(generate, test: torch.Tensor, length: int) -> float:
    prompts = test[:, : length + 2]
    out = generate(prompts)
    pred = out[:, length + 2: 2 * length + 2]
    return (pred == test[:, length + 2: 2 * length + 2]).all(1).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ivl-kernels demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="value-network training steps (default 700, quick 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length", type=int, default=None, help="digits per sequence (default 4, quick 3)")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 15 s) for tests")
    args = p.parse_args(argv)
    # Before any work (pre-training takes most of a minute): sequences are 2 * length + 3 tokens within the tiny
    # models' 64 positions, and the run reports the last training step's loss.
    if args.length is not None and not 1 <= args.length <= MAX_LENGTH:
        p.error(f"--length must be an int in [1, {MAX_LENGTH}] (digits per sequence), got {args.length}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be an int >= 1 (value-network training steps), got {args.steps}")

    from tqdm.auto import tqdm

    from . import GuidedCausalLM, IVLForCausalLM

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    g = torch.Generator().manual_seed(args.seed)
    L = args.length or (3 if args.quick else 4)
    pre_steps = 25 if args.quick else 100
    steps = args.steps if args.steps is not None else (80 if args.quick else 700)
    n_test = 100 if args.quick else 400
    batch = 32 if args.quick else 64

    print(f"Task: REVERSE {L} digits after a separator. Bases are pretrained on COPY only ({pre_steps} steps).")
    base_a = _pretrain(_llama(48, 2, args.seed + 1), pre_steps, L, g, 3e-3, "pretrain base A (Llama h48 x2)", tqdm, batch)
    base_b = _pretrain(_llama(64, 3, args.seed + 2), pre_steps, L, g, 3e-3, "pretrain base B (Llama h64 x3)", tqdm, batch)
    value = _qwen(64, 3, args.seed + 3)

    model = IVLForCausalLM(base_a, value, alpha=1.0, l1_coef=0.0)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    # Warm-up, cosine decay and clipping: with a constant 1e-2 and a 2-layer h32 value network the run ended
    # anywhere from 3 % to 92 % guided accuracy with the seed; this recipe ended at 92-100 % on 10 of 10 seeds.
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    curve = []
    bar = tqdm(range(steps), desc="IVL value training (base A frozen)", mininterval=0.5)
    for step in bar:
        seqs = _batch(batch, L, "reverse", g)
        loss = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), labels=_labels(seqs, L)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    value.eval()
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    print("loss curve: " + "  ".join(f"step {i}: {curve[i]:.3f}" for i in marks))

    test = _batch(n_test, L, "reverse", torch.Generator().manual_seed(10_000 + args.seed))
    gen_kw = dict(max_new_tokens=L + 1, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)

    def base_only(base):
        return lambda x: base.generate(x, attention_mask=torch.ones_like(x), **gen_kw)

    def guided(base):
        lm = GuidedCausalLM(base, value, alpha=1.0)
        return lambda x: lm.generate(x, attention_mask=torch.ones_like(x), **gen_kw)

    acc = {
        "base A alone": _accuracy(base_only(base_a), test, L),
        "base A + value (guided)": _accuracy(guided(base_a), test, L),
        "base B alone": _accuracy(base_only(base_b), test, L),
        "base B + same value (transfer)": _accuracy(guided(base_b), test, L),
    }
    print(f"exact-match accuracy on {n_test} held-out REVERSE sequences (greedy):")
    for k, v in acc.items():
        print(f"  {k:32s} {100 * v:5.1f} %")
    print(HONEST)
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Guided generation throughput, side by side in one run (tokens per second, generated tokens only).

    guided-lm        GuidedCausalLM.generate: both backbones with KV caches, one fused head call per step
    processor        base.generate(logits_processor=[IVLLogitsProcessor]): value backbone cached, fused in place
    ivl-reference    the IVL paper's inference: batch 1 per prompt, both full models recompute the whole
                     sequence every step (no KV cache), argmax(base + value)
    floor            the two models' own cached generate(): base.generate + value.generate (unguided)

Targets (README): guided >= 5x the reference loop; guided <= 1.3x the floor. Times are measured, never asserted.
Usage: python benchmarks/bench_generate.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _models(device, dtype, big):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if big:  # GPU: something closer to a real pair (still random weights)
        b = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4)
        v = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2)
    else:
        b = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)
        v = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    common = dict(max_position_embeddings=1024, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    base = LlamaForCausalLM(LlamaConfig(**b, **common)).to(device, dtype).eval()
    value = Qwen2ForCausalLM(Qwen2Config(**v, **common, tie_word_embeddings=True)).to(device, dtype).eval()
    return base, value


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def _reference(base, value, prompts, new):
    """IVL's reference inference: one prompt at a time, full recompute of both models every step."""
    for p in prompts:
        ids = p[None]
        for _ in range(new):
            z = base(ids, use_cache=False).logits[:, -1].float()
            z[:, : value.config.vocab_size] += value(ids, use_cache=False).logits[:, -1].float()
            ids = torch.cat([ids, z.argmax(-1, keepdim=True)], dim=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import transformers

    from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new = 16 if args.quick else args.new
    repeats = 1 if args.quick else args.repeats
    base, value = _models(device, dtype, big=device.type == "cuda")
    torch.manual_seed(1)
    ids = torch.randint(2, base.config.vocab_size, (args.batch, args.prompt_len), device=device)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    guided = GuidedCausalLM(base, value, alpha=1.0)

    def run_processor():
        proc = IVLLogitsProcessor(value, alpha=1.0, attention_mask=mask)
        base.generate(ids, attention_mask=mask, logits_processor=[proc], **gen)

    def run_floor():
        base.generate(ids, attention_mask=mask, **gen)
        value.generate(ids, attention_mask=mask, **gen)

    ref_new = max(4, new // 4) if device.type == "cpu" else new  # the reference is slow: time fewer steps
    rows = []
    for name, fn, tokens in [
        ("guided-lm", lambda: guided.generate(ids, attention_mask=mask, max_new_tokens=new), args.batch * new),
        ("processor", run_processor, args.batch * new),
        ("floor (base.generate + value.generate)", run_floor, args.batch * new),
        ("ivl-reference (no cache, batch 1)", lambda: _reference(base, value, list(ids), ref_new), args.batch * ref_new),
    ]:
        t = _time(fn, device, repeats)
        rows.append((name, tokens / t, t, tokens))

    tps = {r[0]: r[1] for r in rows}
    floor_t = rows[2][2] / rows[2][3]
    ref = tps["ivl-reference (no cache, batch 1)"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({dev_name}), threads {torch.get_num_threads()}, dtype {dtype}")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"workload: batch {args.batch}, prompt {args.prompt_len}, new {new} tokens; base {base.config.hidden_size}x"
          f"{base.config.num_hidden_layers} V{base.config.vocab_size}, value {value.config.hidden_size}x"
          f"{value.config.num_hidden_layers} V{value.config.vocab_size}")
    print(f"{'method':42s} {'tokens/s':>10s} {'vs reference':>13s} {'time / floor':>13s}")
    for name, tp, t, tok in rows:
        print(f"{name:42s} {tp:10.1f} {tp / ref:12.2f}x {(t / tok) / floor_t:12.2f}x")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"generate_{device.type}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "tokens_per_s", "seconds", "tokens", "speedup_vs_reference", "time_vs_floor", "device",
                    "torch", "transformers"])
        for name, tp, t, tok in rows:
            w.writerow([name, f"{tp:.2f}", f"{t:.4f}", tok, f"{tp / ref:.3f}", f"{(t / tok) / floor_t:.3f}", dev_name,
                        torch.__version__, transformers.__version__])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([r[0] for r in rows], [r[1] for r in rows], color=["C0", "C1", "C2", "C3"])
        ax.set_xlabel("generated tokens / s")
        ax.set_title(f"guided generation, {dev_name}, batch {args.batch}")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {stem}.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

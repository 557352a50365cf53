"""Guided generation throughput, side by side in one run (tokens per second, generated tokens only).

    guided-lm        GuidedCausalLM.generate, the default call (on CUDA: static caches and a captured decode step;
                     on CPU: dynamic caches)
    guided-dynamic   the same with cache_implementation="dynamic": both backbones with DynamicCaches, one fused
                     head call per step, launched from Python
    guided-static    cache_implementation="static": StaticCache per model, the decode step (both backbones + the
                     fused head) captured in a CUDA graph and replayed (eager on CPU)
    base-generate    base.generate alone (no guidance), transformers' default
    base-static      base.generate(cache_implementation="static") alone: transformers' fastest path (on CUDA it
                     compiles the decode step)
    processor        base.generate(logits_processor=[IVLLogitsProcessor]): value backbone cached (on CUDA by default a
                     static cache and a captured decode step), fused in place
    processor-dynamic  the same with the processor's cache_implementation="dynamic"
    floor            DESIGN's floor: the two models' own forward passes alone (each with its KV cache and its LM
                     head on the last position), fed the same number of tokens; no guidance, no sampling, no
                     generate() loop
    ivl-reference    the IVL paper's inference: batch 1 per prompt, both full models recompute the whole
                     sequence every step (no KV cache), argmax(base + value)

Target (DESIGN): guided generation's overhead over the floor under 5 %, i.e. ``time_vs_floor`` < 1.05 for
guided-lm and processor; ``speedup_vs_reference`` is reported, with no target. Models have random weights: on a
GPU the shapes of Qwen2.5-1.5B (base) and Qwen2.5-0.5B (value), on CPU tiny ones. Times are measured, never
asserted; every method runs once per round, best of ``--repeats`` rounds.
Usage: python benchmarks/bench_generate.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (add_output_args, environment, format_table, output_options, plot_bars,  # noqa: E402
                     print_environment, write_csv)


def _models(device, dtype, big):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(pad_token_id=0, eos_token_id=None, bos_token_id=1)
    if big:  # Qwen2.5-1.5B guided by Qwen2.5-0.5B (shapes only)
        base_cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                               tie_word_embeddings=True, **common)
        value_cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                tie_word_embeddings=True, **common)
        base_cls = Qwen2ForCausalLM
    else:
        base_cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **common)
        value_cfg = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                tie_word_embeddings=True, **common)
        base_cls = LlamaForCausalLM
    with torch.device(device):  # initialise on the device: seconds instead of minutes for the GPU shapes
        base = base_cls(base_cfg).to(dtype).eval()
        value = Qwen2ForCausalLM(value_cfg).to(dtype).eval()
    return base, value


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns, device, repeats):
    """Best wall time of each function over ``repeats`` rounds; every round runs all of them in turn, so a
    slow spell of a shared machine hits each method alike instead of whichever ran during it."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
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


@torch.no_grad()
def _forward_floor(models, ids, mask, tokens):
    """Each model's forward passes alone over a generation's token stream: the prompt, then ``tokens [B, n]``
    one column per step (``n + 1`` passes, as generating ``n + 1`` tokens takes), KV caches kept."""
    caches = [None] * len(models)
    step_ids = ids
    for t in range(tokens.shape[1] + 1):
        for i, model in enumerate(models):
            caches[i] = model(input_ids=step_ids, attention_mask=mask, past_key_values=caches[i], use_cache=True,
                              logits_to_keep=1).past_key_values
        if t < tokens.shape[1]:
            step_ids = tokens[:, t:t + 1]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    add_output_args(ap, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    output_options(args)

    import transformers

    from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new = 16 if args.quick else args.new
    repeats = 1 if args.quick else args.repeats
    base, value = _models(device, dtype, big=device.type == "cuda")
    torch.manual_seed(1)
    shared_vocab = min(base.config.vocab_size, value.config.vocab_size)
    ids = torch.randint(2, shared_vocab, (args.batch, args.prompt_len), device=device)
    fed = torch.randint(2, shared_vocab, (args.batch, new - 1), device=device)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    guided = GuidedCausalLM(base, value, alpha=1.0)

    def run_processor(**kw):
        proc = IVLLogitsProcessor(value, alpha=1.0, attention_mask=mask, max_new_tokens=new, **kw)
        base.generate(ids, attention_mask=mask, logits_processor=[proc], **gen)

    ref_new = max(4, new // 4) if device.type == "cpu" else new  # the reference is slow: time fewer steps
    methods = [
        ("guided-lm", lambda: guided.generate(ids, attention_mask=mask, max_new_tokens=new), args.batch * new),
        ("guided-dynamic", lambda: guided.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                   cache_implementation="dynamic"), args.batch * new),
        ("guided-static", lambda: guided.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                  cache_implementation="static"), args.batch * new),
        ("processor", run_processor, args.batch * new),
        ("processor-dynamic", lambda: run_processor(cache_implementation="dynamic"), args.batch * new),
        ("base-generate", lambda: base.generate(ids, attention_mask=mask, **gen), args.batch * new),
        ("base-static", lambda: base.generate(ids, attention_mask=mask, cache_implementation="static", **gen),
         args.batch * new),
        ("floor (the two models' forward passes alone)", lambda: _forward_floor((base, value), ids, mask, fed),
         args.batch * new),
        ("ivl-reference (no cache, batch 1)", lambda: _reference(base, value, list(ids), ref_new), args.batch * ref_new),
    ]
    times = _time_interleaved([m[1] for m in methods], device, repeats)
    rows = [(name, tokens / t, t, tokens) for (name, _, tokens), t in zip(methods, times)]
    by_name = {r[0].split(" (")[0]: r for r in rows}
    floor_t = by_name["floor"][2] / by_name["floor"][3]
    ref = by_name["ivl-reference"][1]
    env = environment(device)
    env["transformers"] = transformers.__version__
    print_environment(env)
    print(f"# workload: batch {args.batch}, prompt {args.prompt_len}, new {new} tokens, {dtype}; base "
          f"{base.config.hidden_size}x{base.config.num_hidden_layers} V{base.config.vocab_size}, value "
          f"{value.config.hidden_size}x{value.config.num_hidden_layers} V{value.config.vocab_size}; best of {repeats}")
    table = [dict(method=name, tokens_per_s=tp, seconds=t, tokens=tok, speedup_vs_reference=tp / ref,
                  time_vs_floor=(t / tok) / floor_t, overhead_pct=100 * ((t / tok) / floor_t - 1))
             for name, tp, t, tok in rows]
    print(format_table(table, list(table[0])))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"generate_{device.type}")
    write_csv(stem + ".csv", table, env)
    plot_bars(stem + ".png", [dict(r, group="") for r in table], group="group", series="method",
              value="tokens_per_s", title=f"guided generation on {env['device']}, batch {args.batch}",
              ylabel="generated tokens / s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

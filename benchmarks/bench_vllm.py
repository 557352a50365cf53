"""Serving throughput with vLLM, side by side in one run (tokens per second, generated tokens only).

    vllm-base        vLLM serving the base model alone
    vllm-guided      vLLM serving the guided checkpoint (ivl_kernels.vllm): base + value, each with its own paged
                     KV cache, one fused guided head per step
    guided-lm        ivl_kernels.hf.GuidedCausalLM.generate on the same prompts (transformers, one batch)

DESIGN's serving target: vllm-guided at least 0.85x vllm-base (``vs_vllm_base``) on a GPU with the qwen pair; on
CPU the ratio is reported on small random models (a Llama base, a Qwen2 value network with ~1/8 of its bytes).
Every prompt gets exactly ``--new`` tokens (ignore_eos); greedy. Times are measured after one warm-up call, best
of ``--repeats``; never asserted. Needs vLLM (``make bench-vllm`` runs it in .venv-vllm).
Usage: python benchmarks/bench_vllm.py [--batches 1 8 32] [--new 64] [--compiled] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _common import environment, format_table, plot_bars, print_environment, write_csv  # noqa: E402

VOCAB = 4096


def _tokenizer():
    from tests.hf._models import CORPUS, train_bpe_tokenizer

    tok = train_bpe_tokenizer(300, CORPUS)
    tok.add_tokens([f"<x{i}>" for i in range(VOCAB - len(tok))])  # as many ids as the heads have rows
    return tok


def _models(root: str) -> dict:
    """Save (once) the base, the value network and the guided checkpoint under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    paths = {k: os.path.join(root, k) for k in ("base", "value", "guided")}
    if os.path.isfile(os.path.join(paths["guided"], "config.json")):
        return paths
    common = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None, max_position_embeddings=1024,
                  torch_dtype="float32")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408,
                                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                        **common)).eval()
    value = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, **common)).eval()
    tok = _tokenizer()
    for name, model in (("base", base), ("value", value)):
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    write_guided_checkpoint(paths["guided"], paths["base"], [{"model": paths["value"], "alpha": 1.0}], tokenizer=tok)
    return paths


def _prompts(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + batch)
    lengths = torch.randint(32, 65, (batch,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _vllm_rows(name: str, model: str, args) -> tuple[list, dict]:
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=not args.compiled,
              max_num_seqs=max(args.batches), enable_prefix_caching=False)
    start_s = time.perf_counter() - t
    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True, detokenize=False)
    rows, tokens = [], {}
    for batch in args.batches:
        reqs = [{"prompt_token_ids": p} for p in _prompts(batch)]
        out = {}

        def run():
            out["o"] = llm.generate(reqs, params, use_tqdm=False)

        secs = _best(run, args.repeats)
        tokens[batch] = [list(o.outputs[0].token_ids) for o in out["o"]]
        assert all(len(t) == args.new for t in tokens[batch])
        rows.append({"method": name, "batch": batch, "new_tokens": args.new, "seconds": secs,
                     "tokens_per_s": batch * args.new / secs, "engine_start_s": start_s})
    from tests.vllm._vllm_util import shutdown

    shutdown(llm)
    del llm
    gc.collect()  # the engine's last reference was ours
    return rows, tokens


def _guided_lm_rows(path: str, args) -> tuple[list, dict]:
    from ivl_kernels.hf import GuidedCausalLM
    from tests.hf._models import left_pad

    lm = GuidedCausalLM.from_pretrained(path)
    rows, tokens = [], {}
    for batch in args.batches:
        ids, mask = left_pad([torch.tensor(p) for p in _prompts(batch)])
        out = {}

        def run():
            out["o"] = lm.generate(ids, attention_mask=mask, max_new_tokens=args.new)

        secs = _best(run, args.repeats)
        tokens[batch] = out["o"][:, ids.shape[1]:].tolist()
        rows.append({"method": "guided-lm", "batch": batch, "new_tokens": args.new, "seconds": secs,
                     "tokens_per_s": batch * args.new / secs})
    return rows, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new", type=int, default=64, help="generated tokens per prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compiled", action="store_true", help="vLLM's compiled mode (default: enforce_eager)")
    ap.add_argument("--models", default=os.path.join(os.path.dirname(HERE), ".vllm-cache", "bench_models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    env = environment(torch.device("cpu"))
    env["vllm"] = vllm.__version__
    env["mode"] = "compiled" if args.compiled else "eager"
    print_environment(env)
    paths = _models(args.models)
    rows, tokens = [], {}
    for name, model in (("vllm-base", paths["base"]), ("vllm-guided", paths["guided"])):
        r, tokens[name] = _vllm_rows(name, model, args)
        rows += r
    r, tokens["guided-lm"] = _guided_lm_rows(paths["guided"], args)
    rows += r
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "vllm-base"}
    for r in rows:
        r["vs_vllm_base"] = r["tokens_per_s"] / base[r["batch"]]
        if r["method"] != "vllm-base":
            same = tokens[r["method"]][r["batch"]] == tokens["guided-lm"][r["batch"]]
            r["same_tokens_as_guided_lm"] = same if r["method"] == "vllm-guided" else ""
    print(format_table(rows, ["method", "batch", "new_tokens", "seconds", "tokens_per_s", "vs_vllm_base",
                              "same_tokens_as_guided_lm", "engine_start_s"]))
    stem = os.path.join(args.out, f"vllm_cpu_{env['mode']}")
    write_csv(stem + ".csv", rows, env)
    plot_bars(stem + ".png", rows, group="batch", series="method", value="tokens_per_s",
              title=f"Serving throughput on CPU (vLLM {vllm.__version__}, {env['mode']})", ylabel="tokens / s")
    print(f"wrote {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving throughput with vLLM, side by side in one run (tokens per second, generated tokens only).

    vllm-base        vLLM serving the base model alone
    vllm-guided      vLLM serving the guided checkpoint (ivl_kernels.vllm): base + value, each with its own paged
                     KV cache, one fused guided head per step
    guided-lm        ivl_kernels.hf.GuidedCausalLM.generate on the same prompts (transformers, one batch)

DESIGN's serving target: vllm-guided at least 0.85x vllm-base (``vs_vllm_base``) on a GPU with the qwen pair; on
CPU the ratio is reported on small random models (a Llama base, a Qwen2 value network with ~1/8 of its bytes).
Every prompt gets exactly ``--new`` tokens (ignore_eos); greedy. Times are measured after one warm-up call, best
of ``--repeats``; never asserted. Needs vLLM (``make bench-vllm`` runs it in .venv-vllm).

Two more sections (``--sections``), each in its own CSV:

    alpha (vllm_cpu_<mode>_alpha.csv)   the guided engine on one batch, three ways: every request with the
                     checkpoint's alpha (``one-alpha``: no per-request work), every request with one other alpha
                     (``ivl_alpha=[0.5]``: the per-request correction on every row), and mixed alphas (0, 0.5,
                     default, 1.5 in turn); ``vs_one_alpha`` is the throughput ratio to the first
    speculative (vllm_cpu_<mode>_speculative.csv)   a guided engine with and without draft-model speculative
                     decoding (``--spec-tokens`` drafts per step): the base with its layers' output projections
                     scaled by 0.02 (same cost) guided by the value network (alpha 0.1), drafted by that base's
                     first 2 layers with its embedding and head (a layer-skip draft: random models have no small
                     model that agrees with them otherwise); reports the acceptance rate (accepted / drafted
                     tokens), the mean accepted drafts per step, tokens/s, and whether the tokens equal the
                     non-speculative ones

Results of the same name already in ``--out`` are kept unless ``--overwrite`` (this run's file gets a time-stamped
name beside them); files are written atomically.
Usage: python benchmarks/bench_vllm.py [--batches 1 8 32] [--new 64] [--compiled] [--sections throughput alpha
       speculative] [--out benchmarks/results] [--overwrite]
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
from _common import (add_output_args, environment, format_table, output_options, plot_bars,  # noqa: E402
                     print_environment, write_csv)

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

    paths = {k: os.path.join(root, k) for k in ("base", "value", "guided", "spec_base", "spec_guided", "draft")}
    if os.path.isfile(os.path.join(paths["guided"], "config.json")):
        if not os.path.isfile(os.path.join(paths["draft"], "config.json")):  # models saved by an earlier version
            _save_spec_models(paths)
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
    _save_spec_models(paths)
    return paths


def _save_spec_models(paths: dict, layers: int = 2, residual_scale: float = 0.02, alpha: float = 0.1) -> None:
    """The speculative section's models. Random models have no small model that agrees with them, so: a copy of
    the base whose layers' output projections are scaled by ``residual_scale`` (each layer a small update of the
    residual stream, as in trained deep models; same shapes, so the same cost), guided by the value network with
    ``alpha``; the draft is its first ``layers`` layers with its embedding, final norm and head (a layer-skip
    draft, ~1/4 of the base's layers)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    base = LlamaForCausalLM.from_pretrained(paths["base"])
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    base.save_pretrained(paths["spec_base"])
    tok = AutoTokenizer.from_pretrained(paths["base"])
    tok.save_pretrained(paths["spec_base"])
    cfg = LlamaConfig.from_pretrained(paths["base"], num_hidden_layers=layers)
    draft = LlamaForCausalLM(cfg).eval()
    missing, _ = draft.load_state_dict(base.state_dict(), strict=False)
    assert not missing, missing
    draft.save_pretrained(paths["draft"])
    tok.save_pretrained(paths["draft"])
    write_guided_checkpoint(paths["spec_guided"], paths["spec_base"], [{"model": paths["value"], "alpha": alpha}],
                            tokenizer=tok)


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


ALPHA_MIX = ([0.0], [0.5], None, [1.5])


def _alpha_rows(path: str, args) -> list:
    """One alpha for every request vs per-request alphas, on the guided engine (its checkpoint alpha is 1.0)."""
    from vllm import LLM, SamplingParams

    from tests.vllm._vllm_util import shutdown

    llm = LLM(model=path, dtype="float32", max_model_len=512, seed=0, enforce_eager=not args.compiled,
              max_num_seqs=max(args.batches), enable_prefix_caching=False)

    def params(alpha):
        return SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True, detokenize=False,
                              extra_args=None if alpha is None else {"ivl_alpha": alpha})

    rows = []
    for batch in args.batches:
        reqs = [{"prompt_token_ids": p} for p in _prompts(batch)]
        cases = {"one-alpha": [params(None)] * batch, "ivl_alpha=[0.5] (all rows)": [params([0.5])] * batch,
                 "mixed 0/0.5/default/1.5": [params(ALPHA_MIX[i % len(ALPHA_MIX)]) for i in range(batch)]}
        one = None
        for name, plist in cases.items():
            secs = _best(lambda: llm.generate(reqs, plist, use_tqdm=False), args.repeats)
            tps = batch * args.new / secs
            one = one or tps
            rows.append({"method": name, "batch": batch, "new_tokens": args.new, "seconds": secs,
                         "tokens_per_s": tps, "vs_one_alpha": tps / one})
    shutdown(llm)
    llm = None  # the engine's last reference (not `del`: the timed closures above name it)
    gc.collect()
    return rows


def _spec_rows(paths: dict, args) -> list:
    """The guided engine with and without draft-model speculative decoding (acceptance from vLLM's metrics)."""
    from vllm import LLM, SamplingParams

    from tests.vllm._vllm_util import shutdown

    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True, detokenize=False)
    rows, plain = [], {}
    for spec in (False, True):
        kw = {}
        if spec:
            kw["speculative_config"] = {"method": "draft_model", "model": paths["draft"],
                                        "num_speculative_tokens": args.spec_tokens}
        llm = LLM(model=paths["spec_guided"], dtype="float32", max_model_len=512, seed=0,
                  enforce_eager=not args.compiled, max_num_seqs=max(args.batches), enable_prefix_caching=False,
                  disable_log_stats=False, **kw)
        for batch in args.batches:
            reqs = [{"prompt_token_ids": p} for p in _prompts(batch)]
            out = {}

            def run():
                out["o"] = llm.generate(reqs, params, use_tqdm=False)

            before = _spec_counts(llm)
            secs = _best(run, args.repeats)
            after = _spec_counts(llm)
            tokens = [list(o.outputs[0].token_ids) for o in out["o"]]
            row = {"method": f"guided + draft ({args.spec_tokens} tokens)" if spec else "guided", "batch": batch,
                   "new_tokens": args.new, "seconds": secs, "tokens_per_s": batch * args.new / secs}
            if spec:
                drafts, drafted, accepted = (after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted"))
                row.update(acceptance_rate=accepted / max(drafted, 1), accepted_per_step=accepted / max(drafts, 1),
                           vs_no_speculation=row["tokens_per_s"] / plain[batch][1],
                           same_tokens_as_no_speculation=tokens == plain[batch][0])
            else:
                plain[batch] = (tokens, row["tokens_per_s"])
            rows.append(row)
        shutdown(llm)
        llm = None  # the engine's last reference (not `del`: the timed closure above names it)
        gc.collect()
    return rows


def _spec_counts(llm) -> dict:
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    got = {v: 0 for v in names.values()}
    for m in llm.get_metrics():
        if m.name in names:
            got[names[m.name]] = getattr(m, "value", 0)
    return got


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
    ap.add_argument("--sections", nargs="+", choices=("throughput", "alpha", "speculative"),
                    default=["throughput", "alpha", "speculative"])
    ap.add_argument("--spec-tokens", type=int, default=3, help="drafted tokens per step (speculative section)")
    add_output_args(ap, os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    output_options(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    env = environment(torch.device("cpu"))
    env["vllm"] = vllm.__version__
    env["mode"] = "compiled" if args.compiled else "eager"
    print_environment(env)
    paths = _models(args.models)
    stem = os.path.join(args.out, f"vllm_cpu_{env['mode']}")
    if "alpha" in args.sections:
        rows = _alpha_rows(paths["guided"], args)
        print(format_table(rows, ["method", "batch", "new_tokens", "seconds", "tokens_per_s", "vs_one_alpha"]))
        write_csv(stem + "_alpha.csv", rows, env)
    if "speculative" in args.sections:
        rows = _spec_rows(paths, args)
        print(format_table(rows, ["method", "batch", "new_tokens", "seconds", "tokens_per_s", "acceptance_rate",
                                  "accepted_per_step", "vs_no_speculation", "same_tokens_as_no_speculation"]))
        write_csv(stem + "_speculative.csv", rows, env | {"spec_tokens": args.spec_tokens})
    if "throughput" not in args.sections:
        return 0
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
    write_csv(stem + ".csv", rows, env)
    plot_bars(stem + ".png", rows, group="batch", series="method", value="tokens_per_s",
              title=f"Serving throughput on CPU (vLLM {vllm.__version__}, {env['mode']})", ylabel="tokens / s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host cost of one guided decode step: CPU time and host syncs, GuidedCausalLM and IVLLogitsProcessor.

A host sync is a read of a tensor's value by Python (``bool(t)``, ``t.item()``, ``int(t)``): on a GPU it waits
for every queued kernel, so the host cannot run ahead and launch the next step while the GPU works. On any
device such a read goes through ``aten::_local_scalar_dense``, so counting that op under ``torch.profiler``
counts syncs on the CPU too. The script runs the same tiny models three ways, each under the profiler:

* ``floor``: the two backbones' incremental forward passes alone (KV caches, no guidance, no sampling);
* ``guided-lm``: ``GuidedCausalLM.generate`` (greedy, EOS set, so its one EOS check per step runs);
* ``guided-static``: the same with ``cache_implementation="static"`` (eager here; a CUDA graph on a GPU);
* ``processor``: ``base.generate(logits_processor=[IVLLogitsProcessor(value)])``;

and prints, per decode step, the CPU time and the ``_local_scalar_dense`` calls beyond the floor's (transformers'
own forward may read values too; those are not ours). ``--json`` writes the numbers.

    python benchmarks/profile_decode_step.py                 # batch 4, prompt 24, 32 new tokens, tiny Llama
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _models(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(s, h):
        torch.manual_seed(s)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(cfg).eval()

    return make(seed, hidden), make(seed + 1, max(hidden // 2, 32))


def _prompts(B: int, T: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for r in range(B):  # left padding of different lengths
        mask[r, : r * 3] = 0
        ids[r, : r * 3] = 0
    return ids, mask


def _count(fn):
    """(wall seconds, CPU microseconds of the top-level ops, _local_scalar_dense calls) of ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    syncs = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    return wall, syncs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="best of")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    ap.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    args = ap.parse_args(argv)
    if args.json and os.path.lexists(args.json) and not args.overwrite:
        ap.error(f"--json {args.json} exists: not replaced (pass --overwrite)")

    from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor
    from ivl_kernels.hf._common import position_ids_from_mask

    torch.set_num_threads(1)
    base, value = _models(args.vocab, args.hidden, args.layers, 0)
    ids, mask = _prompts(args.batch, args.prompt, args.vocab, 1)
    N = args.new
    # An EOS id outside the vocabulary: its check runs every step (one sync, the one a decode loop needs) and
    # never ends the run early, so every method runs N steps.
    lm = GuidedCausalLM(base, value, alpha=1.0, backend="torch")

    def floor():
        # The backbones' own incremental calls, with the least bookkeeping transformers needs (a growing mask).
        from transformers import DynamicCache

        caches = [DynamicCache(), DynamicCache()]
        full, step_ids = mask, ids
        pos = position_ids_from_mask(mask)
        ones = torch.ones((args.batch, 1), dtype=mask.dtype)
        for _ in range(N):
            hs = [m(input_ids=step_ids, attention_mask=full, position_ids=pos, past_key_values=c,
                    use_cache=True).last_hidden_state[:, -1] for m, c in zip((base.model, value.model), caches)]
            step_ids = (hs[0].sum(-1, keepdim=True) + hs[1].sum(-1, keepdim=True)).long().abs() % args.vocab
            full = torch.cat([full, ones], dim=1)
            pos = pos[:, -1:] + 1

    def guided():
        return lm.generate(ids, attention_mask=mask, max_new_tokens=N, eos_token_id=args.vocab + 7,
                           pad_token_id=0)

    def guided_static():
        return lm.generate(ids, attention_mask=mask, max_new_tokens=N, eos_token_id=args.vocab + 7,
                           pad_token_id=0, cache_implementation="static")

    def processor():
        proc = IVLLogitsProcessor(value, alpha=1.0, attention_mask=mask, backend="torch")
        return base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=N,
                             min_new_tokens=N, do_sample=False, eos_token_id=args.vocab + 7, pad_token_id=0)

    with torch.no_grad():
        for fn in (floor, guided, guided_static, processor):  # warm-up
            fn()
        rows = {}
        for name, fn in (("floor", floor), ("guided-lm", guided), ("guided-static", guided_static),
                         ("processor", processor)):
            best = None
            for _ in range(args.repeats):
                wall, syncs = _count(fn)
                if best is None or wall < best[0]:
                    best = (wall, syncs)
            rows[name] = {"ms_per_step": 1e3 * best[0] / N, "syncs_per_step": best[1] / N}
    fl = rows["floor"]
    for r in rows.values():
        r["extra_syncs_per_step"] = r["syncs_per_step"] - fl["syncs_per_step"]
        r["extra_ms_per_step"] = r["ms_per_step"] - fl["ms_per_step"]
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; batch {args.batch}, "
          f"prompt {args.prompt}, {N} new tokens; Llama vocab {args.vocab}, hidden {args.hidden}/{args.hidden // 2}, "
          f"{args.layers} layers; best of {args.repeats} (profiler on)")
    print(f"{'method':<14}{'ms/step':>10}{'syncs/step':>12}{'extra ms':>10}{'extra syncs':>13}")
    for name, r in rows.items():
        print(f"{name:<14}{r['ms_per_step']:>10.3f}{r['syncs_per_step']:>12.2f}{r['extra_ms_per_step']:>10.3f}"
              f"{r['extra_syncs_per_step']:>13.2f}")
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "torch": torch.__version__}, f, indent=1)
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()

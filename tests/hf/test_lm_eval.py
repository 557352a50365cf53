"""lm-evaluation-harness runs a guided checkpoint with ``--model hf``: multiple_choice (log-likelihood),
loglikelihood_rolling (perplexity) and generate_until tasks, batched, from local JSONL files; every per-sample
number equals a plain-torch (float64) computation of the guided distribution from each model's own forward."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from ._lm_eval_tasks import (GEN, MC, MULTIPLE_CHOICE, ROLLING, STOP, generate_until, sample_args,  # noqa: E402
                             write_tasks)
from ._models import (CORPUS, guided_setup, reference_sequence_logits, reference_token_log_probs,  # noqa: E402
                      save_guided, train_bpe_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS = 290
PPL = [{"text": CORPUS[i]} for i in range(5)]


def _tokenizer():
    # 291 ids for a 300-row base head: ids 291..299 are suppressed (a head padded past its tokenizer).
    tok = train_bpe_tokenizer(290, CORPUS)
    tok.add_special_tokens({"eos_token": "</s>"})
    assert len(tok) == 291 and tok.eos_token_id == EOS
    return tok


def _write_tasks(root):
    return write_tasks(root, {"ivl_mc": (MC, MULTIPLE_CHOICE), "ivl_ppl": (PPL, ROLLING),
                              "ivl_gen": (GEN, generate_until(STOP, 8))})


def _guided_checkpoint(tmp_path, kind):
    tok = _tokenizer()
    lm, terms, base = guided_setup(kind, seed=21, tokenizer=tok)
    # An EOS in the base's generation config: generate() pads rows that finished, as transformers does.
    base.config.eos_token_id = base.generation_config.eos_token_id = EOS
    directory, _ = save_guided(tmp_path, lm, terms, base)
    return directory, tok, terms, base


def _check_samples(samples, tok, terms, base):
    limit = len(tok)
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731

    def loglik(context, continuation):
        # lm-eval's split: the continuation's tokens are those of context + continuation past the context's.
        ctx = enc(context) if context else [tok.bos_token_id]
        whole = enc(context + continuation) if context else [tok.bos_token_id] + enc(continuation)
        ids = torch.tensor(whole)
        return float(reference_token_log_probs(base, terms, ids, suppress_from=limit)[len(ctx) - 1:].sum())

    for s in samples["ivl_mc"]:
        got = [float(r[0]) for r in s["filtered_resps"]]
        want = [loglik(c, x) for c, x in sample_args(s)]
        assert got == pytest.approx(want, abs=2e-4, rel=1e-5)
    for s in samples["ivl_ppl"]:
        (text,) = sample_args(s)[0][:1]
        got = s["filtered_resps"][0]
        got = float(got[0] if isinstance(got, (list, tuple)) else got)
        assert got == pytest.approx(loglik("", text), abs=2e-4, rel=1e-5)
    for s in samples["ivl_gen"]:
        context = sample_args(s)[0][0]
        ids = torch.tensor(enc(context))
        for _ in range(8):  # greedy over the guided distribution, suppressed ids excluded, up to EOS
            nxt = int(reference_sequence_logits(base, terms, ids, suppress_from=limit)[-1].argmax())
            ids = torch.cat([ids, torch.tensor([nxt])])
            if nxt == EOS:
                break
        want = tok.decode(ids[len(enc(context)):].tolist(), skip_special_tokens=True).split(STOP)[0]
        assert s["filtered_resps"][0] == want


def test_lm_eval_cli_single_value_network(tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` in a fresh process."""
    directory, tok, terms, base = _guided_checkpoint(tmp_path, "single")
    tasks = _write_tasks(str(tmp_path))
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={directory},trust_remote_code=True", "--tasks", "ivl_mc,ivl_ppl,ivl_gen",
           "--include_path", tasks, "--batch_size", "4", "--device", "cpu", "--log_samples", "--output_path", out]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    samples = {}
    for name in ("ivl_mc", "ivl_ppl", "ivl_gen"):
        (path,) = glob.glob(os.path.join(out, "**", f"samples_{name}_*.jsonl"), recursive=True)
        with open(path) as f:
            samples[name] = [json.loads(line) for line in f]
        assert len(samples[name]) == 5
    _check_samples(samples, tok, terms, base)


def test_lm_eval_python_api_proxy_tuning_with_a_map(tmp_path, monkeypatch):
    """``lm_eval.simple_evaluate(model="hf", ...)`` in process on proxy-tuning's two terms (an expert through a
    vocabulary map, an anti-expert with a negative alpha): loaded through AutoModelForCausalLM by name."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    directory, tok, terms, base = _guided_checkpoint(tmp_path, "proxy")
    tasks = _write_tasks(str(tmp_path))
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={directory}",
                                  tasks=["ivl_mc", "ivl_ppl", "ivl_gen"], batch_size=4, device="cpu",
                                  task_manager=TaskManager(include_path=tasks), log_samples=True)
    assert set(res["samples"]) == {"ivl_mc", "ivl_ppl", "ivl_gen"}
    assert all(len(v) == 5 for v in res["samples"].values())
    _check_samples(res["samples"], tok, terms, base)

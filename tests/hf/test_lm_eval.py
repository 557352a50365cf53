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

from ._models import (CORPUS, guided_setup, reference_sequence_logits, reference_token_log_probs,  # noqa: E402
                      save_guided, train_bpe_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS = 290
STOP = "fox"

MC = [{"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "value", "base model"], "label": 0},
      {"question": "a value network learns to", "choices": ["steer the base model", "fox", "jumps"], "label": 0},
      {"question": "guided decoding adds the value logits to", "choices": ["the base logits", "dog"], "label": 0},
      {"question": "small models can guide", "choices": ["large models", "the story", "friends", "afternoon"],
       "label": 0},
      {"question": "the dog and the fox are", "choices": ["friends", "logits"], "label": 0}]
PPL = [{"text": CORPUS[i]} for i in range(5)]
GEN = [{"prompt": "the quick", "answer": "brown"}, {"prompt": "a value network", "answer": "learns"},
       {"prompt": "the dog and", "answer": "the"}, {"prompt": "small models", "answer": "can"},
       {"prompt": "guided", "answer": "decoding"}]


def _tokenizer():
    # 291 ids for a 300-row base head: ids 291..299 are suppressed (a head padded past its tokenizer).
    tok = train_bpe_tokenizer(290, CORPUS)
    tok.add_special_tokens({"eos_token": "</s>"})
    assert len(tok) == 291 and tok.eos_token_id == EOS
    return tok


def _write_tasks(root):
    """Three lm-eval YAML tasks reading local JSONL files (lm-eval cannot download datasets here)."""
    tasks = os.path.join(root, "tasks")
    os.makedirs(tasks)
    specs = {
        "ivl_mc": (MC, ["output_type: multiple_choice", 'doc_to_text: "{{question}}"',
                        'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{label}}"',
                        "metric_list:\n  - metric: acc"]),
        "ivl_ppl": (PPL, ["output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
                          "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte"]),
        "ivl_gen": (GEN, ["output_type: generate_until", 'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{answer}}"',
                          f'generation_kwargs:\n  until: ["{STOP}"]\n  max_gen_toks: 8\n  do_sample: false',
                          "metric_list:\n  - metric: exact_match"]),
    }
    for name, (rows, lines) in specs.items():
        data = os.path.join(root, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        head = [f"task: {name}", "dataset_path: json", f"dataset_kwargs:\n  data_files:\n    test: {data}",
                "test_split: test"]
        with open(os.path.join(tasks, f"{name}.yaml"), "w") as f:
            f.write("\n".join(head + lines) + "\n")
    return tasks


def _guided_checkpoint(tmp_path, kind):
    tok = _tokenizer()
    lm, terms, base = guided_setup(kind, seed=21, tokenizer=tok)
    # An EOS in the base's generation config: generate() pads rows that finished, as transformers does.
    base.config.eos_token_id = base.generation_config.eos_token_id = EOS
    directory, _ = save_guided(tmp_path, lm, terms, base)
    return directory, tok, terms, base


def _args(sample):
    """``[(context, continuation | gen_kwargs), ...]`` of a logged sample: a list of tuples in process, a dict
    ``{"gen_args_i": {"arg_0": ..., "arg_1": ...}}`` in the samples file."""
    args = sample["arguments"]
    args = args.values() if isinstance(args, dict) else args
    return [tuple(a.values()) if isinstance(a, dict) else tuple(a) for a in args]


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
        want = [loglik(c, x) for c, x in _args(s)]
        assert got == pytest.approx(want, abs=2e-4, rel=1e-5)
    for s in samples["ivl_ppl"]:
        (text,) = _args(s)[0][:1]
        got = s["filtered_resps"][0]
        got = float(got[0] if isinstance(got, (list, tuple)) else got)
        assert got == pytest.approx(loglik("", text), abs=2e-4, rel=1e-5)
    for s in samples["ivl_gen"]:
        context = _args(s)[0][0]
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

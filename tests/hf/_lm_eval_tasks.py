"""Local lm-evaluation-harness tasks (YAML over JSONL files: lm-eval cannot download datasets here) and the reading
of its logged samples, shared by ``tests/hf/test_lm_eval.py`` (``--model hf``) and
``tests/vllm/test_vllm_lm_eval.py`` (``--model vllm``). Imports neither lm-eval nor transformers."""

from __future__ import annotations

import json
import os

# Multiple-choice questions and generation prompts; STOP ends a generation.
STOP = "fox"

MC = [{"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "value", "base model"], "label": 0},
      {"question": "a value network learns to", "choices": ["steer the base model", "fox", "jumps"], "label": 0},
      {"question": "guided decoding adds the value logits to", "choices": ["the base logits", "dog"], "label": 0},
      {"question": "small models can guide", "choices": ["large models", "the story", "friends", "afternoon"],
       "label": 0},
      {"question": "the dog and the fox are", "choices": ["friends", "logits"], "label": 0}]
GEN = [{"prompt": "the quick", "answer": "brown"}, {"prompt": "a value network", "answer": "learns"},
       {"prompt": "the dog and", "answer": "the"}, {"prompt": "small models", "answer": "can"},
       {"prompt": "guided", "answer": "decoding"}]

MULTIPLE_CHOICE = ["output_type: multiple_choice", 'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"',
                   'doc_to_target: "{{label}}"', "metric_list:\n  - metric: acc"]
ROLLING = ["output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
           "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte"]


def generate_until(stop: str, max_tokens: int) -> list:
    """Greedy generation of at most ``max_tokens`` tokens, stopped at ``stop``."""
    return ["output_type: generate_until", 'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{answer}}"',
            f'generation_kwargs:\n  until: ["{stop}"]\n  max_gen_toks: {max_tokens}\n  do_sample: false',
            "metric_list:\n  - metric: exact_match"]


def write_tasks(root: str, specs: dict) -> str:
    """``specs``: task name -> ``(rows, task lines)``. Writes ``root/NAME.jsonl`` and ``root/tasks/NAME.yaml`` per
    task; returns the directory to pass as ``--include_path``."""
    tasks = os.path.join(root, "tasks")
    os.makedirs(tasks)
    for name, (rows, lines) in specs.items():
        data = os.path.join(root, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        head = [f"task: {name}", "dataset_path: json", f"dataset_kwargs:\n  data_files:\n    test: {data}",
                "test_split: test"]
        with open(os.path.join(tasks, f"{name}.yaml"), "w") as f:
            f.write("\n".join(head + lines) + "\n")
    return tasks


def sample_args(sample) -> list:
    """``[(context, continuation | gen_kwargs), ...]`` of a logged sample: a list of tuples in process, a dict
    ``{"gen_args_i": {"arg_0": ..., "arg_1": ...}}`` in the samples file."""
    args = sample["arguments"]
    args = args.values() if isinstance(args, dict) else args
    return [tuple(a.values()) if isinstance(a, dict) else tuple(a) for a in args]

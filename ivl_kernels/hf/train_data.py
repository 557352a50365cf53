"""Training data for ``ivl-kernels train`` (``ivl_kernels.hf.train_cli``): JSONL records, their tokenisation
with the BASE tokenizer (prompt labels ``-100``) and the collator.

- ``load_records``: a JSONL of ``{"prompt", "response"}`` (``"completion"`` is accepted for ``"response"``) or
  ``{"messages": [...]}``; a malformed line is refused naming it.
- ``tokenize_record``: ``{"input_ids", "labels"}``; chat data is rendered with the value tokenizer's chat
  template (the last message, an assistant message, is the response).
- ``IVLDataCollator``: right padding, labels ``-100`` on prompt and padding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional


def load_records(path: str) -> List[dict]:
    """The JSONL records of ``path``; ``ValueError`` naming the line for a malformed one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path}")
    records = []
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is not part of the first record
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                         f"JSONL training data must be UTF-8") from None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not ("messages" in rec or "prompt" in rec):
            raise ValueError(f"{path}:{n}: expected an object with 'prompt' and 'response', or 'messages'")
        rec["_line"] = n
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no examples")
    return records


def _render_chat(messages, chat_tokenizer, where: str):
    """(prompt text, response text) of a conversation: the prompt is the conversation without its last message,
    with the generation prompt; the response is the rest of the rendered conversation."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the response to learn), "
                         f"got role {messages[-1].get('role')!r}")
    if getattr(chat_tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: 'messages' data needs a chat template, and the value tokenizer has none")
    prompt = chat_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = chat_tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{where}: the chat template does not render the conversation without its last message "
                         f"(with the generation prompt) as a prefix of the whole conversation")
    return prompt, full[len(prompt):]


def tokenize_record(rec: dict, tokenizer, chat_tokenizer=None, *, max_length: Optional[int] = None,
                    add_eos: bool = True, where: str = "example") -> Optional[Dict[str, List[int]]]:
    """``{"input_ids", "labels"}`` of one record, ids from ``tokenizer``, labels ``-100`` on the prompt.

    ``{"prompt", "response"}``: the prompt is tokenised with the tokenizer's special tokens (BOS), the response
    without, then EOS is appended (``add_eos``) unless already there; each part is tokenised on its own, as the
    prompt is at generation time. ``{"messages"}``: rendered with ``chat_tokenizer``'s chat template (default
    ``tokenizer``), both parts tokenised without added special tokens (the template writes them). Truncated to
    ``max_length`` from the right; ``None`` when no response token is left.
    """
    if "messages" in rec:
        prompt, response = _render_chat(rec["messages"], chat_tokenizer or tokenizer, where)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        response = rec.get("response", rec.get("completion"))
        if not isinstance(rec.get("prompt"), str) or not isinstance(response, str):
            raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
        prompt_ids = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        if add_eos and eos is not None and (not response_ids or response_ids[-1] != eos):
            response_ids = response_ids + [eos]
    ids = list(prompt_ids) + list(response_ids)
    labels = [-100] * len(prompt_ids) + list(response_ids)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    # Position t predicts labels[t + 1]: a kept label at position 0 trains nothing.
    if all(x == -100 for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


class ListDataset:
    """A map-style dataset over a list (``torch.utils.data.Dataset`` protocol)."""

    def __init__(self, items: List[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class IVLDataCollator:
    """Right-pads ``input_ids`` with ``pad_token_id``; ``attention_mask`` 1 on real tokens; ``labels`` -100 on
    padding (and wherever the example had -100). ``pad_to``: pad every batch to this length instead of its
    longest example."""

    pad_token_id: int = 0
    pad_to: Optional[int] = None

    def __call__(self, features: List[dict]) -> Dict[str, Any]:
        import torch

        T = max(len(f["input_ids"]) for f in features)
        if self.pad_to is not None:
            T = max(T, self.pad_to)
        B = len(features)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

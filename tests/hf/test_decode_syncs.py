"""The decode loops read no tensor value on the host except the one EOS check per step (issue 11).

A read of a tensor's value by Python (``bool(t)``, ``t.item()``) dispatches ``aten::_local_scalar_dense`` on
every device; on a GPU it is a sync that stalls the launch queue. A dispatch mode records each such read with
the innermost Python frame outside torch that caused it, so reads inside transformers' own forward (its mask
construction) are told apart from ours.
"""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch

pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import left_pad, make_base, make_value, random_prompts  # noqa: E402


# torch's own frames, by the package's location (a venv path may itself contain "/torch/", as on the GPU image).
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class _ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_origin = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(_TORCH_DIR)]
            origin = frames[-1] if frames else None
            key = "ours" if origin is not None and "/ivl_kernels/" in origin.filename else "other"
            if key == "ours":
                key = f"ivl_kernels/{origin.filename.split('/ivl_kernels/')[-1]}:{origin.lineno}"
            self.by_origin[key] += 1
        return func(*args, **(kwargs or {}))

    def ours(self) -> dict:
        return {k: v for k, v in self.by_origin.items() if k != "other"}


STEPS = 6
UNREACHABLE_EOS = 10_000  # outside the vocabulary: the EOS check runs every step and never ends the run


def _setup():
    base, value = make_base(), make_value()
    ids, mask = left_pad(random_prompts([5, 3, 7], seed=3))
    return base, value, ids, mask


@pytest.mark.parametrize("terms", [1, 2], ids=["one-term", "two-terms"])
def test_guided_lm_reads_one_value_per_step(terms):
    base, value, ids, mask = _setup()
    model = value if terms == 1 else [GuidanceTerm(value, 1.0), GuidanceTerm(make_value(seed=5), -0.5)]
    lm = GuidedCausalLM(base, model, alpha=0.7, backend="torch")
    lm.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=UNREACHABLE_EOS)  # warm-up

    def reads_for(steps):
        with torch.no_grad(), _ScalarReads() as reads:
            out = lm.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=UNREACHABLE_EOS)
        assert out.shape[1] == ids.shape[1] + steps
        return reads.ours()

    short, long = reads_for(STEPS), reads_for(2 * STEPS)
    per_step = {k: long[k] - short.get(k, 0) for k in long if long[k] != short.get(k, 0)}
    # The EOS check, nothing else, once per step; plus a fixed number of checks of the prompt before decoding
    # (a row with no real token), which do not grow with the steps.
    assert len(per_step) == 1 and "guided.py" in next(iter(per_step)), per_step
    assert next(iter(per_step.values())) == STEPS, per_step
    assert sum(short.values()) - STEPS <= 1, f"host reads by ivl_kernels before decoding: {short}"


def test_processor_reads_no_value_per_step():
    base, value, ids, mask = _setup()
    with torch.no_grad(), _ScalarReads() as reads:
        proc = IVLLogitsProcessor(value, alpha=0.7, attention_mask=mask, backend="torch")
        base.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=STEPS,
                      min_new_tokens=STEPS, do_sample=False, eos_token_id=UNREACHABLE_EOS, pad_token_id=0)
    assert reads.ours() == {}, f"host reads by ivl_kernels: {reads.ours()}"

"""The transformers integration on a GPU in bfloat16, as users run it.

bf16 models make greedy choices noisy at near-ties, so instead of comparing token strings with a reference that
rounds differently, every generated step is checked against a float32 no-cache reference run on the same
(bf16-rounded) weights: the chosen token's reference logit is within the bf16 noise of the reference maximum,
and the guidance the processor added to ``scores`` matches ``alpha * remap(value logits)`` elementwise. A wrong
row, map, position or padding offset breaks both by far more than the noise.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from ivl_kernels.hf import GuidedCausalLM, IVLLogitsProcessor  # noqa: E402

from ._models import left_pad, make_base, make_value, random_map, random_prompts, remap, value_input_ids  # noqa: E402

NEW = 8
ALPHA = 1.5
# bf16 activations through 2 layers: logit noise up to 0.031 on these models (measured on CPU against the same
# float32 reference); reference top-2 gaps were 0.26-0.45.
TOL = 0.15


def _models(kind):
    base, value = make_base(), make_value()
    vmap = None if kind == "identity-tail" else random_map()
    ref_base, ref_value = copy.deepcopy(base), copy.deepcopy(value)
    base, value = base.to("cuda", torch.bfloat16), value.to("cuda", torch.bfloat16)
    # The reference: the same bf16-rounded weights, float32 arithmetic, no cache.
    ref_base = ref_base.to("cuda", torch.bfloat16).float()
    ref_value = ref_value.to("cuda", torch.bfloat16).float()
    return base, value, vmap, ref_base, ref_value


@torch.no_grad()
def _ref_parts(ref_base, ref_value, vmap, ids):
    """(base logits [Vb], alpha * remap(value logits) [Vb]) for one unpadded prefix, float32, no cache."""
    z = ref_base(ids[None]).logits[0, -1].float()
    Vb = z.shape[0]
    m = vmap.to(ids.device) if vmap is not None else None
    v = ref_value(value_input_ids(ids, m, ref_value.config.vocab_size)[None]).logits[0, -1].float()
    return z, ALPHA * remap(v.cpu(), vmap, Vb).to(z.device)


def _check_greedy_steps(out, ids, mask, ref_base, ref_value, vmap, guidance=None):
    T = ids.shape[1]
    checked = 0
    for i in range(ids.shape[0]):
        prompt = ids[i][mask[i].bool()]
        for s in range(NEW):
            prefix = torch.cat([prompt, out[i, T:T + s]])
            zb, zv = _ref_parts(ref_base, ref_value, vmap, prefix)
            z = zb + zv
            chosen = int(out[i, T + s])
            assert z[chosen] >= z.max() - TOL, (f"row {i} step {s}: chose {chosen} (ref {z[chosen]:.3f}) but the "
                                                f"reference max is {z.max():.3f} at {int(z.argmax())}")
            if guidance is not None:
                added = guidance[s][i]
                err = (added - zv).abs().max().item()
                assert err <= TOL, f"row {i} step {s}: guidance added to scores off by {err:.3f}"
            checked += 1
    return checked


class _Recorder(LogitsProcessor):
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


@pytest.mark.parametrize("kind", ["identity-tail", "random-map"])
def test_processor_bf16_value_in_place_on_float32_scores(kind):
    base, value, vmap, ref_base, ref_value = _models(kind)
    ids, mask = left_pad(random_prompts([5, 11, 2]))
    ids, mask = ids.cuda(), mask.cuda()
    before, after = _Recorder(), _Recorder()
    proc = IVLLogitsProcessor(value, alpha=ALPHA, vocab_map=vmap.cuda() if vmap is not None else None,
                              attention_mask=mask)
    out = base.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([before, proc, after]),
                        max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert before.seen[0].dtype == torch.float32  # generate() hands float32 scores to processors
    guidance = [a - b for a, b in zip(after.seen, before.seen)]
    assert _check_greedy_steps(out, ids, mask, ref_base, ref_value, vmap, guidance) == 3 * NEW


@pytest.mark.parametrize("kind", ["identity-tail", "random-map"])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_guided_causal_lm_bf16(kind, backend):
    from ivl_kernels import _backends

    if backend == "cuda" and _backends.cuda_extension() is None:
        pytest.skip("CUDA extension not built")
    base, value, vmap, ref_base, ref_value = _models(kind)
    ids, mask = left_pad(random_prompts([3, 9, 6, 1], seed=11))
    ids, mask = ids.cuda(), mask.cuda()
    lm = GuidedCausalLM(base, value, alpha=ALPHA, vocab_map=vmap.cuda() if vmap is not None else None,
                        backend=backend)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0)
    assert out.device.type == "cuda" and out.shape == (4, ids.shape[1] + NEW)
    assert _check_greedy_steps(out, ids, mask, ref_base, ref_value, vmap) == 4 * NEW

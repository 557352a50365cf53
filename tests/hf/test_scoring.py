"""GuidedCausalLM as a transformers causal LM: forward (guided logits, fused guided loss), log_probs, padding,
errors, and loading by name through the Auto classes (in process and, with trust_remote_code, in a fresh one)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from ivl_kernels.hf import GuidanceTerm, GuidedCausalLM  # noqa: E402
from ivl_kernels.hf import _model_api  # noqa: E402

from ._models import (guided_setup, make_base, make_value, random_prompts, reference_sequence_logits,  # noqa: E402
                      reference_token_log_probs, save_guided)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pad(prompts, side):
    T = max(p.shape[0] for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


def _real(row_mask):
    return row_mask.bool()


@pytest.mark.parametrize("kind", ["single", "proxy"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_logits_equal_the_reference_row_by_row(kind, side):
    lm, terms, base = guided_setup(kind)
    prompts = random_prompts([7, 2, 11], seed=11)
    ids, mask = _pad(prompts, side)
    out = lm(input_ids=ids, attention_mask=mask)
    assert out.loss is None and out.logits.shape == (3, 11, 300) and out.logits.dtype == torch.float32
    for i, p in enumerate(prompts):
        ref = reference_sequence_logits(base, terms, p)
        got = out.logits[i][_real(mask[i])].double()
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        # The row alone: the same numbers as inside the padded batch.
        torch.testing.assert_close(lm(p[None]).logits[0], out.logits[i][_real(mask[i])], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["single", "proxy"])
def test_loss_and_log_probs_equal_the_reference(kind, monkeypatch):
    # A small chunk: the multi-term loss runs over several chunks of rows.
    monkeypatch.setattr(_model_api, "_SCORE_CHUNK_ELEMS", 4 * 300)
    lm, terms, base = guided_setup(kind, seed=4)
    prompts = random_prompts([9, 5, 12, 3], seed=12)
    ids, mask = _pad(prompts, "left")
    labels = ids.clone()
    labels[0, -4] = -100  # an ignored label inside a row
    out = lm(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # a loss call builds no [B, T, V] logits unless asked
    lp = lm.log_probs(ids, attention_mask=mask, labels=labels)
    nll, n = 0.0, 0
    for i, p in enumerate(prompts):
        ref = reference_token_log_probs(base, terms, p)
        row_labels = labels[i][_real(mask[i])]
        kept = row_labels[1:] != -100
        got = lp[i][_real(mask[i])][1:].double()
        torch.testing.assert_close(got[kept], ref[kept], atol=2e-4, rtol=1e-4)
        assert (got[~kept] == 0).all() and (lp[i][~_real(mask[i])] == 0).all() and lp[i, mask[i].argmax()] == 0
        nll, n = nll - ref[kept].sum(), n + int(kept.sum())
    torch.testing.assert_close(out.loss.double(), nll / n, atol=1e-4, rtol=1e-4)
    # The fused scorer against the logits path of the same model.
    logits = lm(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True).logits
    via_logits = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    scored = (labels[:, 1:] != -100) & (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    torch.testing.assert_close(lp[:, 1:].double()[scored], via_logits[scored], atol=1e-5, rtol=1e-5)
    # num_items_in_batch (transformers' Trainer) replaces the count of kept labels.
    total = lm(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1).loss
    torch.testing.assert_close(total.double(), nll, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kind", ["single", "proxy"])
def test_suppressed_ids_are_minus_inf_in_logits_loss_and_log_probs(kind):
    lm, terms, base = guided_setup(kind, seed=7)
    lm.suppress_ids_from = 280  # a head padded past its tokenizer
    ids = random_prompts([10], vocab=280, seed=3)[0][None]
    ids[0, 6] = 290  # a suppressed id as a target
    logits = lm(ids).logits
    assert torch.isinf(logits[..., 280:]).all() and (logits[..., 280:] < 0).all()
    ref = reference_token_log_probs(base, terms, ids[0], suppress_from=280)
    lp = lm.log_probs(ids)[0, 1:].double()
    assert lp[5] == float("-inf") and ref[5] == float("-inf")
    keep = torch.arange(9) != 5
    torch.testing.assert_close(lp[keep], ref[keep], atol=2e-4, rtol=1e-4)
    labels = ids.clone()
    labels[0, 6] = -100
    torch.testing.assert_close(lm(ids, labels=labels).loss.double(), -ref[keep].mean(), atol=1e-4, rtol=1e-4)


def test_logits_to_keep_and_return_dict():
    lm, terms, base = guided_setup("single", seed=2)
    ids = random_prompts([8], seed=4)[0][None]
    full = lm(ids).logits
    torch.testing.assert_close(lm(ids, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(lm(ids, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])
    # A 0-d tensor indexes one position, as in transformers' own forward: [B, V].
    one = lm(ids, logits_to_keep=torch.tensor(5)).logits
    assert one.shape == base(ids, logits_to_keep=torch.tensor(5)).logits.shape
    torch.testing.assert_close(one, full[:, 5])
    loss, logits = lm(ids, labels=ids, return_logits=True, return_dict=False)
    assert loss.dim() == 0 and logits.shape == full.shape


def test_position_ids_of_one_row_serve_the_batch():
    """``position_ids [1, T]`` for a ``[B, T]`` batch (transformers broadcasts it)."""
    lm, _, _ = guided_setup("single", seed=2)
    ids = torch.cat([random_prompts([8], seed=4)[0][None], random_prompts([8], seed=5)[0][None]])
    pos = torch.arange(8)[None]
    torch.testing.assert_close(lm(ids, position_ids=pos).logits, lm(ids, position_ids=pos.expand(2, -1)).logits)


def test_transformers_model_interface():
    lm, _, base = guided_setup("proxy")
    assert lm.config.model_type == "ivl_guided" and lm.config.vocab_size == 300
    assert lm.config.max_position_embeddings == 256 and lm.config.get_text_config().model_type == "llama"
    assert lm.config.ivl_guided["terms"][1]["alpha"] == -0.6
    assert lm.can_generate() and lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.get_input_embeddings() is base.get_input_embeddings() and lm.get_output_embeddings() is None
    lm.tie_weights()
    assert lm.eval() is lm and lm.generation_config is base.generation_config
    assert lm.num_parameters() == sum(p.numel() for p in lm.parameters())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(inputs_embeds=torch.zeros(1, 3, 48)), ValueError, "inputs_embeds"),
    (dict(past_key_values=object()), ValueError, "past_key_values"),
    (dict(use_cache=True), ValueError, "use_cache"),
    (dict(output_hidden_states=True), ValueError, "output_hidden_states"),
    (dict(labels=torch.zeros(1, 2, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.full((1, 3), 300)), ValueError, "labels"),
    (dict(labels=torch.zeros(1, 3)), TypeError, "labels"),
    (dict(attention_mask=torch.ones(1, 4)), ValueError, "attention_mask"),
    (dict(logits_to_keep=-1), TypeError, "logits_to_keep"),
    (dict(token_type_ids=torch.zeros(1, 3)), TypeError, "token_type_ids"),
])
def test_forward_errors_name_the_argument(kwargs, exc, match):
    lm, _, _ = guided_setup("single")
    with pytest.raises(exc, match=match):
        lm(input_ids=torch.tensor([[3, 4, 5]]), **kwargs)


def test_forward_input_errors():
    lm, _, _ = guided_setup("single")
    with pytest.raises(ValueError, match="input_ids"):
        lm(torch.tensor([[3, 4, 300]]))
    with pytest.raises(TypeError, match="input_ids"):
        lm(torch.tensor([[3.0, 4.0]]))
    with pytest.raises(ValueError, match="input_ids is required"):
        lm()
    templated = GuidedCausalLM(make_base(), [GuidanceTerm(make_value(), 1.0, prompt_template="Q: {prompt}")])
    with pytest.raises(ValueError, match="prompt_template"):
        templated.log_probs(torch.tensor([[3, 4, 5]]))


# ---- loading by name -------------------------------------------------------------------------------------------
def test_checkpoint_has_auto_map_and_shims_only(tmp_path):
    directory, _ = save_guided(tmp_path, *guided_setup("proxy", seed=9))
    with open(os.path.join(directory, "config.json")) as f:
        doc = json.load(f)
    assert doc["auto_map"] == {"AutoConfig": "configuration_ivl_guided.IVLGuidedConfig",
                               "AutoModelForCausalLM": "modeling_ivl_guided.GuidedCausalLM"}
    for name in ("configuration_ivl_guided.py", "modeling_ivl_guided.py"):
        with open(os.path.join(directory, name)) as f:
            code = [line for line in f.read().splitlines() if line and not line.startswith("#")]
        assert len(code) == 1 and code[0].startswith("from ivl_kernels.hf.")  # an import, no copy of the code


def test_auto_model_for_causal_lm_loads_the_guided_model(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ivl_kernels.hf import IVLGuidedConfig

    directory, lm = save_guided(tmp_path, *guided_setup("proxy", seed=9))
    assert isinstance(AutoConfig.from_pretrained(directory), IVLGuidedConfig)
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert isinstance(loaded, GuidedCausalLM) and loaded.config.name_or_path == directory
    ids = random_prompts([6, 9], seed=8)
    ids, mask = _pad(ids, "left")
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, lm(ids, attention_mask=mask).logits)
    for name, value in (("gguf_file", "model.gguf"), ("quantization_config", {"load_in_4bit": True})):
        with pytest.raises(ValueError, match=name):
            GuidedCausalLM.from_pretrained(directory, **{name: value})
    # dtype= on every release (4.50-4.55 read only torch_dtype): every model is loaded in it.
    wide = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    assert {p.dtype for p in wide.parameters()} == {torch.float64}


def test_auto_model_for_causal_lm_keeps_the_guided_config():
    """transformers 4.50's ``AutoModelForCausalLM`` swaps the config it read for ``get_text_config(decoder=True)``
    (a guided config's is the base's) before choosing the class; 5.x keeps it. Either way a guided config reaches
    ``GuidedCausalLM`` whole, and any other config is handled as transformers handles it."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    from ivl_kernels.hf import IVLGuidedConfig

    prepare = getattr(AutoModelForCausalLM, "_prepare_config_for_auto_class", lambda config: config)
    guided = IVLGuidedConfig(text_config=PretrainedConfig())
    assert prepare(guided) is guided
    other = PretrainedConfig()
    other.text_config = PretrainedConfig()
    assert prepare(other) in (other, other.text_config)


def test_trust_remote_code_loads_in_a_fresh_process(tmp_path):
    directory, lm = save_guided(tmp_path, *guided_setup("proxy", seed=9))
    ids = torch.tensor([[5, 17, 3, 250, 299, 42]])
    want = lm(ids).logits[0, -1]
    code = ("import sys, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            "assert 'ivl_kernels' not in sys.modules\n"
            f"m = AutoModelForCausalLM.from_pretrained({directory!r}, trust_remote_code=True)\n"
            "print(type(m).__module__, type(m).__name__)\n"
            f"print(m(torch.tensor({ids.tolist()})).logits[0, -1].tolist())\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == "ivl_kernels.hf.guided GuidedCausalLM"
    torch.testing.assert_close(torch.tensor(json.loads(lines[-1])), want, atol=1e-5, rtol=1e-5)

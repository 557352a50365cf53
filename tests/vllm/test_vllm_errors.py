"""Bad guided checkpoints are refused when vLLM builds its configuration (front-end, before any engine process
starts), with a message that says what to do; nothing of this can surface while serving."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

# "vllm" alone would import this directory as a namespace package where vLLM is absent: ask for a module of it.
pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make test-vllm)")

from _vllm_util import ENGINE  # noqa: E402


def _config(path, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(dtype="float32", max_model_len=256)
    args.update(kw)
    return EngineArgs(model=path, **args).create_engine_config()


def _checkpoint(models, tmp_path, terms, name="g", **kw):
    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    out = str(tmp_path / name)
    write_guided_checkpoint(out, models["base"], terms, **kw)
    return out


def _edit_json(path, fn):
    with open(path) as f:
        doc = json.load(f)
    fn(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _copy_model(models, name, tmp_path, fn):
    dst = str(tmp_path / f"{name}_edited")
    shutil.copytree(models[name], dst)
    _edit_json(os.path.join(dst, "config.json"), fn)
    return dst


def test_a_good_checkpoint_passes(checkpoints):
    cfg = _config(checkpoints["proxy"])
    assert cfg.model_config.architecture == "IVLGuidedForCausalLM"
    # The per-request alpha processor, for five terms and their alphas (V1 runner: vLLM's CPU build has no Triton
    # CPU backend).
    from ivl_kernels.vllm import _per_request

    from _vllm_models import PROXY_ALPHAS

    assert cfg.model_config.logits_processors == [_per_request.processor_fqcn(5, False, PROXY_ALPHAS)]
    name = cfg.model_config.logits_processors[0]
    assert name.startswith("ivl_kernels.vllm._per_request:AlphaProcessorV1_T5_3f800000_bf000000_")
    cls = getattr(_per_request, name.split(":")[1])
    assert cls.n_terms == 5 and cls.checkpoint_alphas == tuple(float(np.float32(a)) for a in PROXY_ALPHAS)
    assert cfg.model_config.max_model_len == 256 and cfg.model_config.get_vocab_size() == 300


def test_missing_value_directory(models, tmp_path):
    out = _checkpoint(models, tmp_path, [{"model": models["value"]}])
    _edit_json(os.path.join(out, "config.json"),
               lambda d: d["ivl_guided"]["terms"][0].update(model="../moved_away/value"))
    with pytest.raises(ValueError, match="value model directory .*does not exist"):
        _config(out)


def test_missing_directory_fails_llm_before_an_engine_starts(models, tmp_path):
    from vllm import LLM

    out = _checkpoint(models, tmp_path, [{"model": models["value"]}])
    _edit_json(os.path.join(out, "config.json"), lambda d: d["ivl_guided"].update(base="/nonexistent/base"))
    with pytest.raises(ValueError, match="base model directory '/nonexistent/base' does not exist"):
        LLM(model=out, enforce_eager=True, **ENGINE)


def test_architecture_vllm_lacks(models, tmp_path):
    odd = _copy_model(models, "value", tmp_path, lambda d: d.update(architectures=["NoSuchModelForCausalLM"]))
    out = _checkpoint(models, tmp_path, [{"model": odd}])
    with pytest.raises(ValueError, match="NoSuchModelForCausalLM.*vLLM does not implement"):
        _config(out)


def test_vocabulary_mismatch_without_a_map(models, tmp_path):
    out = _checkpoint(models, tmp_path, [{"model": models["small"]}])
    # compose refuses a larger vocabulary without a map: write the reference by hand
    _edit_json(os.path.join(out, "config.json"), lambda d: d["ivl_guided"]["terms"][0].update(model=models["big"]))
    with pytest.raises(ValueError, match=r"vocabulary \(320 ids\) does not fit the base's \(300\) without a map"):
        _config(out)


def test_tokenizers_that_differ_need_the_transformers_path(models, tmp_path):
    from tests.hf._models import CORPUS, train_bpe_tokenizer

    other = str(tmp_path / "other_tok")
    shutil.copytree(models["value"], other)
    train_bpe_tokenizer(300, [" ".join(reversed(s.split())) + " zq xv" for s in CORPUS]).save_pretrained(other)
    out = _checkpoint(models, tmp_path, [{"model": models["value"]}])
    _edit_json(os.path.join(out, "config.json"), lambda d: d["ivl_guided"]["terms"][0].update(model=other))
    with pytest.raises(ValueError, match="tokenise differently.*re-tokenisation.*IVLLogitsProcessor"):
        _config(out)


def test_value_positions_below_max_model_len(models, tmp_path):
    out = _checkpoint(models, tmp_path, [{"model": models["short"]}])
    with pytest.raises(ValueError, match="max_position_embeddings=64, below the engine's max_model_len=256"):
        _config(out)
    assert _config(out, max_model_len=64).model_config.max_model_len == 64


def test_quantization_config_would_leak(models, tmp_path):
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    qvalue = _copy_model(models, "value", tmp_path, lambda d: d.update(quantization_config=quant))
    out = _checkpoint(models, tmp_path, [{"model": qvalue}])
    with pytest.raises(ValueError, match="base model is unquantized and the value model is quantized"):
        _config(out)


def test_quantized_base_with_unquantized_value(models, tmp_path, monkeypatch):
    from ivl_kernels.vllm import _plan

    # The base's quantization config would be the engine's (vLLM builds every sub-model with it): refused. The
    # check itself is exercised directly (vLLM's CPU build may reject the quantization method first).
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    qbase = _copy_model(models, "base", tmp_path, lambda d: d.update(quantization_config=quant))
    out = str(tmp_path / "qb")
    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    write_guided_checkpoint(out, models["base"], [{"model": models["value"]}])
    cfg = _config(out)
    _edit_json(os.path.join(out, "config.json"), lambda d: d["ivl_guided"].update(base=qbase))
    with pytest.raises(ValueError, match="base model is quantized \\(fp8\\) and the value model is unquantized"):
        _plan.check_guided_config(cfg)


def test_pipeline_parallel_refused(checkpoints):
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        _config(checkpoints["one"], pipeline_parallel_size=2, distributed_executor_backend="mp")


def test_lora_refused(checkpoints):
    with pytest.raises(ValueError, match="LoRA adapters"):
        _config(checkpoints["one"], enable_lora=True)


def test_speculative_methods_other_than_a_draft_model_refused(checkpoints):
    with pytest.raises(ValueError, match="speculative decoding method 'ngram' is not supported.*draft_model"):
        _config(checkpoints["one"], speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                         "prompt_lookup_max": 2})


def test_draft_model_accepted_guided_draft_refused(checkpoints, models):
    cfg = _config(checkpoints["one"], speculative_config={"method": "draft_model", "model": models["value"],
                                                           "num_speculative_tokens": 2})
    # V1 runner + speculative decoding: vLLM refuses custom logits processors, so none is added (see README).
    assert cfg.speculative_config.method == "draft_model" and not cfg.model_config.logits_processors
    with pytest.raises(ValueError, match="draft model is itself a guided checkpoint"):
        _config(checkpoints["one"], speculative_config={"method": "draft_model", "model": checkpoints["one"],
                                                         "num_speculative_tokens": 2})


def test_ivl_alpha_refused_in_the_front_end_under_speculative_decoding(checkpoints, models):
    # No processor under speculative decoding (V1 runner), so no validate_params of the plugin's: the plugin's
    # hook on vLLM's front-end validator refuses every request that sets ivl_alpha (it used to be served with the
    # checkpoint's alphas, unvalidated), and only for a guided engine. Without an engine: vLLM's InputProcessor,
    # the front-end's per-request validation that LLM.generate and the OpenAI server go through.
    from vllm import SamplingParams
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.v1.engine.input_processor import InputProcessor

    spec = {"method": "draft_model", "model": models["base"], "num_speculative_tokens": 2}
    guided = InputProcessor(_config(checkpoints["one"], speculative_config=spec))
    plain = InputProcessor(_config(models["base"], speculative_config=spec))

    def check(processor, extra_args):
        processor._validate_params(SamplingParams(max_tokens=2, extra_args=extra_args), ("generate",))

    for alpha in (0.0, -1.0, [0.7], "abc", 1e39, [float("nan")]):
        with pytest.raises(ValueError, match=r'extra_args\["ivl_alpha"\].*: per-request alpha is not available with '
                                             r"speculative decoding .*checkpoint's alphas \[0.7"):
            check(guided, {"ivl_alpha": alpha})
        check(plain, {"ivl_alpha": alpha})  # not a guided model: its extra_args are none of the plugin's business
    for extra_args in (None, {}, {"ivl_alpha": None}, {"other": 1}):
        check(guided, extra_args)
    with pytest.raises(ValueError) as refused:
        check(guided, {"ivl_alpha": 0.0})
    response = create_error_response(refused.value)
    assert response.error.code == 400 and "ivl_alpha" in response.error.message  # what the OpenAI server answers


# ---- sub-models vLLM serves through its Transformers backend ------------------------------------------------------
def _transformers_term(models, tmp_path, name, build):
    """A term of an architecture vLLM 0.32 serves through its Transformers backend (no native vLLM class), saved
    with the base's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    path = str(tmp_path / name)
    build().eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(models["base"]).save_pretrained(path)
    return path


def test_transformers_backend_term_with_other_attention_shapes_refused(models, tmp_path):
    # That backend sizes a sub-model's attention from the engine's text config (the base's: head size 64), not
    # from the term's own (32): the engine started, and its first request died. Refused at load instead.
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=None)
    term = _transformers_term(models, tmp_path, "olmo2", lambda: Olmo2ForCausalLM(cfg))
    out = _checkpoint(models, tmp_path, [{"model": term}])
    with pytest.raises(ValueError, match=r"Olmo2ForCausalLM, which vLLM serves through its Transformers backend.*"
                                         r"head_size=64 instead of its 32"):
        _config(out)


def test_transformers_backend_check_builds_one_submodel_config(checkpoints, monkeypatch):
    # with_hf_config deep-copies the engine's model config: the check builds one copy and reads the shapes it
    # would get before pointing the copy's text config at the term's own (it built two copies).
    from transformers import Olmo2Config
    from vllm.config import VllmConfig

    from ivl_kernels.vllm._plan import _transformers_backend_problem

    cfg = _config(checkpoints["one"])
    term = Olmo2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=1, eos_token_id=None, architectures=["Olmo2ForCausalLM"])
    calls = []
    original = VllmConfig.with_hf_config

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VllmConfig, "with_hf_config", counted)
    problem = _transformers_backend_problem(cfg, term, False)
    assert len(calls) == 1
    assert "head_size=64 instead of its 32" in problem and "total_num_attention_heads" not in problem
    assert cfg.model_config.model_arch_config.head_size == 64  # the engine's own config is left alone


def test_transformers_backend_term_with_a_biased_head_refused(models, tmp_path):
    # Phi's LM head has a bias, which that backend registers only while loading weights (after the model's own
    # head check): it was silently dropped. Here with the base's attention shapes, so only the bias is wrong.
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0,
                    bos_token_id=1, eos_token_id=None, partial_rotary_factor=1.0)
    term = _transformers_term(models, tmp_path, "phi", lambda: PhiForCausalLM(cfg))
    out = _checkpoint(models, tmp_path, [{"model": term}])
    with pytest.raises(ValueError, match="PhiForCausalLM, which vLLM serves through its Transformers backend.*"
                                         "its LM head has a bias"):
        _config(out)


def test_a_head_bias_registered_while_loading_weights_is_refused(monkeypatch):
    # The safety net behind the check above: every head is checked again once the weights are loaded, before the
    # heads are gathered or packed (stand-in sub-models: the value model registers its bias in load_weights, as
    # vLLM's Transformers backend does).
    import torch
    from torch import nn
    from types import SimpleNamespace
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from ivl_kernels.vllm.model import IVLGuidedForCausalLM

    class Sub(nn.Module):
        def __init__(self, bias_on_load):
            super().__init__()
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.bias_on_load = bias_on_load

        def load_weights(self, weights):
            if self.bias_on_load:
                self.lm_head.bias = nn.Parameter(torch.zeros(10))
            return {"lm_head.weight"}

    monkeypatch.setattr(DefaultModelLoader, "_get_weights_iterator", lambda self, source: iter(()))
    for bias_on_load in (False, True):
        base, value = Sub(False), Sub(bias_on_load)
        stub = SimpleNamespace(_load_config=LoadConfig(), base=base, terms=[value], term_names=["term_a"],
                               plan=SimpleNamespace(base=SimpleNamespace(ref="base"),
                                                    terms=[SimpleNamespace(ref="value", role="value")]),
                               _full_heads=[None], tp=1, _pack_heads=lambda: False)
        stub._check_heads = lambda: IVLGuidedForCausalLM._check_heads(stub)
        if not bias_on_load:
            assert IVLGuidedForCausalLM.load_weights(stub, []) == {"base.lm_head.weight", "term_a.lm_head.weight"}
            continue
        with pytest.raises(ValueError, match=r"the value model \(Sub\): its LM head has a bias"):
            IVLGuidedForCausalLM.load_weights(stub, [])


# ---- the base's generation_config.json -----------------------------------------------------------------------------
def test_the_base_generation_config_is_served(models, tmp_path):
    # GuidedCausalLM generates with the base's generation config (EOS ids, default sampling parameters), as vLLM
    # does serving the base alone; compose writes none into the guided checkpoint.
    base = str(tmp_path / "base_gc")
    shutil.copytree(models["base"], base)
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [113, 7], "temperature": 0.6, "top_p": 0.9}, f)
    from ivl_kernels.hf.checkpoint import write_guided_checkpoint

    out = str(tmp_path / "g_gc")
    write_guided_checkpoint(out, base, [{"model": models["value"], "alpha": 0.7}])
    assert not os.path.exists(os.path.join(out, "generation_config.json"))
    mc = _config(out).model_config
    assert mc.get_diff_sampling_param() == {"temperature": 0.6, "top_p": 0.9}
    assert mc.try_get_generation_config()["eos_token_id"] == [113, 7]  # what vLLM stops at
    assert not os.path.exists(os.path.join(out, "generation_config.json"))  # nothing written into the checkpoint
    # The engine's own choice stays: vLLM's neutral defaults, or a directory given.
    assert _config(out, generation_config="vllm").model_config.get_diff_sampling_param() == {}
    # A generation_config.json of the guided checkpoint itself is read as vLLM reads any model's.
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 5, "temperature": 0.3}, f)
    mc = _config(out).model_config
    assert mc.generation_config == "auto" and mc.get_diff_sampling_param() == {"temperature": 0.3}


"""Bad guided checkpoints are refused when vLLM builds its configuration (front-end, before any engine process
starts), with a message that says what to do; nothing of this can surface while serving."""

from __future__ import annotations

import json
import os
import shutil

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
    # The per-request alpha processor, for five terms (V1 runner: vLLM's CPU build has no Triton CPU backend).
    assert cfg.model_config.logits_processors == ["ivl_kernels.vllm._per_request:AlphaProcessorV1_T5"]
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

"""``IVLGuidedConfig``: the transformers config class of a guided checkpoint (``model_type: ivl_guided``).

``GuidedCausalLM.config`` is one; ``import ivl_kernels.hf`` registers it with ``AutoConfig`` (and
``GuidedCausalLM`` with ``AutoModelForCausalLM``), and a checkpoint's ``auto_map`` names it for
``trust_remote_code=True`` loading in processes that have not imported the package.

vLLM reads a model's limits (``max_position_embeddings``, ``vocab_size``, heads, dtype) from
``config.get_text_config()``: here that is the base model's config, stored as ``text_config`` by
``ivl-kernels compose``. The guidance terms are read from ``config.ivl_guided`` (see ``ivl_kernels.checkpoint_format``).
Needs ``transformers`` only (no vLLM).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..checkpoint_format import GUIDED_ARCHITECTURE, GUIDED_MODEL_TYPE


def _text_config(d):
    from transformers import CONFIG_MAPPING

    if d is None or isinstance(d, PretrainedConfig):
        return d
    d = dict(d)
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"guided checkpoint: the base config (text_config) has model_type {model_type!r}, which "
                         f"transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(d)


class IVLGuidedConfig(PretrainedConfig):
    model_type = GUIDED_MODEL_TYPE

    def __init__(self, ivl_guided=None, text_config=None, **kwargs):
        self.ivl_guided = dict(ivl_guided or {})
        self.text_config = _text_config(text_config)
        kwargs.setdefault("architectures", [GUIDED_ARCHITECTURE])
        super().__init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None, **kwargs):
        return self.text_config if self.text_config is not None else self

    def to_dict(self):
        out = super().to_dict()
        if isinstance(self.text_config, PretrainedConfig):
            out["text_config"] = self.text_config.to_dict()
        return out

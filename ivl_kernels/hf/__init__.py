"""Hugging Face transformers integration (imports ``transformers``; ``import ivl_kernels`` does not).

- ``IVLLogitsProcessor``: guide any ``model.generate()`` with a value network (incremental, batched, in place).
- ``GuidedCausalLM`` / ``GuidanceTerm``: guided decoding with one fused LM head for the base and the value
  network(s); several terms for proxy-tuning (expert +alpha, anti-expert -alpha).
- ``IVLForCausalLM``: IVL training module (frozen base, fused guided cross-entropy).
- ``IVLGuidedConfig``: a guided checkpoint's config. Importing this package registers it with ``AutoConfig`` and
  ``GuidedCausalLM`` with ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(DIR)`` loads a guided
  checkpoint (in a process that has not imported it: ``trust_remote_code=True`` and the checkpoint's ``auto_map``).
"""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError("ivl_kernels.hf needs transformers: pip install 'transformers>=4.50'") from exc

from ..checkpoint_format import GUIDED_MODEL_TYPE
from .config import IVLGuidedConfig
from .guided import GuidanceTerm, GuidedCausalLM, GuidedGenerateOutput
from .processor import IVLLogitsProcessor
from .training import IVLForCausalLM, IVLOutput


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    # exist_ok: idempotent, and the vLLM plugin registers the same config class.
    AutoConfig.register(GUIDED_MODEL_TYPE, IVLGuidedConfig, exist_ok=True)
    AutoModelForCausalLM.register(IVLGuidedConfig, GuidedCausalLM, exist_ok=True)
    _keep_guided_config(AutoModelForCausalLM)


def _keep_guided_config(auto_class) -> None:
    """Where ``auto_class.from_pretrained`` swaps the config it read for ``config.get_text_config(decoder=True)``
    before choosing the model class (transformers 4.50's ``AutoModelForCausalLM``, to load a multimodal model's
    text decoder), a guided checkpoint's config would become its base's config and the base's class would look for
    weight files in the guided directory (which has none). There, a guided config is kept as read (every other
    config as before), so ``GuidedCausalLM.from_pretrained`` is chosen. Found by calling the hook on a probe
    guided config (capability): releases that keep it (5.x) are left alone."""
    from transformers import PretrainedConfig

    prepare = getattr(auto_class, "_prepare_config_for_auto_class", None)
    if prepare is None or getattr(prepare, "_ivl_keeps_guided_config", False):
        return
    probe = IVLGuidedConfig(text_config=PretrainedConfig())
    if prepare(probe) is probe:
        return
    swap = prepare.__func__

    def _prepare_config_for_auto_class(cls, config):
        return config if isinstance(config, IVLGuidedConfig) else swap(cls, config)

    _prepare_config_for_auto_class._ivl_keeps_guided_config = True
    _prepare_config_for_auto_class.__doc__ = swap.__doc__
    auto_class._prepare_config_for_auto_class = classmethod(_prepare_config_for_auto_class)


_register_auto_classes()

__all__ = ["IVLLogitsProcessor", "GuidedCausalLM", "GuidanceTerm", "GuidedGenerateOutput", "IVLForCausalLM",
           "IVLOutput", "IVLGuidedConfig"]

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


_register_auto_classes()

__all__ = ["IVLLogitsProcessor", "GuidedCausalLM", "GuidanceTerm", "GuidedGenerateOutput", "IVLForCausalLM",
           "IVLOutput", "IVLGuidedConfig"]

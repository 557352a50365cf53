"""Hugging Face transformers integration (imports ``transformers``; ``import ivl_kernels`` does not).

- ``IVLLogitsProcessor``: guide any ``model.generate()`` with a value network (incremental, batched, in place).
- ``GuidedCausalLM`` / ``GuidanceTerm``: guided decoding with one fused LM head for the base and the value
  network(s); several terms for proxy-tuning (expert +alpha, anti-expert -alpha).
- ``IVLForCausalLM``: IVL training module (frozen base, fused guided cross-entropy).
"""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError("ivl_kernels.hf needs transformers: pip install 'transformers>=4.50'") from exc

from .guided import GuidanceTerm, GuidedCausalLM, GuidedGenerateOutput
from .processor import IVLLogitsProcessor
from .training import IVLForCausalLM, IVLOutput

__all__ = ["IVLLogitsProcessor", "GuidedCausalLM", "GuidanceTerm", "GuidedGenerateOutput", "IVLForCausalLM",
           "IVLOutput"]

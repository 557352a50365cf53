"""ivl-kernels: fused kernels for logit-level guidance of language models.

    guided_logits = base_logits + alpha * remap(value_logits)

See ``fused_guided_logits`` (decoding / scoring), ``fused_guided_cross_entropy`` (training the value network
without materialising ``[tokens, vocab]`` logits) and ``VocabMap`` (vocabulary maps between tokenizers).
``ivl_kernels.hf`` holds the Hugging Face transformers integration (imports transformers).
"""

from .ops.guided_logits import fused_guided_logits
from .ops.guided_cross_entropy import fused_guided_cross_entropy
from .ops.packed_heads import pack_head_weights
from .vocab import VocabMap

__version__ = "0.1.0"
__all__ = ["fused_guided_logits", "fused_guided_cross_entropy", "pack_head_weights", "VocabMap", "__version__"]

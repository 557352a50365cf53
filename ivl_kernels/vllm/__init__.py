"""vLLM plugin: serve a guided checkpoint (``ivl-kernels compose``) with vLLM.

    pip install "ivl-kernels[vllm]"          # vLLM finds the plugin through the ``vllm.general_plugins`` entry point
    vllm.LLM(model="guided_dir")             # or: python -m vllm.entrypoints.openai.api_server --model guided_dir

``register()`` (called by vLLM in every process it starts) registers

* the config class ``IVLGuidedConfig`` for ``model_type: ivl_guided`` with transformers' ``AutoConfig``; its
  ``get_text_config()`` is the base model's config, so vLLM reads ``max_position_embeddings``, the vocabulary
  and the dtype from the base;
* the architecture ``IVLGuidedForCausalLM`` (``ivl_kernels.vllm.model``): every model is vLLM's own class for its
  architecture with its own layers in vLLM's paged KV cache; ``compute_logits`` is ``fused_guided_logits`` with
  the base LM head fused (torch backend on CPU, CUDA/Triton on GPU, ``backend="auto"``);
* a config hook (vLLM's ``MODELS_CONFIG_MAP``) that checks the checkpoint in the front-end process, before any
  engine process starts: a missing model directory, an architecture vLLM lacks, a vocabulary that does not fit
  without a map, a pair that needs text re-tokenisation (tokenizers differ, no map), a term whose
  ``max_position_embeddings`` is below ``max_model_len``, quantization configs that differ between the base and a
  term (vLLM would apply the base's to every model), pipeline parallelism, LoRA, speculative methods other than
  ``draft_model`` (and a guided checkpoint as the draft): each is a ``ValueError`` at load, never mid-serving;
* the per-request alpha logits processor (``ivl_kernels.vllm._per_request``) in the engine's
  ``logits_processors``, added by the same hook; under speculative decoding with the V1 runner, where vLLM runs no
  custom logits processor, the hook instead makes the front-end refuse requests that set ``ivl_alpha``.

Semantics are ``ivl_kernels.hf.GuidedCausalLM``'s (tests/vllm checks greedy tokens are identical). A request may
set its own alphas, ``SamplingParams(extra_args={"ivl_alpha": [1.0, -0.5]})`` (``vllm_xargs`` in the OpenAI API):
``compute_logits`` uses the checkpoint's and the logits processor corrects that request's rows in place with
``fused_guided_logits`` and a per-row alpha; see ``_per_request`` for what returned logprobs, prompt logprobs and
penalties then see. Draft-model speculative decoding verifies the drafts against the guided logits (the target's
``compute_logits``), so its outputs are the guided distribution's.

Tensor parallelism (``tensor_parallel_size=N``; tested with N = 2 on vLLM's CPU build):

* the base LM head stays vocabulary-sharded as vLLM shards it (``ParallelLMHead``: rank ``r`` holds base ids
  ``[r * Vb_pad / tp, (r + 1) * Vb_pad / tp)``) and its hidden states are replicated after the last all-reduce;
* each term's head is gathered once at load (its own vocabulary shards do not line up with the base's, and a map
  may send a rank's base ids to any value row), so every rank holds the whole value head (small next to the
  base's: ~7% of its bytes for Qwen2.5-7B/0.5B) and runs ``fused_guided_logits`` on its own base ids with the
  map sliced to them (``map[r_lo:r_hi]``, or the identity slice with ``-1`` past ``Vv``), with no communication;
  the value backbones stay tensor-parallel as vLLM builds them (their hidden states are replicated after the
  last all-reduce, like the base's). A refinement left for later: keep only the rows ``map[r_lo:r_hi]`` reads,
  as a compact local head with a local map;
* one all-gather of the ``[M, Vb / tp]`` guided shards (vLLM's ``LogitsProcessor._gather_logits``), then the
  padded rows are dropped and ids ``>= suppress_from`` set to ``-inf``: the same single gather vLLM does for the
  base alone.
"""

from __future__ import annotations

from ..checkpoint_format import GUIDED_ARCHITECTURE as ARCHITECTURE, GUIDED_MODEL_TYPE as MODEL_TYPE


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent)."""
    from transformers import AutoConfig

    from ..hf.config import IVLGuidedConfig

    try:
        AutoConfig.register(MODEL_TYPE, IVLGuidedConfig)
    except ValueError:  # already registered in this process
        pass
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "ivl_kernels.vllm.model:IVLGuidedForCausalLM")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCHITECTURE not in MODELS_CONFIG_MAP:
        from ._plan import verify_hook

        MODELS_CONFIG_MAP[ARCHITECTURE] = verify_hook()


__all__ = ["register", "ARCHITECTURE", "MODEL_TYPE"]

"""``IVLTrainer``: the ``transformers.Trainer`` of ``IVLForCausalLM`` (``ivl_kernels.hf.training``), used by
``ivl-kernels train`` (``ivl_kernels.hf.train_cli``) and usable on its own.

Its checkpoints (``checkpoint-N``) and final save hold the value network only (the full model, or its PEFT
adapter), the value tokenizer, the map it trained with (``vocab_map.pt``) and ``ivl_train.json``, never the base's
weights; a checkpoint is complete once its marker (``ivl_checkpoint_complete.json``) is written, last; resuming
loads the value weights back into the value network.

A module of its own because it imports ``transformers.Trainer`` (about a second, accelerate included), which
``import ivl_kernels.hf`` and the vLLM plugin's processes do not pay for.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from transformers import Trainer

from ..checkpoint_format import TRAINED_MAP as MAP_NAME
from .training import IVLForCausalLM, num_kept_targets

INFO_NAME = "ivl_train.json"
COMPLETE_NAME = "ivl_checkpoint_complete.json"


def _ivl_module(model):
    """The ``IVLForCausalLM`` inside whatever wraps it (DDP, accelerate)."""
    m = model
    for _ in range(8):
        if isinstance(m, IVLForCausalLM):
            return m
        m = getattr(m, "module", None)
        if m is None:
            break
    raise TypeError(f"IVLTrainer trains an IVLForCausalLM, got {type(model).__name__}")


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _load_full_value_weights(value, checkpoint: str) -> None:
    """Load ``value.save_pretrained`` weights (one safetensors file or an index of shards) into ``value``;
    ``ValueError`` unless every parameter is either loaded or tied to one that is."""
    from safetensors.torch import load_file

    single = os.path.join(checkpoint, "model.safetensors")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(single):
        state = load_file(single, device="cpu")
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(checkpoint, name), device="cpu"))
    else:
        raise ValueError(f"{checkpoint}: no value-network weights (model.safetensors) to resume from")
    result = value.load_state_dict(state, strict=False)
    own = value.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]  # tied weights are fine
    if missing or result.unexpected_keys:
        raise ValueError(f"{checkpoint}: value weights do not match the value network (missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]})")


class IVLTrainer(Trainer):
    """``Trainer`` for ``IVLForCausalLM``: saves and resumes the value network only.

    Checkpoints (``checkpoint-N``) and ``save_model`` write ``value_model.save_pretrained`` (the full value
    model, or its PEFT adapter), ``value_tokenizer`` when given, and ``ivl_info`` (a dict, or a callable
    ``global_step -> dict``) as ``ivl_train.json``, on the process that saves (rank 0) only. Resuming loads
    those weights back into the value network; the optimizer, scheduler, RNG and data position are restored
    by ``Trainer``.

    Gradient accumulation is token-weighted: every micro-batch's loss is divided by the number of targets
    ``IVLForCausalLM`` scores in the whole optimizer step (all its micro-batches, and all processes where
    ``average_tokens_across_devices`` is on), passed as ``num_items_in_batch``, so an optimizer step's gradient is
    that of the mean over its kept targets, as without accumulation, whatever each micro-batch's padding or masked
    prompt length (``Trainer`` would otherwise average the micro-batches' means, or count labels the loss does not
    score). Not under ``DataParallel`` (several GPUs in one process), where the micro-batches' means are averaged.
    """

    def __init__(self, *args, value_tokenizer=None, ivl_info=None, vocab_map=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.value_tokenizer = value_tokenizer
        self.ivl_info = ivl_info
        self.vocab_map = vocab_map
        # Read by Trainer (4.50 ... 5.x) in compute_loss / training_step: pass num_items_in_batch to the model and
        # do not divide its loss by the accumulation steps. DataParallel splits a micro-batch across replicas
        # after the count was taken: left to Trainer's own averaging.
        self.model_accepts_loss_kwargs = self.compute_loss_func is None and self.args.n_gpu <= 1

    def _ivl_num_items(self, batch_samples: list, device):
        """The kept targets of these micro-batches (``None`` without labels), summed over the processes when
        ``Trainer`` multiplies the loss by their number (``average_tokens_across_devices``)."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        n = sum(num_kept_targets(b["labels"], b.get("attention_mask")).to(device) for b in batch_samples)
        if getattr(self.args, "average_tokens_across_devices", False):
            n = self.accelerator.gather(n).sum()
        return n

    def _get_num_items_in_batch(self, batch_samples: list, device):
        # transformers >= 4.5x: the count of both get_batch_samples (training) and prediction_step (evaluation).
        if not self.model_accepts_loss_kwargs:
            return super()._get_num_items_in_batch(batch_samples, device)
        return self._ivl_num_items(batch_samples, device)

    def get_batch_samples(self, epoch_iterator, num_batches, device, *args, **kwargs):
        batch_samples, count = super().get_batch_samples(epoch_iterator, num_batches, device, *args, **kwargs)
        # Older transformers count here directly (every label != -100, the unscored first position included).
        if self.model_accepts_loss_kwargs and not hasattr(Trainer, "_get_num_items_in_batch"):
            count = self._ivl_num_items(batch_samples, device)
        return batch_samples, count

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        from transformers.trainer import TRAINING_ARGS_NAME
        import torch

        from .._atomic import atomic_dir

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        ivl = _ivl_module(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        kwargs = {}
        if state_dict is not None:  # FSDP / DeepSpeed: the gathered state dict of the whole IVL module
            prefix = "value_model."
            kwargs["state_dict"] = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        # Staged in a temporary sibling, then moved in: an interrupt leaves the previous files (or none).
        with atomic_dir(output_dir) as tmp:
            ivl.value_model.save_pretrained(tmp, **kwargs)
            if self.value_tokenizer is not None:
                self.value_tokenizer.save_pretrained(tmp)
            info = self.ivl_info(self.state.global_step) if callable(self.ivl_info) else self.ivl_info
            if info is not None:
                write_info(tmp, info)
            if self.vocab_map is not None:
                self.vocab_map.save(os.path.join(tmp, MAP_NAME))
            torch.save(self.args, os.path.join(tmp, TRAINING_ARGS_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer writes a checkpoint file by file (weights, optimizer, RNG, trainer state) and may be
        # interrupted anywhere: the completion marker, written last (after every process has written its part)
        # and atomically, is what makes a checkpoint one to resume from (``checkpoint_problem``). A checkpoint
        # folder that already exists (an earlier run's, or this run's before a resume) is invalidated first, so
        # that a save interrupted half-way is never taken for complete with a mix of old and new files.
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            invalidate_checkpoint(folder)
        self.accelerator.wait_for_everyone()  # no process writes into the folder before it is invalidated
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_checkpoint_complete(folder, self.state.global_step)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # pragma: no cover - not run in CI
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        ivl = _ivl_module(self.accelerator.unwrap_model(model if model is not None else self.model))
        if _is_peft(ivl.value_model):
            return super()._load_from_checkpoint(resume_from_checkpoint, ivl.value_model)
        _load_full_value_weights(ivl.value_model, resume_from_checkpoint)



def write_info(directory: str, info: dict) -> None:
    with open(os.path.join(directory, INFO_NAME), "w") as f:
        json.dump(info, f, indent=2, sort_keys=False)
        f.write("\n")


def invalidate_checkpoint(directory: str) -> None:
    """Make an existing checkpoint folder incomplete before it is written again: remove its completion marker, then
    ``trainer_state.json`` (Trainer's last file, what makes a checkpoint written before the marker existed count as
    complete). Interrupted between the two, the folder still holds one whole, consistent checkpoint."""
    for name in (COMPLETE_NAME, "trainer_state.json"):
        try:
            os.remove(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def mark_checkpoint_complete(directory: str, global_step: int) -> None:
    from .._atomic import atomic_file

    with atomic_file(os.path.join(directory, COMPLETE_NAME)) as tmp:
        with open(tmp, "w") as f:
            json.dump({"global_step": int(global_step)}, f)

"""``IVLForCausalLM`` under DeepSpeed ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator, gloo).

``deepspeed.initialize`` partitions every parameter of the wrapper (base and value network: each rank holds
none of the LM heads' rows outside the forward of the module that owns them). The loss must equal the single
process's on each rank's batch and the value network's full gradients (``safe_get_full_grad``) the
single-process gradients averaged over both batches (fp32, 1e-5 relative), for two steps, with a full value
network whose models were built partitioned (``deepspeed.zero.Init``, as transformers' ``from_pretrained``
does under a ZeRO-3 config) and with a PEFT LoRA one; the guided logits without labels match too. Skipped when
DeepSpeed is not installed (it is no dependency of the package).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

import _dist_harness as H  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    # Nothing kept gathered between uses: every parameter is fetched by its module's hooks when it runs.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                          "stage3_max_live_parameters": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10 ** 9,
}


def _worker(rank, init_method, out_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(H.WORLD), LOCAL_WORLD_SIZE=str(H.WORLD))
    H.init(rank, init_method)
    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm
    from deepspeed.utils import safe_get_full_grad

    from ivl_kernels.hf import IVLForCausalLM

    # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (a C++ build on first use): plain gloo.
    ds_torch_comm.build_shm_op = lambda: None
    for lora in (False, True):
        case = dict(map=lora, alpha=0.5 if lora else 1.0)
        base, value = H.make_base(), H.make_value(tie=not lora, lora=lora)
        ref_losses, ref_grads, ref_logits = H.reference(base, value, case)
        if lora:
            # Partitioned by deepspeed.initialize.
            base, value = copy.deepcopy(base), copy.deepcopy(value)
        else:
            # Built partitioned, as transformers' from_pretrained does under a ZeRO-3 config (deepspeed.zero.Init):
            # IVLForCausalLM is constructed around parameters that hold no rows on any rank.
            from transformers.integrations import HfDeepSpeedConfig

            ds_config = HfDeepSpeedConfig(CONFIG)  # transformers builds models under zero.Init while it lives
            base_z, value_z = (type(m)._from_config(m.config) for m in (base, value))
            del ds_config
            for src, dst in ((base, base_z), (value, value_z)):
                params = dict(dst.named_parameters())
                with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                    for n, p in src.named_parameters():
                        params[n].data.copy_(p.data)
            base, value = base_z, value_z
            assert value.get_output_embeddings().weight.numel() == 0
        model = IVLForCausalLM(base, value, **H.ivl_kwargs(case))
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.0), config=CONFIG)
        heads = [m.get_output_embeddings() for m in (model.base_model, model.value_model)]
        assert all(h.weight.numel() == 0 for h in heads), "ZeRO-3 did not partition the LM heads"
        for it in range(2):
            r = rank if it == 0 else 1 - rank
            ids, mask, labels = H.batch(r)
            loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            H.check_close(f"lora={lora} iteration {it} loss", loss.detach(), ref_losses[r])
            named = [(n, p) for n, p in model.value_model.named_parameters() if p.requires_grad]
            assert {n for n, _ in named} == set(ref_grads)
            for n, p in named:
                H.check_close(f"lora={lora} iteration {it} grad {n}", safe_get_full_grad(p), ref_grads[n])
            engine.step()  # lr 0: clears the partitioned gradients, leaves the weights
            assert all("forward" not in h.__dict__ for h in heads), "an LM head's forward was not restored"
        ids, mask, _ = H.batch(0)
        with torch.no_grad():
            logits = engine(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(logits[keep], ref_logits[keep], rtol=1e-5, atol=1e-5)
        engine.destroy()
    H.finish(out_dir, rank)


def test_deepspeed_zero3_matches_single_process():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if torch.cuda.is_available():
        pytest.skip("this test runs DeepSpeed's CPU accelerator; on a GPU machine DeepSpeed would pick CUDA")
    pytest.importorskip("peft")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(f"tcp://127.0.0.1:{H.free_port()}", out_dir), nprocs=H.WORLD, join=True)
        assert sorted(os.listdir(out_dir)) == [f"ok{r}" for r in range(H.WORLD)]

"""``IVLForCausalLM`` under DDP and FSDP2 on 2 CPU processes (gloo) against one process.

Each rank trains on its own batch; the loss must equal the single-process loss of that batch and the value
network's gradients the single-process gradients averaged over both batches (fp32, 1e-5 relative), for two
iterations in a row; the base gets no gradient; the guided logits without labels match too.

FSDP2 layouts: the value network and the base each their own FSDP root (``fully_shard`` on the decoder layers,
then on the model: the layout that failed when ``IVLForCausalLM`` called ``value_model.model(...)`` and read
``lm_head.weight`` directly), and ``IVLForCausalLM`` itself as the root (untied LM heads their own FSDP units);
every unit reshards after forward, so the heads' weights must be gathered again for the backward pass.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

import _dist_harness as H  # noqa: E402


def _shard(model, mesh, layers):
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return fully_shard(model, mesh=mesh, reshard_after_forward=True)


def _layers(model):
    from ivl_kernels.hf._common import unwrap_causal_lm

    return list(unwrap_causal_lm(model).model.layers)


def _worker(rank, init_method, case, out_dir):
    H.init(rank, init_method)
    from ivl_kernels.hf import IVLForCausalLM
    from ivl_kernels.hf._common import unwrap_causal_lm

    base, value = H.make_base(), H.make_value(tie=case.get("tie", True), lora=case.get("lora", False))
    ref_losses, ref_grads, ref_logits = H.reference(base, value, case)
    base, value = copy.deepcopy(base), copy.deepcopy(value)
    layout = case["layout"]
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ivl = IVLForCausalLM(base, value, **H.ivl_kwargs(case))
        model = DDP(ivl)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (H.WORLD,))
        if layout == "fsdp2-model-roots":
            # Each model its own FSDP root, the wrapper plain (built before or after sharding: both work).
            _shard(value, mesh, _layers(value))
            _shard(base, mesh, _layers(base))
            ivl = model = IVLForCausalLM(base, value, **H.ivl_kwargs(case))
        elif layout == "fsdp2-ivl-root":
            ivl = IVLForCausalLM(base, value, **H.ivl_kwargs(case))
            units = [layer for m in (value, base) for layer in _layers(m)]
            if not case.get("tie", True):
                # Untied heads: each LM head its own FSDP unit too (resharded after its forward).
                units += [m.get_output_embeddings() for m in (value, base)]
            model = _shard(ivl, mesh, units)
        else:
            raise AssertionError(layout)
        trainable = [p for p in value.parameters() if p.requires_grad]
        assert trainable and all(type(p).__name__ == "DTensor" for p in trainable), "value params not sharded"
    model.train()
    heads = [unwrap_causal_lm(m).get_output_embeddings() for m in (base, value)]
    for it in range(2):
        r = rank if it == 0 else 1 - rank  # the second iteration swaps the batches
        ids, mask, labels = H.batch(r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        H.check_close(f"iteration {it} loss", loss.detach(), ref_losses[r])
        H.check_grads(value.named_parameters(), ref_grads, f"iteration {it}")
        assert all(p.grad is None for p in base.parameters()), "the base got a gradient"
        assert all("forward" not in h.__dict__ for h in heads), "an LM head's forward was not restored"
        for p in value.parameters():
            p.grad = None
    ids, mask, _ = H.batch(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(H.full(logits)[keep], ref_logits[keep], rtol=1e-5, atol=1e-5)
    H.finish(out_dir, rank)


def _interpreter_problem() -> str:
    code = "from ivl_kernels._triton import interpreter_problem; print(interpreter_problem())"
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


CASES = [
    pytest.param(dict(layout="ddp", map=True, alpha=0.5), id="ddp-random-map"),
    pytest.param(dict(layout="fsdp2-model-roots"), id="fsdp2-value-and-base-roots-tied"),
    pytest.param(dict(layout="fsdp2-ivl-root", tie=False, map=True, l1_reduction="kept"),
                 id="fsdp2-ivl-root-untied-random-map"),
    pytest.param(dict(layout="fsdp2-model-roots", lora=True, tie=False), id="fsdp2-peft-lora-value-root"),
    pytest.param(dict(layout="fsdp2-model-roots", backend="triton", map=True, tie=False),
                 id="fsdp2-value-root-untied-triton"),
]


@pytest.mark.parametrize("case", CASES)
def test_distributed_matches_single_process(case):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if case.get("lora"):
        pytest.importorskip("peft")
    if case["layout"].startswith("fsdp2"):
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    if case.get("backend") == "triton":
        if torch.cuda.is_available():
            pytest.skip("the gloo workers run the Triton backend on CPU tensors, i.e. under the interpreter")
        problem = _interpreter_problem()
        if problem:
            pytest.skip(f"Triton's interpreter cannot run here: {problem}")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(f"tcp://127.0.0.1:{H.free_port()}", case, out_dir), nprocs=H.WORLD, join=True)
        assert sorted(os.listdir(out_dir)) == [f"ok{r}" for r in range(H.WORLD)]

"""``fused_guided_cross_entropy(process_group=...)`` taking its group from a ``DeviceMesh`` (2 CPU ranks, gloo).

A vocabulary-sharded base head and value head (uneven shards, rank-local maps): the loss and gradients with
``process_group=`` a 1-D mesh, one dimension of a 2-D mesh (``mesh["tp"]``) and the plain ``ProcessGroup`` must
all equal the single-process result on the full tensors; a mesh with two dimensions, or something that is no
group, is refused with an error that says what to pass.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_harness as H

VB, VV = (20, 17), (16, 15)  # per-rank shards of the base and value vocabularies


def _problem():
    g = torch.Generator().manual_seed(7)
    N, Hv, Hb = 9, 8, 6
    vh = torch.randn(N, Hv, generator=g)
    vw = torch.randn(sum(VV), Hv, generator=g) / 3
    bh = torch.randn(N, Hb, generator=g)
    bw = torch.randn(sum(VB), Hb, generator=g) / 3
    target = torch.randint(0, sum(VB), (N,), generator=g)
    target[3] = -100
    local = []
    for vb, vv in zip(VB, VV):
        m = torch.randint(0, vv, (vb,), generator=g)
        m[torch.rand(vb, generator=g) < 0.2] = -1
        local.append(m)
    glob = torch.cat([torch.where(m >= 0, m + sum(VV[:r]), m) for r, m in enumerate(local)])
    return vh, vw, bh, bw, target, local, glob


def _worker(rank, init_method, out_dir):
    H.init(rank, init_method)
    import ivl_kernels as ivl
    from torch.distributed.device_mesh import init_device_mesh

    vh, vw, bh, bw, target, local, glob = _problem()
    b0, v0 = sum(VB[:rank]), sum(VV[:rank])
    b1, v1 = b0 + VB[rank], v0 + VV[rank]
    kw = dict(l1_coef=0.5, l1_reduction="all", label_smoothing=0.1, alpha=0.7, backend="torch")

    def run(w, bw_, vmap, **extra):
        h, w = vh.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ivl.fused_guided_cross_entropy(h, w, target, base_hidden=bh, base_weight=bw_, vocab_map=vmap,
                                              **kw, **extra)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    want = run(vw, bw, glob)
    mesh1 = init_device_mesh("cpu", (H.WORLD,), mesh_dim_names=("tp",))
    mesh2 = init_device_mesh("cpu", (1, H.WORLD), mesh_dim_names=("dp", "tp"))
    for name, group in (("group.WORLD", dist.group.WORLD), ("1-D mesh", mesh1), ('1-D mesh["tp"]', mesh1["tp"]),
                        ('2-D mesh["tp"]', mesh2["tp"])):
        got = run(vw[v0:v1], bw[b0:b1], local[rank], process_group=group)
        for what, g_, w_ in zip(("loss", "d value_hidden", "d value_weight"), got,
                                (want[0], want[1], want[2][v0:v1])):
            H.check_close(f"{name} {what}", g_, w_)
    with pytest.raises(ValueError, match=r'DeviceMesh with 2 dimensions \(\'dp\', \'tp\'\).*mesh\["tp"\]'):
        run(vw[v0:v1], bw[b0:b1], local[rank], process_group=mesh2)
    with pytest.raises(TypeError, match="ProcessGroup or a one-dimensional DeviceMesh"):
        run(vw[v0:v1], bw[b0:b1], local[rank], process_group="tp")
    H.finish(out_dir, rank)


def test_process_group_from_device_mesh():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    pytest.importorskip("torch.distributed.device_mesh")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(f"tcp://127.0.0.1:{H.free_port()}", out_dir), nprocs=H.WORLD, join=True)
        assert sorted(os.listdir(out_dir)) == [f"ok{r}" for r in range(H.WORLD)]

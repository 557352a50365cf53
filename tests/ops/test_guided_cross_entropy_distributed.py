"""``fused_guided_cross_entropy(process_group=...)`` with a vocabulary-sharded LM head over 2 CPU ranks (gloo).

Each rank holds a contiguous shard of the base vocabulary (base_weight rows / base_logits columns) and a shard of
the value head, with a rank-local vocab_map; the loss and d value_hidden must equal the single-process result on
the full tensors (with the equivalent block-diagonal global map), and d value_weight must equal that rank's rows
of the single-process gradient.
"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(case):
    """Global inputs (same seed on every rank) and the shard boundaries of each rank."""
    g = torch.Generator().manual_seed(1234)
    N, Hv, Hb = 13, 16, 12
    Vb_shards, Vv_shards = (70, 61), (64, 57)  # uneven shards: offsets are exercised
    Vb, Vv = sum(Vb_shards), sum(Vv_shards)
    vh = torch.randn(N, Hv, generator=g, dtype=torch.float64)
    vw = torch.randn(Vv, Hv, generator=g, dtype=torch.float64) / 4
    bh = torch.randn(N, Hb, generator=g, dtype=torch.float64)
    bw = torch.randn(Vb, Hb, generator=g, dtype=torch.float64) / 3
    bl = torch.randn(N, Vb, generator=g, dtype=torch.float64)
    alpha = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    target = torch.randint(0, Vb, (N,), generator=g)
    target[[2, 7]] = -100
    local_maps = []
    for vb, vv in zip(Vb_shards, Vv_shards):
        m = torch.randint(0, vv, (vb,), generator=g)
        m[torch.rand(vb, generator=g) < 0.2] = -1
        m[:4] = 1  # many-to-one inside the shard
        local_maps.append(m)
    global_map = torch.cat([torch.where(m >= 0, m + sum(Vv_shards[:r]), m) for r, m in enumerate(local_maps)])
    return dict(vh=vh, vw=vw, bh=bh, bw=bw, bl=bl, alpha=alpha, target=target, local_maps=local_maps,
                global_map=global_map, Vb_shards=Vb_shards, Vv_shards=Vv_shards)


def _kwargs(case, p, dtype, rank=None):
    """Arguments for the full problem (rank None) or for one rank's shard."""
    b0 = 0 if rank is None else sum(p["Vb_shards"][:rank])
    b1 = sum(p["Vb_shards"]) if rank is None else b0 + p["Vb_shards"][rank]
    kw = dict(alpha=p["alpha"].to(dtype), fill=0.2, l1_coef=0.6, label_smoothing=0.1, reduction=case["reduction"])
    if case["base"] == "hidden":
        kw.update(base_hidden=p["bh"].to(dtype), base_weight=p["bw"][b0:b1].to(dtype))
    elif case["base"] == "logits":
        kw.update(base_logits=p["bl"][:, b0:b1].to(dtype))
    if case["map"]:
        kw["vocab_map"] = p["global_map"] if rank is None else p["local_maps"][rank]
    return kw


def _to(p, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else
                [t.to(device) for t in v] if isinstance(v, list) else v) for k, v in p.items()}


def _worker(rank, init, case, out_dir):
    nccl = case.get("dist") == "nccl"
    if not nccl:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import ivl_kernels as ivl

    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        dtype = torch.float32 if case["backend"] == "triton" else torch.float64
        p = _problem(case)
        if not case["map"]:
            # Identity map: value shards must line up with base shards.
            p["Vv_shards"] = p["Vb_shards"]
            p["vw"] = torch.randn(sum(p["Vb_shards"]), p["vh"].shape[1], generator=torch.Generator().manual_seed(5),
                                  dtype=torch.float64) / 4
        p = _to(p, device)
        v0 = sum(p["Vv_shards"][:rank])
        v1 = v0 + p["Vv_shards"][rank]

        def run(vw, kw, **extra):
            h = p["vh"].to(dtype).detach().clone().requires_grad_()
            w = vw.to(dtype).detach().clone().requires_grad_()
            loss = ivl.fused_guided_cross_entropy(h, w, p["target"], backend=case["backend"], **kw, **extra)
            up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
            loss.backward(up)
            return loss.detach(), h.grad, w.grad

        full = run(p["vw"], _kwargs(case, p, dtype))
        shard = run(p["vw"][v0:v1], _kwargs(case, p, dtype, rank), process_group=dist.group.WORLD)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(shard[0], full[0], **tol)
        torch.testing.assert_close(shard[1], full[1], **tol)
        torch.testing.assert_close(shard[2], full[2][v0:v1], **tol)
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The checks passed (the ok file is written). Exit without running C++ static destructors: at interpreter
    # shutdown a worker that ran Triton-interpreter kernels next to gloo intermittently aborts with
    # "terminate called without an active exception" (a joinable std::thread destroyed at exit), after its
    # work is done. os._exit skips that teardown; a failed check above still raises and fails the test.
    os._exit(0)


def _interpreter_problem() -> str:
    """``_triton.interpreter_problem()`` as the spawned workers see it (they set TRITON_INTERPRET=1 before importing
    triton; this process may have imported it without the interpreter, on a GPU machine)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from ivl_kernels._triton import interpreter_problem

        return interpreter_problem()
    code = "from ivl_kernels._triton import interpreter_problem; print(interpreter_problem())"
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("case", [
    pytest.param(dict(backend="torch", base="hidden", map=True, reduction="mean"), id="torch-hidden-localmap-mean"),
    pytest.param(dict(backend="torch", base="logits", map=False, reduction="none"), id="torch-logits-identity-none"),
    pytest.param(dict(backend="torch", base="none", map=True, reduction="sum"), id="torch-valueonly-localmap-sum"),
    pytest.param(dict(backend="triton", base="hidden", map=True, reduction="mean"), id="triton-hidden-localmap-mean"),
    pytest.param(dict(backend="triton", base="none", map=False, reduction="sum"), id="triton-valueonly-identity-sum"),
    pytest.param(dict(backend="triton", base="hidden", map=True, reduction="mean", dist="nccl"),
                 id="nccl-triton-hidden-localmap-mean"),
    pytest.param(dict(backend="torch", base="logits", map=False, reduction="none", dist="nccl"),
                 id="nccl-torch-logits-identity-none"),
])
def test_sharded_vocab_matches_single_process(case):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if case.get("dist") == "nccl" and not (torch.cuda.is_available() and torch.cuda.device_count() >= WORLD
                                           and dist.is_nccl_available()):
        pytest.skip(f"NCCL needs {WORLD} CUDA GPUs (found {torch.cuda.device_count()}) and an NCCL build")
    if case["backend"] == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    if case["backend"] == "triton" and case.get("dist") != "nccl":
        problem = _interpreter_problem()
        if problem:
            pytest.skip(f"the gloo workers run Triton's interpreter on CPU, which cannot run here: {problem}")
    with tempfile.TemporaryDirectory() as out_dir:
        init = f"tcp://127.0.0.1:{_free_port()}"
        mp.spawn(_worker, args=(init, case, out_dir), nprocs=WORLD, join=True)
        assert sorted(os.listdir(out_dir)) == [f"ok{r}" for r in range(WORLD)]


def test_process_group_requires_initialised_distributed():
    import ivl_kernels as ivl

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    vh = torch.randn(3, 4)
    vw = torch.randn(10, 4)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ivl.fused_guided_cross_entropy(vh, vw, torch.zeros(3, dtype=torch.long), process_group=object())


def _mismatch_worker(rank, init, out_dir):
    """Each scenario gives the ranks arguments that must not pass; every rank records what it raised. The
    group's timeout is short so that a rank left waiting in a collective fails the test instead of hanging it."""
    import datetime

    import ivl_kernels as ivl

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(7)
        N, Hv, Vb_r, Vv_r = 6, 8, 9, 7
        vh = torch.randn(N, Hv, generator=g, dtype=torch.float64)
        vw = torch.randn(WORLD * Vv_r, Hv, generator=g, dtype=torch.float64)[rank * Vv_r:(rank + 1) * Vv_r]
        bl = torch.randn(N, WORLD * Vb_r, generator=g, dtype=torch.float64)[:, rank * Vb_r:(rank + 1) * Vb_r]
        target = torch.randint(0, WORLD * Vb_r, (N,), generator=g)
        local_map = torch.randint(-1, Vv_r, (Vb_r,), generator=g)
        ok = dict(base_logits=bl, vocab_map=local_map)

        def one(name, **change):
            kw = dict(value_hidden=vh, value_weight=vw, target=target, **ok)
            kw.update(change)
            try:
                loss = ivl.fused_guided_cross_entropy(kw.pop("value_hidden"), kw.pop("value_weight"), kw.pop("target"),
                                                      backend="torch", process_group=dist.group.WORLD, **kw)
                got = f"ok {float(loss):.12g}"
            except (ValueError, TypeError) as e:
                got = f"{type(e).__name__}: {e}"
            with open(os.path.join(out_dir, f"{name}.{rank}"), "w") as f:
                f.write(got)
            dist.barrier()  # the next scenario starts together (and a rank stuck above fails this one)

        mine = rank == 1
        one("agree")
        one("rows", value_hidden=vh[:4] if mine else vh, target=target[:4] if mine else target,
            base_logits=bl[:4] if mine else bl)
        one("dtype", value_hidden=vh.float() if mine else vh, value_weight=vw.float() if mine else vw,
            base_logits=bl.float() if mine else bl)
        one("target", target=torch.where(torch.arange(N) == 0, (target + 1) % (WORLD * Vb_r), target) if mine else target)
        one("alpha", alpha=torch.full((N,), 0.5 if mine else 0.6, dtype=torch.float64))
        one("reduction", reduction="sum" if mine else "mean")
        one("local-error", vocab_map=torch.full((Vb_r,), Vv_r) if mine else local_map)  # out of range on rank 1
        # both vocabularies split at 7: rank 0 holds 7 base columns and 7 value rows
        one("identity-aligned", vocab_map=None, base_logits=bl[:, :Vv_r] if rank == 0 else bl,
            target=target % (Vv_r + Vb_r))
        # rank 0 holds one base column more than value rows: rank 1's base ids start one after its value ids
        one("identity-misaligned", vocab_map=None, base_logits=torch.cat([bl, bl[:, :1]], 1) if rank == 0 else bl)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see _worker


def test_ranks_that_disagree_all_raise():
    """Under a process group the ranks check each other before the loss's collectives: a rank whose own checks
    fail raises its error and every other rank a ValueError naming it (no rank waits in a collective); ranks given
    different rows, dtypes, target, alpha or options all raise (unchecked, different row counts aborted the process
    inside gloo and a different target gave rank 0 a loss for rank 1's targets); vocab_map=None with shards split
    at other boundaries for the two vocabularies raises (the rank-local identity is not the global one there)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_mismatch_worker, args=(f"tcp://127.0.0.1:{_free_port()}", out_dir), nprocs=WORLD, join=True)
        got = {}
        for name in sorted(os.listdir(out_dir)):
            scenario, rank = name.rsplit(".", 1)
            got.setdefault(scenario, {})[int(rank)] = open(os.path.join(out_dir, name)).read()
    assert got["agree"][0].startswith("ok ") and got["agree"][0] == got["agree"][1]
    assert got["identity-aligned"][0].startswith("ok ") and got["identity-aligned"][0] == got["identity-aligned"][1]
    expected = {"rows": "the number of rows N differs across the process group's ranks (per rank: 6, 4)",
                "dtype": "value_hidden's dtype differs across the process group's ranks (per rank: torch.float64, "
                         "torch.float32)",
                "target": "target differs across the process group's ranks (other values on some ranks)",
                "alpha": "alpha differs across the process group's ranks (other values on some ranks)",
                "reduction": "reduction differs across the process group's ranks (per rank: mean, sum)",
                "identity-misaligned": "vocab_map=None on rank 1 pairs its base shard (ids from 10) with its value "
                                       "shard (ids from 7)"}
    for scenario, message in expected.items():
        for rank in range(WORLD):
            assert got[scenario][rank].startswith("ValueError: " + message), (scenario, rank, got[scenario][rank])
    assert got["local-error"][1].startswith("ValueError: vocab_map entries must lie in [-1, 7)"), got["local-error"]
    assert got["local-error"][0].startswith("ValueError: rank(s) [1] of the process group rejected their "
                                            "arguments"), got["local-error"]

"""Which GEMM of the chunked loss allocates temporaries (peak growth per op, qwen value head, one chunk)."""
import torch
import ivl_kernels as ivl
from ivl_kernels.ops._gemm import addmm_into

dev = "cuda"
C, V, H = 4352, 151936, 896
x = torch.randn(C, H, device=dev, dtype=torch.bfloat16)
w = torch.randn(V, H, device=dev, dtype=torch.bfloat16) / 30
acc = torch.zeros(V, H, device=dev, dtype=torch.float32)
dvh = torch.empty(C, H, device=dev, dtype=torch.bfloat16)


def probe(name, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    print(f"{name:40s} peak +{(torch.cuda.max_memory_allocated() - before) / 2**20:9.1f} MiB  "
          f"held +{(torch.cuda.memory_allocated() - before) / 2**20:9.1f} MiB")
    return out


buf = probe("buf = mm(x, w.T)", lambda: torch.mm(x, w.T))
probe("mm(G, w, out=dvh)", lambda: torch.mm(buf, w, out=dvh))
probe("addmm_into(acc, G.T, x) [out_dtype]", lambda: addmm_into(acc, buf.T, x))
probe("torch.addmm(acc, G.T, x, out_dtype) no out", lambda: torch.addmm(acc, buf.T, x, out_dtype=torch.float32))
probe("acc.to(bf16)", lambda: acc.to(torch.bfloat16))
del buf
N = 16384
vh = torch.randn(N, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
w.requires_grad_()
t = torch.randint(0, V, (N,), device=dev)
probe("value-only loss fwd+bwd N=16384", lambda: ivl.fused_guided_cross_entropy(vh, w, t, backend="triton").backward())

"""Run the CUDA decode kernel (csrc/guided_logits.cu) through every instantiation, for compute-sanitizer.

    python benchmarks/sanitize_cuda.py                                   # results only (seconds)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python benchmarks/sanitize_cuda.py                               # and every device memory access

``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` gives each tensor its own allocation: memcheck flags a read only when it
leaves an allocation, and torch's caching allocator packs tensors into large blocks.

Cases: every dtype (float32, float16, bfloat16) x every ROWS instantiation (M = 1, 2, 3, 4, 8, 16: ROWS 1, 2, 4,
4, 8, 16, so M = 3 leaves rows idle) x every base mode (base logits in the value dtype, base logits in float32,
base hidden + weight) x maps: none (identity; Vb > Vv leaves a tail unmapped), int32 with -1 and many-to-one
entries (per-row alpha tensor), the same as int64. Then the same with out-of-range map entries (Vv + 99999, -7,
Vv, the integer extremes), which the kernel must treat as unmapped (``fill``): no entry may make it form an
out-of-range address. Vb exceeds the grid's warp count (the grid-stride loop iterates) and Hv spans several
rounds of unrolled 16-byte loads plus a tail. Base logits hold -inf entries (a masked token stays -inf).

The op is called directly (``torch.ops.ivl_kernels.guided_logits_decode_``): the public function rejects
out-of-range maps before launching. Every result is compared with torch (float64, on the CPU, same inputs),
with the output poisoned with NaN before each call. Out-of-range cases run last, so a kernel fault on them
(it poisons the CUDA context) cannot hide the other verdicts. Exit status: 0 all passed, 1 a mismatch or a
fault, 2 nothing could run (no GPU or no extension).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_COUNTS = (1, 2, 3, 4, 8, 16)
BASE_MODES = ("logits-same-dtype", "logits-float32", "hidden")
# By output dtype: its rounding dominates (the kernel accumulates in float32; half products are exact in float32).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
ALPHA, FILL = 0.7, 0.25
THREADS, WARPS_PER_BLOCK, BLOCKS_PER_SM = 256, 8, 16  # the launch of csrc/guided_logits.cu


def sizes(sms: int) -> dict:
    grid_warps = BLOCKS_PER_SM * sms * WARPS_PER_BLOCK
    # Hv: 16-byte vectors per row = 137 (half) / 274 (float32), i.e. 2-3 rounds of 32 lanes x 4 loads + a tail.
    return dict(Vb=2 * grid_warps + 123, Vv=20011, Hv=1096, Hb=136)


def in_range_map(Vb: int, Vv: int, dtype, g) -> torch.Tensor:
    m = torch.randint(0, Vv, (Vb,), generator=g)  # duplicates: many-to-one
    m[torch.rand(Vb, generator=g) < 0.1] = -1
    m[-1] = -1
    m[0] = Vv - 1
    return m.to(dtype)


def out_of_range_map(base: torch.Tensor, Vv: int, g) -> torch.Tensor:
    """``base`` with bad entries spread over the vocabulary (first and last ids, every warp's stride)."""
    info = torch.iinfo(base.dtype)
    bad = torch.tensor([Vv + 99999, -7, Vv, info.max, info.min, -2], dtype=base.dtype)
    m = base.clone()
    pos = torch.randperm(len(m), generator=g)[: len(m) // 20]
    m[pos] = bad[torch.arange(len(pos)) % len(bad)]
    m[0], m[-1] = bad[0], bad[3]
    return m


def reference(data, M, base, vocab_map, alpha) -> torch.Tensor:
    """float64 on the CPU from the same inputs; map entries outside [0, Vv) are unmapped."""
    value, Vv, Vb = data["value64"][:M], data["vw"].shape[0], data["bw"].shape[0]
    idx = torch.arange(Vb) if vocab_map is None else vocab_map.long()
    mapped = (idx >= 0) & (idx < Vv)
    term = torch.full((M, Vb), FILL, dtype=torch.float64)
    term[:, mapped] = value[:, idx[mapped]]
    b = base.double() if base is not None else data["base64"][:M]
    a = alpha.double()[:, None] if isinstance(alpha, torch.Tensor) else alpha
    return b + a * term


def run_case(op, data, dev, *, dtype, M, base_mode, vocab_map, alpha) -> str:
    """``""`` when the kernel matches torch, else what went wrong."""
    Vb = data["bw"].shape[0]
    base = None
    out_dtype = torch.float32
    if base_mode != "hidden":
        out_dtype = dtype if base_mode == "logits-same-dtype" else torch.float32
        base = data["base_logits"][:M].to(out_dtype)
    out = torch.full((M, Vb), float("nan"), dtype=out_dtype).to(dev)
    alpha_dev = alpha.to(dev) if isinstance(alpha, torch.Tensor) else None
    hidden = base_mode == "hidden"
    op(data["vh"][:M].to(dev), data["vw_dev"], base.to(dev) if base is not None else None,
       data["bh"][:M].to(dev) if hidden else None, data["bw_dev"] if hidden else None,
       vocab_map.to(dev) if vocab_map is not None else None,
       alpha_dev, ALPHA if alpha_dev is None else 0.0, FILL, out)
    rtol, atol = TOL[out_dtype]
    try:
        torch.testing.assert_close(out.cpu().double(), reference(data, M, base, vocab_map, alpha), rtol=rtol,
                                   atol=atol)
    except AssertionError as exc:
        return " ".join(str(exc).split())[:300]
    return ""


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        return 2
    from ivl_kernels._backends import cuda_extension, cuda_extension_error

    if cuda_extension() is None:
        print(f"the CUDA extension is not built: {cuda_extension_error()}")
        return 2
    op = torch.ops.ivl_kernels.guided_logits_decode_
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sz = sizes(props.multi_processor_count)
    print(f"# {props.name}, {props.multi_processor_count} SMs; Vb={sz['Vb']} Vv={sz['Vv']} Hv={sz['Hv']} "
          f"Hb={sz['Hb']}; PYTORCH_NO_CUDA_MEMORY_CACHING={os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING', '')}",
          flush=True)
    g = torch.Generator().manual_seed(0)
    Vb, Vv = sz["Vb"], sz["Vv"]
    maps32 = in_range_map(Vb, Vv, torch.int32, g)
    in_range = [("none", None, ALPHA), ("int32", maps32, "tensor"), ("int64", maps32.long(), ALPHA)]
    out_of_range = [("int32 out-of-range", out_of_range_map(maps32, Vv, g), "tensor"),
                    ("int64 out-of-range", out_of_range_map(maps32.long(), Vv, g), ALPHA)]

    failures, passed = [], 0
    t0 = time.time()
    for phase, maps in (("in-range maps", in_range), ("out-of-range maps (must read as unmapped)", out_of_range)):
        print(f"# {phase}", flush=True)
        for dtype in DTYPES:
            data = dict(vh=torch.randn(16, sz["Hv"], generator=g).to(dtype),
                        vw=(torch.randn(Vv, sz["Hv"], generator=g) / sz["Hv"] ** 0.5).to(dtype),
                        bh=torch.randn(16, sz["Hb"], generator=g).to(dtype),
                        bw=(torch.randn(Vb, sz["Hb"], generator=g) / sz["Hb"] ** 0.5).to(dtype),
                        base_logits=4 * torch.randn(16, Vb, generator=g))
            data["base_logits"][:, 3::997] = float("-inf")
            data["vw_dev"], data["bw_dev"] = data["vw"].to(dev), data["bw"].to(dev)
            data["value64"] = data["vh"].double() @ data["vw"].double().T
            data["base64"] = data["bh"].double() @ data["bw"].double().T
            for map_name, vocab_map, alpha_kind in maps:
                for M in ROW_COUNTS:
                    alpha = torch.rand(M, generator=g) * 2 - 0.5 if alpha_kind == "tensor" else ALPHA
                    for base_mode in BASE_MODES:
                        case = f"{str(dtype).replace('torch.', '')} M={M} base={base_mode} map={map_name}"
                        try:
                            why = run_case(op, data, dev, dtype=dtype, M=M, base_mode=base_mode,
                                           vocab_map=vocab_map, alpha=alpha)
                            torch.cuda.synchronize()
                        except Exception as exc:  # a launch error or a fault: the context may be gone
                            why = f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                        if why:
                            failures.append(case)
                            print(f"FAIL {case}: {why}", flush=True)
                            if why.startswith("raised"):
                                print(f"# stopping: {len(failures)} failed, {passed} passed")
                                return 1
                        else:
                            passed += 1
            print(f"#   {str(dtype).replace('torch.', '')}: done ({passed} passed, {len(failures)} failed so far, "
                  f"{time.time() - t0:.0f} s)", flush=True)
    print(f"{'PASS' if not failures else 'FAIL'}: {passed} cases passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

// Decode-shaped fused guided logits (M <= 16 rows): memory-bound streaming of the gathered LM-head rows.
//
//   out[m, b] = base[m, b] + alpha[m] * (value_hidden[m] . value_weight[map[b]])   (map[b] >= 0)
//   out[m, b] = base[m, b] + alpha[m] * fill                                        (map[b] == -1)
//
// base[m, b] is either loaded from base_logits [M, Vb] (BASE_MODE 1) or computed as
// base_hidden[m] . base_weight[b] (BASE_MODE 2) by the same warp, so the two LM heads are read in one pass.
//
// One warp per base vocabulary id b (grid-stride): its lanes stream the weight row(s) with 16-byte loads that
// bypass L1 (each weight byte is used once), multiply with the M hidden rows (small, re-read from L1/L2 by every
// warp) and keep one fp32 accumulator per row in registers; a butterfly reduction gives every lane the sums and
// lane r writes row r. Decode is bound by the weight bytes: everything else is arranged to keep enough 16-byte
// loads in flight (UNROLL independent loads per lane before any FMA).
//
// This header is the one copy of the kernel. nvcc compiles it into the extension (guided_logits.cu); the host
// C++ compiler compiles the same text under the SIMT emulation of csrc/emulation/simt_emu.h
// (csrc/emulation/guided_logits_emu.cpp), which runs it on CPU tensors in the tests: the 32 lanes of a warp in
// lockstep at every shuffle, every 16-byte load checked for alignment and bounds
// (tests/ops/test_cuda_emulation.py). The kernel uses no shared memory and no __syncthreads(): the warps of a
// block are independent, which is what lets the emulation run them one after another.

#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#elif !defined(IVL_SIMT_EMULATION)
#error "guided_logits_kernel.cuh is device code: compile it with nvcc, or include emulation/simt_emu.h first"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ivl_kernels {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kMaxRows = 16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// acc += sum_i w[i] * h[i] over the elements packed in one 16-byte vector.
template <typename T>
__device__ __forceinline__ float dot16(const uint4& w, const uint4& h, float acc) {
  const T* wp = reinterpret_cast<const T*>(&w);
  const T* hp = reinterpret_cast<const T*>(&h);
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i) acc = fmaf(to_float(wp[i]), to_float(hp[i]), acc);
  return acc;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// acc[r] += hidden[r] . weight_row for r < M; weight_row and hidden rows hold n16 16-byte vectors.
template <typename T, int ROWS>
__device__ __forceinline__ void row_dots(const uint4* __restrict__ wrow, const T* __restrict__ hidden,
                                         int64_t hidden_stride, int M, int n16, int lane, float (&acc)[ROWS]) {
  for (int v0 = lane; v0 < n16; v0 += 32 * kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * 32;
      if (v < n16) w[u] = __ldcs(wrow + v);  // streamed: used once, keep it out of L1
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * 32;
      if (v < n16) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r < M) {
            const uint4 h = __ldg(reinterpret_cast<const uint4*>(hidden + r * hidden_stride) + v);
            acc[r] = dot16<T>(w[u], h, acc[r]);
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename base_t, typename out_t, int ROWS, int BASE_MODE>
__global__ void __launch_bounds__(kThreads, 2) guided_logits_decode_kernel(
    const scalar_t* __restrict__ value_hidden, int64_t vh_stride,
    const scalar_t* __restrict__ value_weight, int64_t vw_stride,
    const void* __restrict__ vocab_map, bool has_map, bool map_is_int64,
    const base_t* __restrict__ base_logits, int64_t bl_stride,
    const scalar_t* __restrict__ base_hidden, int64_t bh_stride,
    const scalar_t* __restrict__ base_weight, int64_t bw_stride,
    const float* __restrict__ alpha, float alpha_scalar, float fill,
    out_t* __restrict__ out, int64_t out_stride,
    int M, int64_t Vb, int64_t Vv, int Hv, int Hb) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;

  for (int64_t b = warp; b < Vb; b += num_warps) {
    int64_t idx;
    if (has_map) {
      idx = map_is_int64 ? static_cast<const int64_t*>(vocab_map)[b]
                         : static_cast<int64_t>(static_cast<const int32_t*>(vocab_map)[b]);
    } else {
      idx = b < Vv ? b : -1;
    }
    // Memory safety must not rest on the host's range check (it is skipped inside CUDA graphs and compiled
    // graphs, and cannot see a map mutated behind the version counter): an entry outside [-1, Vv) is treated
    // as unmapped (fill), so no address is ever formed from it and the CUDA context survives.
    if (idx < 0 || idx >= Vv) idx = -1;

    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
    if (idx >= 0) {
      row_dots<scalar_t, ROWS>(reinterpret_cast<const uint4*>(value_weight + idx * vw_stride), value_hidden,
                               vh_stride, M, Hv / kVec, lane, acc);
    }
    float base_acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) base_acc[r] = 0.f;
    if constexpr (BASE_MODE == 2) {
      row_dots<scalar_t, ROWS>(reinterpret_cast<const uint4*>(base_weight + b * bw_stride), base_hidden,
                               bh_stride, M, Hb / kVec, lane, base_acc);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < M) {
        acc[r] = warp_sum(acc[r]);
        if constexpr (BASE_MODE == 2) base_acc[r] = warp_sum(base_acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < M && lane == r) {
        const float value = idx >= 0 ? acc[r] : fill;
        const float a = alpha != nullptr ? alpha[r] : alpha_scalar;
        float base;
        if constexpr (BASE_MODE == 1) {
          base = to_float(base_logits[r * bl_stride + b]);
        } else {
          base = base_acc[r];
        }
        out[r * out_stride + b] = from_float<out_t>(base + a * value);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch configuration, shared by the extension's launcher and the emulation's
// ---------------------------------------------------------------------------------------------------------------
constexpr int kBlocksPerSm = 16;  // the grid is capped at this many blocks per SM; warps then stride over Vb

// Blocks of kThreads for Vb vocabulary ids (one warp per id), at most max_blocks (grid-stride beyond that).
inline int grid_blocks(int64_t Vb, int64_t max_blocks) {
  const int64_t warps_per_block = kThreads / 32;
  const int64_t blocks_needed = (Vb + warps_per_block - 1) / warps_per_block;
  return static_cast<int>(std::min<int64_t>(blocks_needed, max_blocks));
}

// The ROWS instantiation for M rows (M <= kMaxRows): calls f(std::integral_constant<int, ROWS>{}).
template <typename F>
inline void for_rows(int64_t M, F&& f) {
  if (M <= 1) return f(std::integral_constant<int, 1>{});
  if (M <= 2) return f(std::integral_constant<int, 2>{});
  if (M <= 4) return f(std::integral_constant<int, 4>{});
  if (M <= 8) return f(std::integral_constant<int, 8>{});
  return f(std::integral_constant<int, kMaxRows>{});
}

}  // namespace ivl_kernels

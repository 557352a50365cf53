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

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
// Host side
// ---------------------------------------------------------------------------------------------------------------
namespace {

template <typename T>
struct CudaType { using type = T; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

bool aligned16(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.size(-1) % vec == 0 &&
         (t.dim() == 1 || t.stride(0) % vec == 0);
}

struct Launch {
  const at::Tensor& vh;
  const at::Tensor& vw;
  const c10::optional<at::Tensor>& base_logits;
  const c10::optional<at::Tensor>& base_hidden;
  const c10::optional<at::Tensor>& base_weight;
  const c10::optional<at::Tensor>& vocab_map;
  const c10::optional<at::Tensor>& alpha;
  float alpha_scalar;
  float fill;
  at::Tensor& out;
};

template <typename scalar_t, typename base_t, typename out_t, int ROWS, int BASE_MODE>
void launch(const Launch& p) {
  using S = typename CudaType<scalar_t>::type;
  using B = typename CudaType<base_t>::type;
  using O = typename CudaType<out_t>::type;
  const int M = static_cast<int>(p.vh.size(0));
  const int64_t Vb = p.out.size(1);
  const int64_t Vv = p.vw.size(0);
  const int Hv = static_cast<int>(p.vh.size(1));
  const int Hb = BASE_MODE == 2 ? static_cast<int>(p.base_hidden->size(1)) : 0;
  const int warps_per_block = kThreads / 32;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks_needed = (Vb + warps_per_block - 1) / warps_per_block;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, static_cast<int64_t>(sms) * 16));
  if (blocks == 0) return;
  const bool has_map = p.vocab_map.has_value();
  auto stream = at::cuda::getCurrentCUDAStream();
  guided_logits_decode_kernel<S, B, O, ROWS, BASE_MODE><<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const S*>(p.vh.data_ptr()), p.vh.stride(0),
      reinterpret_cast<const S*>(p.vw.data_ptr()), p.vw.stride(0),
      has_map ? p.vocab_map->data_ptr() : nullptr, has_map, has_map && p.vocab_map->scalar_type() == at::kLong,
      BASE_MODE == 1 ? reinterpret_cast<const B*>(p.base_logits->data_ptr()) : nullptr,
      BASE_MODE == 1 ? p.base_logits->stride(0) : 0,
      BASE_MODE == 2 ? reinterpret_cast<const S*>(p.base_hidden->data_ptr()) : nullptr,
      BASE_MODE == 2 ? p.base_hidden->stride(0) : 0,
      BASE_MODE == 2 ? reinterpret_cast<const S*>(p.base_weight->data_ptr()) : nullptr,
      BASE_MODE == 2 ? p.base_weight->stride(0) : 0,
      p.alpha.has_value() ? p.alpha->data_ptr<float>() : nullptr, p.alpha_scalar, p.fill,
      reinterpret_cast<O*>(p.out.data_ptr()), p.out.stride(0),
      M, Vb, Vv, Hv, Hb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename base_t, typename out_t, int BASE_MODE>
void dispatch_rows(const Launch& p) {
  const int64_t M = p.vh.size(0);
  if (M <= 1) return launch<scalar_t, base_t, out_t, 1, BASE_MODE>(p);
  if (M <= 2) return launch<scalar_t, base_t, out_t, 2, BASE_MODE>(p);
  if (M <= 4) return launch<scalar_t, base_t, out_t, 4, BASE_MODE>(p);
  if (M <= 8) return launch<scalar_t, base_t, out_t, 8, BASE_MODE>(p);
  return launch<scalar_t, base_t, out_t, kMaxRows, BASE_MODE>(p);
}

template <typename scalar_t>
void dispatch_base(const Launch& p) {
  if (p.base_logits.has_value()) {
    if (p.base_logits->scalar_type() == at::kFloat) {
      dispatch_rows<scalar_t, float, float, 1>(p);
    } else {
      dispatch_rows<scalar_t, scalar_t, scalar_t, 1>(p);
    }
  } else {
    dispatch_rows<scalar_t, scalar_t, float, 2>(p);
  }
}

}  // namespace

void guided_logits_decode_(const at::Tensor& value_hidden, const at::Tensor& value_weight,
                           const c10::optional<at::Tensor>& base_logits,
                           const c10::optional<at::Tensor>& base_hidden,
                           const c10::optional<at::Tensor>& base_weight,
                           const c10::optional<at::Tensor>& vocab_map, const c10::optional<at::Tensor>& alpha_tensor,
                           double alpha_scalar, double fill, at::Tensor& out) {
  // The Python front end validates everything with user-facing messages; these checks guard direct callers.
  TORCH_CHECK(value_hidden.is_cuda(), "guided_logits_decode_: tensors must be on a CUDA device");
  TORCH_CHECK(value_hidden.dim() == 2 && value_weight.dim() == 2 && out.dim() == 2,
              "guided_logits_decode_: value_hidden [M, Hv], value_weight [Vv, Hv] and out [M, Vb] must be 2-D");
  const auto dt = value_hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "guided_logits_decode_: value dtype must be float32, float16 or bfloat16");
  TORCH_CHECK(value_weight.scalar_type() == dt, "guided_logits_decode_: value_weight dtype must match value_hidden");
  TORCH_CHECK(value_hidden.size(0) <= kMaxRows, "guided_logits_decode_: M must be <= ", kMaxRows);
  TORCH_CHECK(value_hidden.size(1) == value_weight.size(1), "guided_logits_decode_: Hv mismatch");
  TORCH_CHECK(out.size(0) == value_hidden.size(0) && out.stride(1) == 1,
              "guided_logits_decode_: out must be [M, Vb] with a contiguous last dim");
  TORCH_CHECK(aligned16(value_hidden) && aligned16(value_weight),
              "guided_logits_decode_: value tensors need stride(-1) == 1 and 16-byte aligned rows");
  TORCH_CHECK(base_logits.has_value() != (base_hidden.has_value() && base_weight.has_value()),
              "guided_logits_decode_: give base_logits or base_hidden + base_weight");
  if (base_logits.has_value()) {
    TORCH_CHECK(base_logits->scalar_type() == dt || base_logits->scalar_type() == at::kFloat,
                "guided_logits_decode_: base_logits dtype must equal the value dtype or be float32");
    TORCH_CHECK(out.scalar_type() == base_logits->scalar_type(), "guided_logits_decode_: out dtype must match base_logits");
    TORCH_CHECK(base_logits->stride(1) == 1 && base_logits->size(1) == out.size(1) &&
                    base_logits->size(0) == out.size(0),
                "guided_logits_decode_: base_logits must be [M, Vb] with a contiguous last dim");
  } else {
    TORCH_CHECK(base_hidden->scalar_type() == dt && base_weight->scalar_type() == dt,
                "guided_logits_decode_: base_hidden/base_weight dtype must equal the value dtype");
    TORCH_CHECK(out.scalar_type() == at::kFloat, "guided_logits_decode_: out must be float32");
    TORCH_CHECK(aligned16(*base_hidden) && aligned16(*base_weight),
                "guided_logits_decode_: base tensors need stride(-1) == 1 and 16-byte aligned rows");
    TORCH_CHECK(base_weight->size(0) == out.size(1) && base_weight->size(1) == base_hidden->size(1),
                "guided_logits_decode_: base_weight must be [Vb, Hb]");
  }
  if (vocab_map.has_value()) {
    TORCH_CHECK(vocab_map->dim() == 1 && vocab_map->size(0) == out.size(1) && vocab_map->stride(0) == 1,
                "guided_logits_decode_: vocab_map must be a contiguous [Vb] tensor");
    TORCH_CHECK(vocab_map->scalar_type() == at::kInt || vocab_map->scalar_type() == at::kLong,
                "guided_logits_decode_: vocab_map must be int32 or int64");
  }
  if (alpha_tensor.has_value()) {
    TORCH_CHECK(alpha_tensor->scalar_type() == at::kFloat && alpha_tensor->is_contiguous() &&
                    alpha_tensor->numel() == value_hidden.size(0),
                "guided_logits_decode_: alpha_tensor must be a contiguous float32 [M] tensor");
  }
  if (value_hidden.size(0) == 0 || out.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(value_hidden.device());
  const Launch p{value_hidden, value_weight, base_logits, base_hidden, base_weight, vocab_map, alpha_tensor,
                 static_cast<float>(alpha_scalar), static_cast<float>(fill), out};
  switch (dt) {
    case at::kFloat: dispatch_base<float>(p); break;
    case at::kHalf: dispatch_base<at::Half>(p); break;
    case at::kBFloat16: dispatch_base<at::BFloat16>(p); break;
    default: TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace ivl_kernels

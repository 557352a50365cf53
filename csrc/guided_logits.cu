// Decode-shaped fused guided logits: the host side of the extension (argument checks, instantiation choice,
// launch). The kernel itself is in guided_logits_kernel.cuh, shared with the host SIMT emulation that runs it
// on CPU in the tests.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "guided_logits_kernel.cuh"

namespace ivl_kernels {

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
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = grid_blocks(Vb, static_cast<int64_t>(sms) * kBlocksPerSm);
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
  for_rows(p.vh.size(0), [&](auto rows) { launch<scalar_t, base_t, out_t, decltype(rows)::value, BASE_MODE>(p); });
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

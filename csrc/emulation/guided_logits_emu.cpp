// The decode kernel of ../guided_logits_kernel.cuh, compiled by the host C++ compiler under the SIMT emulation
// (simt_emu.h) and exposed with a C ABI for ctypes (tests/ops/_cuda_emu.py builds and loads it). The launch
// mirrors guided_logits.cu: the same instantiation choice (for_rows, and base/out types by base mode), the
// same block size and grid formula (grid_blocks), the same arguments; only the grid cap is a parameter, so a
// test can make the grid-stride loop iterate. Before each launch the tensors the kernel reads with 16-byte
// loads are registered as the buffers such loads may touch.
//
// Also here: tiny kernels that check the emulation itself (shuffle results, lockstep, the load checks), and
// the float <-> 16-bit conversions, so the tests can compare them with torch's.

#include "simt_emu.h"
// (simt_emu.h first: the kernel header refuses to compile without it or nvcc)
#include "../guided_logits_kernel.cuh"

#include <cstdio>
#include <mutex>
#include <string>

extern "C" {

struct IvlEmuArgs {
  int dtype;          // value dtype: 0 float32, 1 float16, 2 bfloat16
  int base_mode;      // 1: base_logits, 2: base_hidden + base_weight
  int base_is_float;  // base_mode 1: base_logits (and out) are float32 rather than the value dtype
  const void* value_hidden;
  int64_t vh_stride;
  const void* value_weight;
  int64_t vw_stride;
  const void* vocab_map;  // nullptr: identity
  int map_is_int64;
  const void* base_logits;
  int64_t bl_stride;
  const void* base_hidden;
  int64_t bh_stride;
  const void* base_weight;
  int64_t bw_stride;
  const float* alpha;  // nullptr: alpha_scalar
  float alpha_scalar;
  float fill;
  void* out;
  int64_t out_stride;
  int M;
  int64_t Vb;
  int64_t Vv;
  int Hv;
  int Hb;
  int64_t max_blocks;  // the grid cap (the extension uses SMs * kBlocksPerSm)
  int workers;         // OS threads, whole blocks each
};

struct IvlEmuResult {
  int rows;        // the ROWS instantiation that ran
  int blocks;      // grid size
  int64_t warps;   // warps run
  int64_t shuffle_rounds;
  int64_t vector_loads;
};

}  // extern "C"

namespace {

using namespace ivl_kernels;

std::mutex g_launch_mutex;  // the buffer registry is global: one launch at a time

template <typename T>
size_t extent_bytes(int64_t rows, int64_t stride, int64_t cols) {
  return rows <= 0 || cols <= 0 ? 0 : static_cast<size_t>((rows - 1) * stride + cols) * sizeof(T);
}

template <typename S, typename B, typename O, int BASE_MODE>
std::string run(const IvlEmuArgs& a, IvlEmuResult& res) {
  std::string err;
  simt::clear_buffers();
  simt::register_buffer(a.value_hidden, extent_bytes<S>(a.M, a.vh_stride, a.Hv), "value_hidden");
  simt::register_buffer(a.value_weight, extent_bytes<S>(a.Vv, a.vw_stride, a.Hv), "value_weight");
  if (BASE_MODE == 2) {
    simt::register_buffer(a.base_hidden, extent_bytes<S>(a.M, a.bh_stride, a.Hb), "base_hidden");
    simt::register_buffer(a.base_weight, extent_bytes<S>(a.Vb, a.bw_stride, a.Hb), "base_weight");
  }
  for_rows(a.M, [&](auto rows) {
    constexpr int ROWS = decltype(rows)::value;
    const int blocks = grid_blocks(a.Vb, a.max_blocks);
    res.rows = ROWS;
    res.blocks = blocks;
    if (blocks == 0) return;
    const bool has_map = a.vocab_map != nullptr;
    simt::Stats stats;
    // The argument list of guided_logits.cu's launch, with the emulation's pointers.
    err = simt::launch(
        dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
        [&] {
          guided_logits_decode_kernel<S, B, O, ROWS, BASE_MODE>(
              static_cast<const S*>(a.value_hidden), a.vh_stride,
              static_cast<const S*>(a.value_weight), a.vw_stride,
              has_map ? a.vocab_map : nullptr, has_map, has_map && a.map_is_int64,
              BASE_MODE == 1 ? static_cast<const B*>(a.base_logits) : nullptr,
              BASE_MODE == 1 ? a.bl_stride : 0,
              BASE_MODE == 2 ? static_cast<const S*>(a.base_hidden) : nullptr,
              BASE_MODE == 2 ? a.bh_stride : 0,
              BASE_MODE == 2 ? static_cast<const S*>(a.base_weight) : nullptr,
              BASE_MODE == 2 ? a.bw_stride : 0,
              a.alpha, a.alpha_scalar, a.fill,
              static_cast<O*>(a.out), a.out_stride,
              a.M, a.Vb, a.Vv, a.Hv, a.Hb);
        },
        a.workers, &stats);
    res.warps = stats.warps;
    res.shuffle_rounds = stats.shuffle_rounds;
    res.vector_loads = stats.vector_loads;
  });
  simt::clear_buffers();
  return err;
}

// guided_logits.cu's dispatch_base: base/out in the value dtype or float32 (base logits), float32 (hidden).
template <typename S>
std::string dispatch_base(const IvlEmuArgs& a, IvlEmuResult& res) {
  if (a.base_mode == 1) {
    return a.base_is_float ? run<S, float, float, 1>(a, res) : run<S, S, S, 1>(a, res);
  }
  return run<S, S, float, 2>(a, res);
}

int report(const std::string& err, char* buf, size_t len) {
  if (err.empty()) return 0;
  if (buf && len) std::snprintf(buf, len, "%s", err.c_str());
  return 1;
}

// --- kernels that check the emulation itself --------------------------------------------------------------------

// out[t * 33 + k] = the value lane (t % 32) ^ k holds, for k < 32; out[t * 33 + 32] = shuffles with width 8.
__global__ void shuffle_table_kernel(float* out) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  const float mine = static_cast<float>(1000 * blockIdx.x + t);
  for (int k = 0; k < 32; ++k) out[t * 33 + k] = __shfl_xor_sync(0xffffffffu, mine, k);
  out[t * 33 + 32] = __shfl_xor_sync(0xffffffffu, mine, 12, 8);  // later segment: own value; earlier: theirs
}

// Lockstep: every lane counts itself in before a shuffle and reads the count after it, twice (one counter per
// shuffle and warp). seen[t] = seen[T + t] = 32 for every thread t when no lane passes a shuffle before all 32
// lanes of its warp have reached it.
__global__ void lockstep_kernel(int* counters, int* seen, int total_threads) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned warps = static_cast<unsigned>(total_threads) / 32;
  const unsigned warp = t / 32;
  counters[warp] += 1;
  int x = __shfl_xor_sync(0xffffffffu, static_cast<int>(t), 1);
  seen[t] = counters[warp];
  counters[warps + warp] += 1;
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  seen[total_threads + t] = counters[warps + warp] + (x & 0);
}

// Loads that must fault: which = 0 misaligned __ldg, 1 __ldcs one vector past the end, 2 divergent shuffle.
__global__ void faulty_kernel(const uint4* buf, int n16, int which, float* out) {
  const int lane = threadIdx.x & 31;
  float v = 0.f;
  if (which == 0) {
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(buf) + 4 * (lane == 5)));
    v = static_cast<float>(x.x);
  } else if (which == 1) {
    const uint4 x = __ldcs(buf + (lane == 7 ? n16 : lane % n16));
    v = static_cast<float>(x.y);
  } else if (lane < 16) {
    v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" {

// Runs the decode kernel on host memory. 0: done; 1: the emulation reported an error (message in err).
int ivl_emu_guided_logits(const IvlEmuArgs* a, IvlEmuResult* res, char* err, size_t errlen) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  *res = IvlEmuResult{0, 0, 0, 0, 0};
  if (a->M < 0 || a->M > kMaxRows) return report("M must be in [0, " + std::to_string(kMaxRows) + "]", err, errlen);
  if (a->M == 0 || a->Vb == 0) return 0;
  switch (a->dtype) {
    case 0: return report(dispatch_base<float>(*a, *res), err, errlen);
    case 1: return report(dispatch_base<__half>(*a, *res), err, errlen);
    case 2: return report(dispatch_base<__nv_bfloat16>(*a, *res), err, errlen);
    default: return report("unknown dtype code", err, errlen);
  }
}

int ivl_emu_threads_per_block() { return kThreads; }
int ivl_emu_max_rows() { return kMaxRows; }
int ivl_emu_blocks_per_sm() { return kBlocksPerSm; }

// 1: lanes switch by ucontext; 0: by the x86-64 stack switch. Returns 0 on success, 1 if not available.
int ivl_emu_set_portable_switch(int on) { return simt::set_portable_switch(on != 0) ? 0 : 1; }
int ivl_emu_portable_switch() { return simt::portable_switch() ? 1 : 0; }

void ivl_emu_f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __float2half_rn(x[i]).__x;
}
void ivl_emu_f16_to_f32(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __half2float(__half{x[i]});
}
void ivl_emu_f32_to_bf16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __float2bfloat16_rn(x[i]).__x;
}
void ivl_emu_bf16_to_f32(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = __bfloat162float(__nv_bfloat16{x[i]});
}

int ivl_emu_shuffle_table(int blocks, int threads, float* out, char* err, size_t errlen) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  simt::clear_buffers();
  return report(simt::launch(dim3(blocks), dim3(threads), [&] { shuffle_table_kernel(out); }), err, errlen);
}

int ivl_emu_lockstep(int blocks, int threads, int* counters, int* seen, char* err, size_t errlen) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  simt::clear_buffers();
  return report(simt::launch(dim3(blocks), dim3(threads), [&] { lockstep_kernel(counters, seen, blocks * threads); }),
                err, errlen);
}

int ivl_emu_faulty(int which, const void* buf, int n16, float* out, char* err, size_t errlen) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  simt::clear_buffers();
  simt::register_buffer(buf, static_cast<size_t>(n16) * 16, "buf");
  const std::string e = simt::launch(dim3(1), dim3(32), [&] {
    faulty_kernel(static_cast<const uint4*>(buf), n16, which, out);
  });
  simt::clear_buffers();
  return report(e, err, errlen);
}

}  // extern "C"

// A small SIMT emulation of CUDA for the host C++ compiler: enough of CUDA to run the kernel text of
// ../guided_logits_kernel.cuh on CPU memory, unchanged, in the tests (tests/ops/test_cuda_emulation.py).
//
//  * Threads. A launch runs its blocks one after another (or split over a few OS threads, whole blocks each);
//    within a block, warps run one after another: correct only for kernels without shared memory and without
//    __syncthreads(), and both are refused at compile time below. The 32 lanes of a warp are 32 fibers (own
//    stacks, one OS thread) that a scheduler resumes in turn: each lane runs until it reaches a warp shuffle
//    or returns. When every lane has stopped, a shuffle is performed only if all 32 lanes wait at one, with the
//    same member mask: the values are exchanged and every lane resumes. So the lanes are in lockstep at every
//    shuffle, and a lane that skips a shuffle another lane executes (divergence, or an exited lane named in
//    the mask) is reported as an error instead of reading a stale value.
//  * Memory. The vector loads (__ldg, __ldcs) check that the address is aligned to the access size and that
//    [address, address + size) lies inside one buffer registered for the launch (register_buffer: the
//    [ptr, ptr + bytes) of each tensor the kernel may read with them). A failed check stops the launch and is
//    reported with the lane, warp, block, address and the registered buffers; the faulting load never reads.
//    Plain loads and stores through pointers are not checked (the tests surround tensors with guard zones).
//  * Numbers. __half / __nv_bfloat16 are 16-bit storage types; conversions from float round to nearest even
//    (as __float2half_rn / __float2bfloat16_rn; fp16 subnormals, overflow to infinity, NaN -> 0x7fff as the
//    device's cvt.rn). fmaf is the host's correctly rounded fused multiply-add, as on the device. Not
//    modelled: --use_fast_math's flush of float32 subnormals to zero, and the device's contraction of a * b + c
//    into one FMA where the source writes them apart (results may differ in the last bit of such expressions).
//
// Errors are reported, not aborted on: launch() returns a message (empty on success) and the caller raises it.

#pragma once

#if defined(__CUDACC__)
#error "simt_emu.h emulates CUDA on the host; nvcc compiles the real thing"
#endif

#define IVL_SIMT_EMULATION 1

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

// ---------------------------------------------------------------------------------------------------------------
// Qualifiers: plain host functions. (__restrict__ is a GNU extension that g++ and clang++ accept as is.)
// ---------------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Shared memory and block barriers would need the warps of a block to run concurrently: refused.
#define __shared__ __shared___is_not_supported_by_the_SIMT_emulation_warps_of_a_block_run_one_after_another

namespace simt {
template <typename T = void>
inline void syncthreads_unsupported() {
  static_assert(sizeof(T) == 0,
                "__syncthreads() is not supported by the SIMT emulation: the warps of a block run one after another");
}
}  // namespace simt
#define __syncthreads() ::simt::syncthreads_unsupported<>()

// ---------------------------------------------------------------------------------------------------------------
// Vector and index types
// ---------------------------------------------------------------------------------------------------------------
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---------------------------------------------------------------------------------------------------------------
// 16-bit floating-point storage types and their conversions
// ---------------------------------------------------------------------------------------------------------------
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types");

namespace simt {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even; subnormal results, overflow to infinity, NaN -> 0x7fff.
inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                                    // NaN (canonical, as cvt.rn.f16.f32)
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);    // >= 65520: rounds to infinity
  const int exp = static_cast<int>(a >> 23) - 127 + 15;                  // biased binary16 exponent
  uint32_t mant = a & 0x7fffffu;
  if (exp <= 0) {                                                        // binary16 subnormal (or zero)
    const int shift = 14 - exp;                                          // units of 2^-24
    if (shift > 24) return sign;                                         // below half the smallest subnormal
    mant |= 0x800000u;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;                    // may carry into the smallest normal
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;                // carries into the exponent as it should
  return static_cast<uint16_t>(sign | h);
}

inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {                                                           // zero / subnormal: mant * 2^-24
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;     // exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// float -> bfloat16, round to nearest even (subnormals kept, overflow to infinity); NaN -> 0x7fff.
inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }
}  // namespace simt

inline float __half2float(__half h) { return simt::f16_bits_to_f32(h.__x); }
inline __half __float2half_rn(float f) { return __half{simt::f32_to_f16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return simt::bf16_bits_to_f32(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{simt::f32_to_bf16_bits(f)}; }

// ---------------------------------------------------------------------------------------------------------------
// Launch state seen by the kernel: threadIdx, blockIdx, blockDim, gridDim
// ---------------------------------------------------------------------------------------------------------------
namespace simt {
namespace detail {

constexpr int kWarp = 32;

enum class LaneState { kRunning, kAtShuffle, kDone, kFaulted };

struct Lane {
  void* sp = nullptr;    // saved stack pointer (assembly switch)
  void* uc = nullptr;    // ucontext_t* (portable switch)
  uint3 tid{0, 0, 0};
  LaneState state = LaneState::kRunning;
  unsigned shfl_mask = 0;
  int shfl_src = 0;       // lane whose value this lane receives
  uint64_t shfl_value = 0;
  uint64_t shfl_result = 0;
};

struct Worker;  // one OS thread's scheduler, its lanes and their stacks (simt_emu_runtime.h)

struct ThreadView {
  Worker* worker = nullptr;
  Lane* lane = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
};
extern thread_local ThreadView tls;

// Called by lanes: park at a shuffle / report a fault (both switch back to the scheduler).
void shuffle_wait(Lane& lane);
[[noreturn]] void fault(const std::string& what);
void count_vector_load();
// Whether [p, p + bytes) lies in one registered buffer; else the description of the buffers.
bool in_registered_buffer(const void* p, size_t bytes);
std::string describe_buffers();
std::string where();  // "lane L of warp W of block B" for the running lane

}  // namespace detail
}  // namespace simt

#define threadIdx (::simt::detail::tls.lane->tid)
#define blockIdx (::simt::detail::tls.block_idx)
#define blockDim (::simt::detail::tls.block_dim)
#define gridDim (::simt::detail::tls.grid_dim)

// ---------------------------------------------------------------------------------------------------------------
// Checked vector loads: __ldg (read-only path) and __ldcs (streaming) are plain loads on the host
// ---------------------------------------------------------------------------------------------------------------
namespace simt {
namespace detail {
template <typename T>
inline T checked_load(const T* p, const char* op) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (addr % alignof(T) != 0 || addr % sizeof(T) != 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: misaligned %zu-byte load at address 0x%llx (address %% %zu = %zu)", op,
                  sizeof(T), static_cast<unsigned long long>(addr), sizeof(T), static_cast<size_t>(addr % sizeof(T)));
    fault(std::string(buf) + " by " + where());
  }
  if (!in_registered_buffer(p, sizeof(T))) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: out-of-bounds %zu-byte load at address 0x%llx", op, sizeof(T),
                  static_cast<unsigned long long>(addr));
    fault(std::string(buf) + " by " + where() + ": not inside any registered buffer " + describe_buffers());
  }
  count_vector_load();
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
}  // namespace detail
}  // namespace simt

template <typename T>
inline T __ldg(const T* p) {
  return ::simt::detail::checked_load(p, "__ldg");
}
template <typename T>
inline T __ldcs(const T* p) {
  return ::simt::detail::checked_load(p, "__ldcs");
}

// ---------------------------------------------------------------------------------------------------------------
// Warp shuffle (butterfly): every lane of the mask meets the others here before any of them continues
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "__shfl_xor_sync: 1-8 byte values");
  using namespace ::simt::detail;
  Lane& me = *tls.lane;
  const int lane = static_cast<int>(me.tid.x % kWarp);
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) {
    fault("__shfl_xor_sync: width must be a power of 2 <= 32, by " + where());
  }
  // Source lane lane ^ laneMask; a lane in a later segment of `width` lanes gives the caller its own value.
  const int j = lane ^ laneMask;
  me.shfl_src = (j >= 0 && j < (lane & ~(width - 1)) + width) ? j : lane;
  me.shfl_mask = mask;
  me.shfl_value = 0;
  std::memcpy(&me.shfl_value, &var, sizeof(T));
  shuffle_wait(me);  // returns once every lane has arrived and the values are exchanged
  T out;
  std::memcpy(&out, &me.shfl_result, sizeof(T));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Launch: kernel<<<grid, block>>>(...) becomes simt::launch(grid, block, [&] { kernel(...); })
// ---------------------------------------------------------------------------------------------------------------
namespace simt {

struct Stats {
  int64_t blocks = 0;
  int64_t warps = 0;
  int64_t shuffle_rounds = 0;  // warp-wide shuffles performed (one per 32 lanes meeting)
  int64_t vector_loads = 0;    // checked __ldg / __ldcs loads, all lanes
};

// The buffers vector loads may read during the next launch (name is shown in error messages).
void clear_buffers();
void register_buffer(const void* ptr, size_t bytes, const char* name);

// Lane switching by POSIX ucontext (portable, slower) instead of the x86-64 stack switch. Returns false when
// the stack switch is asked for but not available here (then ucontext stays in use).
bool set_portable_switch(bool on);
bool portable_switch();

// Runs body() as every thread of the grid (1-D grids and blocks; blockDim a multiple of 32). Returns "" on
// success, else what went wrong. workers > 1 runs whole blocks on that many OS threads.
std::string launch_erased(dim3 grid, dim3 block, void (*body)(void*), void* ctx, int workers, Stats* stats);

template <typename F>
std::string launch(dim3 grid, dim3 block, F&& body, int workers = 1, Stats* stats = nullptr) {
  using Body = std::remove_reference_t<F>;
  return launch_erased(grid, block, [](void* c) { (*static_cast<Body*>(c))(); },
                       const_cast<void*>(static_cast<const void*>(&body)), workers, stats);
}

}  // namespace simt

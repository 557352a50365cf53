// Runtime of the SIMT emulation (simt_emu.h): fibers for the lanes of a warp, the warp scheduler that keeps
// them in lockstep at shuffles, the registry of buffers that vector loads may read, and launch().
//
// Lane switching: on x86-64 a 20-instruction stack switch (callee-saved registers, MXCSR and the x87 control
// word); elsewhere, or when selected at run time (set_portable_switch), POSIX ucontext (slower: a system call
// per switch). Each lane has its own stack with an inaccessible guard page below it.

#include "simt_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#if defined(__x86_64__) && !defined(IVL_SIMT_PORTABLE_SWITCH)
#define IVL_SIMT_HAVE_ASM_SWITCH 1
#else
#define IVL_SIMT_HAVE_ASM_SWITCH 0
#endif

#if IVL_SIMT_HAVE_ASM_SWITCH
// ivl_simt_switch(save, load): pushes the callee-saved state on the current stack, stores the stack pointer
// in *save, switches to the stack `load` (saved the same way, or prepared by init_fiber) and pops its state.
extern "C" void ivl_simt_switch(void** save, void* load);
extern "C" void ivl_simt_trampoline();
asm(R"(
    .text
    .p2align 4
    .globl ivl_simt_switch
    .hidden ivl_simt_switch
    .type ivl_simt_switch, @function
ivl_simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ivl_simt_switch, .-ivl_simt_switch

    .p2align 4
    .globl ivl_simt_trampoline
    .hidden ivl_simt_trampoline
    .type ivl_simt_trampoline, @function
ivl_simt_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size ivl_simt_trampoline, .-ivl_simt_trampoline
)");
#endif

namespace simt {
namespace detail {

thread_local ThreadView tls;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

std::atomic<bool> g_portable_switch{!IVL_SIMT_HAVE_ASM_SWITCH};

struct Buffer {
  uintptr_t lo, hi;
  std::string name;
};
std::vector<Buffer> g_buffers;  // written before a launch, read-only while it runs

}  // namespace

struct Worker {
  Lane lanes[kWarp];
  ucontext_t lane_uc[kWarp];
  ucontext_t sched_uc;
  void* sched_sp = nullptr;
  bool portable = false;
  char* stacks = nullptr;
  size_t page = 4096;
  size_t slot = 0;  // guard page + stack, per lane
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  unsigned block = 0;
  unsigned warp = 0;
  std::string error;
  Stats stats;

  Worker() {
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    slot = page + kStackBytes;
    void* p = mmap(nullptr, slot * kWarp, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "simt emulation: cannot map the lane stacks\n");
      std::abort();
    }
    stacks = static_cast<char*>(p);
    for (int i = 0; i < kWarp; ++i) mprotect(stacks + i * slot, page, PROT_NONE);  // overflow faults
  }
  ~Worker() { munmap(stacks, slot * kWarp); }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
};

namespace {

void lane_main_impl() {
  Worker& w = *tls.worker;
  w.body(w.ctx);
  Lane& me = *tls.lane;
  me.state = LaneState::kDone;
  // Back to the scheduler for good.
#if IVL_SIMT_HAVE_ASM_SWITCH
  if (!w.portable) {
    ivl_simt_switch(&me.sp, w.sched_sp);
  } else
#endif
  {
    swapcontext(static_cast<ucontext_t*>(me.uc), &w.sched_uc);
  }
  std::fprintf(stderr, "simt emulation: a finished lane was resumed\n");
  std::abort();
}

void lane_main_asm(void*) { lane_main_impl(); }
void lane_main_uc() { lane_main_impl(); }

void init_fiber(Worker& w, int i) {
  Lane& l = w.lanes[i];
  char* base = w.stacks + i * w.slot + w.page;
  char* top = base + kStackBytes;
  if (w.portable) {
    ucontext_t* uc = &w.lane_uc[i];
    getcontext(uc);
    uc->uc_stack.ss_sp = base;
    uc->uc_stack.ss_size = kStackBytes;
    uc->uc_link = nullptr;
    makecontext(uc, lane_main_uc, 0);
    l.uc = uc;
    return;
  }
#if IVL_SIMT_HAVE_ASM_SWITCH
  // The frame ivl_simt_switch pops: [mxcsr, x87 cw][r15][r14][r13][r12][rbx][rbp][return address].
  auto* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15)) - 128);
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = sp[2] = 0;                                                 // r15, r14
  sp[3] = reinterpret_cast<uint64_t>(&lane_main_asm);              // r13: called by the trampoline
  sp[4] = reinterpret_cast<uint64_t>(&l);                           // r12: its argument
  sp[5] = sp[6] = 0;                                                 // rbx, rbp
  sp[7] = reinterpret_cast<uint64_t>(&ivl_simt_trampoline);         // ret lands here, rsp 16-byte aligned
  l.sp = sp;
#endif
}

void resume(Worker& w, Lane& l) {
  tls.lane = &l;
#if IVL_SIMT_HAVE_ASM_SWITCH
  if (!w.portable) {
    ivl_simt_switch(&w.sched_sp, l.sp);
    return;
  }
#endif
  swapcontext(&w.sched_uc, static_cast<ucontext_t*>(l.uc));
}

void yield_to_scheduler(Worker& w, Lane& l) {
#if IVL_SIMT_HAVE_ASM_SWITCH
  if (!w.portable) {
    ivl_simt_switch(&l.sp, w.sched_sp);
    return;
  }
#endif
  swapcontext(static_cast<ucontext_t*>(l.uc), &w.sched_uc);
}

std::string lane_list(unsigned bits) {
  std::string s;
  for (int i = 0; i < kWarp; ++i) {
    if (bits & (1u << i)) s += (s.empty() ? "" : ",") + std::to_string(i);
  }
  return s.empty() ? "none" : s;
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

// Runs the 32 lanes of one warp to completion. false: w.error says why.
bool run_warp(Worker& w, unsigned block, unsigned warp) {
  w.block = block;
  w.warp = warp;
  for (int i = 0; i < kWarp; ++i) {
    Lane& l = w.lanes[i];
    l.tid = uint3{warp * kWarp + i, 0, 0};
    l.state = LaneState::kRunning;
    init_fiber(w, i);
  }
  for (;;) {
    for (int i = 0; i < kWarp; ++i) {
      if (w.lanes[i].state != LaneState::kRunning) continue;
      resume(w, w.lanes[i]);  // runs lane i up to its next shuffle, its end, or a fault
      if (!w.error.empty()) return false;
    }
    unsigned waiting = 0, done = 0;
    for (int i = 0; i < kWarp; ++i) {
      if (w.lanes[i].state == LaneState::kAtShuffle) waiting |= 1u << i;
      if (w.lanes[i].state == LaneState::kDone) done |= 1u << i;
    }
    if (waiting == 0) return true;  // every lane returned
    const std::string at = "warp " + std::to_string(warp) + " of block " + std::to_string(block);
    const int first = __builtin_ctz(waiting);
    const unsigned mask = w.lanes[first].shfl_mask;
    for (int i = 0; i < kWarp; ++i) {
      if ((waiting & (1u << i)) && w.lanes[i].shfl_mask != mask) {
        w.error = "__shfl_xor_sync: lanes of " + at + " wait at a shuffle with different masks (lane " +
                  std::to_string(first) + ": " + hex(mask) + ", lane " + std::to_string(i) + ": " +
                  hex(w.lanes[i].shfl_mask) + ")";
        return false;
      }
    }
    if ((mask & waiting) != mask || (waiting & ~mask) != 0) {
      w.error = "__shfl_xor_sync: divergent warp: in " + at + ", lanes " + lane_list(waiting) +
                " wait at a shuffle with mask " + hex(mask) + " but lanes " + lane_list(mask & ~waiting) +
                " named in the mask never reach it (" + lane_list(mask & done) + " returned first)";
      return false;
    }
    for (int i = 0; i < kWarp; ++i) {
      if (!(waiting & (1u << i))) continue;
      Lane& l = w.lanes[i];
      if (!(waiting & (1u << l.shfl_src))) {
        w.error = "__shfl_xor_sync: lane " + std::to_string(i) + " of " + at + " reads lane " +
                  std::to_string(l.shfl_src) + ", which is not in the shuffle (mask " + hex(mask) + ")";
        return false;
      }
      l.shfl_result = w.lanes[l.shfl_src].shfl_value;
    }
    for (int i = 0; i < kWarp; ++i) {
      if (waiting & (1u << i)) w.lanes[i].state = LaneState::kRunning;
    }
    ++w.stats.shuffle_rounds;
  }
}

void run_blocks(Worker& w, dim3 grid, dim3 block, int first_block, int stride) {
  tls.worker = &w;
  tls.block_dim = block;
  tls.grid_dim = grid;
  const unsigned warps = block.x / kWarp;
  for (unsigned b = static_cast<unsigned>(first_block); b < grid.x; b += static_cast<unsigned>(stride)) {
    tls.block_idx = uint3{b, 0, 0};
    ++w.stats.blocks;
    for (unsigned wp = 0; wp < warps; ++wp) {
      ++w.stats.warps;
      if (!run_warp(w, b, wp)) {
        tls = ThreadView{};
        return;
      }
    }
  }
  tls = ThreadView{};
}

}  // namespace

void shuffle_wait(Lane& lane) {
  Worker& w = *tls.worker;
  lane.state = LaneState::kAtShuffle;
  yield_to_scheduler(w, lane);
  if (lane.state != LaneState::kRunning) {
    std::fprintf(stderr, "simt emulation: a lane left a shuffle before the exchange\n");
    std::abort();
  }
}

void fault(const std::string& what) {
  Worker& w = *tls.worker;
  Lane& me = *tls.lane;
  if (w.error.empty()) w.error = what;
  me.state = LaneState::kFaulted;
  yield_to_scheduler(w, me);  // the scheduler abandons the warp: never resumed
  std::fprintf(stderr, "simt emulation: a faulted lane was resumed\n");
  std::abort();
}

void count_vector_load() { ++tls.worker->stats.vector_loads; }

bool in_registered_buffer(const void* p, size_t bytes) {
  const auto lo = reinterpret_cast<uintptr_t>(p);
  if (lo + bytes < lo) return false;
  for (const Buffer& b : g_buffers) {
    if (lo >= b.lo && lo + bytes <= b.hi) return true;
  }
  return false;
}

std::string describe_buffers() {
  std::string s = "(registered:";
  for (const Buffer& b : g_buffers) {
    char buf[128];
    std::snprintf(buf, sizeof buf, " %s [0x%llx, 0x%llx)", b.name.c_str(), static_cast<unsigned long long>(b.lo),
                  static_cast<unsigned long long>(b.hi));
    s += buf;
  }
  return s + (g_buffers.empty() ? " none)" : ")");
}

std::string where() {
  const Worker& w = *tls.worker;
  const unsigned t = tls.lane->tid.x;
  return "lane " + std::to_string(t % kWarp) + " of warp " + std::to_string(w.warp) + " of block " +
         std::to_string(w.block) + " (threadIdx.x " + std::to_string(t) + ")";
}

}  // namespace detail

void clear_buffers() { detail::g_buffers.clear(); }

void register_buffer(const void* ptr, size_t bytes, const char* name) {
  const auto lo = reinterpret_cast<uintptr_t>(ptr);
  detail::g_buffers.push_back(detail::Buffer{lo, lo + bytes, name});
}

bool set_portable_switch(bool on) {
  if (!on && !IVL_SIMT_HAVE_ASM_SWITCH) return false;
  detail::g_portable_switch = on;
  return true;
}

bool portable_switch() { return detail::g_portable_switch; }

std::string launch_erased(dim3 grid, dim3 block, void (*body)(void*), void* ctx, int workers, Stats* stats) {
  using namespace detail;
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) return "simt::launch: only 1-D grids and blocks";
  if (block.x == 0 || block.x % kWarp != 0) return "simt::launch: blockDim.x must be a positive multiple of 32";
  if (grid.x == 0) return "";
  workers = std::max(1, std::min<int>(workers, static_cast<int>(grid.x)));
  std::vector<Worker> pool(static_cast<size_t>(workers));
  for (Worker& w : pool) {
    w.body = body;
    w.ctx = ctx;
    w.portable = g_portable_switch;
  }
  if (workers == 1) {
    run_blocks(pool[0], grid, block, 0, 1);
  } else {
    std::vector<std::thread> threads;
    for (int k = 0; k < workers; ++k) {
      threads.emplace_back([&, k] { run_blocks(pool[static_cast<size_t>(k)], grid, block, k, workers); });
    }
    for (std::thread& t : threads) t.join();
  }
  std::string error;
  Stats total;
  for (Worker& w : pool) {
    if (error.empty()) error = w.error;
    total.blocks += w.stats.blocks;
    total.warps += w.stats.warps;
    total.shuffle_rounds += w.stats.shuffle_rounds;
    total.vector_loads += w.stats.vector_loads;
  }
  if (stats) *stats = total;
  return error;
}

}  // namespace simt

// CPU emulation of the CUDA features the linear_attention kernels use, so their real source runs under a host
// compiler in CI (no GPU there). Include this first, then the kernel sources; they see HK_CPU_EMULATION.
//
// A launch runs its blocks one after another; a block runs its CUDA threads as fibers on the calling
// thread, switching at every barrier: __syncthreads is a barrier of the block's fibers, `__shared__` variables are
// function statics they share, and warp operations (shuffles, ldmatrix, mma.sync) exchange values through per-warp
// slots at a warp barrier (every lane of a warp must reach them together, as the kernels guarantee). A
// fiber waiting at a barrier nobody else reaches is a deadlock and aborts. mma.m16n8k16 multiplies in fp32 from the
// fp16/bf16 fragments (products are exact; only the summation order differs from the hardware). cp.async copies
// land at the wait_group that covers them (see cp_async_16). Dynamic shared memory is followed by a guard band
// checked after each block. wgmma.mma_async (sm_90a) is performed by each thread for its own accumulators when a
// wait_group covers it, reading shared memory through the descriptor then (see wgmma_m64nk16); a wgmma that reads
// cp.async data not yet fenced for the async proxy aborts (see fence_proxy_async). What this cannot show: timing,
// bank conflicts, and races between threads that a barrier does not order (fibers run one at a time, in a fixed
// order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <algorithm>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define HK_CPU_EMULATION 1

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

using std::max;
using std::min;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 gridDim;

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

namespace hk_emulation {

// ---- fiber contexts: on x86-64 Linux a switch saves the callee-saved registers and swaps stack pointers (a few
// instructions); elsewhere, or with HK_EMULATION_UCONTEXT defined, ucontext, which is correct but slower (it saves
// the signal mask with a system call at every switch).
#if defined(__x86_64__) && defined(__linux__) && !defined(HK_EMULATION_UCONTEXT)
extern "C" void hk_emulation_switch(void** save_sp, void* load_sp);
asm(".pushsection .text\n"
    ".globl hk_emulation_switch\n"
    ".hidden hk_emulation_switch\n"
    ".type hk_emulation_switch, @function\n"
    "hk_emulation_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $16, %rsp\n  stmxcsr 8(%rsp)\n  fnstcw (%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  fldcw (%rsp)\n  ldmxcsr 8(%rsp)\n  addq $16, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size hk_emulation_switch, .-hk_emulation_switch\n"
    ".popsection\n");

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& save, Context& load) { hk_emulation_switch(&save.sp, load.sp); }

// A context whose first switch enters entry() (which must never return) at the top of the stack.
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uint64_t* slot = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  *--slot = 0;                                  // entry's return address (never used): keeps the ABI's alignment
  *--slot = reinterpret_cast<uint64_t>(entry);  // where hk_emulation_switch returns to
  for (int i = 0; i < 6; ++i) *--slot = 0;      // rbp, rbx, r12 - r15
  slot -= 2;                                    // x87 control word at [sp], MXCSR at [sp + 8]: the caller's
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  std::memcpy(slot, &fpu_control, sizeof fpu_control);
  std::memcpy(reinterpret_cast<char*>(slot) + 8, &mxcsr, sizeof mxcsr);
  c.sp = slot;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }

// getcontext returns twice, as setjmp does: kept in its own frame so no caller variable can be clobbered.
[[gnu::noinline]] inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// One cp.async of 16 bytes, recorded when issued and performed when a wait covers it.
struct AsyncCopy {
  void* dst;
  const void* src;
  bool zero_fill;  // src-size 0: write 16 zero bytes, read nothing
};

// A thread's asynchronous operations of one kind, in groups as commit_group closes them: an issued operation goes
// into `open`, commit() closes that group, wait(pending, perform) performs every committed group but the newest
// `pending` (wait_group), oldest first.
template <class Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::vector<std::vector<Op>> committed;  // not yet waited for, oldest first

  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  template <class Perform>
  void wait(int pending, const Perform& perform) {
    const size_t done = committed.size() > static_cast<size_t>(pending) ? committed.size() - pending : 0;
    for (size_t g = 0; g < done; ++g) {
      for (const Op& op : committed[g]) perform(op);
    }
    committed.erase(committed.begin(), committed.begin() + static_cast<std::ptrdiff_t>(done));
  }
  void clear() {
    open.clear();
    committed.clear();
  }
};

// Fibers of the block being run, and the scheduler's context.
struct Barrier;
struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack;
  unsigned index = 0;
  bool done = false;
  const Barrier* waiting = nullptr;  // blocked at this barrier until its generation moves past wait_generation
  uint64_t wait_generation = 0;
  AsyncGroups<AsyncCopy> copies;            // cp.async
  AsyncGroups<std::function<void()>> mmas;  // wgmma.mma_async
  uint64_t fenced_at = 0;                   // the block event of this thread's last fence.proxy.async
};

inline thread_local Context scheduler_context;
inline thread_local Fiber* current_fiber = nullptr;

// A reusable barrier of `count` fibers: the last to arrive goes on, the others yield until it has.
struct Barrier {
  explicit Barrier(int n) : count(n) {}
  int count, arrived = 0;
  uint64_t generation = 0;
  // Returns true for the last fiber to arrive, which runs on before any other resumes.
  bool arrive_and_wait() {
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return true;
    }
    Fiber* self = current_fiber;
    self->waiting = this;
    self->wait_generation = generation;
    switch_context(self->context, scheduler_context);
    return false;
  }
};

constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kGuard = 0xA5;

// Per-warp exchange slots, double-buffered by each lane's count of warp operations: a lane can only come back to a
// buffer after the next operation's barrier, which every lane reaches only once done reading this one. So one
// barrier per warp operation suffices.
struct Warp {
  Barrier barrier{32};
  unsigned calls[32] = {};
  uint32_t words[2][32][6];
  float accumulators[2][32][4];
  const void* pointers[2][32];
  float values[2][32];
  int next_buffer(int lane) { return static_cast<int>(calls[lane]++ & 1u); }
};

struct Block {
  explicit Block(int threads, size_t smem)
      : barrier(threads), warps((threads + 31) / 32), shared(smem + kGuardBytes), landed(smem / 16 + 1, 0) {
    std::fill(shared.begin() + static_cast<std::ptrdiff_t>(smem), shared.end(), kGuard);
  }
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;  // operator new aligns it to 16 bytes
  // Proxy fences: the event count of the block, and per 16 bytes of dynamic shared memory the event at which a
  // cp.async last landed there (0: never).
  uint64_t events = 0;
  std::vector<uint64_t> landed;
};

inline thread_local Block* block = nullptr;

inline Warp& warp() { return block->warps[threadIdx.x / 32]; }
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline unsigned char* dynamic_shared_memory() { return block->shared.data(); }

inline float shfl_xor(float v, int offset) {
  Warp& w = warp();
  const int buf = w.next_buffer(lane());
  w.values[buf][lane()] = v;
  (void)w.barrier.arrive_and_wait();
  return w.values[buf][lane() ^ offset];
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8i..8i+7 give the row addresses of matrix i; each lane
// receives from matrix i the pair (row lane / 4, columns 2 (lane % 4), +1), or with .trans the pair
// (rows 2 (lane % 4), +1 of column lane / 4).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* address, bool trans) {
  Warp& w = warp();
  const int buf = w.next_buffer(lane());
  const void* const* pointers = w.pointers[buf];
  w.pointers[buf][lane()] = address;
  (void)w.barrier.arrive_and_wait();
  const int g = lane() / 4, t = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (trans) {
      lo = static_cast<const uint16_t*>(pointers[i * 8 + 2 * t])[g];
      hi = static_cast<const uint16_t*>(pointers[i * 8 + 2 * t + 1])[g];
    } else {
      const uint16_t* row = static_cast<const uint16_t*>(pointers[i * 8 + g]);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

// cp.async.cg.shared.global 16 bytes, commit_group, wait_group: a copy is recorded in the fiber's open group when
// issued and performed only when a wait_group covers its group, so a kernel that reads its stage before waiting
// reads what was there before; the destination is filled with 0xFF bytes (a NaN in every float type) at issue,
// so that read sees NaN rather than plausibly stale data, and so does another thread reading a slot whose refill
// was issued before a barrier ordered the two. Other threads see a performed copy after the next __syncthreads,
// as on hardware. Both addresses must be 16-byte aligned (the instruction's rule, zero-fill included).
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    std::fprintf(stderr, "hk_emulation: cp.async with an address not 16-byte aligned (dst %p, src %p)\n", dst, src);
    std::abort();
  }
  std::memset(dst, 0xFF, 16);
  current_fiber->copies.open.push_back({dst, src, !valid});
}

inline void cp_async_commit() { current_fiber->copies.commit(); }

// Performs every committed group but the newest `pending`.
inline void cp_async_wait(int pending) {
  current_fiber->copies.wait(pending, [](const AsyncCopy& c) {
    if (c.zero_fill) std::memset(c.dst, 0, 16);
    else std::memcpy(c.dst, c.src, 16);
    const auto offset = static_cast<const unsigned char*>(c.dst) - block->shared.data();
    if (offset >= 0 && static_cast<size_t>(offset) / 16 < block->landed.size()) {
      block->landed[static_cast<size_t>(offset) / 16] = ++block->events;
    }
  });
}

template <typename T>
float half_bits_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
  else return __bfloat162float(__ushort_as_bfloat16(bits));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: lane (g, t) = (lane / 4, lane % 4) holds A (16 x 16) pairs
// a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..); B (16 x 8) pairs b0 (k = 2t, 2t + 1; n = g),
// b1 (k = 2t + 8, 2t + 9; n = g); C pairs c0, c1 (g, 2t..), c2, c3 (g + 8, 2t..).
template <typename T>
void mma_16816(float* c, const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  const int buf = w.next_buffer(lane());
  uint32_t* mine = w.words[buf][lane()];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  for (int e = 0; e < 4; ++e) w.accumulators[buf][lane()][e] = c[e];
  if (w.barrier.arrive_and_wait()) {  // the last lane in multiplies for the warp while the others wait
    float A[16][16], B[16][8];
    auto lo = [](uint32_t v) { return half_bits_to_float<T>(static_cast<uint16_t>(v & 0xffffu)); };
    auto hi = [](uint32_t v) { return half_bits_to_float<T>(static_cast<uint16_t>(v >> 16)); };
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const uint32_t* x = w.words[buf][l];
      A[g][2 * t] = lo(x[0]);
      A[g][2 * t + 1] = hi(x[0]);
      A[g + 8][2 * t] = lo(x[1]);
      A[g + 8][2 * t + 1] = hi(x[1]);
      A[g][2 * t + 8] = lo(x[2]);
      A[g][2 * t + 9] = hi(x[2]);
      A[g + 8][2 * t + 8] = lo(x[3]);
      A[g + 8][2 * t + 9] = hi(x[3]);
      B[2 * t][g] = lo(x[4]);
      B[2 * t + 1][g] = hi(x[4]);
      B[2 * t + 8][g] = lo(x[5]);
      B[2 * t + 9][g] = hi(x[5]);
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
        float sum = w.accumulators[buf][l][e];
        for (int k = 0; k < 16; ++k) sum = std::fma(A[row][k], B[k][col], sum);
        w.accumulators[buf][l][e] = sum;
      }
    }
  }
  for (int e = 0; e < 4; ++e) c[e] = w.accumulators[buf][lane()][e];
}

// The .shared window address of dynamic shared memory's first byte. Deliberately not a multiple of 1024, so a kernel
// that needs 1024-byte-aligned swizzle atoms has to align them itself, as on a GPU where nothing promises it.
constexpr uint32_t kSharedWindowBase = 0x190;

inline uint32_t shared_address(const void* p) {
  const auto* byte = static_cast<const unsigned char*>(p);
  if (byte < block->shared.data() || byte >= block->shared.data() + block->shared.size()) {
    std::fprintf(stderr, "hk_emulation: shared_address of a pointer outside the block's shared memory\n");
    std::abort();
  }
  return kSharedWindowBase + static_cast<uint32_t>(byte - block->shared.data());
}

// Element (row, kk) of a wgmma operand given by its shared-memory matrix descriptor, read as the PTX ISA describes
// the descriptor: start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride byte offset >> 4 in
// 32-45, base offset in 49-51, swizzle mode in 62-63. Only the K-major 128-byte swizzle (mode 1, base offset 0) is
// emulated: rows of 128 bytes in 8-row groups `stride` bytes apart, the 16-byte piece index (address bits 4-6)
// XORed with address bits 7-9.
template <typename T>
float wgmma_operand(uint64_t descriptor, int row, int kk, bool check_fence = false) {
  const uint32_t start = static_cast<uint32_t>(descriptor & 0x3FFF) << 4;
  const uint32_t stride = static_cast<uint32_t>((descriptor >> 32) & 0x3FFF) << 4;
  const unsigned base_offset = static_cast<unsigned>((descriptor >> 49) & 7);
  const unsigned mode = static_cast<unsigned>(descriptor >> 62);
  if (mode != 1 || base_offset != 0) {
    std::fprintf(stderr, "hk_emulation: wgmma descriptor with swizzle mode %u, base offset %u (not emulated)\n", mode,
                 base_offset);
    std::abort();
  }
  const uint32_t logical = start + static_cast<uint32_t>(row / 8) * stride + static_cast<uint32_t>(row % 8) * 128 +
                           static_cast<uint32_t>(kk) * 2;
  const uint32_t physical = logical ^ (((logical >> 7) & 7u) << 4);
  if (physical < kSharedWindowBase || physical + 2 > kSharedWindowBase + block->shared.size() - kGuardBytes) {
    std::fprintf(stderr, "hk_emulation: wgmma operand read outside the block's shared memory\n");
    std::abort();
  }
  if (check_fence && block->landed[(physical - kSharedWindowBase) / 16] > current_fiber->fenced_at) {
    std::fprintf(stderr, "hk_emulation: wgmma reads shared memory that a cp.async wrote after this thread's last "
                         "fence.proxy.async (the async proxy may not see it)\n");
    std::abort();
  }
  uint16_t bits;
  std::memcpy(&bits, block->shared.data() + (physical - kSharedWindowBase), sizeof bits);
  return half_bits_to_float<T>(bits);
}

// fence.proxy.async.shared::cta: the cp.async data this thread sees (its own landed copies, and others' ordered
// before by a barrier) becomes visible to its wgmma. The emulation asks for the fence after the barrier, by every
// reader, as Triton orders it (a writer-side fence before the barrier, also valid on hardware, is not modelled).
inline void fence_proxy_async() { current_fiber->fenced_at = ++block->events; }

// wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{f16,bf16} with A and B from shared memory (K-major, no transpose):
// recorded in the thread's open group, performed at the wait_group that covers it. Each thread computes its own
// accumulators: warp w of the warpgroup holds rows 16 w + lane / 4 (+ 8), register 4 j + e column 8 j + 2 (lane % 4)
// + e % 2 of row + 8 (e / 2). The accumulators are read at that wait too (scale-d true: D = A B^T + D), so a kernel
// that reads them before its wait sees stale values, and one that refills a stage an unfinished MMA reads feeds it
// the new data.
template <typename T>
void wgmma_m64nk16(float* d, int n, uint64_t a, uint64_t b, bool accumulate) {
  const int warp = static_cast<int>(threadIdx.x / 32) % 4, g = lane() / 4, t = lane() % 4;
  for (int kk = 0; kk < 16; kk += 8) {  // at issue: what this thread's fragment reads was fenced for the async proxy
    for (int r = 0; r < 2; ++r) (void)wgmma_operand<T>(a, 16 * warp + g + 8 * r, kk, true);
    for (int col = 2 * t; col < n; col += 8) {
      for (int c = 0; c < 2; ++c) (void)wgmma_operand<T>(b, col + c, kk, true);
    }
  }
  Block* const issuing_block = block;
  current_fiber->mmas.open.push_back([=] {
    if (block != issuing_block) std::abort();
    for (int j = 0; j < n / 8; ++j) {
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * warp + g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
        float sum = accumulate ? d[4 * j + e] : 0.f;
        for (int kk = 0; kk < 16; ++kk) sum = std::fma(wgmma_operand<T>(a, row, kk), wgmma_operand<T>(b, col, kk), sum);
        d[4 * j + e] = sum;
      }
    }
  });
}

inline void wgmma_commit() { current_fiber->mmas.commit(); }

// Performs every committed wgmma group but the newest `pending`.
inline void wgmma_wait(int pending) {
  current_fiber->mmas.wait(pending, [](const std::function<void()>& mma) { mma(); });
}

constexpr size_t kStackBytes = 256 * 1024;

template <class Params>
struct Launch {
  void (*kernel)(Params);
  const Params* params;
};
inline thread_local void (*fiber_body)() = nullptr;

[[gnu::noinline]] inline void resume(Fiber& f) { switch_context(scheduler_context, f.context); }

[[noreturn]] inline void fiber_entry() {
  fiber_body();
  current_fiber->done = true;
  switch_context(current_fiber->context, scheduler_context);
  std::abort();  // a finished fiber is never resumed
}

inline void prepare(Fiber& f, unsigned index) {
  f.index = index;
  f.done = false;
  f.waiting = nullptr;
  f.copies.clear();  // copies and MMAs a finished block never waited for are dropped with it
  f.mmas.clear();
  f.fenced_at = 0;
  start_context(f.context, f.stack.get(), kStackBytes, fiber_entry);
}

// The grid and block size of every launch on this thread, in order (tests read them to see which kernels a
// launcher ran).
struct Launched {
  dim3 grid;
  int threads;
};
inline thread_local std::vector<Launched> launches;

// Runs kernel(params) on grid.x * grid.y blocks of `threads` threads, one block after another.
template <class Params>
cudaError_t launch(void (*kernel)(Params), dim3 grid, int threads, size_t smem, const Params& params) {
  launches.push_back({grid, threads});
  static thread_local Launch<Params> current;
  current = {kernel, &params};
  gridDim = grid;
  fiber_body = [] { current.kernel(*current.params); };
  std::vector<Fiber> fibers(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) fibers[t].stack = std::make_unique<char[]>(kStackBytes);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b(threads, smem);
      block = &b;
      blockIdx = make_uint3(bx, by, 0);
      for (int t = 0; t < threads; ++t) prepare(fibers[t], static_cast<unsigned>(t));
      int finished = 0;
      while (finished < threads) {
        bool progressed = false;
        for (Fiber& f : fibers) {
          if (f.done || (f.waiting != nullptr && f.waiting->generation == f.wait_generation)) continue;
          f.waiting = nullptr;
          current_fiber = &f;
          threadIdx = make_uint3(f.index, 0, 0);
          resume(f);
          progressed = true;
          if (f.done) ++finished;
        }
        if (!progressed) {
          std::fprintf(stderr, "hk_emulation: deadlock in block (%u, %u): threads wait at different barriers\n", bx,
                       by);
          std::abort();
        }
      }
      for (size_t i = smem; i < b.shared.size(); ++i) {
        if (b.shared[i] != kGuard) {
          std::fprintf(stderr, "hk_emulation: block (%u, %u) wrote past its %zu bytes of dynamic shared memory\n", bx,
                       by, smem);
          std::abort();
        }
      }
      block = nullptr;
    }
  }
  return cudaSuccess;
}

}  // namespace hk_emulation

#define __syncthreads() ((void)hk_emulation::block->barrier.arrive_and_wait())

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int offset) { return hk_emulation::shfl_xor(v, offset); }

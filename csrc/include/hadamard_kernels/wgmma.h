// Hopper warpgroup MMA (sm_90a): wgmma.mma_async with both operands in shared memory, their descriptors, and the
// fences and waits around it. A warpgroup is 4 consecutive warps (128 threads) that issue each instruction together.
//
// Operand layout used here, "K-major, 128-byte swizzle": a tile of rows (of A: M rows, of B: N rows) whose K
// elements are contiguous, 128 bytes of K per row (64 halves), 8-row atoms of 1024 bytes, the atoms 1024 bytes apart,
// and inside an atom the 16-byte piece p of row r stored at piece p ^ (r % 8). The hardware applies that XOR to
// address bits [4, 7) from bits [7, 10), so each atom must start on a 1024-byte boundary of the shared window.
// A k16 slice of the tile is addressed by moving the descriptor's start 32 bytes along the row.
//
// Under HK_CPU_EMULATION (tests/emulation/cuda_emulation.h) the host emulation runs instead: an MMA is performed when
// a wait covers its group, reading shared memory through the descriptor then.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/common.h"

// The device passes that have the instructions: sm_90a (and the CPU emulation). A plain sm_90 build has none, and
// a kernel that needs them would be compiled without its body: refuse that build instead.
#if defined(HK_CPU_EMULATION) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HK_HAS_WGMMA 1
#else
#define HK_HAS_WGMMA 0
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
#error "hadamard_kernels: build Hopper as sm_90a (CMAKE_CUDA_ARCHITECTURES 90a-real), not sm_90"
#endif
#endif

namespace hadamard_kernels {

constexpr int kSwizzleRowBytes = 128;    // bytes of K per row of a 128-byte-swizzled tile
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows

// Byte offset of 16-byte piece `piece` (0..7) of row `row` in a 128-byte-swizzled tile that starts on an atom.
HK_HOST_DEVICE constexpr uint32_t swizzle128_offset(int row, int piece) {
  return static_cast<uint32_t>(row * kSwizzleRowBytes + ((piece ^ (row % 8)) * 16));
}

// Descriptor of a K-major, 128-byte-swizzled operand whose k16 slice starts at shared address `address`:
// start address >> 4 (bits 0-13), leading byte offset (bits 16-29: 0, unused by this layout), stride byte offset
// >> 4 (bits 32-45: 1024, from one 8-row atom to the next), swizzle mode 1 = 128 bytes (bits 62-63). The same
// encoding as Triton's sm_90 code for its 128-byte-swizzled operands (0x4000004000000000 | address >> 4, k16
// slices 32 bytes apart), read off its PTX.
HK_HOST_DEVICE constexpr uint64_t swizzle128_descriptor(uint32_t address) {
  return ((address & 0x3FFFFu) >> 4) | (uint64_t{kSwizzleAtomBytes >> 4} << 32) | (uint64_t{1} << 62);
}
static_assert(swizzle128_descriptor(0x12340) == (0x4000004000000000ull | 0x1234),
              "the descriptor Triton's sm_90 PTX builds for a 128-byte-swizzled operand at 0x12340");
static_assert(swizzle128_offset(9, 3) == 9 * 128 + 2 * 16, "row 9 is row 1 of its atom: piece 3 lands at 3 ^ 1");

// The .shared window address of a pointer into this block's shared memory.
__device__ __forceinline__ uint32_t shared_address(const void* smem) {
#if defined(HK_CPU_EMULATION)
  return hk_emulation::shared_address(smem);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#endif
}

// Makes the generic-proxy writes to shared memory this thread sees (its own st.shared and cp.async, and other
// threads' ordered before it by a barrier) visible to its async-proxy reads: wgmma's operands.
__device__ __forceinline__ void fence_async_shared() {
#if defined(HK_CPU_EMULATION)
  hk_emulation::fence_proxy_async();
#elif HK_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Orders this thread's register accesses to the accumulators before the wgmma that follows (every warp of the
// warpgroup issues it).
__device__ __forceinline__ void wgmma_fence() {
#if HK_HAS_WGMMA && !defined(HK_CPU_EMULATION)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#if defined(HK_CPU_EMULATION)
  hk_emulation::wgmma_commit();
#elif HK_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of the warpgroup's committed groups are in flight (the newest ones): the older
// groups' accumulators are written and their shared-memory operands free.
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
#if defined(HK_CPU_EMULATION)
  hk_emulation::wgmma_wait(PENDING);
#elif HK_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// Keeps the compiler from moving accesses of d across this point (a wgmma's registers are written behind its back).
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#if !defined(HK_CPU_EMULATION)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

#define HK_WGMMA_D8(i)                                                                                  \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define HK_WGMMA_D128                                                                                               \
  HK_WGMMA_D8(0), HK_WGMMA_D8(8), HK_WGMMA_D8(16), HK_WGMMA_D8(24), HK_WGMMA_D8(32), HK_WGMMA_D8(40), HK_WGMMA_D8(48), \
      HK_WGMMA_D8(56), HK_WGMMA_D8(64), HK_WGMMA_D8(72), HK_WGMMA_D8(80), HK_WGMMA_D8(88), HK_WGMMA_D8(96),           \
      HK_WGMMA_D8(104), HK_WGMMA_D8(112), HK_WGMMA_D8(120)
// scale-d is a predicate (false: d = A B^T), set from operand 130; A and B K-major (no transpose), not negated.
#define HK_WGMMA_M64N256K16(TYPE)                                                                   \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                     \
  "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                 \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                 \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                 \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "      \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
  "%128, %129, p, 1, 1, 0, 0;\n}\n"

// d = A B^T (+ d when `accumulate`) for the warpgroup: A [64, 16] and B [256, 16] (T: __half or __nv_bfloat16)
// from the K-major descriptors a and b, D [64, 256] fp32 in the accumulator layout: warp w of the warpgroup holds
// rows 16 w + lane / 4 (+ 8), register 4 j + e the column 8 j + 2 (lane % 4) + e % 2 of row + 8 (e / 2), as
// mma.sync's C tiles side by side. Asynchronous: d is written by the wgmma_wait that covers this instruction's group.
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b, bool accumulate) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma_m64n256k16 takes fp16 or bf16");
#if defined(HK_CPU_EMULATION)
  hk_emulation::wgmma_m64nk16<T>(d, 256, a, b, accumulate);
#elif HK_HAS_WGMMA
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(HK_WGMMA_M64N256K16("f16") : HK_WGMMA_D128 : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
  } else {
    asm volatile(HK_WGMMA_M64N256K16("bf16") : HK_WGMMA_D128 : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
  }
#else
  (void)d, (void)a, (void)b, (void)accumulate;
#endif
}

#undef HK_WGMMA_D8
#undef HK_WGMMA_D128
#undef HK_WGMMA_M64N256K16

}  // namespace hadamard_kernels

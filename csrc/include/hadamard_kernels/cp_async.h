// Asynchronous global -> shared copies (sm_80 cp.async), for multi-stage shared-memory pipelines.
// Under HK_CPU_EMULATION (tests/emulation/cuda_emulation.h) the host emulation runs instead: a copy lands only
// when a wait covers its group, so a pipeline that reads a stage too early fails the CPU tests.
#pragma once

#include <cstdint>

namespace hadamard_kernels {

// Starts copying 16 bytes from global `gmem` to shared `smem` (both 16-byte aligned), bypassing L1 (.cg).
// valid = false reads nothing and writes 16 zero bytes (src-size 0); gmem must still be an aligned address.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(HK_CPU_EMULATION)
  hk_emulation::cp_async_16(smem, gmem, valid);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
#endif
}

// Closes the group of copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() {
#if defined(HK_CPU_EMULATION)
  hk_emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of this thread's committed groups are still in flight (the newest ones). Other
// threads' copies are visible only after a __syncthreads that follows their wait.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if defined(HK_CPU_EMULATION)
  hk_emulation::cp_async_wait(PENDING);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

}  // namespace hadamard_kernels

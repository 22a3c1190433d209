// A probe of the cp.async emulation (csrc/include/hadamard_kernels/cp_async.h under cuda_emulation.h) for
// tests/test_cuda_emulation.py: one block of 64 threads, each copying its own 16 bytes in two groups, records what
// its shared memory (and a neighbour's, across a barrier) holds at each step of the wait sequence.

#include "cuda_emulation.h"

#include "hadamard_kernels/common.h"
#include "hadamard_kernels/cp_async.h"

#include <pybind11/pybind11.h>

#include <cstdint>

namespace hk = hadamard_kernels;

constexpr int kThreads = 64;
constexpr int kFloats = 4;  // 16 bytes
constexpr int kSteps = 6;

struct Probe {
  const float* src;  // [2, kThreads, kFloats]: group 0, group 1
  float* out;        // [kSteps, 2, kThreads, kFloats]: both slots of this thread (step 5: of thread + 1)
};

void probe_kernel(const Probe p) {
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  float* slots = reinterpret_cast<float*>(smem_raw);  // [2][kThreads][kFloats]
  const int t = static_cast<int>(threadIdx.x);
  auto record = [&](int step, int owner) {
    for (int s = 0; s < 2; ++s) {
      for (int e = 0; e < kFloats; ++e) {
        p.out[((step * 2 + s) * kThreads + t) * kFloats + e] = slots[(s * kThreads + owner) * kFloats + e];
      }
    }
  };
  for (int i = 0; i < 2 * kThreads * kFloats; ++i) slots[i] = 7.f;  // what was there before
  __syncthreads();
  hk::cp_async_16(slots + t * kFloats, p.src + t * kFloats, true);
  record(0, t);  // issued, open group
  hk::cp_async_commit();
  hk::cp_async_16(slots + (kThreads + t) * kFloats, p.src + (kThreads + t) * kFloats, t % 2 == 0);  // odd: zfill
  hk::cp_async_commit();
  record(1, t);  // two groups in flight
  hk::cp_async_wait<2>();
  record(2, t);  // nothing performed
  hk::cp_async_wait<1>();
  record(3, t);  // group 0 performed
  hk::cp_async_wait<0>();
  record(4, t);  // both
  __syncthreads();
  record(5, (t + 1) % kThreads);  // a neighbour's copies, after the barrier
}

PYBIND11_MODULE(hk_cp_async_emulated, m) {
  m.attr("THREADS") = kThreads;
  m.attr("STEPS") = kSteps;
  m.def("probe", [](std::uintptr_t src, std::uintptr_t out) {
    const Probe p{reinterpret_cast<const float*>(src), reinterpret_cast<float*>(out)};
    hk_emulation::launch(&probe_kernel, dim3(1), kThreads, 2 * kThreads * kFloats * sizeof(float), p);
  });
}

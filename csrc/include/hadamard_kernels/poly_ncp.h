// poly_ncp (DESIGN.md §1, NCP): y_1 = A_1 x + a_1, y_n = (A_n x + a_n) * (S_n y_{n-1} + s_n), returns y_N.
// Kernels in csrc/poly_ncp.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hadamard_kernels/common.h"

namespace hadamard_kernels {

// Largest k of the fast path, where a block keeps its rows' whole [rows, k] chain in shared memory. Larger k (or
// per_degree) runs the per-degree path: one launch per degree, the chain in device memory (csrc/poly_ncp.cu).
inline constexpr int64_t kPolyNcpMaxK = 256;

// Pointers to device memory; all tensors share `dtype`. Sizes and strides count elements.
struct PolyNcpParams {
  const void* x = nullptr;         // [M, d], rows x_row_stride apart, unit column stride
  const void* a_weight = nullptr;  // [N, k, d], contiguous
  const void* a_bias = nullptr;    // [N, k], contiguous, or null
  const void* s_weight = nullptr;  // [N-1, k, k], contiguous (not read when N = 1)
  const void* s_bias = nullptr;    // [N-1, k], contiguous, or null
  void* y = nullptr;               // forward output [M, k], rows y_row_stride apart
  const void* grad_y = nullptr;    // backward input [M, k], rows y_row_stride apart
  void* grad_a = nullptr;          // backward output [M, N, k], contiguous: dL/d(A_n x + a_n)
  void* grad_s = nullptr;          // backward output [N-1, M, k], contiguous: dL/d(S_n y_{n-1} + s_n), n = 2..N
  void* ys = nullptr;              // backward output [N-1, M, k], contiguous: y_1..y_{N-1} (for dS_n)
  void* workspace = nullptr;       // forward on the per-degree path with N > 1: [M, k] contiguous, the chain's
                                   // second buffer (y_N lands in y)
  int64_t M = 0, d = 0, k = 0, N = 0;
  int64_t x_row_stride = 0;
  int64_t y_row_stride = 0;
  DType dtype = DType::kFloat32;
  bool per_degree = false;  // the per-degree path also for k <= kPolyNcpMaxK (k above it always takes it)
};

// Enqueue the kernels on `stream`; return cudaErrorInvalidValue for bad params, else the first CUDA error of the
// launches.
cudaError_t launch_poly_ncp_fwd(const PolyNcpParams& params, cudaStream_t stream);
cudaError_t launch_poly_ncp_bwd(const PolyNcpParams& params, cudaStream_t stream);

}  // namespace hadamard_kernels

// poly_chain (DESIGN.md §1): y = prod_n f_n, f_1 = u_1, f_n = 1 + u_n (ccp) or u_n (product),
// u_n = scale * act(x @ weight[n]^T + bias[n]). Kernels in csrc/poly_chain.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hadamard_kernels/common.h"

namespace hadamard_kernels {

// Codes match MODES in hadamard_kernels/ops/poly_chain/common.py (exported as _C.POLY_CHAIN_MODES).
enum PolyChainMode : int { kModeCcp = 0, kModeProduct = 1 };
inline constexpr int kNumPolyChainModes = 2;
inline constexpr const char* kPolyChainModeNames[kNumPolyChainModes] = {"ccp", "product"};

// Pointers to device memory; all tensors share `dtype`. Sizes and strides count elements.
struct PolyChainParams {
  const void* x = nullptr;       // [M, d], rows x_row_stride apart, unit column stride
  const void* weight = nullptr;  // [N, k, d], contiguous
  const void* bias = nullptr;    // [N, k], contiguous, or null
  void* y = nullptr;             // forward output [M, k], rows y_row_stride apart
  // [M, N, k], contiguous, z_n = x W_n^T + b_n at (m * N + n) * k + j (the pre-activation projections, bias
  // included). Forward: an optional output (written when non-null, for a backward that skips its recompute GEMM).
  // Backward: the input the grad_z kernel reads (saved by the forward, or recomputed by a GEMM).
  void* z = nullptr;
  const void* grad_y = nullptr;  // backward input [M, k], rows y_row_stride apart
  void* grad_z = nullptr;        // backward output [M, N, k] like z, dL/dz; may be z itself (in place)
  int64_t M = 0, d = 0, k = 0, N = 0;
  int64_t x_row_stride = 0;
  int64_t y_row_stride = 0;
  DType dtype = DType::kFloat32;
  int activation = 0;  // Activation code (activation.h)
  int mode = 0;        // PolyChainMode
  float scale = 1.f;
  // Forward only: run the Hopper kernel (wgmma, sm_90a; float16/bfloat16) instead of the mma.sync one. Opt-in until
  // its GPU tests pass on an H100 (docs/decisions.md); launching it elsewhere returns cudaErrorInvalidDeviceFunction.
  bool wgmma = false;
};

// Enqueue the kernel on `stream`; return cudaErrorInvalidValue for bad params, else cudaGetLastError().
// The forward reads x, weight, bias and writes y (and z when non-null). The backward is the element-wise grad_z
// kernel: it reads z and grad_y and writes grad_z (x, weight, bias and d are not used; dx, dweight and dbias are
// GEMMs on grad_z, done by the caller).
cudaError_t launch_poly_chain_fwd(const PolyChainParams& params, cudaStream_t stream);
cudaError_t launch_poly_chain_bwd(const PolyChainParams& params, cudaStream_t stream);

}  // namespace hadamard_kernels

// poly_sa (DESIGN.md §3, Poly-SA): m = mean over real tokens of (z w1) * (z w2)  (B, C),
// Y = alpha z + beta ((z * m) w3)  (B, N, C). Kernels in csrc/poly_sa.cu; the Python side (ops/poly_sa/cuda.py)
// reduces their per-split partial sums in a fixed order and runs the gradient GEMMs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hadamard_kernels/common.h"

namespace hadamard_kernels {

// Pointers to device memory; z, the weights, alpha, beta and the outputs y, dz, u, grad_p share `dtype`; m, s and
// part are float32. Sizes and strides count elements. Token t of batch row b is row b * N + t.
struct PolySaParams {
  const void* z = nullptr;          // [B*N, C], rows z_row_stride apart, unit column stride
  const void* w1 = nullptr;         // [C, C], contiguous (z @ w1)
  const void* w2 = nullptr;         // [C, C], contiguous
  const void* w3 = nullptr;         // [C, C], contiguous
  const void* alpha = nullptr;      // one element
  const void* beta = nullptr;       // one element
  const uint8_t* mask = nullptr;    // [B*N], nonzero = real token; null: every token is real
  const float* m = nullptr;         // [B, C]: the pool (output forward and output backward)
  const float* s = nullptr;         // [B, C]: dL/dm / count (pool gradient)
  const void* grad_y = nullptr;     // [B*N, C], rows g_row_stride apart
  float* part = nullptr;            // pool: [B, splits, C]; output backward: [2, B, splits, C]
  void* y = nullptr;                // output forward: [B*N, C], rows out_row_stride apart
  void* dz = nullptr;               // output backward: alpha G + beta (G w3^T) * m, [B*N, C], out_row_stride
  void* u = nullptr;                // output backward: beta z * m, [B*N, C], out_row_stride
  void* grad_p = nullptr;           // pool gradient: [B*N, 2C] contiguous, [dp1 | dp2]
  int64_t B = 0, N = 0, C = 0;
  int64_t tokens_per_split = 0;     // pool and output backward: splits = ceil(N / tokens_per_split)
  int64_t z_row_stride = 0;
  int64_t g_row_stride = 0;
  int64_t out_row_stride = 0;
  DType dtype = DType::kFloat32;
};

// Element-wise math of the kernels' epilogues (host builds are bound for CPU tests).
// A padded token's product is left out with a select, so an inf or NaN there does not reach the mean.
HK_HOST_DEVICE inline float poly_sa_pool_term(bool real, float p1, float p2) { return real ? p1 * p2 : 0.f; }
HK_HOST_DEVICE inline float poly_sa_output(float alpha, float z, float beta, float acc) {
  return alpha * z + beta * acc;
}
// dL/d(z w1) and dL/d(z w2) of a real token from s = dL/dm / count: s * p2 and s * p1; 0 for a padded one.
HK_HOST_DEVICE inline float poly_sa_pool_grad(bool real, float s, float other_projection) {
  return real ? s * other_projection : 0.f;
}
// The output backward at one element, gp = (G w3^T): dz = alpha g + beta gp m, u = beta z m.
HK_HOST_DEVICE inline float poly_sa_direct_grad(float alpha, float beta, float g, float gp, float m) {
  return alpha * g + beta * gp * m;
}

// Enqueue the kernel on `stream`; return cudaErrorInvalidValue for bad params, else the first CUDA error of the
// launch. pool_fwd: part [B, splits, C] = per-split sums of the real tokens' (z w1) * (z w2). out_fwd: y.
// out_bwd: dz, u and part [2, B, splits, C] = per-split sums of (G w3^T) * z and G * z. pool_bwd: grad_p.
cudaError_t launch_poly_sa_pool_fwd(const PolySaParams& params, cudaStream_t stream);
cudaError_t launch_poly_sa_out_fwd(const PolySaParams& params, cudaStream_t stream);
cudaError_t launch_poly_sa_out_bwd(const PolySaParams& params, cudaStream_t stream);
cudaError_t launch_poly_sa_pool_bwd(const PolySaParams& params, cudaStream_t stream);

}  // namespace hadamard_kernels

// poly_chain forward and backward kernels (DESIGN.md §1), private to csrc/. The templates are instantiated one
// dtype per translation unit (poly_chain_{f32,f16,bf16}.cu) so the build compiles them in parallel;
// poly_chain.cu checks the params and picks the dtype.
//
// Forward (poly_chain_forward.cuh; the opt-in Hopper kernel, poly_chain_forward_wgmma.cuh, shares its epilogue and is
// compiled in poly_chain_wgmma_{f16,bf16}_{ccp,product}.cu): a block of 256 threads computes a 128-row x 128-slot
// GEMM tile, a slot being a (degree, output column) pair, so each thread ends the pass over d holding every degree's z of its own output
// elements and multiplies the chain in registers; the N [M, k] projections never reach memory (unless params.z asks for
// them). d streams through a 4-stage cp.async ring in shared memory. float16/bfloat16 use mma.sync m16n8k16 with fp32
// accumulators; float32 uses exact fp32 FMAs in the same register layout, so one epilogue serves all dtypes.
//
// Backward. dL/dz_n = dy * prefix_n * suffix_n * scale * act'(z_n), with prefix_n / suffix_n the products of the
// factors before / after degree n (no division: exact with zero factors). The caller supplies z [M, N, k] (saved by
// the forward, which writes it when params.z is set, or recomputed by one cuBLAS GEMM) and one element-wise kernel
// writes grad_z, in place over z if asked; dx, dweight and dbias are GEMMs on grad_z, done by cuBLAS from Python.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/activation.h"
#include "hadamard_kernels/common.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/poly_chain.h"
#include "poly_chain_forward.cuh"

namespace hadamard_kernels {
namespace poly_chain_detail {

// dL/dz_n of one (row, column) pair for n = 0..N-1, given its output gradient dy: z_at(n) reads z_n and
// store(n, v) writes dL/dz_n, after which z_n is not read again (so grad_z may overwrite z). Registers hold BLOCK
// degrees: for N > BLOCK the prefix is carried from block to block and the suffix of the later blocks is recomputed
// from z, (N - BLOCK) N / (2 BLOCK) extra reads of z (none for N <= BLOCK), instead of a workspace.
template <int ACT, bool PRODUCT, int BLOCK, class Load, class Store>
HK_HOST_DEVICE inline void chain_grad(int64_t N, float dy, float scale, const Load& z_at, const Store& store) {
  float prefix = 1.f;  // product of the factors before the current degree
  for (int64_t lo = 0; lo < N; lo += BLOCK) {
    const int64_t count = N - lo < BLOCK ? N - lo : BLOCK;
    float f[BLOCK], g[BLOCK];  // factor, and prefix * scale * act'(z), of degree lo + i
    for (int i = 0; i < BLOCK; ++i) {
      if (i < count) {
        const float z = z_at(lo + i);
        f[i] = chain_factor<PRODUCT>(scale * activation<ACT>(z), lo + i);
        g[i] = prefix * scale * activation_grad<ACT>(z);
        prefix *= f[i];
      }
    }
    float suffix = dy;  // dy times the product of the factors after the current degree
    for (int64_t n = lo + count; n < N; ++n) suffix *= chain_factor<PRODUCT>(scale * activation<ACT>(z_at(n)), n);
    for (int i = BLOCK - 1; i >= 0; --i) {
      if (i < count) {
        store(lo + i, g[i] * suffix);
        suffix *= f[i];
      }
    }
  }
}

constexpr int kGradThreads = 256;
constexpr int kDegreeBlock = 16;  // degrees per thread in registers (f and g: 32 floats)

// One thread per (row, column) pair of the [M, k] output: consecutive threads read consecutive columns of each z_n.
template <typename T, int ACT, bool PRODUCT>
__global__ void __launch_bounds__(kGradThreads) poly_chain_grad_z_kernel(const PolyChainParams p) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kGradThreads + threadIdx.x;
  if (pair >= p.M * p.k) return;
  const int64_t row = pair / p.k, col = pair % p.k;
  const int64_t at = row * p.N * p.k + col;  // z_n and dL/dz_n at [at + n * k]
  const T* z = static_cast<const T*>(p.z) + at;
  T* gz = static_cast<T*>(p.grad_z) + at;
  const int64_t k = p.k;
  chain_grad<ACT, PRODUCT, kDegreeBlock>(
      p.N, to_float(static_cast<const T*>(p.grad_y)[row * p.y_row_stride + col]), p.scale,
      [&](int64_t n) { return to_float(z[n * k]); }, [&](int64_t n, float v) { gz[n * k] = from_float<T>(v); });
}

inline int64_t grad_z_blocks(const PolyChainParams& p) { return (p.M * p.k + kGradThreads - 1) / kGradThreads; }

template <class Kernel>
cudaError_t run_grad_z(Kernel kernel, const PolyChainParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(grad_z_blocks(p));
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, dim3(blocks), kGradThreads, 0, p);
#else
  kernel<<<blocks, kGradThreads, 0, stream>>>(p);
  return cudaGetLastError();
#endif
}

// Enqueues the forward (BACKWARD = false) or grad_z kernel instance for element type T that p asks for
// (activation, mode, bias). p was checked by poly_chain.cu.
template <typename T, bool BACKWARD>
cudaError_t launch(const PolyChainParams& p, cudaStream_t stream) {
  return HK_ACTIVATION_SWITCH(p.activation, ACT, [&] {
    return HK_BOOL_SWITCH(p.mode == kModeProduct, PRODUCT, [&] {
      if constexpr (BACKWARD) {
        return run_grad_z(poly_chain_grad_z_kernel<T, ACT, PRODUCT>, p, stream);
      } else {
        return HK_BOOL_SWITCH(p.bias != nullptr, HAS_BIAS, [&] {
          return forward::launch<T, ACT, PRODUCT, HAS_BIAS>(p, stream);
        });
      }
    });
  });
}

// Defined in poly_chain_{f32,f16,bf16}.cu; other translation units only call them.
extern template cudaError_t launch<float, false>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch<float, true>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch<__half, false>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch<__half, true>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch<__nv_bfloat16, false>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch<__nv_bfloat16, true>(const PolyChainParams&, cudaStream_t);

}  // namespace poly_chain_detail
}  // namespace hadamard_kernels

// LRNN sum-of-products activations (DESIGN.md §4): per neuron l, phi_l = prod_{j < dbar} (1 + gamma g(z_lj)),
// z = x weight^T + bias with weight rows ordered l-major (row l * dbar + j). Kernels in csrc/lrnn.cu; the Python
// side (ops/lrnn/cuda.py) runs the backward in row chunks and the gradient GEMMs.
#pragma once

#include <cuda_runtime_api.h>
#include <math.h>

#include <cstdint>

#include "hadamard_kernels/common.h"

// `#pragma unroll` in device passes only (a host compiler would warn about an unknown pragma).
#if defined(__CUDA_ARCH__)
#define HK_LRNN_UNROLL _Pragma("unroll")
#else
#define HK_LRNN_UNROLL
#endif

namespace hadamard_kernels {

// Codes match ACTIVATIONS in hadamard_kernels/ops/lrnn/common.py (exported as _C.LRNN_ACTIVATIONS).
enum LrnnActivation : int { kLrnnSin = 0, kLrnnSpder = 1, kLrnnArctan = 2, kLrnnTanh = 3, kLrnnMlp = 4 };
inline constexpr int kNumLrnnActivations = 5;
inline constexpr const char* kLrnnActivationNames[kNumLrnnActivations] = {"sin", "spder", "arctan", "tanh", "mlp"};

// Limits of the kernels: a block's 64 output columns hold whole neurons (dbar <= 64); the mlp's per-column
// parameters sit in shared memory and its parameter-gradient sums in registers (h <= 16).
inline constexpr int64_t kLrnnMaxDbar = 64;
inline constexpr int kLrnnMaxHidden = 16;

// Pointers to device memory; x, weight, bias, g_params, phi, grad_phi and grad_z share `dtype`. Sizes and strides
// count elements; columns are the rank * dbar projections, column l * dbar + j.
struct LrnnParams {
  const void* x = nullptr;         // [M, d], rows x_row_stride apart, unit column stride
  const void* weight = nullptr;    // [rank * dbar, d], contiguous
  const void* bias = nullptr;      // [rank * dbar], or null
  const void* g_params = nullptr;  // mlp: [3, rank, dbar, h] contiguous = (a, w, c); else unused
  void* phi = nullptr;             // forward output [M, rank], rows phi_row_stride apart
  const void* grad_phi = nullptr;  // backward input [M, rank], rows phi_row_stride apart
  void* grad_z = nullptr;          // backward output dL/dz [M, rank * dbar], rows grad_z_row_stride apart
  float* g_params_part = nullptr;  // backward output (mlp): [splits, 3, rank * dbar, h], per-split sums of dL/dg_params
  int64_t M = 0, d = 0, rank = 0, dbar = 0, h = 0;
  int64_t x_row_stride = 0;
  int64_t phi_row_stride = 0;
  int64_t grad_z_row_stride = 0;
  int64_t rows_per_split = 0;      // backward: a block walks this many rows (a multiple of 64); splits = ceil(M / it)
  DType dtype = DType::kFloat32;
  int activation = 0;              // LrnnActivation
  float omega = 1.f;               // sin only: g = sin(omega z)
  float gamma = 1.f;
};

// ---- element-wise math of the epilogues, shared by the kernels and the host wrappers the tests call

// g(z) of a fixed activation (not mlp).
template <int ACT>
HK_HOST_DEVICE inline float lrnn_g(float z, float omega) {
  static_assert(ACT >= 0 && ACT < kLrnnMlp, "lrnn_g: a fixed activation; mlp has lrnn_mlp_g");
  if constexpr (ACT == kLrnnSin) {
    return sinf(omega * z);
  } else if constexpr (ACT == kLrnnSpder) {
    return sinf(z) * sqrtf(fabsf(z));
  } else if constexpr (ACT == kLrnnArctan) {
    return atanf(z);
  } else {
    return tanhf(z);
  }
}

// sin(z) / z, 1 at z = 0 (sinf(z) / z is exact to rounding down to the smallest z: sinf(z) = z there).
HK_HOST_DEVICE inline float lrnn_sinc(float z) { return z == 0.f ? 1.f : sinf(z) / z; }

// g'(z). spder: cos(z) sqrt|z| + sign(z) sin(z) / (2 sqrt|z|) written as sqrt|z| (cos(z) + sinc(z) / 2), which is
// finite everywhere and 0 at z = 0, the limit of the derivative (the function itself is differentiable there:
// |sin(z) sqrt|z|| <= |z|^1.5). arctan: 1 / (1 + z^2) (0 once z^2 overflows, the right limit).
template <int ACT>
HK_HOST_DEVICE inline float lrnn_g_grad(float z, float omega) {
  static_assert(ACT >= 0 && ACT < kLrnnMlp, "lrnn_g_grad: a fixed activation; mlp has lrnn_mlp_g_grad");
  if constexpr (ACT == kLrnnSin) {
    return omega * cosf(omega * z);
  } else if constexpr (ACT == kLrnnSpder) {
    return sqrtf(fabsf(z)) * (cosf(z) + 0.5f * lrnn_sinc(z));
  } else if constexpr (ACT == kLrnnArctan) {
    return 1.f / (1.f + z * z);
  } else {
    const float t = tanhf(z);
    return 1.f - t * t;
  }
}

// The mlp component g(z) = sum_{i < h} a_i tanh(w_i z + c_i); a, w, c point at one column's h values each. The
// loops run to the compile-time bound kLrnnMaxHidden and stop at h, so fully unrolled they index registers.
HK_HOST_DEVICE inline float lrnn_mlp_g(float z, const float* a, const float* w, const float* c, int h) {
  float g = 0.f;
  HK_LRNN_UNROLL
  for (int i = 0; i < kLrnnMaxHidden; ++i) {
    if (i >= h) break;
    g = fmaf(a[i], tanhf(fmaf(w[i], z, c[i])), g);
  }
  return g;
}

// Its derivative in z; with ACCUMULATE, also adds u times the derivatives in the parameters to da, dw, dc:
// dg/da_i = t_i, dg/dc_i = a_i (1 - t_i^2), dg/dw_i = z dg/dc_i, with t_i = tanh(w_i z + c_i).
template <bool ACCUMULATE>
HK_HOST_DEVICE inline float lrnn_mlp_g_grad(float z, const float* a, const float* w, const float* c, int h, float u,
                                            float* da, float* dw, float* dc) {
  float grad = 0.f;
  HK_LRNN_UNROLL
  for (int i = 0; i < kLrnnMaxHidden; ++i) {
    if (i >= h) break;
    const float t = tanhf(fmaf(w[i], z, c[i]));
    const float dci = a[i] * (1.f - t * t);
    grad = fmaf(dci, w[i], grad);
    if constexpr (ACCUMULATE) {
      da[i] = fmaf(u, t, da[i]);
      dc[i] = fmaf(u, dci, dc[i]);
      dw[i] = fmaf(u * dci, z, dw[i]);
    }
  }
  return grad;
}

// Run-time code -> instance, for the host tests (_C.lrnn_g_host); the kernels use the templates. mlp or an
// unknown code gives NaN.
HK_HOST_DEVICE inline float lrnn_g(int code, float z, float omega) {
  switch (code) {
    case kLrnnSin: return lrnn_g<kLrnnSin>(z, omega);
    case kLrnnSpder: return lrnn_g<kLrnnSpder>(z, omega);
    case kLrnnArctan: return lrnn_g<kLrnnArctan>(z, omega);
    case kLrnnTanh: return lrnn_g<kLrnnTanh>(z, omega);
    default: return NAN;
  }
}

HK_HOST_DEVICE inline float lrnn_g_grad(int code, float z, float omega) {
  switch (code) {
    case kLrnnSin: return lrnn_g_grad<kLrnnSin>(z, omega);
    case kLrnnSpder: return lrnn_g_grad<kLrnnSpder>(z, omega);
    case kLrnnArctan: return lrnn_g_grad<kLrnnArctan>(z, omega);
    case kLrnnTanh: return lrnn_g_grad<kLrnnTanh>(z, omega);
    default: return NAN;
  }
}

// ---- launchers

// Neurons per block: the 64 output columns of a tile hold floor(64 / dbar) whole neurons.
HK_HOST_DEVICE inline int64_t lrnn_neurons_per_tile(int64_t dbar) { return 64 / dbar; }

// Enqueue the kernel on `stream`; return cudaErrorInvalidValue for bad params, else the first CUDA error of the
// launch. fwd: phi. bwd: grad_z (z recomputed, leave-one-out products by prefix and suffix) and, for mlp, the
// per-split sums g_params_part; the caller reduces them over the splits in a fixed order.
cudaError_t launch_lrnn_fwd(const LrnnParams& params, cudaStream_t stream);
cudaError_t launch_lrnn_bwd(const LrnnParams& params, cudaStream_t stream);

}  // namespace hadamard_kernels

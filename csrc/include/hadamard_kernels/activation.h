// Element-wise activations and their derivatives, in float, for host and device.
// Codes match ACTIVATIONS in hadamard_kernels/ops/poly_chain/common.py (exported as _C.ACTIVATIONS).
#pragma once

#include <math.h>

#include "hadamard_kernels/common.h"

namespace hadamard_kernels {

enum Activation : int { kIdentity = 0, kRelu = 1, kTanh = 2, kSigmoid = 3, kGelu = 4 };
inline constexpr int kNumActivations = 5;
inline constexpr const char* kActivationNames[kNumActivations] = {"identity", "relu", "tanh", "sigmoid", "gelu"};

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

template <int ACT>
HK_HOST_DEVICE inline float activation(float z) {
  static_assert(ACT >= 0 && ACT < kNumActivations, "unknown activation code");
  if constexpr (ACT == kIdentity) {
    return z;
  } else if constexpr (ACT == kRelu) {
    return z < 0.f ? 0.f : z;  // NaN stays NaN (and -0 stays -0), as torch.relu
  } else if constexpr (ACT == kTanh) {
    return tanhf(z);
  } else if constexpr (ACT == kSigmoid) {
    // expf(-z) overflows to inf for z < -88: the quotient is then exactly 0, the right limit.
    return 1.f / (1.f + expf(-z));
  } else {
    return 0.5f * z * (1.f + erff(z * kInvSqrt2));  // exact (erf) GELU
  }
}

// d activation / dz.
template <int ACT>
HK_HOST_DEVICE inline float activation_grad(float z) {
  static_assert(ACT >= 0 && ACT < kNumActivations, "unknown activation code");
  if constexpr (ACT == kIdentity) {
    return 1.f;
  } else if constexpr (ACT == kRelu) {
    return z <= 0.f ? 0.f : 1.f;  // 0 at z = 0 and 1 at NaN, as torch.relu's backward
  } else if constexpr (ACT == kTanh) {
    const float t = tanhf(z);
    return 1.f - t * t;
  } else if constexpr (ACT == kSigmoid) {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f - s);
  } else {
    // Phi(z) + z * phi(z); for large |z| the exp underflows to 0 before z can make it inf.
    return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * expf(-0.5f * z * z) * kInvSqrt2Pi;
  }
}

// Run-time code -> instance, for host-side tests of the same math (_C.activation_host). Kernels use the
// templates. An unknown code gives NaN.
HK_HOST_DEVICE inline float activation(int code, float z) {
  switch (code) {
    case kIdentity: return activation<kIdentity>(z);
    case kRelu: return activation<kRelu>(z);
    case kTanh: return activation<kTanh>(z);
    case kSigmoid: return activation<kSigmoid>(z);
    case kGelu: return activation<kGelu>(z);
    default: return NAN;
  }
}

HK_HOST_DEVICE inline float activation_grad(int code, float z) {
  switch (code) {
    case kIdentity: return activation_grad<kIdentity>(z);
    case kRelu: return activation_grad<kRelu>(z);
    case kTanh: return activation_grad<kTanh>(z);
    case kSigmoid: return activation_grad<kSigmoid>(z);
    case kGelu: return activation_grad<kGelu>(z);
    default: return NAN;
  }
}

}  // namespace hadamard_kernels

// NAME becomes the activation code as a compile-time int; an unknown code returns cudaErrorInvalidValue.
#define HK_ACTIVATION_SWITCH(CODE, NAME, ...)                      \
  [&]() -> cudaError_t {                                           \
    switch (CODE) {                                                \
      HK_INT_CASE(::hadamard_kernels::kIdentity, NAME, __VA_ARGS__) \
      HK_INT_CASE(::hadamard_kernels::kRelu, NAME, __VA_ARGS__)     \
      HK_INT_CASE(::hadamard_kernels::kTanh, NAME, __VA_ARGS__)     \
      HK_INT_CASE(::hadamard_kernels::kSigmoid, NAME, __VA_ARGS__)  \
      HK_INT_CASE(::hadamard_kernels::kGelu, NAME, __VA_ARGS__)     \
      default:                                                     \
        return cudaErrorInvalidValue;                              \
    }                                                              \
  }()

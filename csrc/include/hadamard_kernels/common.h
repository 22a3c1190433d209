// Shared by every op family: the dtype codes, error helpers and static switches that pick template instances.
// Host-only translation units (bindings.cpp) include this too, so nothing here may need nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define HK_HOST_DEVICE __host__ __device__
#else
#define HK_HOST_DEVICE
#endif

namespace hadamard_kernels {

// The element type of an op's tensors; the index is the code Python passes (names exported as _C.DTYPES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
inline constexpr int kNumDTypes = 3;
inline constexpr const char* kDTypeNames[kNumDTypes] = {"float32", "float16", "bfloat16"};

HK_HOST_DEVICE inline bool is_aligned(const void* ptr, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

// Shared-memory layouts: each region starts on a 128-byte boundary (the alignment HK_DYNAMIC_SHARED_MEMORY declares).
constexpr std::size_t round_up_128(std::size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T>
constexpr T max_of(T a, T b) {
  return a > b ? a : b;
}

}  // namespace hadamard_kernels

// Returns the error code of `expr` from the enclosing function when it is not cudaSuccess.
#define HK_RETURN_IF_ERROR(expr)                   \
  do {                                             \
    const cudaError_t hk_err_ = (expr);            \
    if (hk_err_ != cudaSuccess) return hk_err_;    \
  } while (0)

// Declares `name`, the block's dynamic shared memory as unsigned char*, 128-byte aligned. Under HK_CPU_EMULATION
// (tests/emulation/cuda_emulation.h, included before this header) it is the emulated block's buffer instead.
#if defined(HK_CPU_EMULATION)
#define HK_DYNAMIC_SHARED_MEMORY(name) unsigned char* const name = hk_emulation::dynamic_shared_memory()
#else
#define HK_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// Static switches: turn a run-time value into a compile-time constant NAME visible inside the lambda body
// passed as the last argument, which is called and whose cudaError_t is returned. A value outside the
// supported set returns cudaErrorInvalidValue. Nest them to pick one instance of a kernel template:
//   return HK_BOOL_SWITCH(p.bias != nullptr, HAS_BIAS, [&] { return launch<HAS_BIAS>(p, stream); });
#define HK_BOOL_SWITCH(COND, NAME, ...)   \
  [&]() -> cudaError_t {                  \
    if (COND) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr bool NAME = false;        \
      return __VA_ARGS__();               \
    }                                     \
  }()

// One case of an integer switch: NAME becomes the constant VALUE.
#define HK_INT_CASE(VALUE, NAME, ...) \
  case VALUE: {                       \
    constexpr int NAME = VALUE;       \
    return __VA_ARGS__();             \
  }

// NAME becomes the C++ element type of a DType (float, __half, __nv_bfloat16). Use in .cu files only.
#define HK_DTYPE_SWITCH(DTYPE, NAME, ...)                    \
  [&]() -> cudaError_t {                                     \
    switch (DTYPE) {                                         \
      case ::hadamard_kernels::DType::kFloat32: {            \
        using NAME = float;                                  \
        return __VA_ARGS__();                                \
      }                                                      \
      case ::hadamard_kernels::DType::kFloat16: {            \
        using NAME = __half;                                 \
        return __VA_ARGS__();                                \
      }                                                      \
      case ::hadamard_kernels::DType::kBFloat16: {           \
        using NAME = __nv_bfloat16;                          \
        return __VA_ARGS__();                                \
      }                                                      \
      default:                                               \
        return cudaErrorInvalidValue;                        \
    }                                                        \
  }()

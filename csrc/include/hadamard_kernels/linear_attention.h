// Causal linear attention (DESIGN.md §2). With Q = phi(q), K = phi(k), per sequence and head:
//   S_t = S_0 + sum_{s<=t} K_s^T v_s  [K, V],   z_t = z_0 + sum_{s<=t} K_s  [K]
//   o_t = scale * Q_t S_t,  or  scale * Q_t S_t / (Q_t . z_t + eps)  (normalize)
// Kernels in csrc/linear_attention_kernels.cuh; launchers in csrc/linear_attention.cu.
#pragma once

#include <cuda_runtime_api.h>
#include <math.h>

#include <cstdint>

#include "hadamard_kernels/common.h"

namespace hadamard_kernels {

// Codes match FEATURE_MAPS in hadamard_kernels/ops/linear_attention/common.py (exported as _C.FEATURE_MAPS).
enum FeatureMap : int { kFeatureIdentity = 0, kFeatureElu1 = 1, kFeatureRelu = 2 };
inline constexpr int kNumFeatureMaps = 3;
inline constexpr const char* kFeatureMapNames[kNumFeatureMaps] = {"identity", "elu1", "relu"};

// Largest K and V: a block keeps a [K or V, 64] slice of the fp32 state in shared memory.
inline constexpr int64_t kLinearAttentionMaxDim = 256;

// ---- element-wise math, shared by the kernels and the host wrappers the tests call (_C.linear_attention_*_host)

// phi(x). NaN stays NaN for every map (relu as torch.relu; elu1 through exp).
template <int FM>
HK_HOST_DEVICE inline float feature_map(float x) {
  static_assert(FM >= 0 && FM < kNumFeatureMaps, "unknown feature map");
  if constexpr (FM == kFeatureIdentity) {
    return x;
  } else if constexpr (FM == kFeatureElu1) {
    return x > 0.f ? x + 1.f : expf(x);  // elu(x) + 1; exp underflows to 0, never below
  } else {
    return x < 0.f ? 0.f : x;
  }
}

// phi'(x), as the reference oracle defines it: elu1 gives NaN at NaN (exp), relu gives 0 there (x > 0 fails).
template <int FM>
HK_HOST_DEVICE inline float feature_map_grad(float x) {
  static_assert(FM >= 0 && FM < kNumFeatureMaps, "unknown feature map");
  if constexpr (FM == kFeatureIdentity) {
    return 1.f;
  } else if constexpr (FM == kFeatureElu1) {
    return x > 0.f ? 1.f : expf(x);
  } else {
    return x > 0.f ? 1.f : 0.f;
  }
}

// Run-time code -> instance (the kernels take the map as a run-time code: a uniform branch per loaded element).
// An unknown code gives NaN.
HK_HOST_DEVICE inline float feature_map(int code, float x) {
  switch (code) {
    case kFeatureIdentity: return feature_map<kFeatureIdentity>(x);
    case kFeatureElu1: return feature_map<kFeatureElu1>(x);
    case kFeatureRelu: return feature_map<kFeatureRelu>(x);
    default: return NAN;
  }
}

HK_HOST_DEVICE inline float feature_map_grad(int code, float x) {
  switch (code) {
    case kFeatureIdentity: return feature_map_grad<kFeatureIdentity>(x);
    case kFeatureElu1: return feature_map_grad<kFeatureElu1>(x);
    case kFeatureRelu: return feature_map_grad<kFeatureRelu>(x);
    default: return NAN;
  }
}

// The normalizer. `den` is Q_t . z_t + eps (eps already added): o = scale * num / den.
HK_HOST_DEVICE inline float normalized_output(float num, float den, float scale) { return scale * (num / den); }

// Its backward, per token: d num = grad_o * normalizer_row_scale(den, scale), the factor every element of the
// row shares; d den = -(grad_o . o) / den.
HK_HOST_DEVICE inline float normalizer_row_scale(float den, float scale) { return scale / den; }
HK_HOST_DEVICE inline float normalizer_den_grad(float grad_o_dot_o, float den) { return -grad_o_dot_o / den; }

// ---- launchers

// Pointers to device memory. q, k, v, o, grad_o, dq, dk, dv share `dtype` and are indexed [row, head, col] with
// row = b * T + t (b < B, or the packed row with cu_seqlens), unit column stride and the row / head strides below
// (elements); the tensors [B, T, H, D] are viewed as [B * T, H, D]. States are fp32 and contiguous.
struct LinearAttentionParams {
  const void* q = nullptr;  // [B*T, H, K]
  const void* k = nullptr;  // [B*T, H, K]
  const void* v = nullptr;  // [B*T, H, V]
  void* o = nullptr;        // forward output [B*T, H, V]
  const void* grad_o = nullptr;  // backward input [B*T, H, V]
  void* dq = nullptr;            // backward outputs, or null when not needed
  void* dk = nullptr;
  void* dv = nullptr;
  const float* initial_state = nullptr;    // [N, H, K, V] or null (zeros)
  const float* initial_key_sum = nullptr;  // [N, H, K] or null (zeros); normalize only
  float* final_state = nullptr;            // forward output [N, H, K, V], or null
  float* final_key_sum = nullptr;          // forward output [N, H, K], or null; normalize only
  const float* grad_final_state = nullptr;    // backward input [N, H, K, V] or null (zeros)
  const float* grad_final_key_sum = nullptr;  // backward input [N, H, K] or null (zeros); normalize only
  float* grad_initial_state = nullptr;        // backward output [N, H, K, V], or null
  float* grad_initial_key_sum = nullptr;      // backward output [N, H, K], or null; normalize only
  const int32_t* cu_seqlens = nullptr;  // [N + 1] token offsets of packed sequences (B == 1), or null (N = B)
  // Sequence split (SegmentPlan in hadamard_kernels/ops/linear_attention/common.py): with segment_chunks > 0 every
  // sequence is cut into segments of that many 64-token chunks, and each pass runs one block per segment.
  int64_t segment_chunks = 0;  // 0: a sequence is one segment
  int64_t segments = 0;  // in all: N * ceil(ceil(T / 64) / segment_chunks), with cu_seqlens an upper bound
  const int32_t* segment_offsets = nullptr;   // with cu_seqlens: [N + 1], the first segment of each sequence
  const int32_t* segment_sequence = nullptr;  // with cu_seqlens: [segments], the sequence of each segment
  void* workspace = nullptr;  // scratch of linear_attention_{fwd,bwd}_workspace_bytes(), 16-byte aligned
  int64_t B = 0, T = 0, H = 0, K = 0, V = 0;
  int64_t N = 0;  // sequences: B, or cu_seqlens entries - 1
  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t v_row_stride = 0, v_head_stride = 0;
  int64_t o_row_stride = 0, o_head_stride = 0;  // o, and grad_o in the backward
  int64_t dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_row_stride = 0, dv_head_stride = 0;
  DType dtype = DType::kFloat32;
  int feature_map = 0;  // FeatureMap
  bool normalize = false;
  float scale = 1.f;
  float eps = 0.f;
};

// Bytes of scratch the launchers need: the segments' state sums when sequences are split, and in the backward with
// normalize the per-token statistics (0 for invalid params, or when neither applies).
int64_t linear_attention_fwd_workspace_bytes(const LinearAttentionParams& params);
int64_t linear_attention_bwd_workspace_bytes(const LinearAttentionParams& params);

// Enqueue the kernels on `stream`; return cudaErrorInvalidValue for bad params (K or V > kLinearAttentionMaxDim
// included), else the first CUDA error of the launches.
cudaError_t launch_linear_attention_fwd(const LinearAttentionParams& params, cudaStream_t stream);
cudaError_t launch_linear_attention_bwd(const LinearAttentionParams& params, cudaStream_t stream);

}  // namespace hadamard_kernels

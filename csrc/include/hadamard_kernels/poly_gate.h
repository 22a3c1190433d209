// poly_gate (DESIGN.md §5, MONet's PolyMlp gate): y = n1 + alpha * n1 * n2 with n1 = LN1(shift(a) or a),
// n2 = LN2(b), LayerNorms over the last dim C. Kernels in csrc/poly_gate.cu; the index and element math below is
// shared by the kernels and the host wrappers the tests call (_C.poly_gate_*_host).
#pragma once

#include <cuda_runtime_api.h>
#include <math.h>

#include <cstdint>

#include "hadamard_kernels/common.h"

namespace hadamard_kernels {

// Largest C: a backward block keeps five [C] float32 rows of parameter-gradient sums in shared memory.
inline constexpr int64_t kPolyGateMaxC = 2048;
// Parameter gradients summed per backward block: ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha per channel.
inline constexpr int kPolyGateParamGrads = 5;

// Pointers to device memory; all tensors share `dtype`. Sizes and strides count elements. a, b, y, grad_y, da, db
// are [M, C] with unit channel stride and the given row strides; with `spatial` the M rows are the pixels
// (B, W, H) in that order.
struct PolyGateParams {
  const void* a = nullptr;
  const void* b = nullptr;
  const void* ln1_weight = nullptr;  // [C], contiguous (all four)
  const void* ln1_bias = nullptr;
  const void* ln2_weight = nullptr;
  const void* ln2_bias = nullptr;
  const void* alpha = nullptr;  // [1] or [C] (alpha_stride 0 or 1), or null for alpha = 1
  void* y = nullptr;            // forward output
  const void* grad_y = nullptr;  // backward input
  void* da = nullptr;            // backward outputs
  void* db = nullptr;
  float* partial = nullptr;  // backward output [kPolyGateParamGrads, grid, C] float32, contiguous
  int64_t M = 0, C = 0;
  int64_t W = 1, H = 1;  // the image with `spatial` (M a multiple of W * H)
  int64_t a_row_stride = 0, b_row_stride = 0;
  int64_t y_row_stride = 0;  // y (forward) or grad_y (backward)
  int64_t da_row_stride = 0, db_row_stride = 0;
  int64_t alpha_stride = 0;
  int64_t grid = 0;  // backward: blocks of the persistent kernel (rows of `partial`)
  float eps = 1e-6f;
  bool spatial = false;
  DType dtype = DType::kFloat32;
};

// Enqueue the kernel on `stream`; return cudaErrorInvalidValue for bad params (C > kPolyGateMaxC included), else
// the first CUDA error of the launch.
cudaError_t launch_poly_gate_fwd(const PolyGateParams& params, cudaStream_t stream);
cudaError_t launch_poly_gate_bwd(const PolyGateParams& params, cudaStream_t stream);

// ---- the spatial shift: channel group c of pixel (w, h) reads pixel (w -+ 1, h) or (w, h -+ 1), the border itself

// The survey's group boundaries g1 = C / 4, g2 = C / 2, g3 = 3 C / 4: group 0 [0, g1) +W, 1 [g1, g2) -W,
// 2 [g2, g3) +H, 3 [g3, C) -H.
struct ShiftGroups {
  int64_t g1, g2, g3;
};

HK_HOST_DEVICE inline ShiftGroups shift_groups(int64_t C) { return {C / 4, C / 2, 3 * C / 4}; }

HK_HOST_DEVICE inline int shift_group(int64_t c, const ShiftGroups& g) {
  return static_cast<int>(c >= g.g1) + static_cast<int>(c >= g.g2) + static_cast<int>(c >= g.g3);
}

// The row of `a` that row r (flat over (B, W, H)) of the shifted tensor reads in channel group `group`.
HK_HOST_DEVICE inline int64_t shift_source_row(int64_t r, int group, int64_t W, int64_t H) {
  const int64_t w = (r / H) % W, h = r % H;
  switch (group) {
    case 0: return w > 0 ? r - H : r;
    case 1: return w < W - 1 ? r + H : r;
    case 2: return h > 0 ? r - 1 : r;
    default: return h < H - 1 ? r + 1 : r;
  }
}

// The shift's transpose (the backward) as a permutation of rows: row r sends its group's gradient to
// shift_target_row: (w - 1) mod W for group 0, (w + 1) mod W for 1, (h - 1) mod H for 2, (h + 1) mod H for 3.
HK_HOST_DEVICE inline int64_t shift_target_row(int64_t r, int group, int64_t W, int64_t H) {
  const int64_t w = (r / H) % W, h = r % H;
  switch (group) {
    case 0: return w >= 1 ? r - H : r + (W - 1) * H;
    case 1: return w <= W - 2 ? r + H : r - (W - 1) * H;
    case 2: return h >= 1 ? r - 1 : r + (H - 1);
    default: return h <= H - 2 ? r + 1 : r - (H - 1);
  }
}

// What it sends: its own gradient unless it is the border pixel no one else reads (`own`), plus that of the border
// pixel read twice when it is the neighbour whose target is that pixel (`partner`: its coordinate along the group's
// axis, the other coordinate unchanged; -1 for none). The sums keep every element of da written exactly once.
struct ShiftTransposeTerms {
  bool own;
  int64_t partner;
};

HK_HOST_DEVICE inline ShiftTransposeTerms shift_transpose_terms(int64_t w, int64_t h, int group, int64_t W,
                                                                int64_t H) {
  const int64_t n = group < 2 ? W : H;
  const int64_t i = group < 2 ? w : h;
  if (group % 2 == 0) {  // reads max(i - 1, 0): pixel 0 is read by 0 and 1, pixel n - 1 by none
    const int64_t carrier = n > 1 ? 1 : 0;
    return {i >= 1, i == carrier ? int64_t{0} : int64_t{-1}};
  }
  const int64_t carrier = n > 1 ? n - 2 : 0;  // reads min(i + 1, n - 1)
  return {i <= n - 2, i == carrier ? n - 1 : int64_t{-1}};
}

// Pixels per backward tile along an axis of length n, and the pixel at tile position k: 0, 1, n - 2, n - 1, then
// 2 .. n - 3 (identity for n < 4), so each pair whose gradients are summed lies in one tile; -1 past the axis.
HK_HOST_DEVICE inline int64_t shift_axis_tile(int64_t n) { return n == 1 ? 1 : (n == 3 ? 4 : 2); }

HK_HOST_DEVICE inline int64_t shift_tile_pixel(int64_t k, int64_t n) {
  if (k >= n) return -1;
  if (n < 4 || k < 2) return k;
  return k < 4 ? n - 4 + k : k - 2;
}

// ---- element math (float32)

HK_HOST_DEVICE inline float poly_gate_output(float n1, float n2, float alpha) { return n1 + alpha * n1 * n2; }

// dL/dn1 and dL/dn2 of y = n1 + alpha * n1 * n2 from dL/dy = g (dL/dalpha sums g * n1 * n2).
HK_HOST_DEVICE inline float poly_gate_grad_n1(float g, float n2, float alpha) { return g * (1.f + alpha * n2); }
HK_HOST_DEVICE inline float poly_gate_grad_n2(float g, float n1, float alpha) { return g * alpha * n1; }

// 1 / sqrt(var + eps).
HK_HOST_DEVICE inline float layer_norm_rstd(float var, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(var + eps);
#else
  return 1.f / sqrtf(var + eps);
#endif
}

// dL/dx of a LayerNorm row from dxhat = dL/dn * weight: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
HK_HOST_DEVICE inline float layer_norm_input_grad(float dxhat, float xhat, float rstd, float mean_dxhat,
                                                  float mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace hadamard_kernels

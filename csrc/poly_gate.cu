// poly_gate forward and backward kernels (DESIGN.md §5): y = n1 + alpha * n1 * n2, n1 = LN1(shift(a) or a),
// n2 = LN2(b), statistics in float32.
//
// Forward: a warp per row. Three sweeps over the row's C channels (mean, centred variance, output); the row of a
// and b (a few KiB) stays in L1 between them, so device memory sees one read of a and b and one write of y. With the
// shift, channel c of row r is read from row shift_source_row(r, group(c)): an index remap, no shifted copy.
//
// Backward: one persistent kernel. A block walks tiles of rows: 2 x 2 pixels (4 along an axis of length 3) in the
// order of shift_tile_pixel with the shift, else kFlatRows consecutive rows. Phase 1, a warp per row: the row's
// statistics and mean(dxhat), mean(dxhat * xhat) of both LayerNorms (8 floats per row in shared memory). Phase 2,
// a thread per channel over all rows of the tile: dn1, dn2, the parameter-gradient sums (five [C] float32 rows in
// shared memory, each channel owned by one thread: no atomics), db, and da through the shift's transpose, whose
// border sums (a border pixel is read twice) combine rows of the same tile. The block's sums go to
// partial[k, block, C]; Python adds the blocks (ops/poly_gate/common.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "hadamard_kernels/common.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/poly_gate.h"

namespace hadamard_kernels {
namespace {

constexpr int kFwdThreads = 256;
constexpr int kFwdWarps = kFwdThreads / 32;
constexpr int kBwdThreads = 256;
constexpr int kBwdWarps = kBwdThreads / 32;
constexpr int kMaxTileRows = 16;  // 4 x 4 pixels (both axes of length 3)
constexpr int kFlatRows = 8;      // rows per backward tile without the shift
constexpr int kRowStats = 8;      // mean1, rstd1, mean2, rstd2, mean(dxhat1), mean(dxhat1 xhat1), and for LN2

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
struct Operands {
  const T* a;
  const T* b;
  const T* w1;
  const T* b1;
  const T* w2;
  const T* b2;
  const T* alpha;
  ShiftGroups groups;

  __device__ __forceinline__ explicit Operands(const PolyGateParams& p)
      : a(static_cast<const T*>(p.a)),
        b(static_cast<const T*>(p.b)),
        w1(static_cast<const T*>(p.ln1_weight)),
        b1(static_cast<const T*>(p.ln1_bias)),
        w2(static_cast<const T*>(p.ln2_weight)),
        b2(static_cast<const T*>(p.ln2_bias)),
        alpha(static_cast<const T*>(p.alpha)),
        groups(shift_groups(p.C)) {}

  // Element c of row r of LN1's input: a itself, or a read through the shift.
  __device__ __forceinline__ float x1(const PolyGateParams& p, int64_t r, int64_t c) const {
    const int64_t src = p.spatial ? shift_source_row(r, shift_group(c, groups), p.W, p.H) : r;
    return to_float(a[src * p.a_row_stride + c]);
  }
  __device__ __forceinline__ float x2(const PolyGateParams& p, int64_t r, int64_t c) const {
    return to_float(b[r * p.b_row_stride + c]);
  }
  __device__ __forceinline__ float alpha_at(const PolyGateParams& p, int64_t c) const {
    return alpha != nullptr ? to_float(alpha[c * p.alpha_stride]) : 1.f;
  }
};

// Mean and 1 / sqrt(var + eps) of row r of LN1's and LN2's inputs (two sweeps: mean, then the centred variance).
template <typename T>
__device__ __forceinline__ void row_statistics(const PolyGateParams& p, const Operands<T>& op, int64_t r, int lane,
                                               float& mean1, float& rstd1, float& mean2, float& rstd2) {
  float s1 = 0.f, s2 = 0.f;
  for (int64_t c = lane; c < p.C; c += 32) {
    s1 += op.x1(p, r, c);
    s2 += op.x2(p, r, c);
  }
  const float inv_c = 1.f / static_cast<float>(p.C);
  mean1 = warp_sum(s1) * inv_c;
  mean2 = warp_sum(s2) * inv_c;
  float v1 = 0.f, v2 = 0.f;
  for (int64_t c = lane; c < p.C; c += 32) {
    const float d1 = op.x1(p, r, c) - mean1, d2 = op.x2(p, r, c) - mean2;
    v1 += d1 * d1;
    v2 += d2 * d2;
  }
  rstd1 = layer_norm_rstd(warp_sum(v1) * inv_c, p.eps);
  rstd2 = layer_norm_rstd(warp_sum(v2) * inv_c, p.eps);
}

template <typename T>
__global__ void __launch_bounds__(kFwdThreads) poly_gate_fwd_kernel(const PolyGateParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / 32;
  if (r >= p.M) return;
  const Operands<T> op(p);
  float mean1, rstd1, mean2, rstd2;
  row_statistics(p, op, r, lane, mean1, rstd1, mean2, rstd2);
  T* y = static_cast<T*>(p.y) + r * p.y_row_stride;
  for (int64_t c = lane; c < p.C; c += 32) {
    const float n1 = (op.x1(p, r, c) - mean1) * rstd1 * to_float(op.w1[c]) + to_float(op.b1[c]);
    const float n2 = (op.x2(p, r, c) - mean2) * rstd2 * to_float(op.w2[c]) + to_float(op.b2[c]);
    y[c] = from_float<T>(poly_gate_output(n1, n2, op.alpha_at(p, c)));
  }
}

// The backward's tiling: tile t covers [tile_w, tile_h] rows (pixels with the shift, tile_w = 1 without).
struct Tiling {
  int64_t tile_w, tile_h, tiles_w, tiles_h, count;
};

Tiling backward_tiling(const PolyGateParams& p) {
  Tiling t{};
  if (p.spatial) {
    t.tile_w = shift_axis_tile(p.W);
    t.tile_h = shift_axis_tile(p.H);
    t.tiles_w = (p.W + t.tile_w - 1) / t.tile_w;
    t.tiles_h = (p.H + t.tile_h - 1) / t.tile_h;
    t.count = p.M / (p.W * p.H) * t.tiles_w * t.tiles_h;
  } else {
    t.tile_w = 1;
    t.tile_h = kFlatRows;
    t.tiles_w = t.tiles_h = 1;
    t.count = (p.M + kFlatRows - 1) / kFlatRows;
  }
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) poly_gate_bwd_kernel(const PolyGateParams p, const Tiling tiling) {
  extern __shared__ float smem[];
  float* acc = smem;                            // [kPolyGateParamGrads][C]
  float* stats = acc + kPolyGateParamGrads * p.C;  // [kMaxTileRows][kRowStats]
  __shared__ int64_t tile_row[kMaxTileRows];    // -1: outside the tensor
  __shared__ int64_t tile_w[kMaxTileRows];
  __shared__ int64_t tile_h[kMaxTileRows];

  const Operands<T> op(p);
  const T* gy = static_cast<const T*>(p.grad_y);
  T* da = static_cast<T*>(p.da);
  T* db = static_cast<T*>(p.db);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int rows = static_cast<int>(tiling.tile_w * tiling.tile_h);
  const float inv_c = 1.f / static_cast<float>(p.C);

  for (int64_t c = threadIdx.x; c < kPolyGateParamGrads * p.C; c += kBwdThreads) acc[c] = 0.f;

  for (int64_t t = blockIdx.x; t < tiling.count; t += gridDim.x) {
    if (static_cast<int>(threadIdx.x) < rows) {
      const int iw = static_cast<int>(threadIdx.x / tiling.tile_h), ih = static_cast<int>(threadIdx.x % tiling.tile_h);
      int64_t r = -1, w = -1, h = -1;
      if (p.spatial) {
        const int64_t per_image = tiling.tiles_w * tiling.tiles_h;
        const int64_t image = t / per_image, rem = t % per_image;
        w = shift_tile_pixel(rem / tiling.tiles_h * tiling.tile_w + iw, p.W);
        h = shift_tile_pixel(rem % tiling.tiles_h * tiling.tile_h + ih, p.H);
        if (w >= 0 && h >= 0) r = (image * p.W + w) * p.H + h;
      } else {
        r = t * kFlatRows + ih;
        if (r >= p.M) r = -1;
      }
      tile_row[threadIdx.x] = r;
      tile_w[threadIdx.x] = w;
      tile_h[threadIdx.x] = h;
    }
    __syncthreads();

    // Phase 1: a warp per row.
    for (int i = warp; i < rows; i += kBwdWarps) {
      const int64_t r = tile_row[i];
      if (r < 0) continue;
      float mean1, rstd1, mean2, rstd2;
      row_statistics(p, op, r, lane, mean1, rstd1, mean2, rstd2);
      float s1 = 0.f, sx1 = 0.f, s2 = 0.f, sx2 = 0.f;
      for (int64_t c = lane; c < p.C; c += 32) {
        const float xhat1 = (op.x1(p, r, c) - mean1) * rstd1, xhat2 = (op.x2(p, r, c) - mean2) * rstd2;
        const float w1 = to_float(op.w1[c]), w2 = to_float(op.w2[c]), al = op.alpha_at(p, c);
        const float n1 = xhat1 * w1 + to_float(op.b1[c]), n2 = xhat2 * w2 + to_float(op.b2[c]);
        const float g = to_float(gy[r * p.y_row_stride + c]);
        const float dxhat1 = poly_gate_grad_n1(g, n2, al) * w1, dxhat2 = poly_gate_grad_n2(g, n1, al) * w2;
        s1 += dxhat1;
        sx1 += dxhat1 * xhat1;
        s2 += dxhat2;
        sx2 += dxhat2 * xhat2;
      }
      s1 = warp_sum(s1);
      sx1 = warp_sum(sx1);
      s2 = warp_sum(s2);
      sx2 = warp_sum(sx2);
      if (lane == 0) {
        float* st = stats + i * kRowStats;
        st[0] = mean1;
        st[1] = rstd1;
        st[2] = mean2;
        st[3] = rstd2;
        st[4] = s1 * inv_c;
        st[5] = sx1 * inv_c;
        st[6] = s2 * inv_c;
        st[7] = sx2 * inv_c;
      }
    }
    __syncthreads();

    // Phase 2: a thread per channel, over every row of the tile.
    for (int64_t c = threadIdx.x; c < p.C; c += kBwdThreads) {
      const float w1 = to_float(op.w1[c]), b1 = to_float(op.b1[c]), w2 = to_float(op.w2[c]), b2 = to_float(op.b2[c]);
      const float al = op.alpha_at(p, c);
      float dw1 = 0.f, db1 = 0.f, dw2 = 0.f, db2 = 0.f, dal = 0.f;
      float dx1[kMaxTileRows];
#pragma unroll
      for (int i = 0; i < kMaxTileRows; ++i) {
        dx1[i] = 0.f;
        if (i >= rows || tile_row[i] < 0) continue;
        const int64_t r = tile_row[i];
        const float* st = stats + i * kRowStats;
        const float xhat1 = (op.x1(p, r, c) - st[0]) * st[1], xhat2 = (op.x2(p, r, c) - st[2]) * st[3];
        const float n1 = xhat1 * w1 + b1, n2 = xhat2 * w2 + b2;
        const float g = to_float(gy[r * p.y_row_stride + c]);
        const float dn1 = poly_gate_grad_n1(g, n2, al), dn2 = poly_gate_grad_n2(g, n1, al);
        dw1 += dn1 * xhat1;
        db1 += dn1;
        dw2 += dn2 * xhat2;
        db2 += dn2;
        dal += g * n1 * n2;
        db[r * p.db_row_stride + c] = from_float<T>(layer_norm_input_grad(dn2 * w2, xhat2, st[3], st[6], st[7]));
        dx1[i] = layer_norm_input_grad(dn1 * w1, xhat1, st[1], st[4], st[5]);
      }
      acc[c] += dw1;
      acc[p.C + c] += db1;
      acc[2 * p.C + c] += dw2;
      acc[3 * p.C + c] += db2;
      acc[4 * p.C + c] += dal;

      const int group = shift_group(c, op.groups);
#pragma unroll
      for (int i = 0; i < kMaxTileRows; ++i) {
        if (i >= rows || tile_row[i] < 0) continue;
        const int64_t r = tile_row[i];
        if (!p.spatial) {
          da[r * p.da_row_stride + c] = from_float<T>(dx1[i]);
          continue;
        }
        const ShiftTransposeTerms terms = shift_transpose_terms(tile_w[i], tile_h[i], group, p.W, p.H);
        float value = terms.own ? dx1[i] : 0.f;
        if (terms.partner >= 0) {
          // The partner pixel shares this row's other coordinate and lies in this tile (shift_tile_pixel's order).
#pragma unroll
          for (int j = 0; j < kMaxTileRows; ++j) {
            if (j >= rows || tile_row[j] < 0) continue;
            const bool same = group < 2 ? (tile_w[j] == terms.partner && tile_h[j] == tile_h[i])
                                        : (tile_h[j] == terms.partner && tile_w[j] == tile_w[i]);
            if (same) value += dx1[j];
          }
        }
        da[shift_target_row(r, group, p.W, p.H) * p.da_row_stride + c] = from_float<T>(value);
      }
    }
    __syncthreads();  // tile_row and stats are rewritten by the next tile
  }

  float* out = p.partial + static_cast<int64_t>(blockIdx.x) * p.C;
  const int64_t stride_k = p.grid * p.C;
  for (int64_t c = threadIdx.x; c < p.C; c += kBwdThreads) {
#pragma unroll
    for (int k = 0; k < kPolyGateParamGrads; ++k) out[k * stride_k + c] = acc[k * p.C + c];
  }
}

bool valid_common(const PolyGateParams& p) {
  if (p.M < 1 || p.C < 1 || p.C > kPolyGateMaxC || p.W < 1 || p.H < 1) return false;
  if (p.a == nullptr || p.b == nullptr || p.ln1_weight == nullptr || p.ln1_bias == nullptr ||
      p.ln2_weight == nullptr || p.ln2_bias == nullptr) {
    return false;
  }
  if (p.a_row_stride < p.C || p.b_row_stride < p.C || p.y_row_stride < p.C) return false;
  if (p.alpha != nullptr && p.alpha_stride != 0 && p.alpha_stride != 1) return false;
  if (p.spatial && p.M % (p.W * p.H) != 0) return false;
  if (!(p.eps > 0.f)) return false;
  return static_cast<int>(p.dtype) >= 0 && static_cast<int>(p.dtype) < kNumDTypes;
}

}  // namespace

cudaError_t launch_poly_gate_fwd(const PolyGateParams& p, cudaStream_t stream) {
  if (!valid_common(p) || p.y == nullptr) return cudaErrorInvalidValue;
  const int64_t blocks = (p.M + kFwdWarps - 1) / kFwdWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  return HK_DTYPE_SWITCH(p.dtype, T, [&] {
    poly_gate_fwd_kernel<T><<<static_cast<unsigned>(blocks), kFwdThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_poly_gate_bwd(const PolyGateParams& p, cudaStream_t stream) {
  if (!valid_common(p) || p.grad_y == nullptr || p.da == nullptr || p.db == nullptr || p.partial == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.da_row_stride < p.C || p.db_row_stride < p.C || p.grid < 1 || p.grid > INT32_MAX) return cudaErrorInvalidValue;
  const Tiling tiling = backward_tiling(p);
  if (tiling.tile_w * tiling.tile_h > kMaxTileRows) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * static_cast<size_t>(kPolyGateParamGrads * p.C + kMaxTileRows * kRowStats);
  return HK_DTYPE_SWITCH(p.dtype, T, [&] {
    poly_gate_bwd_kernel<T><<<static_cast<unsigned>(p.grid), kBwdThreads, smem, stream>>>(p, tiling);
    return cudaGetLastError();
  });
}

}  // namespace hadamard_kernels

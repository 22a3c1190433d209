// poly_sa kernels (DESIGN.md §3, Poly-SA):
//   m = sum over real tokens of (z w1) * (z w2) / count,   Y = alpha z + beta ((z * m) w3).
//
// Every kernel is a block GEMM with a custom prologue (how the A operand is read) and epilogue. A block of 256
// threads owns a tile of kRows = 64 token rows and kCols = 64 output columns; the contraction (C) is staged through
// shared memory in slices of kChunk = 32, so shared memory does not grow with C. The fp32 accumulators land in
// shared buffers and one element-wise pass forms the epilogue.
//   pool_fwd  (block: batch row b, column block, token split): for each token tile, both projections of the tile
//             (z read once per slice for both), then per column the sum over the tile's real tokens of p1 * p2,
//             kept in registers across tiles; the four row groups' sums are added in a fixed order and stored as
//             part[b, split, columns]. The projections and their product never reach device memory.
//   out_fwd   (block: 64 flat rows): A = z * m[row's batch] rounded to the input dtype; y = alpha z + beta acc.
//   out_bwd   (block: b, column block, split): gp = G w3^T; dz = alpha G + beta gp m, u = beta z m, and per column
//             the sums of gp * z (-> dm, dbeta) and G * z (-> dalpha) as part[0 / 1, b, split, columns].
//   pool_bwd  (block: 64 flat rows): both projections again; grad_p = [s p2 | s p1] on real tokens, 0 on padded.
// Sums over tokens: per thread in a fixed row order, then the four row groups in a fixed order, then (in Python)
// the splits by torch.sum: the same bits run to run, no atomics.
//
// Precision: float16/bfloat16 multiply on tensor cores (nvcuda::wmma m16n16k16, fp32 accumulate); float32 runs
// exact fp32 FMAs (no TF32) in a SIMT micro-kernel with the same shared-memory layout.
//
// HK_CPU_EMULATION (defined by tests/emulation/cuda_emulation.h) compiles this file with a host compiler: blocks
// run as fibers and tests/emulation/poly_sa_module.cpp supplies nvcuda::wmma, so the tests run this source on the
// CPU (tests/test_poly_sa_cuda.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/common.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/poly_sa.h"

namespace hadamard_kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;   // token rows of a tile
constexpr int kCols = 64;   // output columns of a tile
constexpr int kChunk = 32;  // contraction slice per shared-memory stage
constexpr int kGroups = kThreads / kCols;  // row groups of the per-column token sums

// Shared-memory layout. Row pads: 8 elements keep 16-bit rows a multiple of 16 bytes (wmma's ldm rule) with every
// 16 x 16 fragment 32-byte aligned; 1 float staggers the fp32 rows of the SIMT path.
template <typename T>
struct Layout {
  static constexpr int kPad = std::is_same_v<T, float> ? 1 : 8;
  static constexpr int kLdA = kChunk + kPad;  // A slice [kRows][kLdA]
  static constexpr int kLdB = kCols + kPad;   // B slice [kChunk][kLdB], B(l, c)
  static constexpr int kLdO = kCols + 4;      // fp32 accumulators [kRows][kLdO]
  static constexpr size_t kABytes = round_up_128(sizeof(T) * kRows * kLdA);
  static constexpr size_t kBBytes = round_up_128(sizeof(T) * kChunk * kLdB);
  static constexpr size_t kOBytes = round_up_128(sizeof(float) * kRows * kLdO);
  static constexpr size_t kRowBytes = round_up_128(sizeof(int64_t) * kRows);
  static constexpr size_t kBytes = kABytes + 2 * kBBytes + 2 * kOBytes + kRowBytes;
  static_assert(kBytes <= 96 * 1024, "fits the shared memory of every sm_8x/sm_90 GPU with room for two blocks");
};

template <typename T>
struct Smem {
  using L = Layout<T>;
  T* a;
  T* b[2];
  float* out[2];
  int64_t* row_batch;  // flat kernels: the batch row of each tile row
  __device__ __forceinline__ explicit Smem(unsigned char* base)
      : a(reinterpret_cast<T*>(base)),
        b{reinterpret_cast<T*>(base + L::kABytes), reinterpret_cast<T*>(base + L::kABytes + L::kBBytes)},
        out{reinterpret_cast<float*>(base + L::kABytes + 2 * L::kBBytes),
            reinterpret_cast<float*>(base + L::kABytes + 2 * L::kBBytes + L::kOBytes)},
        row_batch(reinterpret_cast<int64_t*>(base + L::kABytes + 2 * L::kBBytes + 2 * L::kOBytes)) {}
};

// NB accumulators of the block's [kRows, kCols] products, float16/bfloat16: warp w owns 16 x 16 tiles w and w + 8.
template <typename T, int NB>
struct TensorCoreAcc {
  using L = Layout<T>;
  static constexpr int kTilesN = kCols / 16;
  static constexpr int kPerWarp = kRows / 16 * kTilesN / kWarps;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[NB][kPerWarp];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int n = 0; n < NB; ++n) {
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) wmma::fill_fragment(c[n][i], 0.f);
    }
  }

  __device__ __forceinline__ void mma_chunk(const Smem<T>& sm) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int t = warp + i * kWarps, tm = t / kTilesN, tn = t % kTilesN;
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, sm.a + tm * 16 * L::kLdA + kk, L::kLdA);
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, sm.b[n] + kk * L::kLdB + tn * 16, L::kLdB);
          wmma::mma_sync(c[n][i], fa, fb, c[n][i]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(const Smem<T>& sm) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int n = 0; n < NB; ++n) {
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        const int t = warp + i * kWarps, tm = t / kTilesN, tn = t % kTilesN;
        wmma::store_matrix_sync(sm.out[n] + tm * 16 * L::kLdO + tn * 16, c[n][i], L::kLdO, wmma::mem_row_major);
      }
    }
  }
};

// float32: exact FMAs. Thread (tr, tc) = (tid / 16, tid % 16) owns rows 4 tr .. 4 tr + 3, columns 4 tc .. 4 tc + 3.
template <int NB>
struct SimtAcc {
  using L = Layout<float>;
  float c[NB][4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int n = 0; n < NB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) c[n][i][j] = 0.f;
      }
    }
  }

  __device__ __forceinline__ void mma_chunk(const Smem<float>& sm) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll 4
    for (int l = 0; l < kChunk; ++l) {
      float av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sm.a[(4 * tr + i) * L::kLdA + l];
#pragma unroll
      for (int n = 0; n < NB; ++n) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float bv = sm.b[n][l * L::kLdB + 4 * tc + j];
#pragma unroll
          for (int i = 0; i < 4; ++i) c[n][i][j] = fmaf(av[i], bv, c[n][i][j]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(const Smem<float>& sm) const {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int n = 0; n < NB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sm.out[n][(4 * tr + i) * L::kLdO + 4 * tc + j] = c[n][i][j];
      }
    }
  }
};

template <typename T, int NB>
using Acc = std::conditional_t<std::is_same_v<T, float>, SimtAcc<NB>, TensorCoreAcc<T, NB>>;

// sm.out[n] [kRows, kCols] (fp32) = A B_n with a contraction of length C:
//   A(r, l) = load_a(r, l) for l < C (the caller masks its rows; it is not called for l >= C);
//   B_n(l, c) = w_n[l * C + col0 + c], or with TRANSPOSED w_n[(col0 + c) * C + l]; 0 past C.
// Every thread of the block must call it. It ends with a barrier, so sm.out is ready to read.
template <typename T, int NB, bool TRANSPOSED, class LoadA>
__device__ __forceinline__ void block_gemm(const Smem<T>& sm, const LoadA& load_a, const T* w0, const T* w1,
                                           int64_t C, int64_t col0) {
  using L = Layout<T>;
  const T zero = from_float<T>(0.f);
  const T* w[2] = {w0, w1};
  Acc<T, NB> acc;
  acc.zero();
  for (int64_t l0 = 0; l0 < C; l0 += kChunk) {
    for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, l = e % kChunk;
      sm.a[r * L::kLdA + l] = l0 + l < C ? load_a(r, l0 + l) : zero;
    }
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      for (int e = threadIdx.x; e < kChunk * kCols; e += kThreads) {
        // Consecutive threads read consecutive addresses of w in both layouts.
        const int l = TRANSPOSED ? e % kChunk : e / kCols, c = TRANSPOSED ? e / kChunk : e % kCols;
        const int64_t k = l0 + l, col = col0 + c;
        T v = zero;
        if (k < C && col < C) v = TRANSPOSED ? w[n][col * C + k] : w[n][k * C + col];
        sm.b[n][l * L::kLdB + c] = v;
      }
    }
    __syncthreads();
    acc.mma_chunk(sm);
    __syncthreads();
  }
  acc.store(sm);
  __syncthreads();
}

// The token splits of a batch row: the grid's y extent (the emulation has no gridDim).
__device__ __forceinline__ int64_t num_splits(const PolySaParams& p) {
#if defined(HK_CPU_EMULATION)
  return (p.N + p.tokens_per_split - 1) / p.tokens_per_split;
#else
  (void)p;
  return gridDim.y;
#endif
}

__device__ __forceinline__ bool is_real(const PolySaParams& p, int64_t row) {
  return p.mask == nullptr || p.mask[row] != 0;
}

// Adds the kGroups per-thread sums of each column in a fixed order; the result is valid in threads < kCols.
// Uses (and ends by releasing) scratch, kThreads floats of shared memory.
__device__ __forceinline__ float sum_groups(float value, float* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x < kCols) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) total += scratch[g * kCols + threadIdx.x];
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) poly_sa_pool_fwd_kernel(const PolySaParams p) {
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T> sm(smem_raw);
  const int64_t n_col = (p.C + kCols - 1) / kCols;
  const int64_t b = blockIdx.x / n_col, col0 = blockIdx.x % n_col * kCols;
  const int64_t split = blockIdx.y, splits = num_splits(p);
  const int64_t t_begin = split * p.tokens_per_split;
  const int64_t t_end = t_begin + p.tokens_per_split < p.N ? t_begin + p.tokens_per_split : p.N;
  const T* z = static_cast<const T*>(p.z);
  const int c = threadIdx.x % kCols, group = threadIdx.x / kCols;
  float sum = 0.f;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kRows) {
    auto load_a = [&](int r, int64_t k) {
      return t0 + r < t_end ? z[(b * p.N + t0 + r) * p.z_row_stride + k] : from_float<T>(0.f);
    };
    block_gemm<T, 2, false>(sm, load_a, static_cast<const T*>(p.w1), static_cast<const T*>(p.w2), p.C, col0);
    for (int r = group; r < kRows; r += kGroups) {
      const bool real = t0 + r < t_end && is_real(p, b * p.N + t0 + r);
      sum += poly_sa_pool_term(real, sm.out[0][r * Layout<T>::kLdO + c], sm.out[1][r * Layout<T>::kLdO + c]);
    }
    __syncthreads();  // the next tile's GEMM overwrites sm.out
  }
  const float total = sum_groups(sum, sm.out[0]);
  if (threadIdx.x < kCols && col0 + c < p.C) p.part[(b * splits + split) * p.C + col0 + c] = total;
}

// The batch row of each of the tile's flat rows, for the A prologue and the epilogue (one division per row).
__device__ __forceinline__ void fill_row_batch(const PolySaParams& p, int64_t row0, int64_t* row_batch) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) row_batch[r] = (row0 + r) / p.N;
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) poly_sa_out_fwd_kernel(const PolySaParams p) {
  using L = Layout<T>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T> sm(smem_raw);
  const int64_t M = p.B * p.N;
  const int64_t n_col = (p.C + kCols - 1) / kCols;
  const int64_t row0 = blockIdx.x / n_col * kRows, col0 = blockIdx.x % n_col * kCols;
  const T* z = static_cast<const T*>(p.z);
  fill_row_batch(p, row0, sm.row_batch);
  auto load_a = [&](int r, int64_t k) {
    const int64_t row = row0 + r;
    if (row >= M) return from_float<T>(0.f);
    return from_float<T>(to_float(z[row * p.z_row_stride + k]) * p.m[sm.row_batch[r] * p.C + k]);
  };
  block_gemm<T, 1, false>(sm, load_a, static_cast<const T*>(p.w3), nullptr, p.C, col0);
  const float alpha = to_float(*static_cast<const T*>(p.alpha)), beta = to_float(*static_cast<const T*>(p.beta));
  T* y = static_cast<T*>(p.y);
  for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    const int64_t row = row0 + r, col = col0 + c;
    if (row < M && col < p.C) {
      const float zv = to_float(z[row * p.z_row_stride + col]);
      y[row * p.out_row_stride + col] = from_float<T>(poly_sa_output(alpha, zv, beta, sm.out[0][r * L::kLdO + c]));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) poly_sa_out_bwd_kernel(const PolySaParams p) {
  using L = Layout<T>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T> sm(smem_raw);
  const int64_t n_col = (p.C + kCols - 1) / kCols;
  const int64_t b = blockIdx.x / n_col, col0 = blockIdx.x % n_col * kCols;
  const int64_t split = blockIdx.y, splits = num_splits(p);
  const int64_t t_begin = split * p.tokens_per_split;
  const int64_t t_end = t_begin + p.tokens_per_split < p.N ? t_begin + p.tokens_per_split : p.N;
  const T* z = static_cast<const T*>(p.z);
  const T* g = static_cast<const T*>(p.grad_y);
  T* dz = static_cast<T*>(p.dz);
  T* u = static_cast<T*>(p.u);
  const int c = threadIdx.x % kCols, group = threadIdx.x / kCols;
  const int64_t col = col0 + c;
  const float m = col < p.C ? p.m[b * p.C + col] : 0.f;
  const float alpha = to_float(*static_cast<const T*>(p.alpha)), beta = to_float(*static_cast<const T*>(p.beta));
  float sum_q = 0.f, sum_a = 0.f;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kRows) {
    auto load_a = [&](int r, int64_t k) {
      return t0 + r < t_end ? g[(b * p.N + t0 + r) * p.g_row_stride + k] : from_float<T>(0.f);
    };
    block_gemm<T, 1, true>(sm, load_a, static_cast<const T*>(p.w3), nullptr, p.C, col0);
    if (col < p.C) {
      for (int r = group; r < kRows; r += kGroups) {
        if (t0 + r >= t_end) break;
        const int64_t row = b * p.N + t0 + r;
        const float zv = to_float(z[row * p.z_row_stride + col]), gv = to_float(g[row * p.g_row_stride + col]);
        const float gp = sm.out[0][r * L::kLdO + c];
        dz[row * p.out_row_stride + col] = from_float<T>(poly_sa_direct_grad(alpha, beta, gv, gp, m));
        u[row * p.out_row_stride + col] = from_float<T>(beta * zv * m);
        sum_q += gp * zv;
        sum_a += gv * zv;
      }
    }
    __syncthreads();
  }
  const float total_q = sum_groups(sum_q, sm.out[0]);
  const float total_a = sum_groups(sum_a, sm.out[0]);
  if (threadIdx.x < kCols && col < p.C) {
    const int64_t at = (b * splits + split) * p.C + col;
    p.part[at] = total_q;
    p.part[p.B * splits * p.C + at] = total_a;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) poly_sa_pool_bwd_kernel(const PolySaParams p) {
  using L = Layout<T>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T> sm(smem_raw);
  const int64_t M = p.B * p.N;
  const int64_t n_col = (p.C + kCols - 1) / kCols;
  const int64_t row0 = blockIdx.x / n_col * kRows, col0 = blockIdx.x % n_col * kCols;
  const T* z = static_cast<const T*>(p.z);
  fill_row_batch(p, row0, sm.row_batch);
  auto load_a = [&](int r, int64_t k) {
    return row0 + r < M ? z[(row0 + r) * p.z_row_stride + k] : from_float<T>(0.f);
  };
  block_gemm<T, 2, false>(sm, load_a, static_cast<const T*>(p.w1), static_cast<const T*>(p.w2), p.C, col0);
  T* grad_p = static_cast<T*>(p.grad_p);
  for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    const int64_t row = row0 + r, col = col0 + c;
    if (row < M && col < p.C) {
      const bool real = is_real(p, row);
      const float s = p.s[sm.row_batch[r] * p.C + col];
      const int i = r * L::kLdO + c;
      grad_p[row * 2 * p.C + col] = from_float<T>(poly_sa_pool_grad(real, s, sm.out[1][i]));
      grad_p[row * 2 * p.C + p.C + col] = from_float<T>(poly_sa_pool_grad(real, s, sm.out[0][i]));
    }
  }
}

// Host-side checks of what the kernels rely on; Python has already checked shapes and dtypes.
bool valid(const PolySaParams& p) {
  if (p.B < 1 || p.N < 1 || p.C < 1 || p.z == nullptr || p.z_row_stride < p.C) return false;
  const int64_t col_blocks = (p.C + kCols - 1) / kCols;
  return col_blocks * ((p.B * p.N + kRows - 1) / kRows) <= INT_MAX && col_blocks * p.B <= INT_MAX;
}

// Grid (B * column blocks, splits) of the token-reducing kernels, or false when tokens_per_split is unusable.
bool split_grid(const PolySaParams& p, dim3& grid) {
  if (p.tokens_per_split < 1 || p.part == nullptr) return false;
  const int64_t splits = (p.N + p.tokens_per_split - 1) / p.tokens_per_split;
  if (splits > 65535) return false;
  grid = dim3(static_cast<unsigned>((p.C + kCols - 1) / kCols * p.B), static_cast<unsigned>(splits));
  return true;
}

dim3 flat_grid(const PolySaParams& p) {
  return dim3(static_cast<unsigned>((p.C + kCols - 1) / kCols * ((p.B * p.N + kRows - 1) / kRows)));
}

template <typename T>
cudaError_t launch(void (*kernel)(const PolySaParams), const PolySaParams& p, dim3 grid, cudaStream_t stream) {
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, grid, kThreads, Layout<T>::kBytes, p);
#else
  // Above 48 KiB of dynamic shared memory a kernel has to opt in.
  HK_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(Layout<T>::kBytes)));
  kernel<<<grid, kThreads, Layout<T>::kBytes, stream>>>(p);
  return cudaGetLastError();
#endif
}

}  // namespace

cudaError_t launch_poly_sa_pool_fwd(const PolySaParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!valid(p) || !split_grid(p, grid) || p.w1 == nullptr || p.w2 == nullptr) return cudaErrorInvalidValue;
  return HK_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(&poly_sa_pool_fwd_kernel<T>, p, grid, stream); });
}

cudaError_t launch_poly_sa_out_fwd(const PolySaParams& p, cudaStream_t stream) {
  if (!valid(p) || p.w3 == nullptr || p.alpha == nullptr || p.beta == nullptr || p.m == nullptr || p.y == nullptr ||
      p.out_row_stride < p.C) {
    return cudaErrorInvalidValue;
  }
  return HK_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(&poly_sa_out_fwd_kernel<T>, p, flat_grid(p), stream); });
}

cudaError_t launch_poly_sa_out_bwd(const PolySaParams& p, cudaStream_t stream) {
  dim3 grid;
  if (!valid(p) || !split_grid(p, grid) || p.w3 == nullptr || p.alpha == nullptr || p.beta == nullptr ||
      p.m == nullptr || p.grad_y == nullptr || p.g_row_stride < p.C || p.dz == nullptr || p.u == nullptr ||
      p.out_row_stride < p.C) {
    return cudaErrorInvalidValue;
  }
  return HK_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(&poly_sa_out_bwd_kernel<T>, p, grid, stream); });
}

cudaError_t launch_poly_sa_pool_bwd(const PolySaParams& p, cudaStream_t stream) {
  if (!valid(p) || p.w1 == nullptr || p.w2 == nullptr || p.s == nullptr || p.grad_p == nullptr) {
    return cudaErrorInvalidValue;
  }
  return HK_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(&poly_sa_pool_bwd_kernel<T>, p, flat_grid(p), stream); });
}

}  // namespace hadamard_kernels

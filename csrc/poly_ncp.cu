// poly_ncp forward and backward kernels (DESIGN.md §1, NCP):
//   y_1 = A_1 x + a_1,  y_n = (A_n x + a_n) * (S_n y_{n-1} + s_n),  output y_N.
//
// Tiling. A block of 256 threads owns kRows rows and all k columns, k padded to KP in {32, 64, 128, 256}
// (kRows * KP <= 4096). Each degree is two block GEMMs with fp32 accumulators:
//   s_n = y_{n-1} S_n^T  (A operand: the y tile resident in shared memory)
//   a_n = x A_n^T        (A operand: x, staged through shared memory)
// with the weight streamed through shared memory in slices of kChunk along the contraction, so shared memory
// does not grow with d and holds at most a [KP, kChunk] slice of a weight. The accumulators land in fp32
// shared buffers and one elementwise pass forms y_n = (a_n + bias) * (s_n + bias): the N intermediate [M, k]
// tensors never reach device memory in the forward.
//
// Precision: float16/bfloat16 multiply on tensor cores (nvcuda::wmma m16n16k16, fp32 accumulate); y_{n-1}
// is rounded to the input dtype to be their operand, as in the Triton kernel. float32 runs exact fp32 FMAs
// (no TF32) in a SIMT micro-kernel with the same shared-memory layout.
//
// Backward (only the inputs are saved). Pass 1 reruns the chain and writes y_1..y_{N-1} to `ys`; pass 2 walks
// n = N..2 with g = dL/dy_n (fp32 in shared memory), recomputing a_n, s_n from x and ys (the last degree's are
// still in shared memory):  grad_a_n = g * s_n,  grad_s_n = g * a_n,  g <- grad_s_n @ S_n;  grad_a_1 = g.
// The weight and input gradients are GEMMs on grad_a, grad_s and ys, done in Python (poly_ncp/common.py).
//
// Per-degree path (k > kPolyNcpMaxK, or per_degree): one launch per degree, a block owning a [64, 64] tile of
// y_n whose two GEMMs loop over d and over k, with y_{n-1} read from device memory (input dtype, the rounding the
// fast path applies too). The forward alternates between y and an [M, k] workspace; the backward reruns the chain
// into ys, then walks n = N..1 with g = dL/dy_n read from grad_y or formed as grad_s_{n+1} S_{n+1} (a third GEMM
// per tile, on the grad_s slab the launch before wrote) and writes the same grad_a, grad_s as the fast path.
//
// HK_CPU_EMULATION (defined by tests/emulation/cuda_emulation.h) compiles this file with a host compiler: blocks
// run as fibers and tests/emulation/wmma_emulation.h supplies nvcuda::wmma, so the tests run this source on the CPU
// (tests/test_poly_ncp_cuda.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/common.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/poly_ncp.h"

namespace hadamard_kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;  // slice of the contraction (d, or k for the S products) per shared-memory stage

constexpr int kWideCols = 64;  // columns of a per-degree tile (its rows: Layout<T, kWideCols>::kRows = 64)

// Shared-memory layout of one block. Row pads: 8 elements keep 16-bit rows a multiple of 16 bytes (wmma's
// ldm rule) with every 16 x 16 fragment 32-byte aligned; 1 float staggers the fp32 weight slice rows so the
// SIMT reads of 32 consecutive rows fall in 32 banks.
template <typename T, int KP>
struct Layout {
  static constexpr int kRows = KP >= 128 ? 4096 / KP : 64;
  static constexpr int kPad = std::is_same_v<T, float> ? 1 : 8;
  static constexpr int kLdX = kChunk + kPad;  // x slice  [kRows][kLdX]
  static constexpr int kLdW = kChunk + kPad;  // weight slice W[o, l0 + l] at [o][l], [KP][kLdW]
  static constexpr int kLdWT = KP + kPad;     // weight slice W[l0 + l, o] at [l][o], [kChunk][kLdWT]
  static constexpr int kLdY = KP + kPad;      // y tile (the resident A operand) [kRows][kLdY]
  static constexpr int kLdF = KP + 4;         // fp32 a, s, g tiles [kRows][kLdF]
  static constexpr size_t kXBytes = round_up_128(sizeof(T) * kRows * kLdX);
  static constexpr size_t kWBytes = round_up_128(sizeof(T) * max_of(KP * kLdW, kChunk * kLdWT));
  static constexpr size_t kYBytes = round_up_128(sizeof(T) * kRows * kLdY);
  static constexpr size_t kFBytes = round_up_128(sizeof(float) * kRows * kLdF);
  static constexpr size_t kBytes = kXBytes + kWBytes + kYBytes + 3 * kFBytes;
  static_assert(kRows % kWarps == 0 && kRows % 16 == 0, "row split over warps and 16-row MMA tiles");
  static_assert(kBytes <= 160 * 1024, "within the 163 KiB a block may opt into on sm_80");
};

template <typename T, int KP>
struct Smem {
  using L = Layout<T, KP>;
  T* x;
  T* w;
  T* y;
  float* a;  // A_n x (no bias)
  float* s;  // S_n y_{n-1} (no bias)
  float* g;  // backward: dL/dy_n
  __device__ __forceinline__ explicit Smem(unsigned char* base)
      : x(reinterpret_cast<T*>(base)),
        w(reinterpret_cast<T*>(base + L::kXBytes)),
        y(reinterpret_cast<T*>(base + L::kXBytes + L::kWBytes)),
        a(reinterpret_cast<float*>(base + L::kXBytes + L::kWBytes + L::kYBytes)),
        s(a + L::kFBytes / sizeof(float)),
        g(s + L::kFBytes / sizeof(float)) {}
};

// Accumulators of the block's [kRows, KP] product, float16/bfloat16: warp w owns 16 x 16 tiles w, w + 8, ...
template <typename T, int KP>
struct TensorCoreAcc {
  using L = Layout<T, KP>;
  static constexpr int kTilesN = KP / 16;
  static constexpr int kTiles = L::kRows / 16 * kTilesN;
  static constexpr int kPerWarp = kTiles / kWarps;
  static_assert(kTiles % kWarps == 0, "every warp owns the same number of tiles");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[kPerWarp];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) wmma::fill_fragment(c[i], 0.f);
  }

  // c += A[:, 0:kChunk] B, A row-major at `a` (row stride lda), B(l, o) the weight slice `w`.
  template <bool TRANSPOSED>
  __device__ __forceinline__ void mma_chunk(const T* a, int lda, const T* w) {
    using BLayout = std::conditional_t<TRANSPOSED, wmma::row_major, wmma::col_major>;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int t = warp + i * kWarps, tm = t / kTilesN, tn = t % kTilesN;
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
        wmma::load_matrix_sync(fa, a + tm * 16 * lda + kk, lda);
        if constexpr (TRANSPOSED) {
          wmma::load_matrix_sync(fb, w + kk * L::kLdWT + tn * 16, L::kLdWT);
        } else {
          wmma::load_matrix_sync(fb, w + tn * 16 * L::kLdW + kk, L::kLdW);
        }
        wmma::mma_sync(c[i], fa, fb, c[i]);
      }
    }
  }

  __device__ __forceinline__ void store(float* out) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int t = warp + i * kWarps, tm = t / kTilesN, tn = t % kTilesN;
      wmma::store_matrix_sync(out + tm * 16 * L::kLdF + tn * 16, c[i], L::kLdF, wmma::mem_row_major);
    }
  }
};

// float32: exact FMAs. Warp w owns rows w, w + 8, ...; lane j owns columns j, j + 32, ...
template <int KP>
struct SimtAcc {
  using L = Layout<float, KP>;
  static constexpr int kR = L::kRows / kWarps;
  static constexpr int kC = KP / 32;
  float c[kR][kC];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kR; ++i) {
#pragma unroll
      for (int j = 0; j < kC; ++j) c[i][j] = 0.f;
    }
  }

  template <bool TRANSPOSED>
  __device__ __forceinline__ void mma_chunk(const float* a, int lda, const float* w) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll 4
    for (int l = 0; l < kChunk; ++l) {
      float av[kR], bv[kC];
#pragma unroll
      for (int i = 0; i < kR; ++i) av[i] = a[(warp + i * kWarps) * lda + l];  // one address per warp
#pragma unroll
      for (int j = 0; j < kC; ++j) {
        const int o = lane + 32 * j;
        bv[j] = TRANSPOSED ? w[l * L::kLdWT + o] : w[o * L::kLdW + l];
      }
#pragma unroll
      for (int i = 0; i < kR; ++i) {
#pragma unroll
        for (int j = 0; j < kC; ++j) c[i][j] = fmaf(av[i], bv[j], c[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(float* out) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kR; ++i) {
#pragma unroll
      for (int j = 0; j < kC; ++j) out[(warp + i * kWarps) * L::kLdF + lane + 32 * j] = c[i][j];
    }
  }
};

template <typename T, int KP>
using Acc = std::conditional_t<std::is_same_v<T, float>, SimtAcc<KP>, TensorCoreAcc<T, KP>>;

// out [kRows, KP] (fp32, shared) = A B with a contraction of length L, where
//   A = rows row0 .. row0 + kRows of `a` (global, rows lda apart) staged through shared memory (A_GLOBAL), else
//       the resident y tile sm.y;
//   B(l, o) = w[o * ld_w + l] (W row-major [cols, L], B = W^T) or, when TRANSPOSED, w[l * ld_w + o] (B = W).
// Rows past M, columns o >= cols and l past L read as 0. Every thread of the block must call it; it begins by
// overwriting the staging buffers and ends with a barrier before the (unsynchronised) store to `out`.
template <typename T, int KP, bool A_GLOBAL, bool TRANSPOSED>
__device__ __forceinline__ void block_gemm(const Smem<T, KP>& sm, const T* a, int64_t lda, int64_t M, int64_t row0,
                                           const T* w, int64_t ld_w, int64_t L, int64_t cols, float* out) {
  using Lay = Layout<T, KP>;
  const T zero = from_float<T>(0.f);
  Acc<T, KP> acc;
  acc.zero();
  for (int64_t l0 = 0; l0 < L; l0 += kChunk) {
    if constexpr (A_GLOBAL) {
      for (int e = threadIdx.x; e < Lay::kRows * kChunk; e += kThreads) {
        const int r = e / kChunk, l = e % kChunk;
        const int64_t row = row0 + r, col = l0 + l;
        sm.x[r * Lay::kLdX + l] = (row < M && col < L) ? a[row * lda + col] : zero;
      }
    }
    if constexpr (TRANSPOSED) {
      for (int e = threadIdx.x; e < kChunk * KP; e += kThreads) {
        const int l = e / KP, o = e % KP;
        sm.w[l * Lay::kLdWT + o] = (l0 + l < L && o < cols) ? w[(l0 + l) * ld_w + o] : zero;
      }
    } else {
      for (int e = threadIdx.x; e < KP * kChunk; e += kThreads) {
        const int o = e / kChunk, l = e % kChunk;
        sm.w[o * Lay::kLdW + l] = (o < cols && l0 + l < L) ? w[o * ld_w + l0 + l] : zero;
      }
    }
    __syncthreads();
    if constexpr (A_GLOBAL) {
      acc.template mma_chunk<TRANSPOSED>(sm.x, Lay::kLdX, sm.w);
    } else {
      acc.template mma_chunk<TRANSPOSED>(sm.y + l0, Lay::kLdY, sm.w);  // L <= KP: l0 + kChunk <= KP
    }
    __syncthreads();
  }
  acc.store(out);
}

template <typename T>
__device__ __forceinline__ float bias_at(const void* bias, int64_t n, int64_t k, int64_t c) {
  return bias != nullptr ? to_float(static_cast<const T*>(bias)[n * k + c]) : 0.f;
}

// sm.a = x A_n^T for the tile's rows from row0 and its `cols` columns from col0 (no bias).
template <typename T, int KP>
__device__ __forceinline__ void a_product(const PolyNcpParams& p, const Smem<T, KP>& sm, int64_t row0, int64_t col0,
                                          int64_t cols, int64_t n) {
  block_gemm<T, KP, true, false>(sm, static_cast<const T*>(p.x), p.x_row_stride, p.M, row0,
                                 static_cast<const T*>(p.a_weight) + (n * p.k + col0) * p.d, p.d, p.d, cols, sm.a);
}

// The block's two GEMMs of degree n (0-based) on the fast path: sm.s = y_{n-1} S_n^T (n > 0, y_{n-1} resident in
// sm.y) and sm.a = x A_n^T, then a barrier.
template <typename T, int KP>
__device__ __forceinline__ void degree_products(const PolyNcpParams& p, const Smem<T, KP>& sm, int64_t row0,
                                                int64_t n) {
  if (n > 0) {
    block_gemm<T, KP, false, false>(sm, nullptr, 0, p.M, row0,
                                    static_cast<const T*>(p.s_weight) + (n - 1) * p.k * p.k, p.k, p.k, p.k, sm.s);
  }
  a_product<T, KP>(p, sm, row0, 0, p.k, n);
  __syncthreads();
}

// y_n at tile element (r, c), column col0 + c < k, from the accumulators of degree n.
template <typename T, int KP>
__device__ __forceinline__ float chain_value(const PolyNcpParams& p, const Smem<T, KP>& sm, int64_t n, int r, int c,
                                             int64_t col0 = 0) {
  const int i = r * Layout<T, KP>::kLdF + c;
  const float a = sm.a[i] + bias_at<T>(p.a_bias, n, p.k, col0 + c);
  return n == 0 ? a : a * (sm.s[i] + bias_at<T>(p.s_bias, n - 1, p.k, col0 + c));
}

template <typename T, int KP>
__global__ void __launch_bounds__(kThreads) poly_ncp_fwd_kernel(const PolyNcpParams p) {
  using Lay = Layout<T, KP>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T, KP> sm(smem_raw);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Lay::kRows;
  T* out = static_cast<T*>(p.y);

  for (int64_t n = 0; n < p.N; ++n) {
    degree_products<T, KP>(p, sm, row0, n);
    const bool last = n + 1 == p.N;
    for (int e = threadIdx.x; e < Lay::kRows * KP; e += kThreads) {
      const int r = e / KP, c = e % KP;
      const int64_t row = row0 + r;
      // Padded columns stay exactly 0: they meet S_{n+1}'s zero-filled slice in the next product.
      const float y = c < p.k ? chain_value<T, KP>(p, sm, n, r, c) : 0.f;
      if (!last) {
        sm.y[r * Lay::kLdY + c] = from_float<T>(y);
      } else if (row < p.M && c < p.k) {
        out[row * p.y_row_stride + c] = from_float<T>(y);
      }
    }
    __syncthreads();  // sm.y complete before the next S product reads it
  }
}

template <typename T, int KP>
__global__ void __launch_bounds__(kThreads) poly_ncp_bwd_kernel(const PolyNcpParams p) {
  using Lay = Layout<T, KP>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T, KP> sm(smem_raw);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Lay::kRows;
  const int64_t slab = p.M * p.k;  // one degree of grad_s and ys
  T* ys = static_cast<T*>(p.ys);
  T* grad_a = static_cast<T*>(p.grad_a);
  T* grad_s = static_cast<T*>(p.grad_s);
  const T* grad_y = static_cast<const T*>(p.grad_y);

  // Pass 1: the forward chain, parking y_n for n < N-1 (0-based). Ends with a_{N-1}, s_{N-1} in sm.a, sm.s.
  for (int64_t n = 0; n < p.N; ++n) {
    degree_products<T, KP>(p, sm, row0, n);
    if (n + 1 == p.N) break;
    for (int e = threadIdx.x; e < Lay::kRows * KP; e += kThreads) {
      const int r = e / KP, c = e % KP;
      const int64_t row = row0 + r;
      const T y = from_float<T>(c < p.k ? chain_value<T, KP>(p, sm, n, r, c) : 0.f);
      sm.y[r * Lay::kLdY + c] = y;
      if (row < p.M && c < p.k) ys[n * slab + row * p.k + c] = y;
    }
    __syncthreads();
  }

  // Pass 2: g = dL/dy_n for n = N-1 .. 1 (0-based).
  for (int e = threadIdx.x; e < Lay::kRows * KP; e += kThreads) {
    const int r = e / KP, c = e % KP;
    const int64_t row = row0 + r;
    sm.g[r * Lay::kLdF + c] = (row < p.M && c < p.k) ? to_float(grad_y[row * p.y_row_stride + c]) : 0.f;
  }
  __syncthreads();
  for (int64_t n = p.N - 1; n >= 1; --n) {
    if (n + 1 < p.N) {
      // Recompute from the parked y_{n-1}: the same rounded values pass 1 multiplied.
      for (int e = threadIdx.x; e < Lay::kRows * KP; e += kThreads) {
        const int r = e / KP, c = e % KP;
        const int64_t row = row0 + r;
        sm.y[r * Lay::kLdY + c] = (row < p.M && c < p.k) ? ys[(n - 1) * slab + row * p.k + c] : from_float<T>(0.f);
      }
      __syncthreads();
      degree_products<T, KP>(p, sm, row0, n);
    }
    for (int e = threadIdx.x; e < Lay::kRows * KP; e += kThreads) {
      const int r = e / KP, c = e % KP;
      const int64_t row = row0 + r;
      const int i = r * Lay::kLdF + c;
      float d_a = 0.f, d_s = 0.f;
      if (c < p.k) {
        const float g = sm.g[i];
        d_a = g * (sm.s[i] + bias_at<T>(p.s_bias, n - 1, p.k, c));
        d_s = g * (sm.a[i] + bias_at<T>(p.a_bias, n, p.k, c));
      }
      const T d_s_t = from_float<T>(d_s);
      sm.y[r * Lay::kLdY + c] = d_s_t;  // the A operand of g <- grad_s_n S_n
      if (row < p.M && c < p.k) {
        grad_a[(row * p.N + n) * p.k + c] = from_float<T>(d_a);
        grad_s[(n - 1) * slab + row * p.k + c] = d_s_t;
      }
    }
    __syncthreads();
    block_gemm<T, KP, false, true>(sm, nullptr, 0, p.M, row0, static_cast<const T*>(p.s_weight) + (n - 1) * p.k * p.k,
                                   p.k, p.k, p.k, sm.g);
    __syncthreads();
  }
  for (int e = threadIdx.x; e < Lay::kRows * KP; e += kThreads) {
    const int r = e / KP, c = e % KP;
    const int64_t row = row0 + r;
    if (row < p.M && c < p.k) grad_a[row * p.N * p.k + c] = from_float<T>(sm.g[r * Lay::kLdF + c]);
  }
}

// ---- the per-degree path
// One launch of the per-degree path: degree n (0-based) of the chain.
struct DegreeStep {
  PolyNcpParams p;
  int64_t n = 0;
  const void* prev = nullptr;  // y_{n-1} [M, k], rows prev_row_stride apart (n > 0)
  int64_t prev_row_stride = 0;
  void* out = nullptr;  // forward: y_n [M, k], rows out_row_stride apart
  int64_t out_row_stride = 0;
};

// The tile of block b: rows from row0, columns col0 .. col0 + cols (a 1D grid, the column tiles of a row block
// adjacent so they share its rows in L2).
struct WideTile {
  int64_t row0, col0, cols;
};

template <typename T>
__device__ __forceinline__ WideTile wide_tile(const PolyNcpParams& p) {
  const int64_t col_tiles = (p.k + kWideCols - 1) / kWideCols;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) % col_tiles * kWideCols;
  return {static_cast<int64_t>(blockIdx.x) / col_tiles * Layout<T, kWideCols>::kRows, col0,
          p.k - col0 < kWideCols ? p.k - col0 : kWideCols};
}

// sm.s = y_{n-1} S_n^T for the tile (n > 0; y_{n-1} = s.prev), then sm.a = x A_n^T; then a barrier.
template <typename T>
__device__ __forceinline__ void wide_products(const DegreeStep& s, const Smem<T, kWideCols>& sm, const WideTile& t) {
  const PolyNcpParams& p = s.p;
  if (s.n > 0) {
    block_gemm<T, kWideCols, true, false>(sm, static_cast<const T*>(s.prev), s.prev_row_stride, p.M, t.row0,
                                          static_cast<const T*>(p.s_weight) + ((s.n - 1) * p.k + t.col0) * p.k, p.k,
                                          p.k, t.cols, sm.s);
  }
  a_product<T, kWideCols>(p, sm, t.row0, t.col0, t.cols, s.n);
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) poly_ncp_degree_fwd_kernel(const DegreeStep s) {
  using Lay = Layout<T, kWideCols>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T, kWideCols> sm(smem_raw);
  const PolyNcpParams& p = s.p;
  const WideTile t = wide_tile<T>(p);
  wide_products<T>(s, sm, t);
  T* out = static_cast<T*>(s.out);
  for (int e = threadIdx.x; e < Lay::kRows * kWideCols; e += kThreads) {
    const int r = e / kWideCols, c = e % kWideCols;
    const int64_t row = t.row0 + r;
    if (row < p.M && c < t.cols) {
      out[row * s.out_row_stride + t.col0 + c] = from_float<T>(chain_value<T, kWideCols>(p, sm, s.n, r, c, t.col0));
    }
  }
}

// Degree n of the backward walk: g = dL/dy_n is grad_y (n = N-1) or grad_s_{n+1} S_{n+1}; writes
// grad_a_n = g * s_n and grad_s_n = g * a_n (n > 0), or grad_a_1 = g (n = 0).
template <typename T>
__global__ void __launch_bounds__(kThreads) poly_ncp_degree_bwd_kernel(const DegreeStep s) {
  using Lay = Layout<T, kWideCols>;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  const Smem<T, kWideCols> sm(smem_raw);
  const PolyNcpParams& p = s.p;
  const WideTile t = wide_tile<T>(p);
  const int64_t slab = p.M * p.k;  // one degree of grad_s and ys
  if (s.n == p.N - 1) {
    const T* grad_y = static_cast<const T*>(p.grad_y);
    for (int e = threadIdx.x; e < Lay::kRows * kWideCols; e += kThreads) {
      const int r = e / kWideCols, c = e % kWideCols;
      const int64_t row = t.row0 + r;
      sm.g[r * Lay::kLdF + c] = (row < p.M && c < t.cols) ? to_float(grad_y[row * p.y_row_stride + t.col0 + c]) : 0.f;
    }
    // The stores above are ordered before their reads by the barriers inside wide_products (or the one below).
  } else {
    // B(l, o) = S_{n+1}[l, col0 + o]: S itself, not its transpose.
    block_gemm<T, kWideCols, true, true>(sm, static_cast<const T*>(p.grad_s) + s.n * slab, p.k, p.M, t.row0,
                                         static_cast<const T*>(p.s_weight) + s.n * p.k * p.k + t.col0, p.k, p.k,
                                         t.cols, sm.g);
  }
  if (s.n > 0) {
    wide_products<T>(s, sm, t);
  } else {
    __syncthreads();
  }
  T* grad_a = static_cast<T*>(p.grad_a);
  T* grad_s = static_cast<T*>(p.grad_s);
  for (int e = threadIdx.x; e < Lay::kRows * kWideCols; e += kThreads) {
    const int r = e / kWideCols, c = e % kWideCols;
    const int64_t row = t.row0 + r, col = t.col0 + c;
    if (row >= p.M || c >= t.cols) continue;
    const int i = r * Lay::kLdF + c;
    const float g = sm.g[i];
    if (s.n > 0) {
      grad_a[(row * p.N + s.n) * p.k + col] = from_float<T>(g * (sm.s[i] + bias_at<T>(p.s_bias, s.n - 1, p.k, col)));
      grad_s[(s.n - 1) * slab + row * p.k + col] = from_float<T>(g * (sm.a[i] + bias_at<T>(p.a_bias, s.n, p.k, col)));
    } else {
      grad_a[row * p.N * p.k + col] = from_float<T>(g);
    }
  }
}

// Calls f(std::integral_constant<int, KP>) for the padded width of k (k <= kPolyNcpMaxK checked before).
template <class F>
cudaError_t padded_k_switch(int64_t k, F&& f) {
  static_assert(kPolyNcpMaxK == 256, "the widths below end at kPolyNcpMaxK");
  if (k <= 32) return f(std::integral_constant<int, 32>{});
  if (k <= 64) return f(std::integral_constant<int, 64>{});
  if (k <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// Host-side checks of what the kernels rely on; Python has already checked shapes and dtypes.
bool valid(const PolyNcpParams& p) {
  if (p.M < 1 || p.d < 1 || p.k < 1 || p.N < 1) return false;
  if (p.x == nullptr || p.a_weight == nullptr || (p.N > 1 && p.s_weight == nullptr)) return false;
  // One block per kRows >= 16 rows (per-degree path: per 64 x 64 tile) in a 1D grid.
  return (p.M + 15) / 16 <= INT_MAX && (p.M + 63) / 64 * ((p.k + kWideCols - 1) / kWideCols) <= INT_MAX;
}

bool per_degree(const PolyNcpParams& p) { return p.per_degree || p.k > kPolyNcpMaxK; }

template <typename Params>
cudaError_t launch_kernel(void (*kernel)(const Params), int64_t blocks, size_t smem, const Params& params,
                          cudaStream_t stream) {
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, dim3(static_cast<unsigned>(blocks)), kThreads, smem, params);
#else
  // Above 48 KiB of dynamic shared memory a kernel has to opt in.
  HK_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(params);
  return cudaGetLastError();
#endif
}

template <typename T, int KP, bool BACKWARD>
cudaError_t launch(const PolyNcpParams& p, cudaStream_t stream) {
  using Lay = Layout<T, KP>;
  void (*kernel)(const PolyNcpParams) = BACKWARD ? &poly_ncp_bwd_kernel<T, KP> : &poly_ncp_fwd_kernel<T, KP>;
  return launch_kernel(kernel, (p.M + Lay::kRows - 1) / Lay::kRows, Lay::kBytes, p, stream);
}

// The per-degree path: the forward chain into `outputs` (degree n into outputs(n), an [M, k] buffer with rows
// stride(n) apart), n = 0 .. degrees - 1.
template <typename T, class Out, class Stride>
cudaError_t degree_chain(const PolyNcpParams& p, int64_t degrees, Out outputs, Stride stride, cudaStream_t stream) {
  using Lay = Layout<T, kWideCols>;
  const int64_t blocks = (p.M + Lay::kRows - 1) / Lay::kRows * ((p.k + kWideCols - 1) / kWideCols);
  for (int64_t n = 0; n < degrees; ++n) {
    DegreeStep step{p, n, n > 0 ? outputs(n - 1) : nullptr, n > 0 ? stride(n - 1) : 0, outputs(n), stride(n)};
    HK_RETURN_IF_ERROR(launch_kernel(&poly_ncp_degree_fwd_kernel<T>, blocks, Lay::kBytes, step, stream));
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t degree_fwd(const PolyNcpParams& p, cudaStream_t stream) {
  // y and the workspace alternate so that y_N lands in y.
  auto output = [&](int64_t n) { return (p.N - 1 - n) % 2 == 0 ? p.y : p.workspace; };
  auto stride = [&](int64_t n) { return (p.N - 1 - n) % 2 == 0 ? p.y_row_stride : p.k; };
  return degree_chain<T>(p, p.N, output, stride, stream);
}

template <typename T>
cudaError_t degree_bwd(const PolyNcpParams& p, cudaStream_t stream) {
  using Lay = Layout<T, kWideCols>;
  T* ys = static_cast<T*>(p.ys);
  const int64_t slab = p.M * p.k;
  HK_RETURN_IF_ERROR(degree_chain<T>(
      p, p.N - 1, [&](int64_t n) { return static_cast<void*>(ys + n * slab); }, [&](int64_t) { return p.k; },
      stream));
  const int64_t blocks = (p.M + Lay::kRows - 1) / Lay::kRows * ((p.k + kWideCols - 1) / kWideCols);
  for (int64_t n = p.N - 1; n >= 0; --n) {
    DegreeStep step{p, n, n > 0 ? ys + (n - 1) * slab : nullptr, p.k, nullptr, 0};
    HK_RETURN_IF_ERROR(launch_kernel(&poly_ncp_degree_bwd_kernel<T>, blocks, Lay::kBytes, step, stream));
  }
  return cudaSuccess;
}

template <bool BACKWARD>
cudaError_t dispatch(const PolyNcpParams& p, cudaStream_t stream) {
  return HK_DTYPE_SWITCH(p.dtype, T, [&] {
    if (per_degree(p)) return BACKWARD ? degree_bwd<T>(p, stream) : degree_fwd<T>(p, stream);
    return padded_k_switch(p.k, [&](auto kp) { return launch<T, decltype(kp)::value, BACKWARD>(p, stream); });
  });
}

}  // namespace

cudaError_t launch_poly_ncp_fwd(const PolyNcpParams& p, cudaStream_t stream) {
  if (!valid(p) || p.y == nullptr) return cudaErrorInvalidValue;
  if (per_degree(p) && p.N > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  return dispatch<false>(p, stream);
}

cudaError_t launch_poly_ncp_bwd(const PolyNcpParams& p, cudaStream_t stream) {
  if (!valid(p) || p.grad_y == nullptr || p.grad_a == nullptr) return cudaErrorInvalidValue;
  if (p.N > 1 && (p.grad_s == nullptr || p.ys == nullptr)) return cudaErrorInvalidValue;
  return dispatch<true>(p, stream);
}

}  // namespace hadamard_kernels

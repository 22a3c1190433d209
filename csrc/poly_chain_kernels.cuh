// poly_chain forward and backward kernels (DESIGN.md §1), private to csrc/. The templates are instantiated one
// dtype per translation unit (poly_chain_{f32,f16,bf16}.cu) so the build compiles them in parallel;
// poly_chain.cu checks the params and picks the dtype.
//
// Tiling. A block of 128 threads (4 warps as 2 x 2) owns a 64 x 64 tile of the [M, k] output: 64 rows of x and
// 64 output columns, i.e. 64 rows of every W_n. For n = 0..N-1 it computes z_n for that tile over d in
// chunks of 32, staged in shared memory with two stages (the next chunk is read into registers while the
// tensor cores work on the current one), then applies bias, activation and the chain in registers: the N
// [M, k] intermediates never reach device memory.
//
// Every thread holds 32 elements of the tile, laid out as the fp32 accumulators of mma.m16n8k16 (each warp
// owns a 32 x 32 sub-tile = 2 x 4 MMA tiles of 16 x 8). float16/bfloat16 use mma.sync with fp32
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
#include "hadamard_kernels/mma_sync.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/poly_chain.h"

namespace hadamard_kernels {
namespace poly_chain_detail {


constexpr int kThreads = 128;
constexpr int kTileM = 64;   // rows of x per block
constexpr int kTileN = 64;   // output columns (rows of each W_n) per block
constexpr int kChunk = 32;   // slice of d per shared-memory stage
constexpr int kWarpTile = 32;
constexpr int kPerThread = kTileM * kTileN / kThreads;  // 32 accumulators per thread
static_assert(kTileM == 2 * kWarpTile && kTileN == 2 * kWarpTile && kThreads == 4 * 32, "2 x 2 warps");

// Raw storage type of an element, and the shared-memory row padding (in elements) that keeps the
// fragment reads free of bank conflicts: rows of 40 halves (80 B) put the 8 rows an ldmatrix phase reads in
// 8 distinct 4-bank groups; rows of 36 floats put rows g = 0..7 in banks 4g and rows 2t in banks 8t.
template <typename T>
struct Elem {
  using Bits = uint16_t;
  static constexpr int kPad = 8;
};
template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr int kPad = 4;
};

template <typename T>
struct SharedTiles {
  using Bits = typename Elem<T>::Bits;
  static constexpr int kStride = kChunk + Elem<T>::kPad;  // elements; a multiple of 16 bytes
  alignas(16) Bits x[2][kTileM * kStride];
  alignas(16) Bits w[2][kTileN * kStride];
};

// One thread's share of a [64, kChunk] tile in flight from global to shared memory, as 16-byte vectors.
template <typename T>
struct StagedTile {
  using Bits = typename Elem<T>::Bits;
  static constexpr int kVec = 16 / sizeof(T);                           // elements per vector
  static constexpr int kVecsPerRow = kChunk / kVec;
  static constexpr int kVecs = kTileM * kChunk / (kVec * kThreads);     // vectors per thread
  static_assert(kTileM == kTileN && kVecs * kVec * kThreads == kTileM * kChunk, "tile split");
  union {
    uint4 v[kVecs];
    Bits e[kVecs * kVec];
  };
};

// Stores two adjacent elements; dst must be aligned to 2 * sizeof(T).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
  if constexpr (std::is_same_v<T, float>) *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  else if constexpr (std::is_same_v<T, __half>) *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  else *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// Reads rows [row0, row0 + 64) x columns [col0, col0 + kChunk) of a row-major matrix with `rows` rows,
// `cols` columns and row stride `ld`; elements outside it read as 0, so tails add nothing to the dot products.
// `vec`: 16-byte loads are legal (base 16-byte aligned and ld, cols multiples of kVec); else scalar loads.
template <typename T>
__device__ __forceinline__ void load_tile(StagedTile<T>& s, const T* base, int64_t row0, int64_t rows,
                                          int64_t col0, int64_t cols, int64_t ld, bool vec) {
  using Stage = StagedTile<T>;
  using Bits = typename Stage::Bits;
  const Bits* src = reinterpret_cast<const Bits*>(base);
#pragma unroll
  for (int i = 0; i < Stage::kVecs; ++i) {
    const int v = threadIdx.x + i * kThreads;  // consecutive threads take consecutive vectors of a row
    const int64_t row = row0 + v / Stage::kVecsPerRow;
    const int64_t col = col0 + (v % Stage::kVecsPerRow) * Stage::kVec;
    if (vec) {
      s.v[i] = (row < rows && col < cols) ? *reinterpret_cast<const uint4*>(src + row * ld + col)
                                          : make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
      for (int e = 0; e < Stage::kVec; ++e) {
        s.e[i * Stage::kVec + e] = (row < rows && col + e < cols) ? src[row * ld + col + e] : Bits(0);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_tile(typename Elem<T>::Bits* dst, const StagedTile<T>& s) {
  using Stage = StagedTile<T>;
#pragma unroll
  for (int i = 0; i < Stage::kVecs; ++i) {
    const int v = threadIdx.x + i * kThreads;
    const int row = v / Stage::kVecsPerRow;
    const int col = (v % Stage::kVecsPerRow) * Stage::kVec;
    *reinterpret_cast<uint4*>(dst + row * SharedTiles<T>::kStride + col) = s.v[i];
  }
}

// Where accumulator r (0..31) of this thread sits in the block's 64 x 64 tile: r = (mt * 4 + nt) * 4 + e
// is element e of MMA tile (mt, nt) of the warp's 32 x 32 sub-tile (mma.m16n8k16 C layout: e = 0, 1 on row
// lane / 4, e = 2, 3 eight rows below; columns 2 * (lane % 4) + e % 2).
struct Fragment {
  int row_base, col_base;
  __device__ __forceinline__ Fragment() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    row_base = (warp / 2) * kWarpTile + lane / 4;
    col_base = (warp % 2) * kWarpTile + (lane % 4) * 2;
  }
  __device__ __forceinline__ int row(int r) const { return row_base + (r / 16) * 16 + ((r % 4) / 2) * 8; }
  __device__ __forceinline__ int col(int r) const { return col_base + ((r / 4) % 4) * 8 + r % 2; }
};

// acc += x_tile (64 x kChunk) @ w_tile (64 x kChunk)^T for this thread's 32 elements.
template <typename T>
__device__ __forceinline__ void multiply_chunk(const typename Elem<T>::Bits* xs, const typename Elem<T>::Bits* ws,
                                               float (&acc)[kPerThread]) {
  constexpr int kStride = SharedTiles<T>::kStride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / 2) * kWarpTile, warp_col = (warp % 2) * kWarpTile;
  if constexpr (std::is_same_v<T, float>) {
    // Exact fp32 (no TF32): each thread forms the outer product of its 4 rows and 8 columns, two d at a time.
    const int g = lane / 4, t = lane % 4;
#pragma unroll 4
    for (int kk = 0; kk < kChunk; kk += 2) {
      float2 a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // rows g, g + 8, g + 16, g + 24 of the warp tile
        a[i] = *reinterpret_cast<const float2*>(xs + (warp_row + (i / 2) * 16 + (i % 2) * 8 + g) * kStride + kk);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // columns nt * 8 + 2t + p
        b[j] = *reinterpret_cast<const float2*>(ws + (warp_col + (j / 2) * 8 + t * 2 + j % 2) * kStride + kk);
      }
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int i = (r / 16) * 2 + (r % 4) / 2, j = ((r / 4) % 4) * 2 + r % 2;
        acc[r] = fmaf(a[i].x, b[j].x, acc[r]);
        acc[r] = fmaf(a[i].y, b[j].y, acc[r]);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kChunk; ks += 16) {
      // A fragments: lanes 0-15 address rows 0-15 at k = ks, lanes 16-31 the same rows at k = ks + 8.
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        ldmatrix_x4(a[mt], xs + (warp_row + mt * 16 + lane % 16) * kStride + ks + (lane / 16) * 8, false);
      }
      // B fragments of two 8-column tiles per ldmatrix: matrix q = lane / 8 covers columns (q / 2) * 8.. at
      // k = ks + (q % 2) * 8, giving b0, b1 of the first tile and b0, b1 of the second.
      uint32_t b[4][2];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        uint32_t r[4];
        ldmatrix_x4(r, ws + (warp_col + p * 16 + (lane / 16) * 8 + lane % 8) * kStride + ks + ((lane / 8) % 2) * 8,
                    false);
        b[2 * p][0] = r[0];
        b[2 * p][1] = r[1];
        b[2 * p + 1][0] = r[2];
        b[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc + (mt * 4 + nt) * 4, a[mt], b[nt][0], b[nt][1]);
      }
    }
  }
}

// Tile of the output owned by this block; column tiles vary fastest so blocks that share rows of x run together.
struct TileOrigin {
  int64_t row0, col0;
};

__device__ __forceinline__ TileOrigin tile_origin(const PolyChainParams& p) {
  const int64_t col_tiles = (p.k + kTileN - 1) / kTileN;
  return {static_cast<int64_t>(blockIdx.x) / col_tiles * kTileM, static_cast<int64_t>(blockIdx.x) % col_tiles * kTileN};
}

// For n = 0..N-1: z_n (without bias) of the block's tile, into this thread's accumulators, then
// epilogue(n, acc). All threads of the block must call it.
template <typename T, class Epilogue>
__device__ __forceinline__ void for_each_projection(const PolyChainParams& p, TileOrigin tile, SharedTiles<T>& smem,
                                                    Epilogue&& epilogue) {
  constexpr int kVec = StagedTile<T>::kVec;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  const bool x_vec = is_aligned(x, 16) && p.x_row_stride % kVec == 0 && p.d % kVec == 0;
  const bool w_vec = is_aligned(w, 16) && p.d % kVec == 0;
  const int64_t chunks = (p.d + kChunk - 1) / kChunk;

  StagedTile<T> xr, wr;
  auto load = [&](int64_t n, int64_t chunk) {
    load_tile(xr, x, tile.row0, p.M, chunk * kChunk, p.d, p.x_row_stride, x_vec);
    load_tile(wr, w + n * p.k * p.d, tile.col0, p.k, chunk * kChunk, p.d, p.d, w_vec);
  };

  float acc[kPerThread];
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) acc[r] = 0.f;

  load(0, 0);
  store_tile<T>(smem.x[0], xr);
  store_tile<T>(smem.w[0], wr);
  __syncthreads();

  // (n, chunk) walks all N * chunks steps; (next_n, next_chunk) is the step being prefetched.
  int64_t n = 0, chunk = 0, next_n = 0, next_chunk = 0;
  int buf = 0;
  for (;;) {
    if (++next_chunk == chunks) {
      next_chunk = 0;
      ++next_n;
    }
    const bool more = next_n < p.N;
    if (more) load(next_n, next_chunk);  // global loads in flight during the MMAs below
    multiply_chunk<T>(smem.x[buf], smem.w[buf], acc);
    // The other buffer was last read in the previous step, which every thread finished before its barrier.
    if (more) {
      store_tile<T>(smem.x[buf ^ 1], xr);
      store_tile<T>(smem.w[buf ^ 1], wr);
    }
    __syncthreads();
    if (chunk + 1 == chunks) {
      epilogue(static_cast<int>(n), acc);
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) acc[r] = 0.f;
    }
    if (!more) break;
    n = next_n;
    chunk = next_chunk;
    buf ^= 1;
  }
}

// The 8 bias values of this thread's columns for degree n (0 past k): bias[j] for column j = 0..7 of
// Fragment::col order ((r / 4) % 4) * 2 + r % 2.
template <typename T, bool HAS_BIAS>
__device__ __forceinline__ void load_bias(float (&b)[8], const PolyChainParams& p, const Fragment& frag,
                                          int64_t col0, int n) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t col = col0 + frag.col_base + (j / 2) * 8 + j % 2;
    b[j] = (HAS_BIAS && col < p.k) ? to_float(static_cast<const T*>(p.bias)[n * p.k + col]) : 0.f;
  }
}

__device__ __forceinline__ int bias_index(int r) { return ((r / 4) % 4) * 2 + r % 2; }

// Stores the values a, b of columns col, col + 1 (col even) of row `row` of a [M, k] matrix at `out` with row
// stride `ld`; `pairs`: as one 2-element store (k, ld even and out aligned to 2 elements).
template <typename T>
__device__ __forceinline__ void store_output(T* out, int64_t ld, bool pairs, const PolyChainParams& p, int64_t row,
                                             int64_t col, float a, float b) {
  if (row >= p.M || col >= p.k) return;
  T* dst = out + row * ld + col;
  if (pairs) {
    store_pair(dst, a, b);  // col even and k even: col + 1 < k
  } else {
    dst[0] = from_float<T>(a);
    if (col + 1 < p.k) dst[1] = from_float<T>(b);
  }
}

template <typename T>
__device__ __forceinline__ bool pair_stores(const T* out, int64_t ld, const PolyChainParams& p) {
  return p.k % 2 == 0 && ld % 2 == 0 && is_aligned(out, 2 * sizeof(T));
}

// f_1 = u_1; f_n = 1 + u_n (ccp) or u_n (product).
template <bool PRODUCT>
HK_HOST_DEVICE inline float chain_factor(float u, int64_t n) {
  return (PRODUCT || n == 0) ? u : 1.f + u;
}

// STORE_Z: also write z (params.z). A template flag, not a run-time branch: the stores' addressing inside the
// projection loop took the bf16 kernels from 124-128 to 204-208 registers (ptxas -v, sm_80), also when not taken.
template <typename T, int ACT, bool PRODUCT, bool HAS_BIAS, bool STORE_Z>
__global__ void __launch_bounds__(kThreads) poly_chain_fwd_kernel(const PolyChainParams p) {
  __shared__ SharedTiles<T> smem;
  const TileOrigin tile = tile_origin(p);
  const Fragment frag;

  float y[kPerThread];
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) y[r] = 1.f;

  T* z_out = static_cast<T*>(p.z);  // optional: the projections for the backward, [M, N, k]
  const bool z_pairs = pair_stores(z_out, p.N * p.k, p);
  for_each_projection<T>(p, tile, smem, [&](int n, const float (&acc)[kPerThread]) {
    float b[8];
    load_bias<T, HAS_BIAS>(b, p, frag, tile.col0, n);
#pragma unroll
    for (int r = 0; r < kPerThread; r += 2) {  // r, r + 1: adjacent columns of one row
      const float z0 = acc[r] + b[bias_index(r)], z1 = acc[r + 1] + b[bias_index(r + 1)];
      y[r] *= chain_factor<PRODUCT>(p.scale * activation<ACT>(z0), n);
      y[r + 1] *= chain_factor<PRODUCT>(p.scale * activation<ACT>(z1), n);
      if constexpr (STORE_Z) {
        store_output(z_out + n * p.k, p.N * p.k, z_pairs, p, tile.row0 + frag.row(r), tile.col0 + frag.col(r), z0, z1);
      }
    }
  });

  T* out = static_cast<T*>(p.y);
  const bool pairs = pair_stores(out, p.y_row_stride, p);
#pragma unroll
  for (int r = 0; r < kPerThread; r += 2) {
    store_output(out, p.y_row_stride, pairs, p, tile.row0 + frag.row(r), tile.col0 + frag.col(r), y[r], y[r + 1]);
  }
}

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

inline int64_t num_tiles(const PolyChainParams& p) {
  return ((p.M + kTileM - 1) / kTileM) * ((p.k + kTileN - 1) / kTileN);
}

inline int64_t grad_z_blocks(const PolyChainParams& p) { return (p.M * p.k + kGradThreads - 1) / kGradThreads; }

template <class Kernel>
cudaError_t run(Kernel kernel, int64_t blocks, int threads, const PolyChainParams& p, cudaStream_t stream) {
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, dim3(static_cast<unsigned>(blocks)), threads, 0, p);
#else
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  return cudaGetLastError();
#endif
}

// Enqueues the forward (BACKWARD = false) or grad_z kernel instance for element type T that p asks for
// (activation, mode, bias, z). p was checked by poly_chain.cu.
template <typename T, bool BACKWARD>
cudaError_t launch(const PolyChainParams& p, cudaStream_t stream) {
  return HK_ACTIVATION_SWITCH(p.activation, ACT, [&] {
    return HK_BOOL_SWITCH(p.mode == kModeProduct, PRODUCT, [&] {
      if constexpr (BACKWARD) {
        return run(poly_chain_grad_z_kernel<T, ACT, PRODUCT>, grad_z_blocks(p), kGradThreads, p, stream);
      } else {
        return HK_BOOL_SWITCH(p.bias != nullptr, HAS_BIAS, [&] {
          return HK_BOOL_SWITCH(p.z != nullptr, STORE_Z, [&] {
            return run(poly_chain_fwd_kernel<T, ACT, PRODUCT, HAS_BIAS, STORE_Z>, num_tiles(p), kThreads, p, stream);
          });
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

// poly_chain forward kernel (DESIGN.md §1), included by poly_chain_kernels.cuh.
//
// The block's work is one GEMM tile, x rows [128] x "slots" [128] over d, whose epilogue forms the chain: a slot is a
// (degree, output column) pair, so W is read through a permutation of its N * k rows and the N [M, k] projections
// never reach memory. 8 warps as 4 (rows) x 2 (slots) each own a 32 x 64 sub-tile: 2 x 8 mma.m16n8k16 tiles, 64
// fp32 accumulators per thread in the mma C layout (float32 keeps exact fp32 FMAs in the same layout, no TF32).
//
// Slot layout. A warp's 8 n-tiles hold `per_pass` consecutive degrees of `groups` = 8 / per_pass runs of 8 output
// columns: n-tile j is degree j % per_pass of run j / per_pass. So every thread ends the d loop holding z_n of all
// degrees of its own output elements and multiplies the chain in registers, x is read once per tile, and the
// pipeline runs without a break between degrees. N <= 8 takes one pass (per_pass = N; the 8 % N spare n-tiles read
// zeros: N = 3, 5, 6, 7 waste 25, 37.5, 25, 12.5% of the MMAs); larger N takes ceil(N / 8) passes over d of
// per_pass = ceil(N / passes) degrees and one run per warp, the partial product carried in 8 registers. A block
// covers 16 * groups output columns, so a row tile of x is read passes * k / (16 * groups) times: N * k / 128 when
// N divides 8, as often as a loop over degrees would, but in `passes` trips over d per block instead of N.
//
// Pipeline. d is staged in chunks of 64 bytes (32 halves, 16 floats) in a ring of kStages slots of dynamic shared
// memory, each x and W row padded to 80 bytes (the 8 rows an ldmatrix phase reads land in 8 distinct 16-byte bank
// groups; the fp32 float2 reads of 8 rows too). cp.async (16 bytes, zero-fill past M, d, k) fills a slot
// kStages - 1 chunks ahead; one __syncthreads per chunk both publishes the waited-for chunk and retires the slot
// the next copy overwrites. x or W that is not 16-byte aligned (odd strides, d not a multiple of 8 halves / 4
// floats) takes synchronous loads into the same ring instead.
//
// Schedule: tile b walks a band of kBandTiles row tiles down one column tile before the next column tile, so the
// blocks resident together share W column tiles and a band of x rows in L2.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/activation.h"
#include "hadamard_kernels/common.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/cp_async.h"
#include "hadamard_kernels/mma_sync.h"
#include "hadamard_kernels/poly_chain.h"

namespace hadamard_kernels {
namespace poly_chain_detail {

// f_1 = u_1; f_n = 1 + u_n (ccp) or u_n (product). The backward's chain_grad uses it too.
template <bool PRODUCT>
HK_HOST_DEVICE inline float chain_factor(float u, int64_t n) {
  return (PRODUCT || n == 0) ? u : 1.f + u;
}

namespace forward {

// A block's warps: WARP_GRID_ROWS x WARP_GRID_SLOTS of them, each owning WARP_ROWS x WARP_SLOTS of the tile as
// 16 x 8 tiles in the mma.sync C layout (which wgmma's accumulators share), mt-major: accumulator
// (mt * kNTiles + j) * 4 + e of a thread is row 16 mt + lane / 4 + 8 (e / 2), slot 8 j + 2 (lane % 4) + e % 2.
template <int WARP_GRID_ROWS, int WARP_GRID_SLOTS, int WARP_ROWS, int WARP_SLOTS>
struct Geometry {
  static constexpr int kWarpGridRows = WARP_GRID_ROWS, kWarpGridSlots = WARP_GRID_SLOTS;
  static constexpr int kWarpRows = WARP_ROWS, kWarpSlots = WARP_SLOTS;
  static constexpr int kThreads = 32 * kWarpGridRows * kWarpGridSlots;
  static constexpr int kTileRows = kWarpGridRows * kWarpRows;     // rows of x per block
  static constexpr int kTileSlots = kWarpGridSlots * kWarpSlots;  // (degree, output column) slots per block
  static constexpr int kMTiles = kWarpRows / 16;      // 16-row tiles per warp
  static constexpr int kNTiles = kWarpSlots / 8;      // 8-slot tiles per warp, also the most degrees in one pass
  static constexpr int kAcc = kMTiles * kNTiles * 4;  // accumulators per thread
  static constexpr int kOwn = kMTiles * 4;            // accumulators per thread of one n-tile
};

// The mma.sync kernel's (below): 8 warps as 4 (rows) x 2 (slots), 32 x 64 each.
using MmaSync = Geometry<4, 2, 32, 64>;

constexpr int kStages = 4;
constexpr int kRowBytes = 64;                // of d per staged row
constexpr int kRowPitch = 80;                // bytes between staged rows
constexpr int kStageBytes = (MmaSync::kTileRows + MmaSync::kTileSlots) * kRowPitch;
constexpr int kSmemBytes = kStages * kStageBytes;  // 80 KiB
constexpr int kVecsPerRow = kRowBytes / 16;
constexpr int kVecsPerThread = (MmaSync::kTileRows + MmaSync::kTileSlots) * kVecsPerRow / MmaSync::kThreads;
constexpr int64_t kBandTiles = 8;
static_assert(kVecsPerThread * MmaSync::kThreads == (MmaSync::kTileRows + MmaSync::kTileSlots) * kVecsPerRow &&
                  kVecsPerThread % 2 == 0,
              "each thread copies the same number of x and W vectors");

// Which (degree, output column) each slot of a G block holds; see the slot layout above.
template <class G>
struct SlotMap {
  int passes, per_pass, groups;
  int64_t cols;  // output columns per block tile

  HK_HOST_DEVICE explicit SlotMap(int64_t N)
      : passes(N <= G::kNTiles ? 1 : static_cast<int>((N + G::kNTiles - 1) / G::kNTiles)),
        per_pass(static_cast<int>((N + passes - 1) / passes)),
        groups(G::kNTiles / per_pass),
        cols(G::kWarpGridSlots * 8 * static_cast<int64_t>(groups)) {}

  // Output column of slot column c (0..7) of n-tile j of warp column wc, relative to the tile's first column.
  __device__ __forceinline__ int column(int wc, int j, int c) const { return (wc * groups + j / per_pass) * 8 + c; }
  __device__ __forceinline__ int64_t degree(int pass, int j) const {
    return static_cast<int64_t>(pass) * per_pass + j % per_pass;
  }
  // n-tile j holds a degree (< N) of a run this layout uses.
  __device__ __forceinline__ bool used(int pass, int j, int64_t N) const {
    return j / per_pass < groups && degree(pass, j) < N;
  }
  // The row of W (degree * k + output column) that slot `slot` of a tile starting at column col0 holds in pass
  // `pass`, or -1 past k or on a spare n-tile.
  __device__ __forceinline__ int64_t w_row(const PolyChainParams& p, int slot, int pass, int64_t col0) const {
    const int j = (slot % G::kWarpSlots) / 8;
    const int64_t col = col0 + column(slot / G::kWarpSlots, j, slot % 8);
    return used(pass, j, p.N) && col < p.k ? degree(pass, j) * p.k + col : -1;
  }
  // The x row or W row (w_row) that staged row `row` of a tile at (row0, col0) copies in pass `pass`: rows
  // 0..kTileRows-1 are x rows, the rest W slots; null past M or k or on a spare n-tile.
  template <typename B>
  __device__ __forceinline__ const B* source(const PolyChainParams& p, const B* x, const B* w, int row, int pass,
                                             int64_t row0, int64_t col0) const {
    if (row < G::kTileRows) return row0 + row < p.M ? x + (row0 + row) * p.x_row_stride : nullptr;
    const int64_t r = w_row(p, row - G::kTileRows, pass, col0);
    return r >= 0 ? w + r * p.d : nullptr;
  }
};

template <class G>
HK_HOST_DEVICE inline int64_t row_tiles(const PolyChainParams& p) {
  return (p.M + G::kTileRows - 1) / G::kTileRows;
}
template <class G>
HK_HOST_DEVICE inline int64_t col_tiles(const PolyChainParams& p) {
  const int64_t cols = SlotMap<G>(p.N).cols;
  return (p.k + cols - 1) / cols;
}
template <class G>
HK_HOST_DEVICE inline int64_t num_tiles(const PolyChainParams& p) {
  return row_tiles<G>(p) * col_tiles<G>(p);
}

// L2 swizzle: consecutive tiles b are consecutive row tiles of a band of kBandTiles, then the next column tile.
template <class G>
__device__ __forceinline__ void tile_origin(const PolyChainParams& p, int64_t cols, int64_t b, int64_t& row0,
                                            int64_t& col0) {
  const int64_t rows = row_tiles<G>(p), per_band = kBandTiles * col_tiles<G>(p);
  const int64_t first = b / per_band * kBandTiles, i = b % per_band;
  const int64_t band = rows - first < kBandTiles ? rows - first : kBandTiles;
  row0 = (first + i % band) * G::kTileRows;
  col0 = i / band * cols;
}

template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;

template <typename T>
struct Tile {
  static constexpr int kChunk = kRowBytes / sizeof(T);  // elements of d per stage
  static constexpr int kPitch = kRowPitch / sizeof(T);  // elements between staged rows
  static constexpr int kVec = 16 / sizeof(T);
};

// acc += x rows (32 per warp) . W slots (64 per warp) over one staged chunk of d.
template <typename T>
__device__ __forceinline__ void multiply_chunk(const Bits<T>* xs, const Bits<T>* ws, float (&acc)[MmaSync::kAcc]) {
  using G = MmaSync;
  constexpr int kPitch = Tile<T>::kPitch;
  constexpr int kMTiles = G::kMTiles, kNTiles = G::kNTiles;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  xs += (warp / G::kWarpGridSlots) * G::kWarpRows * kPitch;
  ws += (warp % G::kWarpGridSlots) * G::kWarpSlots * kPitch;
  if constexpr (std::is_same_v<T, float>) {
    // Exact fp32: the thread's rows (g + 8i) times its 16 slots (8j + 2t + q), 2 d at a time.
    const int g = lane / 4, t = lane % 4;
#pragma unroll 2
    for (int kk = 0; kk < Tile<T>::kChunk; kk += 2) {
      float2 a[2 * kMTiles], b[2 * kNTiles];
#pragma unroll
      for (int i = 0; i < 2 * kMTiles; ++i) a[i] = *reinterpret_cast<const float2*>(xs + (i * 8 + g) * kPitch + kk);
#pragma unroll
      for (int s = 0; s < 2 * kNTiles; ++s) {
        b[s] = *reinterpret_cast<const float2*>(ws + ((s / 2) * 8 + 2 * t + s % 2) * kPitch + kk);
      }
#pragma unroll
      for (int r = 0; r < G::kAcc; ++r) {  // r = (mt * kNTiles + j) * 4 + e
        const int i = (r / (4 * kNTiles)) * 2 + (r % 4) / 2, s = ((r / 4) % kNTiles) * 2 + r % 2;
        acc[r] = fmaf(a[i].x, b[s].x, acc[r]);
        acc[r] = fmaf(a[i].y, b[s].y, acc[r]);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < Tile<T>::kChunk; ks += 16) {
      // A: lanes 0-15 address rows 0-15 at k = ks, lanes 16-31 the same rows at ks + 8.
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        ldmatrix_x4(a[mt], xs + (mt * 16 + lane % 16) * kPitch + ks + (lane / 16) * 8, false);
      }
      // B of two n-tiles per ldmatrix: matrix q = lane / 8 covers slots (q / 2) * 8.. at k = ks + (q % 2) * 8.
      uint32_t b[kNTiles][2];
#pragma unroll
      for (int j = 0; j < kNTiles; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, ws + (j * 8 + (lane / 16) * 8 + lane % 8) * kPitch + ks + ((lane / 8) % 2) * 8, false);
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) mma_16816<T>(acc + (mt * kNTiles + j) * 4, a[mt], b[j][0], b[j][1]);
      }
    }
  }
}

// Stores values a, b of output columns col, col + 1 (col even) of a row; `pairs`: k even and the row 2-element
// aligned, so col < k implies col + 1 < k.
template <typename T>
__device__ __forceinline__ void store_two(T* dst, int64_t col, int64_t k, bool pairs, float a, float b) {
  if (!pairs) {
    dst[0] = from_float<T>(a);
    if (col + 1 < k) dst[1] = from_float<T>(b);
  } else if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else if constexpr (std::is_same_v<T, __half>) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
  }
}

// Stages the 16-byte vector of `row` (a row of x or W, null: zeros) at column `col` into shared `dst`, zeros past d:
// by cp.async when `async` (the row is 16-byte aligned and d a multiple of the vector, so a vector is all in or all
// out; `base` is a valid aligned address for the zero-fill), else by synchronous loads and stores.
template <typename B>
__device__ __forceinline__ void stage_vector(B* dst, const B* row, int64_t col, int64_t d, bool async, const B* base) {
  constexpr int kVec = 16 / sizeof(B);
  if (async) {
    const bool ok = row != nullptr && col < d;
    cp_async_16(dst, ok ? row + col : base, ok);
  } else {
    B e[kVec];
#pragma unroll
    for (int q = 0; q < kVec; ++q) e[q] = row != nullptr && col + q < d ? row[col + q] : B(0);
#pragma unroll
    for (int q = 0; q < kVec; ++q) dst[q] = e[q];
  }
}

// After the last chunk of a pass: bias, activation, the chain over this pass's degrees and the stores, for a
// thread of a G block at tile (row0, col0). The run's product so far replaces the accumulators in place; carry holds
// the product of earlier passes (one run per warp when passes > 1), index mt * 4 + e.
template <class G, typename T, int ACT, bool PRODUCT, bool HAS_BIAS>
__device__ __forceinline__ void chain_epilogue(const PolyChainParams& p, const SlotMap<G>& map, int pass, int64_t row0,
                                               int64_t col0, float (&acc)[G::kAcc], float (&carry)[G::kOwn]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t thread_row = row0 + (warp / G::kWarpGridSlots) * G::kWarpRows + lane / 4;
  T* y = static_cast<T*>(p.y);
  T* z = static_cast<T*>(p.z);
  const bool y_pairs = p.k % 2 == 0 && p.y_row_stride % 2 == 0 && is_aligned(y, 2 * sizeof(T));
  const bool z_pairs = p.k % 2 == 0 && is_aligned(z, 2 * sizeof(T));
#pragma unroll
  for (int j = 0; j < G::kNTiles; ++j) {
    if (!map.used(pass, j, p.N)) continue;
    const int64_t n = map.degree(pass, j);
    const int64_t col = col0 + map.column(warp % G::kWarpGridSlots, j, 2 * (lane % 4));
    float bias[2] = {0.f, 0.f};
    if (HAS_BIAS) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        if (col + q < p.k) bias[q] = to_float(static_cast<const T*>(p.bias)[n * p.k + col + q]);
      }
    }
    const bool first = j % map.per_pass == 0;
#pragma unroll
    for (int h = 0; h < G::kOwn / 2; ++h) {  // h = mt * 2 + e / 2: row thread_row + mt * 16 + (e / 2) * 8
      const int a = ((h / 2) * G::kNTiles + j) * 4 + (h % 2) * 2;
      const float z0 = acc[a] + bias[0], z1 = acc[a + 1] + bias[1];
      const int64_t row = thread_row + (h / 2) * 16 + (h % 2) * 8;
      if (z != nullptr && row < p.M && col < p.k) {
        store_two(z + (row * p.N + n) * p.k + col, col, p.k, z_pairs, z0, z1);
      }
      const float f0 = chain_factor<PRODUCT>(p.scale * activation<ACT>(z0), n);
      const float f1 = chain_factor<PRODUCT>(p.scale * activation<ACT>(z1), n);
      const int before = j > 0 ? a - 4 : a;  // the previous n-tile's accumulators are dead after it
      acc[a] = first ? f0 : f0 * acc[before];
      acc[a + 1] = first ? f1 : f1 * acc[before + 1];
    }
    if (j % map.per_pass != map.per_pass - 1 && n != p.N - 1) continue;  // the run goes on in the next n-tile
#pragma unroll
    for (int h = 0; h < G::kOwn / 2; ++h) {
      const int a = ((h / 2) * G::kNTiles + j) * 4 + (h % 2) * 2;
      carry[2 * h] *= acc[a];
      carry[2 * h + 1] *= acc[a + 1];
      if (pass + 1 < map.passes) continue;  // (then groups == 1: this was the warp's only run)
      const int64_t row = thread_row + (h / 2) * 16 + (h % 2) * 8;
      if (row < p.M && col < p.k) {
        store_two(y + row * p.y_row_stride + col, col, p.k, y_pairs, carry[2 * h], carry[2 * h + 1]);
      }
      carry[2 * h] = carry[2 * h + 1] = 1.f;
    }
  }
}

template <typename T, int ACT, bool PRODUCT, bool HAS_BIAS>
__global__ void __launch_bounds__(MmaSync::kThreads) poly_chain_fwd_kernel(const PolyChainParams p) {
  using G = MmaSync;
  HK_DYNAMIC_SHARED_MEMORY(smem);
  using B = Bits<T>;
  constexpr int kChunk = Tile<T>::kChunk, kPitch = Tile<T>::kPitch, kVec = Tile<T>::kVec;
  const SlotMap<G> map(p.N);
  int64_t row0, col0;
  tile_origin<G>(p, map.cols, blockIdx.x, row0, col0);

  const B* x = static_cast<const B*>(p.x);
  const B* w = static_cast<const B*>(p.weight);
  const bool x_async = is_aligned(x, 16) && p.x_row_stride % kVec == 0 && p.d % kVec == 0;
  const bool w_async = is_aligned(w, 16) && p.d % kVec == 0;
  const int64_t chunks = (p.d + kChunk - 1) / kChunk, steps = map.passes * chunks;

  // Thread vector i is 16-byte piece v % 4 of staged row v / 4, v = threadIdx.x + i * kThreads: vectors
  // 0..kHalf-1 copy x rows, the rest W slots. Their source rows: x's are fixed, W's depend on the pass.
  constexpr int kHalf = kVecsPerThread / 2;
  const B* src[kVecsPerThread];
  auto point = [&](int pass, int first) {
#pragma unroll
    for (int i = first; i < (first == 0 ? kHalf : kVecsPerThread); ++i) {
      src[i] = map.source(p, x, w, static_cast<int>((threadIdx.x + i * G::kThreads) / kVecsPerRow), pass, row0, col0);
    }
  };
  point(0, 0);
  point(0, kHalf);

  // Step s (pass s / chunks, chunk s % chunks) into ring slot s % kStages.
  auto load = [&](int64_t s) {
    if (s % chunks == 0 && s > 0) point(static_cast<int>(s / chunks), kHalf);
    B* stage = reinterpret_cast<B*>(smem + (s % kStages) * kStageBytes);
    const int64_t d0 = s % chunks * kChunk;
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int v = threadIdx.x + i * G::kThreads, piece = v % kVecsPerRow;
      const int64_t col = d0 + piece * kVec;
      B* dst = stage + (v / kVecsPerRow) * kPitch + piece * kVec;
      stage_vector(dst, src[i], col, p.d, i < kHalf ? x_async : w_async, i < kHalf ? x : w);
    }
  };

  float acc[G::kAcc];
#pragma unroll
  for (int r = 0; r < G::kAcc; ++r) acc[r] = 0.f;
  float carry[G::kOwn];
#pragma unroll
  for (int i = 0; i < G::kOwn; ++i) carry[i] = 1.f;

  for (int64_t s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s);
    cp_async_commit();
  }
  for (int64_t s = 0; s < steps; ++s) {
    cp_async_wait<kStages - 2>();  // this thread's copies of step s have landed
    __syncthreads();               // everyone's have, and everyone is done with step s - 1's slot
    if (s + kStages - 1 < steps) load(s + kStages - 1);
    cp_async_commit();
    const B* stage = reinterpret_cast<const B*>(smem + (s % kStages) * kStageBytes);
    multiply_chunk<T>(stage, stage + G::kTileRows * kPitch, acc);
    if ((s + 1) % chunks == 0) {
      chain_epilogue<G, T, ACT, PRODUCT, HAS_BIAS>(p, map, static_cast<int>(s / chunks), row0, col0, acc, carry);
#pragma unroll
      for (int r = 0; r < G::kAcc; ++r) acc[r] = 0.f;
    }
  }
}

// Enqueues the forward for p (checked by poly_chain.cu).
template <typename T, int ACT, bool PRODUCT, bool HAS_BIAS>
cudaError_t launch(const PolyChainParams& p, cudaStream_t stream) {
  void (*kernel)(const PolyChainParams) = &poly_chain_fwd_kernel<T, ACT, PRODUCT, HAS_BIAS>;
  const unsigned blocks = static_cast<unsigned>(num_tiles<MmaSync>(p));
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, dim3(blocks), MmaSync::kThreads, kSmemBytes, p);
#else
  // Above 48 KiB of dynamic shared memory a kernel has to opt in.
  HK_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<blocks, MmaSync::kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
#endif
}

}  // namespace forward
}  // namespace poly_chain_detail
}  // namespace hadamard_kernels

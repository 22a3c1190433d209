// LRNN kernels (DESIGN.md §4): phi_l = prod_{j < dbar} (1 + gamma g(z_lj)), z = x weight^T + bias.
//
// Tiling. A block of 128 threads (4 warps as 2 x 2) owns 64 rows of x and a column tile of floor(64 / dbar) whole
// neurons (their neurons * dbar <= 64 weight rows; the rest of the 64 columns is padding, so dbar that does not
// divide 64 wastes part of the tile: dbar = 33 uses 33 of 64). z of the tile is one block GEMM over d, staged
// through shared memory in slices of 32 with two stages (the next slice is read into registers while the current
// one is multiplied); past d, past M and past the tile's columns the operands read as 0, so d = 1 is a K-padded
// GEMM. float16/bfloat16 multiply with mma.sync m16n8k16 (fp32 accumulate); float32 runs exact fp32 FMAs (no TF32)
// in the same register layout, so one epilogue serves all dtypes. Each warp owns a 32 x 32 sub-tile (2 x 4 MMA
// tiles of 16 x 8), each thread 32 accumulators.
//
// Forward epilogue: the accumulators are parked in a shared fp32 [64, 64] buffer, where one element per thread becomes
// the factor f = 1 + gamma g(z + bias); then one thread per (row, neuron) multiplies the neuron's dbar factors in
// fp32, in order, and writes phi. z and f never reach device memory.
//
// Backward (one launch per row chunk, see ops/lrnn/cuda.py): the same GEMM recomputes z; the epilogue stores f and
// d = gamma g'(z) (mlp: z itself); one thread per (row, neuron) walks the neuron's factors right to left (exclusive
// suffix products) and left to right (exclusive prefix products) in fp32: dL/dz_j = grad_phi * prefix_j * suffix_j *
// d_j, no division, exact when a factor is 0. A per-element pass writes grad_z coalesced. For mlp, u = dL/dg is
// kept instead of d, and the per-element pass forms grad_z = u g'(z) and adds u dg/d(a, w, c) into per-thread fp32
// sums over the rows of the block's split (a fixed order); the two row groups are added in a fixed order and stored
// as the split's part, which Python reduces over splits in a fixed order: no atomics, the same bits run to run.
//
// HK_CPU_EMULATION (tests/emulation/cuda_emulation.h) compiles this file with a host compiler: blocks run as fibers
// and mma.sync is emulated, so tests/test_lrnn_cuda.py runs this source on the CPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "hadamard_kernels/common.h"
#include "hadamard_kernels/convert.h"
#include "hadamard_kernels/lrnn.h"
#include "hadamard_kernels/mma_sync.h"

namespace hadamard_kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kTileM = 64;     // rows of x per tile
constexpr int kTileN = 64;     // output columns (weight rows) per tile
constexpr int kChunk = 32;     // slice of d per shared-memory stage
constexpr int kWarpTile = 32;  // each warp owns 32 x 32 of the tile
constexpr int kPerThread = kTileM * kTileN / kThreads;  // 32 accumulators
constexpr int kLdE = kTileN + 9;  // fp32 epilogue rows, an odd stride: the (row, neuron) walks of a warp read
                                  // neurons n and rows r at banks 9 r + n dbar, at most 2-way conflicts
constexpr int kLdP = kLrnnMaxHidden + 1;                // mlp parameters of a column, staggered across banks
constexpr int kGroups = kThreads / kTileN;              // row groups of the per-element pass
static_assert(kTileM == 2 * kWarpTile && kTileN == 2 * kWarpTile && kThreads == 4 * 32, "2 x 2 warps");
static_assert(kLrnnMaxDbar == kTileN, "a neuron fits one column tile");

// Register budgets, as blocks per SM for __launch_bounds__ (4: 128 registers, 3: 168, 2: 255), the fewest blocks
// with no spills on sm_80 and sm_90a: the backward keeps the GEMM's staging and the epilogue's state across its row
// loop, mlp adds its parameter-gradient sums, float32 its wider staging.
template <typename T, int ACT, bool BACKWARD>
constexpr int kBlocksPerSm = 4 - (std::is_same_v<T, float> ? 1 : 0) * (BACKWARD || ACT == kLrnnMlp) -
                             (BACKWARD && ACT == kLrnnMlp ? 1 : 0);

// Raw storage of an element and the shared-memory row pad (elements) of the staged operands: 16-bit rows of 40
// (20 words) put the 8 rows g of a fragment load in distinct 4-bank groups; fp32 rows of 36 do the same for the
// float2 loads of the SIMT path.
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

// Dynamic shared memory: the staged operands (x and weight slices, two stages each), which the fp32 epilogue
// buffers reuse once the GEMM is done, then (mlp) the tile's g_params as floats [3][kTileN][kLdP].
template <typename T, bool BACKWARD, bool MLP>
struct Layout {
  using Bits = typename Elem<T>::Bits;
  static constexpr int kStride = kChunk + Elem<T>::kPad;
  static constexpr size_t kStageBytes = sizeof(Bits) * kTileM * kStride;
  static constexpr int kBuffers = BACKWARD ? (MLP ? 3 : 2) : 1;  // f; d or z; u
  static constexpr size_t kBufferBytes = sizeof(float) * kTileM * kLdE;
  static constexpr size_t kMainBytes = round_up_128(max_of(4 * kStageBytes, kBuffers * kBufferBytes));
  static constexpr size_t kBytes = kMainBytes + (MLP ? sizeof(float) * 3 * kTileN * kLdP : 0);
  static_assert(kTileM == kTileN, "x and weight slices share one shape");
  static_assert(!MLP || !BACKWARD || kBufferBytes >= sizeof(float) * 3 * kLrnnMaxHidden * kTileN,
                "the row groups' mlp sums fit one epilogue buffer");
  static_assert(kBytes <= 96 * 1024, "fits every sm_8x/sm_90 GPU with room for two blocks");
};

// One thread's share of a [64, kChunk] operand slice in flight from global to shared memory, as 16-byte vectors.
template <typename T>
struct StagedTile {
  using Bits = typename Elem<T>::Bits;
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kVecsPerRow = kChunk / kVec;
  static constexpr int kVecs = kTileM * kChunk / (kVec * kThreads);
  static_assert(kVecs * kVec * kThreads == kTileM * kChunk, "slice split");
  union {
    uint4 v[kVecs];
    Bits e[kVecs * kVec];
  };
};

// Reads rows [0, valid_rows) x columns [k0, k0 + kChunk) of the row-major matrix at `rows` (row stride ld, d
// columns); everything else reads as 0 without a load. `vec`: 16-byte loads are legal (rows 16-byte aligned, d a
// multiple of the vector).
template <typename T>
__device__ __forceinline__ void load_slice(StagedTile<T>& s, const T* rows, int valid_rows, int64_t k0, int64_t d,
                                           int64_t ld, bool vec) {
  using Stage = StagedTile<T>;
  using Bits = typename Stage::Bits;
  const Bits* src = reinterpret_cast<const Bits*>(rows);
#pragma unroll
  for (int i = 0; i < Stage::kVecs; ++i) {
    const int v = threadIdx.x + i * kThreads;  // consecutive threads read consecutive vectors of a row
    const int r = v / Stage::kVecsPerRow;
    const int64_t k = k0 + (v % Stage::kVecsPerRow) * Stage::kVec;
    if (vec) {
      s.v[i] = (r < valid_rows && k < d) ? *reinterpret_cast<const uint4*>(src + r * ld + k) : make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
      for (int e = 0; e < Stage::kVec; ++e) {
        s.e[i * Stage::kVec + e] = (r < valid_rows && k + e < d) ? src[r * ld + k + e] : Bits(0);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_slice(typename Elem<T>::Bits* dst, const StagedTile<T>& s) {
  using Stage = StagedTile<T>;
  constexpr int kStride = Layout<T, false, false>::kStride;
#pragma unroll
  for (int i = 0; i < Stage::kVecs; ++i) {
    const int v = threadIdx.x + i * kThreads;
    *reinterpret_cast<uint4*>(dst + (v / Stage::kVecsPerRow) * kStride + (v % Stage::kVecsPerRow) * Stage::kVec) =
        s.v[i];
  }
}

// Two adjacent 16-bit elements of shared memory as one 32-bit register (a fragment register of mma.sync).
__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) {
#if defined(HK_CPU_EMULATION)
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}

// Where this thread's accumulators sit in the tile (mma.m16n8k16 C layout): its rows i = 0..3 and columns
// j = 0..7, accumulator acc_index(i, j).
struct Fragment {
  int row_base, col_base;
  __device__ __forceinline__ Fragment() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    row_base = (warp / 2) * kWarpTile + lane / 4;
    col_base = (warp % 2) * kWarpTile + (lane % 4) * 2;
  }
  __device__ __forceinline__ int row(int i) const { return row_base + (i / 2) * 16 + (i % 2) * 8; }
  __device__ __forceinline__ int col(int j) const { return col_base + (j / 2) * 8 + j % 2; }
};
__device__ __forceinline__ constexpr int acc_index(int i, int j) {
  return ((i / 2) * 4 + j / 2) * 4 + (i % 2) * 2 + j % 2;
}

// acc += x slice (64 x kChunk) @ weight slice (64 x kChunk)^T over the slice's first `klimit` (>= 1) columns; the
// columns past klimit hold zeros, so the last step may run over them.
template <typename T>
__device__ __forceinline__ void multiply_slice(const typename Elem<T>::Bits* xs, const typename Elem<T>::Bits* ws,
                                               float (&acc)[kPerThread], int64_t klimit) {
  constexpr int kStride = Layout<T, false, false>::kStride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / 2) * kWarpTile, warp_col = (warp % 2) * kWarpTile;
  const int g = lane / 4, t = lane % 4;
  if constexpr (std::is_same_v<T, float>) {
    // Exact fp32: the outer product of the thread's 4 rows and 8 columns, two k at a time.
#pragma unroll 2
    for (int kk = 0; kk < klimit; kk += 2) {
      float2 a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = *reinterpret_cast<const float2*>(xs + (warp_row + (i / 2) * 16 + (i % 2) * 8 + g) * kStride + kk);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        b[j] = *reinterpret_cast<const float2*>(ws + (warp_col + (j / 2) * 8 + t * 2 + j % 2) * kStride + kk);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float& c = acc[acc_index(i, j)];
          c = fmaf(a[i].x, b[j].x, c);
          c = fmaf(a[i].y, b[j].y, c);
        }
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kChunk; ks += 16) {
      if (ks >= klimit) break;  // K padding: a slice past d has nothing to add
      // A (row-major x rows) and B (weight rows = columns of B) fragments straight from shared memory: each
      // register is the pair (k = 2t, 2t + 1) of one row, +8 rows / +8 k for the other registers.
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint16_t* p = xs + (warp_row + mt * 16 + g) * kStride + ks + 2 * t;
        a[mt][0] = load_pair(p);
        a[mt][1] = load_pair(p + 8 * kStride);
        a[mt][2] = load_pair(p + 8);
        a[mt][3] = load_pair(p + 8 * kStride + 8);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const uint16_t* p = ws + (warp_col + nt * 8 + g) * kStride + ks + 2 * t;
        const uint32_t b0 = load_pair(p), b1 = load_pair(p + 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_16816<T>(acc + (mt * 4 + nt) * 4, a[mt], b0, b1);
      }
    }
  }
}

// The block's tile: rows [row0, row0 + 64) and neurons [neuron0, neuron0 + neurons), i.e. columns
// [col0, col0 + cols) of z.
struct Tile {
  int64_t row0, neuron0, col0;
  int neurons, cols;
};

__device__ __forceinline__ int64_t column_tiles(const LrnnParams& p) {
  const int64_t per = lrnn_neurons_per_tile(p.dbar);
  return (p.rank + per - 1) / per;
}

__device__ __forceinline__ Tile tile_of(const LrnnParams& p, int64_t column_tile, int64_t row0) {
  const int64_t per = lrnn_neurons_per_tile(p.dbar);
  Tile t;
  t.row0 = row0;
  t.neuron0 = column_tile * per;
  t.neurons = static_cast<int>(p.rank - t.neuron0 < per ? p.rank - t.neuron0 : per);
  t.col0 = t.neuron0 * p.dbar;
  t.cols = static_cast<int>(t.neurons * p.dbar);
  return t;
}

// acc = z - bias of the tile for this thread's 32 elements (0 past M and past the tile's columns). All threads of
// the block call it; it ends with a barrier after the last read of the staged operands, so the caller may reuse
// that shared memory.
template <typename T>
__device__ __forceinline__ void tile_gemm(const LrnnParams& p, const Tile& tile, unsigned char* smem,
                                          float (&acc)[kPerThread]) {
  using Bits = typename Elem<T>::Bits;
  using Stage = StagedTile<T>;
  constexpr size_t kStage = Layout<T, false, false>::kStageBytes;
  Bits* xs[2] = {reinterpret_cast<Bits*>(smem), reinterpret_cast<Bits*>(smem + kStage)};
  Bits* ws[2] = {reinterpret_cast<Bits*>(smem + 2 * kStage), reinterpret_cast<Bits*>(smem + 3 * kStage)};
  const T* x = static_cast<const T*>(p.x) + tile.row0 * p.x_row_stride;
  const T* w = static_cast<const T*>(p.weight) + tile.col0 * p.d;
  const int rows = static_cast<int>(p.M - tile.row0 < kTileM ? p.M - tile.row0 : kTileM);
  const bool x_vec = is_aligned(x, 16) && p.x_row_stride % Stage::kVec == 0 && p.d % Stage::kVec == 0;
  const bool w_vec = is_aligned(w, 16) && p.d % Stage::kVec == 0;
  const int64_t slices = (p.d + kChunk - 1) / kChunk;

#pragma unroll
  for (int r = 0; r < kPerThread; ++r) acc[r] = 0.f;
  Stage xr, wr;
  load_slice(xr, x, rows, 0, p.d, p.x_row_stride, x_vec);
  load_slice(wr, w, tile.cols, 0, p.d, p.d, w_vec);
  store_slice<T>(xs[0], xr);
  store_slice<T>(ws[0], wr);
  __syncthreads();
  for (int64_t s = 0; s < slices; ++s) {
    const int buf = static_cast<int>(s & 1);
    const bool more = s + 1 < slices;
    if (more) {  // global loads in flight during the multiplies below
      load_slice(xr, x, rows, (s + 1) * kChunk, p.d, p.x_row_stride, x_vec);
      load_slice(wr, w, tile.cols, (s + 1) * kChunk, p.d, p.d, w_vec);
    }
    const int64_t left = p.d - s * kChunk;
    multiply_slice<T>(xs[buf], ws[buf], acc, left < kChunk ? left : kChunk);
    // The other stage was last read in the previous step, which every thread finished before its barrier.
    if (more) {
      store_slice<T>(xs[buf ^ 1], xr);
      store_slice<T>(ws[buf ^ 1], wr);
    }
    __syncthreads();
  }
}

// The tile's mlp parameters as floats: params[(k * kTileN + c) * kLdP + i] = g_params[k, column col0 + c, i] for
// k = 0, 1, 2 (a, w, c). Read after the next barrier.
template <typename T>
__device__ __forceinline__ void load_mlp_params(const LrnnParams& p, const Tile& tile, float* params) {
  const T* src = static_cast<const T*>(p.g_params);
  const int64_t columns = p.rank * p.dbar;
  const int per_kind = tile.cols * static_cast<int>(p.h);
  for (int e = threadIdx.x; e < 3 * per_kind; e += kThreads) {
    const int k = e / per_kind, c = e % per_kind / static_cast<int>(p.h), i = e % static_cast<int>(p.h);
    params[(k * kTileN + c) * kLdP + i] = to_float(src[(k * columns + tile.col0 + c) * p.h + i]);
  }
}

// Per-column mlp parameters of column c of the tile.
struct MlpColumn {
  const float *a, *w, *c;
  __device__ __forceinline__ MlpColumn(const float* params, int column)
      : a(params + column * kLdP), w(params + (kTileN + column) * kLdP), c(params + (2 * kTileN + column) * kLdP) {}
};

template <int ACT>
__device__ __forceinline__ float g_of(float z, const LrnnParams& p, const float* params, int column) {
  if constexpr (ACT == kLrnnMlp) {
    const MlpColumn m(params, column);
    return lrnn_mlp_g(z, m.a, m.w, m.c, static_cast<int>(p.h));
  } else {
    (void)params;
    (void)column;
    return lrnn_g<ACT>(z, p.omega);
  }
}

template <typename T>
__device__ __forceinline__ float bias_of(const LrnnParams& p, const Tile& tile, int column) {
  return p.bias != nullptr ? to_float(static_cast<const T*>(p.bias)[tile.col0 + column]) : 0.f;
}

// Parks this thread's accumulators in the fp32 buffer [kTileM][kLdE], so the element-wise epilogue runs one element
// per thread with its transcendental code emitted once, not 32 times.
__device__ __forceinline__ void store_accumulators(float* buffer, const float (&acc)[kPerThread]) {
  const Fragment frag;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) buffer[frag.row(i) * kLdE + frag.col(j)] = acc[acc_index(i, j)];
  }
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, (kBlocksPerSm<T, ACT, false>)) lrnn_fwd_kernel(const LrnnParams p) {
  constexpr bool MLP = ACT == kLrnnMlp;
  using L = Layout<T, false, MLP>;
  HK_DYNAMIC_SHARED_MEMORY(smem);
  float* const f = reinterpret_cast<float*>(smem);
  float* const params = reinterpret_cast<float*>(smem + L::kMainBytes);
  const int64_t column_tile_count = column_tiles(p);
  const Tile tile = tile_of(p, blockIdx.x % column_tile_count, blockIdx.x / column_tile_count * kTileM);
  if constexpr (MLP) load_mlp_params<T>(p, tile, params);  // visible after the GEMM's first barrier

  float acc[kPerThread];
  tile_gemm<T>(p, tile, smem, acc);
  store_accumulators(f, acc);
  __syncthreads();

  // f = 1 + gamma g(z) in place; thread (column, group) takes rows group, group + kGroups, ...
  const int rows = static_cast<int>(p.M - tile.row0 < kTileM ? p.M - tile.row0 : kTileM);
  const int column = threadIdx.x % kTileN, group = threadIdx.x / kTileN;
  if (column < tile.cols) {
    const float b = bias_of<T>(p, tile, column);
#pragma unroll 1
    for (int r = group; r < rows; r += kGroups) {
      float& v = f[r * kLdE + column];
      v = 1.f + p.gamma * g_of<ACT>(v + b, p, params, column);
    }
  }
  __syncthreads();

  T* phi = static_cast<T*>(p.phi);
  const int dbar = static_cast<int>(p.dbar);
  for (int e = threadIdx.x; e < rows * tile.neurons; e += kThreads) {  // consecutive threads: consecutive neurons
    const int r = e / tile.neurons, n = e % tile.neurons;
    const float* factors = f + r * kLdE + n * dbar;
    float prod = 1.f;
    for (int j = 0; j < dbar; ++j) prod *= factors[j];
    phi[(tile.row0 + r) * p.phi_row_stride + tile.neuron0 + n] = from_float<T>(prod);
  }
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, (kBlocksPerSm<T, ACT, true>)) lrnn_bwd_kernel(const LrnnParams p) {
  constexpr bool MLP = ACT == kLrnnMlp;
  using L = Layout<T, true, MLP>;
  HK_DYNAMIC_SHARED_MEMORY(smem);
  float* const f = reinterpret_cast<float*>(smem);
  float* const dz = f + kTileM * kLdE;  // gamma g'(z), then dL/dz; mlp: z
  float* const u = dz + kTileM * kLdE;  // mlp: dL/dg
  float* const params = reinterpret_cast<float*>(smem + L::kMainBytes);
  const int64_t column_tile_count = column_tiles(p);
  const int64_t split = blockIdx.x / column_tile_count;
  const int64_t row_begin = split * p.rows_per_split;
  const int64_t row_end = row_begin + p.rows_per_split < p.M ? row_begin + p.rows_per_split : p.M;
  Tile tile = tile_of(p, blockIdx.x % column_tile_count, row_begin);
  if constexpr (MLP) load_mlp_params<T>(p, tile, params);

  const int dbar = static_cast<int>(p.dbar), h = static_cast<int>(p.h);
  const int column = threadIdx.x % kTileN, group = threadIdx.x / kTileN;  // the per-element pass
  float da[kLrnnMaxHidden], dw[kLrnnMaxHidden], dc[kLrnnMaxHidden];      // mlp: this thread's sums
#pragma unroll
  for (int i = 0; i < kLrnnMaxHidden; ++i) da[i] = dw[i] = dc[i] = 0.f;
  const T* grad_phi = static_cast<const T*>(p.grad_phi);
  T* grad_z = static_cast<T*>(p.grad_z);

  for (; tile.row0 < row_end; tile.row0 += kTileM) {
    float acc[kPerThread];
    tile_gemm<T>(p, tile, smem, acc);
    const int rows = static_cast<int>(p.M - tile.row0 < kTileM ? p.M - tile.row0 : kTileM);

    store_accumulators(dz, acc);
    __syncthreads();

    // f = 1 + gamma g(z) and, in place of z, gamma g'(z) (mlp: z is kept).
    if (column < tile.cols) {
      const float b = bias_of<T>(p, tile, column);
#pragma unroll 1
      for (int r = group; r < rows; r += kGroups) {
        const int at = r * kLdE + column;
        const float z = dz[at] + b;
        f[at] = 1.f + p.gamma * g_of<ACT>(z, p, params, column);
        if constexpr (MLP) {
          dz[at] = z;
        } else {
          dz[at] = p.gamma * lrnn_g_grad<ACT>(z, p.omega);
        }
      }
    }
    __syncthreads();

    // Leave-one-out products of each (row, neuron): exclusive suffix products right to left, then exclusive prefix
    // products (times grad_phi) left to right. Fixed activations: dz_j = grad_phi * prefix_j * suffix_j * d_j;
    // mlp: u_j = grad_phi * gamma * prefix_j * suffix_j.
    for (int e = threadIdx.x; e < rows * tile.neurons; e += kThreads) {
      const int r = e / tile.neurons, n = e % tile.neurons;
      const float* factors = f + r * kLdE + n * dbar;
      float* out = (MLP ? u : dz) + r * kLdE + n * dbar;
      float suffix = 1.f;
      for (int j = dbar - 1; j >= 0; --j) {
        out[j] = MLP ? suffix : out[j] * suffix;
        suffix *= factors[j];
      }
      float prefix = to_float(grad_phi[(tile.row0 + r) * p.phi_row_stride + tile.neuron0 + n]);
      if constexpr (MLP) prefix *= p.gamma;
      for (int j = 0; j < dbar; ++j) {
        out[j] *= prefix;
        prefix *= factors[j];
      }
    }
    __syncthreads();

    // grad_z, a row's columns by consecutive threads; mlp: dz = u g'(z) and the parameter sums.
    if (column < tile.cols) {
#pragma unroll 1
      for (int r = group; r < rows; r += kGroups) {
        float value = dz[r * kLdE + column];
        if constexpr (MLP) {
          const MlpColumn m(params, column);
          const float ur = u[r * kLdE + column];
          value = ur * lrnn_mlp_g_grad<true>(value, m.a, m.w, m.c, h, ur, da, dw, dc);
        }
        grad_z[(tile.row0 + r) * p.grad_z_row_stride + tile.col0 + column] = from_float<T>(value);
      }
    }
    __syncthreads();  // the next tile's GEMM overwrites the epilogue buffers
  }

  if constexpr (MLP) {
    // The row groups' sums, added in a fixed order (group 0 + group 1), as this split's part.
    static_assert(kGroups == 2, "two row groups");
    float* other = f;  // [3 * kLrnnMaxHidden][kTileN]
    if (group == 1) {
#pragma unroll
      for (int i = 0; i < kLrnnMaxHidden; ++i) {
        other[(0 * kLrnnMaxHidden + i) * kTileN + column] = da[i];
        other[(1 * kLrnnMaxHidden + i) * kTileN + column] = dw[i];
        other[(2 * kLrnnMaxHidden + i) * kTileN + column] = dc[i];
      }
    }
    __syncthreads();
    if (group == 0 && column < tile.cols && p.g_params_part != nullptr) {
      const int64_t columns = p.rank * p.dbar;
      float* part = p.g_params_part + split * 3 * columns * p.h;
#pragma unroll
      for (int i = 0; i < kLrnnMaxHidden; ++i) {
        if (i >= h) break;
        const int64_t at = (tile.col0 + column) * p.h + i;
        part[at] = da[i] + other[(0 * kLrnnMaxHidden + i) * kTileN + column];
        part[columns * p.h + at] = dw[i] + other[(1 * kLrnnMaxHidden + i) * kTileN + column];
        part[2 * columns * p.h + at] = dc[i] + other[(2 * kLrnnMaxHidden + i) * kTileN + column];
      }
    }
  }
}

// Host-side checks of what the kernels rely on; Python has already checked shapes and dtypes.
bool valid(const LrnnParams& p) {
  if (p.M < 1 || p.d < 1 || p.rank < 1 || p.dbar < 1 || p.dbar > kLrnnMaxDbar) return false;
  if (p.x == nullptr || p.weight == nullptr || p.x_row_stride < p.d) return false;
  if (p.activation < 0 || p.activation >= kNumLrnnActivations) return false;
  if (p.activation == kLrnnMlp && (p.g_params == nullptr || p.h < 1 || p.h > kLrnnMaxHidden)) return false;
  return true;
}

int64_t host_column_tiles(const LrnnParams& p) {
  const int64_t per = lrnn_neurons_per_tile(p.dbar);
  return (p.rank + per - 1) / per;
}

template <typename T, bool BACKWARD, bool MLP>
cudaError_t launch(void (*kernel)(const LrnnParams), const LrnnParams& p, int64_t blocks, cudaStream_t stream) {
  constexpr size_t kBytes = Layout<T, BACKWARD, MLP>::kBytes;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, dim3(static_cast<unsigned>(blocks)), kThreads, kBytes, p);
#else
  // Above 48 KiB of dynamic shared memory a kernel has to opt in.
  HK_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kBytes)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
#endif
}

}  // namespace

// NAME becomes the activation code as a compile-time int; an unknown code returns cudaErrorInvalidValue.
#define HK_LRNN_ACTIVATION_SWITCH(CODE, NAME, ...)          \
  [&]() -> cudaError_t {                                    \
    switch (CODE) {                                         \
      HK_INT_CASE(::hadamard_kernels::kLrnnSin, NAME, __VA_ARGS__)    \
      HK_INT_CASE(::hadamard_kernels::kLrnnSpder, NAME, __VA_ARGS__)  \
      HK_INT_CASE(::hadamard_kernels::kLrnnArctan, NAME, __VA_ARGS__) \
      HK_INT_CASE(::hadamard_kernels::kLrnnTanh, NAME, __VA_ARGS__)   \
      HK_INT_CASE(::hadamard_kernels::kLrnnMlp, NAME, __VA_ARGS__)    \
      default:                                              \
        return cudaErrorInvalidValue;                       \
    }                                                       \
  }()

cudaError_t launch_lrnn_fwd(const LrnnParams& p, cudaStream_t stream) {
  if (!valid(p) || p.phi == nullptr || p.phi_row_stride < p.rank) return cudaErrorInvalidValue;
  const int64_t blocks = host_column_tiles(p) * ((p.M + kTileM - 1) / kTileM);
  return HK_DTYPE_SWITCH(p.dtype, T, [&] {
    return HK_LRNN_ACTIVATION_SWITCH(p.activation, ACT, [&] {
      return launch<T, false, ACT == kLrnnMlp>(&lrnn_fwd_kernel<T, ACT>, p, blocks, stream);
    });
  });
}

cudaError_t launch_lrnn_bwd(const LrnnParams& p, cudaStream_t stream) {
  if (!valid(p) || p.grad_phi == nullptr || p.phi_row_stride < p.rank || p.grad_z == nullptr ||
      p.grad_z_row_stride < p.rank * p.dbar || p.rows_per_split < kTileM || p.rows_per_split % kTileM != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = host_column_tiles(p) * ((p.M + p.rows_per_split - 1) / p.rows_per_split);
  return HK_DTYPE_SWITCH(p.dtype, T, [&] {
    return HK_LRNN_ACTIVATION_SWITCH(p.activation, ACT, [&] {
      return launch<T, true, ACT == kLrnnMlp>(&lrnn_bwd_kernel<T, ACT>, p, blocks, stream);
    });
  });
}

}  // namespace hadamard_kernels

// Causal linear attention kernels (DESIGN.md §2), compiled one dtype per translation unit
// (linear_attention_{f32,f16,bf16}.cu); the launchers that combine them are in linear_attention.cu.
//
// One kernel template, the chunked scan, serves the forward and the three gradient passes. A block owns one
// (sequence, head) and a 64-column slice [c0, c0 + 64) of the output; it walks the sequence in chunks of 64
// tokens (forward or reverse) and keeps the running state S [da, 64] in fp32 shared memory. (A split pass gives
// each block a segment of the sequence and its start state, after the same template, as SUMS, has summed the
// segments' S updates: linear_attention.cu. One-token decoding has a kernel of its own, at the end.)
// For a chunk with operands A, B [64, da] and C [64, dv] (rows past the sequence end are 0):
//   out = (A B^T ∘ M) C + A S_prev       (M: s <= t forward, s >= t reverse)
//   S  += B^T C
// The forward is A = phi(q), B = phi(k), C = v. With G = d o / d num (grad_o times scale, / den when normalize)
// and the chunked algebra of the backward (dQ_t = S_t G_t + ..., and dK, dV through the reverse state
// R_t = dS_T + sum_{u>=t} Q_u^T G_u), each gradient is the same scan on other operands:
//   dq = phi'(q) * scan_fwd(A = G, B = v, C = phi(k))        state S^T   (S_0^T first)
//   dk = phi'(k) * scan_rev(A = v, B = G, C = phi(q))        state R^T   (dS_T^T first)
//   dv =           scan_rev(A = phi(k), B = phi(q), C = G)   state R     (dS_T first; ends at dS_0)
// normalize adds rank-1 terms kept in fp32: the forward's den_t = Q_t . z_prev + rowsum(A B^T ∘ M) + eps; in
// the dq / dk passes the key-sum gradient d den_t = -(grad_o_t . o_t) / den_t, which enters as an extra feature
// (dq: a_t = d den_t, b_s = 1; dk: a_t = 1, b_s = d den_s) with its own state row (z for dq; r_t =
// dz_T + sum_{u>=t} d den_u Q_u for dk, which ends at dz_0). den and grad_o . o come from a first forward pass
// that writes them per token ("stats").
//
// Tensor cores. A block of 128 threads (2 x 2 warps) holds each 64 x 64 product as the fp32 accumulators of
// mma.m16n8k16 (32 per thread). float16/bfloat16 run mma.sync with fp32 accumulation; operands go through
// shared memory in the input dtype (the feature map applied in fp32 on load), the state enters from its fp32 copy
// as hi + lo in the input dtype (two MMAs, near-fp32 accuracy), and the masked P = A B^T is rounded to the input
// dtype before P C.
// float32 runs exact fp32 FMAs in the same register layout. float16 has a small range: the state is scaled by a
// power of two (from its block-wide max) before conversion, and a row-scaled gradient operand G is stored as
// G / F with F a power of two per chunk (d num shrinks like 1/T with normalize), the accumulators multiplied
// back in fp32. Power-of-two factors are exact, so bf16 and fp32 take the same path at no cost in accuracy.
//
// HK_CPU_EMULATION (defined by tests/emulation/cuda_emulation.h) compiles this file with a host compiler: blocks
// run as threads on the CPU and the few PTX instructions (ldmatrix, mma) are emulated, so the tests check this
// source on machines without a GPU.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/common.h"
#include "hadamard_kernels/cp_async.h"
#include "hadamard_kernels/linear_attention.h"
#include "hadamard_kernels/mma_sync.h"

namespace hadamard_kernels {
namespace linear_attention_detail {

constexpr int kThreads = 128;
constexpr int kChunk = 64;   // tokens per chunk
constexpr int kBlock = 64;   // output columns per block, and columns of A, B per reduction slice
constexpr int kPerThread = kChunk * kBlock / kThreads;  // 32 accumulators of a 64 x 64 tile
constexpr int kStateLd = kBlock + 4;  // floats per state row in shared memory (fragment reads bank-conflict free)
constexpr int kMaxDim = static_cast<int>(kLinearAttentionMaxDim);
static_assert(kThreads == 4 * 32 && kChunk == 64 && kBlock == 64, "2 x 2 warps of 32 x 32 on a 64 x 64 tile");

// Which pass a kernel instance runs (the operands and epilogue it uses; see the header comment).
enum Role : int { kForward = 0, kGradQ = 1, kGradK = 2, kGradV = 3 };

// A [rows, H, cols] tensor: element (row, head, col) at ptr + row * row_stride + head * head_stride + col.
struct Operand {
  const void* ptr = nullptr;
  int64_t row_stride = 0, head_stride = 0;
};

// One scan pass; built by the launchers in linear_attention.cu. Sizes and strides count elements.
struct ScanParams {
  Operand a, b, c;     // a, b: [rows, H, da]; c: [rows, H, dv]
  int64_t da = 0, dv = 0;
  void* out = nullptr;  // [rows, H, dv] in the input dtype, or null (nothing stored)
  int64_t out_row_stride = 0, out_head_stride = 0;
  Operand dphi;         // kGradQ / kGradK: out is multiplied by phi'(dphi), dphi [rows, H, dv]
  Operand grad_o;       // kForward with stats: [rows, H, dv]
  // States: block (sequence n, head h) of N * H blocks of da * dv floats; element (i, j) of block nh at
  // nh * da * dv + i * state_da_stride + j * state_dv_stride.
  const float* state_in = nullptr;  // null: zeros
  float* state_out = nullptr;       // null: not stored
  int64_t state_da_stride = 0, state_dv_stride = 0;
  // normalize: kForward's key sum z [N * H, da]; kGradQ / kGradK's extra state row [N * H, dv].
  const float* vec_in = nullptr;
  float* vec_out = nullptr;
  // Per-token statistics of normalize, [rows, H] (den, with eps) and [delta_blocks, rows, H] (partial sums of
  // grad_o . o over 64-column blocks): written by kForward with stats, read by the gradient passes.
  float* den = nullptr;
  float* delta = nullptr;
  int64_t delta_blocks = 0;
  const int32_t* cu_seqlens = nullptr;
  // Segments (LinearAttentionParams): block x = segment * H + head; seg_chunks 0 = a segment is a sequence.
  int64_t segments = 0, seg_chunks = 0, seg_per_sequence = 1;
  const int32_t* seg_offsets = nullptr;   // with cu_seqlens and seg_chunks > 0
  const int32_t* seg_sequence = nullptr;
  int64_t rows = 0, T = 0, H = 0;  // rows = B * T
  int feature_map = 0;
  bool normalize = false;
  bool stats = false;
  // The segment sums of a split pass: only state_out = sum over the segment's chunks of B^T C (and vec_out, the
  // normalize vector's sum) is computed, from zero; nothing else is read or written.
  bool sums = false;
  float scale = 1.f, eps = 0.f;
};

// The tokens and chunks a block walks: its segment of a sequence.
struct Segment {
  int64_t sequence = 0, bos = 0, len = 0;  // the sequence and its token rows [bos, bos + len)
  int c0 = 0, c1 = 0;                      // the segment's chunks [c0, c1) of that sequence (empty past the end)
};

__device__ __forceinline__ Segment segment_of(const ScanParams& p, int64_t g) {
  Segment s;
  int64_t j = 0;  // segment j of its sequence
  s.sequence = g;
  if (p.seg_chunks > 0) {
    if (p.cu_seqlens != nullptr) {
      s.sequence = p.seg_sequence[g];
      j = g - p.seg_offsets[s.sequence];
    } else {
      s.sequence = g / p.seg_per_sequence;
      j = g % p.seg_per_sequence;
    }
  }
  s.bos = p.cu_seqlens != nullptr ? p.cu_seqlens[s.sequence] : s.sequence * p.T;
  s.len = p.cu_seqlens != nullptr ? p.cu_seqlens[s.sequence + 1] - s.bos : p.T;
  const int64_t chunks = (s.len + kChunk - 1) / kChunk;  // < 2^31: T < 2^37 (the launcher checks)
  s.c0 = static_cast<int>(p.seg_chunks > 0 ? min(j * p.seg_chunks, chunks) : 0);
  s.c1 = static_cast<int>(p.seg_chunks > 0 ? min(s.c0 + p.seg_chunks, chunks) : chunks);
  return s;
}

template <typename T>
struct Elem {
  using Bits = uint16_t;
  static constexpr int kPad = 8;  // rows of 72 halves (144 B): the 8 rows an ldmatrix phase reads hit distinct banks
};
template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr int kPad = 4;  // rows of 68 floats: the fp32 fragment reads are conflict free
};

template <typename T>
constexpr int kTileLd = kBlock + Elem<T>::kPad;  // elements per row of a shared [64, 64] tile
template <typename T>
constexpr int kTileElems = kChunk * kTileLd<T>;

// Dynamic shared memory of one block: the four [64, 64] tiles A, B, C, P, the fp32 state [da_pad, 64] and, for
// 16-bit inputs, the staging area of the next step's raw A, B, C ([64][64] each, unpadded).
template <typename T>
constexpr int64_t shared_bytes(int64_t da) {
  const int64_t da_pad = (da + kBlock - 1) / kBlock * kBlock;
  const int64_t elem = static_cast<int64_t>(sizeof(typename Elem<T>::Bits));
  return 4 * kTileElems<T> * elem + da_pad * kStateLd * static_cast<int64_t>(sizeof(float)) +
         (sizeof(T) == 2 ? 3 * kChunk * kBlock * elem : 0);
}

template <typename T>
__device__ __forceinline__ float bits_to_float(typename Elem<T>::Bits b) {
  if constexpr (std::is_same_v<T, float>) return __uint_as_float(b);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(b));
  else return __bfloat162float(__ushort_as_bfloat16(b));
}

template <typename T>
__device__ __forceinline__ typename Elem<T>::Bits float_to_bits(float f) {
  if constexpr (std::is_same_v<T, float>) return __float_as_uint(f);
  else if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(__float2half_rn(f));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Two 16-bit elements in one register, `lo` in the low half (the lower column of an MMA fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bits<T>(lo)) | (static_cast<uint32_t>(float_to_bits<T>(hi)) << 16);
}

// The exact power of two 2^e for -126 <= e <= 127 (callers keep |e| <= 114).
__device__ __forceinline__ float pow2(int e) { return __int_as_float((127 + e) << 23); }

// The exponent e with m in [2^(e-1), 2^e), clamped to [-100, 100]; 0 when m is 0, inf or NaN.
__device__ __forceinline__ int exponent_of(float m) {
  if (!(m > 0.f) || isinf(m)) return 0;
  int e;
  frexpf(m, &e);
  return max(-100, min(100, e));
}

// |x| when finite, else 0: the float16 state scale follows the finite values (an inf stays inf when converted).
__device__ __forceinline__ float finite_abs(float x) {
  const float a = fabsf(x);
  return a < INFINITY ? a : 0.f;
}

// The maximum of `v` over the block (NaN ignored, as fmaxf does). Contains one __syncthreads(); `scratch` [4]
// must not be rewritten before every thread has returned (the caller's next barrier).
__device__ __forceinline__ float block_max(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  return fmaxf(fmaxf(scratch[0], scratch[1]), fmaxf(scratch[2], scratch[3]));
}

// The chunk's per-token factor d num_t / d o_t (`rs`: this thread's row, tid < 64; 0 past the end) written as
// F * row_scale[t], F = 2^(returned exponent) from the chunk's largest |rs|, so that grad_o * row_scale[t] stays in
// float16's range when rs is tiny (normalize: rs = scale / den_t, den_t ~ t). The stats pass and the gradient passes
// compute it from the same den values in the same way, so grad_o . o (stats) is taken with the very rounding of
// d num the gradient passes use; the normalizer's terms then cancel as they do in exact arithmetic. Contains a
// barrier (every thread calls it); row_scale is read after the caller's next barrier.
__device__ __forceinline__ int chunk_row_scale(float rs, float* row_scale, float* scratch) {
  const int f_exp = exponent_of(block_max(threadIdx.x < kChunk ? fabsf(rs) : 0.f, scratch));
  if (threadIdx.x < kChunk) row_scale[threadIdx.x] = rs * pow2(-f_exp);
  return f_exp;
}

// ---- where this thread's 32 accumulators sit in a 64 x 64 tile (mma.m16n8k16 C layout; each warp owns a
// 32 x 32 quarter = 2 x 4 MMA tiles of 16 x 8): accumulator r = (mt * 4 + nt) * 4 + e, rows lane / 4 (+ 8 for
// e >= 2), columns 2 * (lane % 4) + e % 2.
struct Fragment {
  int warp_row, warp_col, g, t4;
  __device__ __forceinline__ Fragment() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_row = (warp / 2) * 32;
    warp_col = (warp % 2) * 32;
    g = lane / 4;
    t4 = lane % 4;
  }
  __device__ __forceinline__ int row(int r) const { return warp_row + (r / 16) * 16 + ((r % 4) / 2) * 8 + g; }
  __device__ __forceinline__ int col(int r) const { return warp_col + ((r / 4) % 4) * 8 + 2 * t4 + r % 2; }
  // The 4 distinct rows (i = 0..3) and 8 distinct columns (j = 0..7) of this thread, and r's indices into them.
  __device__ __forceinline__ int row_i(int i) const { return warp_row + (i / 2) * 16 + (i % 2) * 8 + g; }
  __device__ __forceinline__ int col_j(int j) const { return warp_col + (j / 2) * 8 + 2 * t4 + j % 2; }
  static __device__ __forceinline__ int i_of(int r) { return (r / 16) * 2 + (r % 4) / 2; }
  static __device__ __forceinline__ int j_of(int r) { return ((r / 4) % 4) * 2 + r % 2; }
};

// ---- tensor-core and fp32 tile products: acc (64 x 64) += A (64 x klen) * B (klen x 64), operands in shared
// memory. A is row-major [m][k] or, with A_COL, stored as [k][m]; B is stored [n][k] or, with B_KN, [k][n].

// A fragment (rows m0..m0+15, k0..k0+15) of a tile with row stride ld.
template <bool A_COL>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint16_t* tile, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  if constexpr (A_COL) {
    // Stored [k][m]: matrix q = lane / 8 covers rows m0 + (q % 2) * 8, k = k0 + (q / 2) * 8; .trans hands each
    // thread the (m, k), (m, k + 1) pair of the row-major fragment.
    const int q = lane / 8, r = lane % 8;
    ldmatrix_x4(a, tile + (k0 + (q / 2) * 8 + r) * ld + m0 + (q % 2) * 8, true);
  } else {
    // Lanes 0-15 address rows m0..m0+15 at k0, lanes 16-31 the same rows at k0 + 8.
    ldmatrix_x4(a, tile + (m0 + lane % 16) * ld + k0 + (lane / 16) * 8, false);
  }
}

// B fragments of the two 8-column tiles n0 and n0 + 8 for k0..k0+15, into b[2 p] and b[2 p + 1] ({b0, b1} each).
template <bool B_KN>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b)[4][2], int p, const uint16_t* tile, int ld, int k0,
                                                 int n0) {
  const int lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
  uint32_t x[4];
  if constexpr (B_KN) {
    // Stored [k][n]: matrix q covers k0 + (q % 2) * 8, columns n0 + (q / 2) * 8, transposed on load.
    ldmatrix_x4(x, tile + (k0 + (q % 2) * 8 + r) * ld + n0 + (q / 2) * 8, true);
  } else {
    // Stored [n][k]: matrix q covers columns n0 + (q / 2) * 8 at k0 + (q % 2) * 8.
    ldmatrix_x4(x, tile + (n0 + (q / 2) * 8 + r) * ld + k0 + (q % 2) * 8, false);
  }
  b[2 * p][0] = x[0];
  b[2 * p][1] = x[1];
  b[2 * p + 1][0] = x[2];
  b[2 * p + 1][1] = x[3];
}

// acc += A * B over ksteps slices of 16 (16-bit operands, tensor cores).
template <typename T, bool A_COL, bool B_KN>
__device__ __forceinline__ void mma_tile(float (&acc)[kPerThread], const uint16_t* a_tile, const uint16_t* b_tile,
                                         int ksteps) {
  constexpr int ld = kTileLd<T>;
  const Fragment f;
#pragma unroll
  for (int ks = 0; ks < kBlock / 16; ++ks) {
    if (ks >= ksteps) break;
    uint32_t a[2][4], b[4][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) load_a_fragment<A_COL>(a[mt], a_tile, ld, f.warp_row + mt * 16, ks * 16);
#pragma unroll
    for (int p = 0; p < 2; ++p) load_b_fragments<B_KN>(b, p, b_tile, ld, ks * 16, f.warp_col + p * 16);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc + (mt * 4 + nt) * 4, a[mt], b[nt][0], b[nt][1]);
    }
  }
}

// x = hi + lo with hi = x rounded to T and lo = the remainder rounded to T, for two adjacent elements (a pair
// register each): hi + lo carries 2 x 8 (bf16) or 2 x 11 (fp16) significant bits, close to the fp32 state.
template <typename T>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const typename Elem<T>::Bits h0 = float_to_bits<T>(x0), h1 = float_to_bits<T>(x1);
  hi = static_cast<uint32_t>(h0) | (static_cast<uint32_t>(h1) << 16);
  const float r0 = x0 - bits_to_float<T>(h0), r1 = x1 - bits_to_float<T>(h1);
  lo = pack2<T>(r0 == r0 ? r0 : 0.f, r1 == r1 ? r1 : 0.f);  // inf - inf: hi alone carries an inf (or NaN)
}

// acc += A * (sc * S) with S an fp32 [k][n] slice of the state (row stride kStateLd). S enters the tensor cores
// as hi + lo (two MMAs): rounded once to T, the state's error would come back amplified in the gradients, where
// the normalizer's terms S dnum and z dden cancel to leading order when v has a nonzero mean.
template <typename T>
__device__ __forceinline__ void mma_tile_state(float (&acc)[kPerThread], const uint16_t* a_tile, const float* s,
                                               float sc, int ksteps) {
  constexpr int ld = kTileLd<T>;
  const Fragment f;
#pragma unroll
  for (int ks = 0; ks < kBlock / 16; ++ks) {
    if (ks >= ksteps) break;
    uint32_t a[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) load_a_fragment<false>(a[mt], a_tile, ld, f.warp_row + mt * 16, ks * 16);
    // b0 = (S[k][n], S[k + 1][n]), b1 = (S[k + 8][n], S[k + 9][n]) with k = 16 ks + 2 t4, n = lane / 4 of the
    // 8-column tile: rows 2 t4 apart by 136 floats land in banks 8 t4 + g, all distinct.
    const float* sk = s + (ks * 16 + 2 * f.t4) * kStateLd;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int n = f.warp_col + nt * 8 + f.g;
      uint32_t b0_hi, b0_lo, b1_hi, b1_lo;
      split_pair<T>(sc * sk[n], sc * sk[kStateLd + n], b0_hi, b0_lo);
      split_pair<T>(sc * sk[8 * kStateLd + n], sc * sk[9 * kStateLd + n], b1_hi, b1_lo);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_16816<T>(acc + (mt * 4 + nt) * 4, a[mt], b0_lo, b1_lo);
        mma_16816<T>(acc + (mt * 4 + nt) * 4, a[mt], b0_hi, b1_hi);
      }
    }
  }
}

// acc += A * B over klen in exact fp32 (float32 inputs): each thread forms the outer product of its 4 rows and
// 8 columns, one k at a time.
template <bool A_COL, bool B_KN>
__device__ __forceinline__ void fma_tile(float (&acc)[kPerThread], const float* a_tile, int lda, const float* b_tile,
                                         int ldb, int klen) {
  const Fragment f;
#pragma unroll 2
  for (int kk = 0; kk < klen; ++kk) {
    float a[4], b[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = f.row_i(i);
      a[i] = A_COL ? a_tile[kk * lda + m] : a_tile[m * lda + kk];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = f.col_j(j);
      b[j] = B_KN ? b_tile[kk * ldb + n] : b_tile[n * ldb + kk];
    }
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) acc[r] = fmaf(a[Fragment::i_of(r)], b[Fragment::j_of(r)], acc[r]);
  }
}

// acc += A * B for the dtype: tensor cores for 16-bit tiles (reduction rounded up to 16), fp32 FMAs for float.
template <typename T, bool A_COL, bool B_KN>
__device__ __forceinline__ void tile_product(float (&acc)[kPerThread], const typename Elem<T>::Bits* a_tile,
                                             const typename Elem<T>::Bits* b_tile, int klen) {
  if constexpr (std::is_same_v<T, float>) {
    fma_tile<A_COL, B_KN>(acc, reinterpret_cast<const float*>(a_tile), kTileLd<T>,
                          reinterpret_cast<const float*>(b_tile), kTileLd<T>, klen);
  } else {
    mma_tile<T, A_COL, B_KN>(acc, a_tile, b_tile, (klen + 15) / 16);
  }
}

// acc += A * (sc * S) for the dtype (sc is 1 except for float16).
template <typename T>
__device__ __forceinline__ void state_product(float (&acc)[kPerThread], const typename Elem<T>::Bits* a_tile,
                                              const float* s, float sc, int klen) {
  if constexpr (std::is_same_v<T, float>) {
    fma_tile<false, true>(acc, reinterpret_cast<const float*>(a_tile), kTileLd<T>, s, kStateLd, klen);
  } else {
    mma_tile_state<T>(acc, a_tile, s, sc, (klen + 15) / 16);
  }
}

// ---- global -> shared
//
// A [64, 64] operand tile is read as 16-byte vectors, consecutive threads on consecutive vectors of a row; thread
// tid owns vectors tid + i * kThreads. Each element becomes phi(x) (PHI) times row_scale[row] (when given) in the
// compute tile; elements past `rows` valid rows or `cols` columns become 0 (after phi, so elu1's phi(0) = 1 never
// leaks into a sum). float32 tiles are loaded synchronously (load_tile). 16-bit tiles are pipelined: a step's raw
// tiles are copied into a staging area with cp.async while the previous step computes (stage_tile), then converted
// by the same threads (convert_tile; a thread reads only the vectors it copied, so its own cp.async wait suffices).

template <typename T>
struct TileVectors {
  using Bits = typename Elem<T>::Bits;
  static constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector
  static constexpr int kPerRow = kBlock / kVec;
  static constexpr int kPerThread = kChunk * kBlock / (kVec * kThreads);
  union Vector {
    uint4 u;
    Bits e[kVec];
  };
  // Vector i of this thread: its row and first column in the tile.
  static __device__ __forceinline__ int row(int i) { return (threadIdx.x + i * kThreads) / kPerRow; }
  static __device__ __forceinline__ int col(int i) { return ((threadIdx.x + i * kThreads) % kPerRow) * kVec; }
};

// The raw elements of tile row r, columns col + [0, kVec), of the operand at `base`; `vec`: 16-byte loads are
// possible. Elements past rows / cols are 0.
template <typename T>
__device__ __forceinline__ typename TileVectors<T>::Vector fetch_vector(const typename Elem<T>::Bits* base,
                                                                       int64_t row_stride, bool vec, int r, int rows,
                                                                       int64_t col, int64_t cols) {
  using V = TileVectors<T>;
  typename V::Vector in;
  if (r < rows && vec && col + V::kVec <= cols) {
    in.u = *reinterpret_cast<const uint4*>(base + r * row_stride + col);
  } else {
#pragma unroll
    for (int e = 0; e < V::kVec; ++e) {
      in.e[e] = (r < rows && col + e < cols) ? base[r * row_stride + col + e] : typename Elem<T>::Bits(0);
    }
  }
  return in;
}

// The compute tile's vector from raw elements: phi, the row scale and the zeros past rows / cols.
template <typename T, bool PHI>
__device__ __forceinline__ uint4 transform_vector(typename TileVectors<T>::Vector in, int r, int rows, int64_t col,
                                                  int64_t cols, int fm, const float* row_scale) {
  using V = TileVectors<T>;
  typename V::Vector out;
  const float sc = row_scale != nullptr ? row_scale[r] : 1.f;
#pragma unroll
  for (int e = 0; e < V::kVec; ++e) {
    float f = bits_to_float<T>(in.e[e]);
    if constexpr (PHI) f = feature_map(fm, f);
    out.e[e] = float_to_bits<T>((r < rows && col + e < cols) ? f * sc : 0.f);
  }
  return out.u;
}

template <typename T>
__device__ __forceinline__ const typename Elem<T>::Bits* tile_base(const Operand& x, int64_t row0, int64_t head) {
  return static_cast<const typename Elem<T>::Bits*>(x.ptr) + row0 * x.row_stride + head * x.head_stride;
}

template <typename T>
__device__ __forceinline__ bool vector_loads(const typename Elem<T>::Bits* base, const Operand& x) {
  return is_aligned(base, 16) && x.row_stride % TileVectors<T>::kVec == 0;
}

// Rows [0, 64) x columns [col0, col0 + 64) of operand x at token rows row0.. and `head`, loaded synchronously and
// transformed into the compute tile dst.
template <typename T, bool PHI>
__device__ __forceinline__ void load_tile(typename Elem<T>::Bits* dst, const Operand& x, int64_t row0, int64_t head,
                                          int rows, int64_t col0, int64_t cols, int fm, const float* row_scale) {
  using V = TileVectors<T>;
  const auto* base = tile_base<T>(x, row0, head);
  const bool vec = vector_loads<T>(base, x);
#pragma unroll
  for (int i = 0; i < V::kPerThread; ++i) {
    const int r = V::row(i), c = V::col(i);
    const auto in = fetch_vector<T>(base, x.row_stride, vec, r, rows, col0 + c, cols);
    *reinterpret_cast<uint4*>(dst + r * kTileLd<T> + c) = transform_vector<T, PHI>(in, r, rows, col0 + c, cols, fm,
                                                                                    row_scale);
  }
}

// The same tile's raw elements into the staging tile `stage` ([64][64], unpadded): cp.async for whole aligned
// vectors, synchronous element loads at a ragged column end or without 16-byte alignment; vectors past rows / cols
// are left as they are (convert_tile writes zeros there without reading them).
template <typename T>
__device__ __forceinline__ void stage_tile(typename Elem<T>::Bits* stage, const Operand& x, int64_t row0,
                                           int64_t head, int rows, int64_t col0, int64_t cols) {
  using V = TileVectors<T>;
  const auto* base = tile_base<T>(x, row0, head);
  const bool vec = vector_loads<T>(base, x);
#pragma unroll
  for (int i = 0; i < V::kPerThread; ++i) {
    const int r = V::row(i), c = V::col(i);
    const int64_t col = col0 + c;
    auto* dst = stage + r * kBlock + c;
    if (r >= rows || col >= cols) continue;
    if (vec && col + V::kVec <= cols) {
      cp_async_16(dst, base + r * x.row_stride + col, true);
    } else {
      *reinterpret_cast<uint4*>(dst) = fetch_vector<T>(base, x.row_stride, vec, r, rows, col, cols).u;
    }
  }
}

// stage_tile's copy into the compute tile dst, transformed. Reads only this thread's vectors of `stage`, after its
// cp_async_wait for them.
template <typename T, bool PHI>
__device__ __forceinline__ void convert_tile(typename Elem<T>::Bits* dst, const typename Elem<T>::Bits* stage,
                                             int rows, int64_t col0, int64_t cols, int fm, const float* row_scale) {
  using V = TileVectors<T>;
#pragma unroll
  for (int i = 0; i < V::kPerThread; ++i) {
    const int r = V::row(i), c = V::col(i);
    typename V::Vector in;
    in.u = *reinterpret_cast<const uint4*>(stage + r * kBlock + c);  // past rows / cols: stale, replaced by 0
    *reinterpret_cast<uint4*>(dst + r * kTileLd<T> + c) = transform_vector<T, PHI>(in, r, rows, col0 + c, cols, fm,
                                                                                    row_scale);
  }
}

// Element (row, col) of operand x for this chunk, as float.
template <typename T>
__device__ __forceinline__ float load_element(const Operand& x, int64_t row, int64_t head, int64_t col) {
  using Bits = typename Elem<T>::Bits;
  return bits_to_float<T>(static_cast<const Bits*>(x.ptr)[row * x.row_stride + head * x.head_stride + col]);
}

template <typename T>
__device__ __forceinline__ void store_element(T* dst, float v) {
  if constexpr (std::is_same_v<T, float>) *dst = v;
  else if constexpr (std::is_same_v<T, __half>) *dst = __float2half_rn(v);
  else *dst = __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
  if constexpr (std::is_same_v<T, float>) *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  else if constexpr (std::is_same_v<T, __half>) *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  else *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// ---- the scan

// SUMS: the segment sums (ScanParams::sums), the same walk without the A operand and the outputs.
template <typename T, int ROLE, bool SUMS>
__global__ void __launch_bounds__(kThreads) scan_kernel(const ScanParams p) {
  using Bits = typename Elem<T>::Bits;
  constexpr bool kReverse = ROLE == kGradK || ROLE == kGradV;
  constexpr bool kPhiAB = ROLE == kForward || ROLE == kGradV;  // A, B are phi(q), phi(k) (or phi(k), phi(q))
  constexpr bool kPhiC = ROLE == kGradQ || ROLE == kGradK;     // C is phi(k) (or phi(q))
  constexpr bool kScaleState = std::is_same_v<T, __half> && !SUMS;  // SUMS never feeds the state to an MMA
  constexpr int ld = kTileLd<T>;
  constexpr bool kStaged = sizeof(T) == 2;  // 16-bit tiles pipelined through the staging area (see load_tile)

#if defined(HK_CPU_EMULATION)
  unsigned char* const smem_raw = hk_emulation::dynamic_shared_memory();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  Bits* const tile_a = reinterpret_cast<Bits*>(smem_raw);
  Bits* const tile_b = tile_a + kTileElems<T>;
  Bits* const tile_c = tile_b + kTileElems<T>;
  Bits* const tile_p = tile_c + kTileElems<T>;
  float* const state = reinterpret_cast<float*>(tile_p + kTileElems<T>);  // [da_pad][kStateLd]
  // 16-bit inputs: the raw tiles of the next step, [64][64] each (shared_bytes).
  Bits* const stage_a = reinterpret_cast<Bits*>(state + ((p.da + kBlock - 1) / kBlock) * kBlock * kStateLd);
  Bits* const stage_b = stage_a + kChunk * kBlock;
  Bits* const stage_c = stage_b + kChunk * kBlock;
  __shared__ float vec[kMaxDim];          // forward: key sum z [da]; dq / dk: the extra state row [64]
  __shared__ float row_scale[kChunk];     // gradient passes: d num_t / d o_t over F (the row-scaled operand)
  __shared__ float dden[kChunk];          // gradient passes with normalize: d den_t
  __shared__ float den_inter[kChunk];     // forward with normalize: Q_t . z_prev
  __shared__ float row_sum[2][kChunk];    // forward with normalize: row sums of P, one per column half
  __shared__ float delta_sum[2][kChunk];  // stats: grad_o . o over this block's columns, one per column half
  __shared__ float scratch[kThreads / 32];

  const Fragment f;
  const int tid = threadIdx.x;
  const int64_t nh = blockIdx.x;  // segment * H + head: the index of its states
  const int64_t head = nh % p.H;
  const Segment seg = segment_of(p, nh / p.H);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBlock;
  const int cols = static_cast<int>(min(static_cast<int64_t>(kBlock), p.dv - col0));  // valid output columns
  const int slices = static_cast<int>((p.da + kBlock - 1) / kBlock);
  const bool ext = p.normalize && (ROLE == kGradQ || ROLE == kGradK);
  const bool norm_fwd = p.normalize && ROLE == kForward;
  const int chunks = seg.c1 - seg.c0;

  // Chunk ci of the walk: its first token row and its number of valid rows.
  auto chunk_rows = [&](int ci, int64_t& row0, int& rows) {
    const int64_t chunk = kReverse ? seg.c1 - 1 - ci : seg.c0 + ci;
    row0 = seg.bos + chunk * kChunk;
    rows = static_cast<int>(min(static_cast<int64_t>(kChunk), seg.len - chunk * kChunk));
  };
  // 16-bit inputs: step (ci, j) (chunk ci, reduction slice j) stages its raw A_j, B_j and, at j = 0, C while the
  // step before it computes.
  auto stage_step = [&](int ci, int j) {
    int64_t row0;
    int rows;
    chunk_rows(ci, row0, rows);
    if (j == 0) stage_tile<T>(stage_c, p.c, row0, head, rows, col0, p.dv);
    if constexpr (!SUMS) stage_tile<T>(stage_a, p.a, row0, head, rows, static_cast<int64_t>(j) * kBlock, p.da);
    stage_tile<T>(stage_b, p.b, row0, head, rows, static_cast<int64_t>(j) * kBlock, p.da);
    cp_async_commit();
  };
  if constexpr (kStaged) {
    if (chunks > 0) stage_step(0, 0);  // in flight while the initial state loads
  }

  // Initial state [da, 64] (zeros past da and past the valid columns) and the normalize vector.
  float local_max = 0.f;  // max finite |S| over the elements this thread owns (float16 state scaling)
  for (int i = tid; i < slices * kBlock * kBlock; i += kThreads) {
    const int r = i / kBlock, c = i % kBlock;
    float s = 0.f;
    if (p.state_in != nullptr && r < p.da && c < cols) {
      s = p.state_in[nh * p.da * p.dv + r * p.state_da_stride + (col0 + c) * p.state_dv_stride];
    }
    state[r * kStateLd + c] = s;
    local_max = fmaxf(local_max, finite_abs(s));
  }
  if (norm_fwd) {
    for (int i = tid; i < slices * kBlock; i += kThreads) {
      vec[i] = (p.vec_in != nullptr && i < p.da) ? p.vec_in[nh * p.da + i] : 0.f;
    }
  } else if (ext && tid < kBlock) {
    vec[tid] = (p.vec_in != nullptr && tid < cols) ? p.vec_in[nh * p.dv + col0 + tid] : 0.f;
  }
  int state_exp = 0;  // float16: the state enters the MMAs as S * 2^state_exp
  if constexpr (kScaleState) state_exp = 14 - exponent_of(block_max(local_max, scratch));
  __syncthreads();

  for (int ci = 0; ci < chunks; ++ci) {
    int64_t row0;  // token row of the chunk's first token
    int rows;
    chunk_rows(ci, row0, rows);
    local_max = 0.f;

    // Gradient passes: the per-token factor d num_t / d o_t (scale / den_t, or scale) as F * row_scale[t] with
    // F = 2^f_exp from the chunk's largest, and d den_t. Rows past the end get 0.
    int f_exp = 0;
    if constexpr (ROLE != kForward) {
      float rs = 0.f, dd = 0.f;
      if (tid < rows) {
        const int64_t idx = (row0 + tid) * p.H + head;
        if (p.normalize) {
          const float den = p.den[idx];
          float dot = 0.f;
          for (int64_t blk = 0; blk < p.delta_blocks; ++blk) dot += p.delta[blk * p.rows * p.H + idx];
          rs = normalizer_row_scale(den, p.scale);
          dd = normalizer_den_grad(dot, den);
        } else {
          rs = p.scale;
        }
      }
      f_exp = chunk_row_scale(rs, row_scale, scratch);
      if (tid < kChunk) dden[tid] = dd;
      __syncthreads();
    }

    const float* const c_scale = ROLE == kGradV ? row_scale : nullptr;
    const float* const a_scale = ROLE == kGradQ ? row_scale : nullptr;
    const float* const b_scale = ROLE == kGradK ? row_scale : nullptr;
    if constexpr (!kStaged) load_tile<T, kPhiC>(tile_c, p.c, row0, head, rows, col0, p.dv, p.feature_map, c_scale);

    float acc_o[kPerThread], acc_p[kPerThread];
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) acc_o[r] = acc_p[r] = 0.f;
    float qz = 0.f;  // forward normalize: this thread's half of Q_t . z_prev, t = tid / 2

    for (int j = 0; j < slices; ++j) {
      const int k0 = j * kBlock;
      const int klen = static_cast<int>(min(static_cast<int64_t>(kBlock), p.da - k0));
      if constexpr (kStaged) {
        cp_async_wait<0>();  // this thread's copies of the step; it converts only those
        if (j == 0) convert_tile<T, kPhiC>(tile_c, stage_c, rows, col0, p.dv, p.feature_map, c_scale);
        if constexpr (!SUMS) convert_tile<T, kPhiAB>(tile_a, stage_a, rows, k0, p.da, p.feature_map, a_scale);
        convert_tile<T, kPhiAB>(tile_b, stage_b, rows, k0, p.da, p.feature_map, b_scale);
      } else {
        if constexpr (!SUMS) load_tile<T, kPhiAB>(tile_a, p.a, row0, head, rows, k0, p.da, p.feature_map, a_scale);
        load_tile<T, kPhiAB>(tile_b, p.b, row0, head, rows, k0, p.da, p.feature_map, b_scale);
      }
      __syncthreads();
      if constexpr (kStaged) {  // the next step's copies run under this step's products
        if (j + 1 < slices) {
          stage_step(ci, j + 1);
        } else if (ci + 1 < chunks) {
          stage_step(ci + 1, 0);
        }
      }

      float* const s_j = state + k0 * kStateLd;
      if constexpr (!SUMS) {
        tile_product<T, false, false>(acc_p, tile_a, tile_b, klen);                 // P += A_j B_j^T
        state_product<T>(acc_o, tile_a, s_j, pow2(state_exp), klen);               // out += A_j S_j
        if (norm_fwd) {
          const Bits* a_row = tile_a + (tid / 2) * ld;
          for (int kk = (tid % 2) * 32; kk < min(klen, (tid % 2) * 32 + 32); ++kk) {
            qz = fmaf(bits_to_float<T>(a_row[kk]), vec[k0 + kk], qz);
          }
        }
        __syncthreads();  // S_j and z_j are read; now update them
      }

      float acc_s[kPerThread];
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) acc_s[r] = 0.f;
      tile_product<T, true, true>(acc_s, tile_b, tile_c, rows);  // B_j^T C
      const float ds = kReverse ? pow2(f_exp) : 1.f;             // the row scale F sits in B (dk) or C (dv)
#pragma unroll
      for (int r = 0; r < kPerThread; r += 2) {
        float2* s = reinterpret_cast<float2*>(s_j + f.row(r) * kStateLd + f.col(r));
        float2 x = *s;
        x.x = fmaf(ds, acc_s[r], x.x);
        x.y = fmaf(ds, acc_s[r + 1], x.y);
        *s = x;
        local_max = fmaxf(local_max, fmaxf(finite_abs(x.x), finite_abs(x.y)));
      }
      if (norm_fwd && tid < kBlock) {
        float sum = 0.f;
        for (int t = 0; t < rows; ++t) sum += bits_to_float<T>(tile_b[t * ld + tid]);
        vec[k0 + tid] += sum;
      }
      __syncthreads();  // tiles A, B are free for the next slice
    }

    if constexpr (!SUMS) {  // the outputs: the segment sums stop at the state and vector updates above
      // The state product used S * 2^state_exp; dk / dv also carry F in the intra-chunk term, applied below.
      {
        const float back = pow2(-state_exp), unscale = kReverse ? pow2(-f_exp) : 1.f;
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) acc_o[r] = acc_o[r] * back * unscale;
      }

      // P = A B^T (+ the normalize feature), masked to the causal triangle, then rounded into tile_p.
      if (ext) {
        const float inv_f = pow2(-f_exp);
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
          acc_p[r] += (ROLE == kGradQ ? dden[f.row(r)] : dden[f.col(r)]) * inv_f;
        }
      }
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int t = f.row(r), s = f.col(r);
        if (kReverse ? s < t : s > t) acc_p[r] = 0.f;
      }
      if (norm_fwd) {
        float part[4] = {0.f, 0.f, 0.f, 0.f};
        // Row sums of P as rounded for P C below: den is then the same computation as num on a column of ones.
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) part[Fragment::i_of(r)] += bits_to_float<T>(float_to_bits<T>(acc_p[r]));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          part[i] += __shfl_xor_sync(0xffffffffu, part[i], 1);
          part[i] += __shfl_xor_sync(0xffffffffu, part[i], 2);
          if (f.t4 == 0) row_sum[f.warp_col / 32][f.row_i(i)] = part[i];
        }
        qz += __shfl_xor_sync(0xffffffffu, qz, 1);
        if (tid % 2 == 0) den_inter[tid / 2] = qz;
      }
#pragma unroll
      for (int r = 0; r < kPerThread; r += 2) {
        Bits* dst = tile_p + f.row(r) * ld + f.col(r);  // column even: a 4- or 8-byte aligned pair
        if constexpr (std::is_same_v<T, float>) {
          *reinterpret_cast<float2*>(dst) = make_float2(acc_p[r], acc_p[r + 1]);
        } else {
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc_p[r], acc_p[r + 1]);
        }
      }
      __syncthreads();
      if (ROLE == kForward && p.stats) {  // the gradient passes' d num factors of this chunk (see chunk_row_scale)
        const float den = tid < rows ? den_inter[tid] + row_sum[0][tid] + row_sum[1][tid] + p.eps : 0.f;
        chunk_row_scale(tid < rows ? normalizer_row_scale(den, p.scale) : 0.f, row_scale, scratch);
        __syncthreads();
      }

      tile_product<T, false, true>(acc_o, tile_p, tile_c, rows);  // out += P C
      if constexpr (ROLE != kForward) {
        const float back = pow2(f_exp);
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) acc_o[r] *= back;
      }
      if (ext) {  // the normalize feature's state row: dq: d den_t * z_prev; dk: 1 * r_prev
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) acc_o[r] += (ROLE == kGradQ ? dden[f.row(r)] : 1.f) * vec[f.col(r)];
      }

      // Epilogue: rows < rows, columns < cols.
      {
        T* out = static_cast<T*>(p.out);
        const bool pairs = out != nullptr && p.dv % 2 == 0 && p.out_row_stride % 2 == 0 &&
                           p.out_head_stride % 2 == 0 && is_aligned(out, 2 * sizeof(T));
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int r = 0; r < kPerThread; r += 2) {  // r, r + 1: adjacent columns of one row
          const int t = f.row(r), c = f.col(r);
          if (t >= rows || c >= cols) continue;
          const bool second = c + 1 < cols;
          const int64_t row = row0 + t, col = col0 + c;
          float v0 = acc_o[r], v1 = acc_o[r + 1];
          if constexpr (ROLE == kForward) {
            if (p.normalize) {
              const float den = den_inter[t] + row_sum[0][t] + row_sum[1][t] + p.eps;
              v0 = normalized_output(v0, den, p.scale);
              v1 = normalized_output(v1, den, p.scale);
            } else {
              v0 *= p.scale;
              v1 *= p.scale;
            }
            if (p.stats) {  // grad_o . o with grad_o as the gradient passes will see it
              const float rp = row_scale[t];
              const bool rounded = finite_abs(rp) > 0.f;  // 0, inf, NaN: the pass has no finite factor to round by
              auto effective = [&](float g) { return rounded ? bits_to_float<T>(float_to_bits<T>(g * rp)) / rp : g; };
              float d = v0 * effective(load_element<T>(p.grad_o, row, head, col));
              if (second) d = fmaf(v1, effective(load_element<T>(p.grad_o, row, head, col + 1)), d);
              part[Fragment::i_of(r)] += d;
            }
          } else if constexpr (ROLE == kGradQ || ROLE == kGradK) {
            v0 *= feature_map_grad(p.feature_map, load_element<T>(p.dphi, row, head, col));
            if (second) v1 *= feature_map_grad(p.feature_map, load_element<T>(p.dphi, row, head, col + 1));
          }
          if (out != nullptr) {
            T* dst = out + row * p.out_row_stride + head * p.out_head_stride + col;
            if (pairs) {
              store_pair(dst, v0, v1);  // col even and dv even: col + 1 < dv
            } else {
              store_element(dst, v0);
              if (second) store_element(dst + 1, v1);
            }
          }
        }
        if (ROLE == kForward && p.stats) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            part[i] += __shfl_xor_sync(0xffffffffu, part[i], 1);
            part[i] += __shfl_xor_sync(0xffffffffu, part[i], 2);
            if (f.t4 == 0) delta_sum[f.warp_col / 32][f.row_i(i)] = part[i];
          }
        }
      }
      __syncthreads();  // vec (read above), tile_c and the epilogue's sums are complete

      if (ROLE == kForward && p.stats && tid < rows) {
        const int64_t idx = (row0 + tid) * p.H + head;
        if (blockIdx.y == 0) p.den[idx] = den_inter[tid] + row_sum[0][tid] + row_sum[1][tid] + p.eps;
        p.delta[blockIdx.y * p.rows * p.H + idx] = delta_sum[0][tid] + delta_sum[1][tid];
      }
    }
    if (ext && tid < kBlock) {  // the extra state row: dq: z += sum_s C_s; dk: r += sum_s d den_s C_s
      float sum = 0.f;
      for (int t = 0; t < rows; ++t) {
        sum = fmaf(ROLE == kGradQ ? 1.f : dden[t], bits_to_float<T>(tile_c[t * ld + tid]), sum);
      }
      vec[tid] += sum;
    }
    if constexpr (kScaleState) state_exp = 14 - exponent_of(block_max(local_max, scratch));
    __syncthreads();  // before the next chunk overwrites the tiles, row_scale and dden
  }

  // Final state and vector.
  if (p.state_out != nullptr) {
    for (int i = tid; i < slices * kBlock * kBlock; i += kThreads) {
      const int r = i / kBlock, c = i % kBlock;
      if (r < p.da && c < cols) {
        p.state_out[nh * p.da * p.dv + r * p.state_da_stride + (col0 + c) * p.state_dv_stride] =
            state[r * kStateLd + c];
      }
    }
  }
  if (p.vec_out != nullptr) {
    if (norm_fwd && blockIdx.y == 0) {
      for (int i = tid; i < p.da; i += kThreads) p.vec_out[nh * p.da + i] = vec[i];
    } else if (ext && tid < cols) {
      p.vec_out[nh * p.dv + col0 + tid] = vec[tid];
    }
  }
}

// Enqueue one pass (or its segment sums, p.sums): a block per (segment, head) and 64 output columns.
template <typename T, int ROLE>
cudaError_t launch_scan(const ScanParams& p, cudaStream_t stream) {
  const int64_t smem = shared_bytes<T>(p.da);
  const dim3 grid(static_cast<unsigned>(p.segments * p.H), static_cast<unsigned>((p.dv + kBlock - 1) / kBlock));
  auto* const kernel = p.sums ? scan_kernel<T, ROLE, true> : scan_kernel<T, ROLE, false>;
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(kernel, grid, kThreads, static_cast<size_t>(smem), p);
#else
  HK_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(p);
  return cudaGetLastError();
#endif
}

// ---- one-token decode (T = 1 without cu_seqlens, as causal_linear_attention_step calls it), a path of its own:
// S_1 = S_0 + phi(k)^T v, z_1 = z_0 + phi(k), o = scale * phi(q) S_1 (/ (phi(q) . z_1 + eps)). A scan block would
// run 64 x 64 tiles for one valid row; here the cost is reading S_0 and writing S_1 once, in fp32 (no tensor cores
// for a one-row product). A block owns one (sequence, head) and 64 state columns: thread (c, g) updates column c in
// the rows i = g, g + 4, ... and keeps its part of phi(q) S_1; the 4 parts are added in a fixed order.
constexpr int kDecodeColumns = 64;
constexpr int kDecodeGroups = 4;
constexpr int kDecodeThreads = kDecodeColumns * kDecodeGroups;

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(const LinearAttentionParams p) {
  __shared__ float phi_q[kMaxDim], phi_k[kMaxDim], key_sum[kMaxDim];
  __shared__ float part[kDecodeGroups][kDecodeColumns];
  const int tid = threadIdx.x, c = tid % kDecodeColumns, group = tid / kDecodeColumns;
  const int64_t nh = blockIdx.x, n = nh / p.H, head = nh % p.H;  // token row n: B = N sequences of one token
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kDecodeColumns + c;
  const Operand q{p.q, p.q_row_stride, p.q_head_stride}, k{p.k, p.k_row_stride, p.k_head_stride};
  const Operand v{p.v, p.v_row_stride, p.v_head_stride};

  for (int i = tid; i < p.K; i += kDecodeThreads) {
    phi_q[i] = feature_map(p.feature_map, load_element<T>(q, n, head, i));
    phi_k[i] = feature_map(p.feature_map, load_element<T>(k, n, head, i));
    if (p.normalize) {
      key_sum[i] = (p.initial_key_sum != nullptr ? p.initial_key_sum[nh * p.K + i] : 0.f) + phi_k[i];
      if (p.final_key_sum != nullptr && blockIdx.y == 0) p.final_key_sum[nh * p.K + i] = key_sum[i];
    }
  }
  __syncthreads();

  float num = 0.f;
  if (col < p.V) {
    const float vc = load_element<T>(v, n, head, col);
    const int64_t base = nh * p.K * p.V + col;
    for (int i = group; i < p.K; i += kDecodeGroups) {
      const float s = (p.initial_state != nullptr ? p.initial_state[base + i * p.V] : 0.f) + phi_k[i] * vc;
      if (p.final_state != nullptr) p.final_state[base + i * p.V] = s;
      num = fmaf(phi_q[i], s, num);
    }
  }
  part[group][c] = num;
  __syncthreads();
  if (group == 0 && col < p.V) {
    num = ((part[0][c] + part[1][c]) + part[2][c]) + part[3][c];
    float out = num * p.scale;
    if (p.normalize) {
      float den = 0.f;  // every thread of the block forms the same dot from shared memory (broadcast reads)
      for (int i = 0; i < p.K; ++i) den = fmaf(phi_q[i], key_sum[i], den);
      out = normalized_output(num, den + p.eps, p.scale);
    }
    store_element(static_cast<T*>(p.o) + n * p.o_row_stride + head * p.o_head_stride + col, out);
  }
}

template <typename T>
cudaError_t launch_decode(const LinearAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.N * p.H), static_cast<unsigned>((p.V + kDecodeColumns - 1) / kDecodeColumns));
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(decode_kernel<T>, grid, kDecodeThreads, 0, p);
#else
  decode_kernel<T><<<grid, kDecodeThreads, 0, stream>>>(p);
  return cudaGetLastError();
#endif
}

// Instantiated in linear_attention_{f32,f16,bf16}.cu.
#define HK_LINEAR_ATTENTION_INSTANCES(PREFIX, T)                                        \
  PREFIX template cudaError_t launch_scan<T, kForward>(const ScanParams&, cudaStream_t); \
  PREFIX template cudaError_t launch_scan<T, kGradQ>(const ScanParams&, cudaStream_t);   \
  PREFIX template cudaError_t launch_scan<T, kGradK>(const ScanParams&, cudaStream_t);   \
  PREFIX template cudaError_t launch_scan<T, kGradV>(const ScanParams&, cudaStream_t);   \
  PREFIX template cudaError_t launch_decode<T>(const LinearAttentionParams&, cudaStream_t);

HK_LINEAR_ATTENTION_INSTANCES(extern, float)
HK_LINEAR_ATTENTION_INSTANCES(extern, __half)
HK_LINEAR_ATTENTION_INSTANCES(extern, __nv_bfloat16)

}  // namespace linear_attention_detail
}  // namespace hadamard_kernels

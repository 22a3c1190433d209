// poly_chain forward on Hopper tensor cores (sm_90a wgmma), fp16/bf16; instantiated in
// poly_chain_wgmma_{f16,bf16}_{ccp,product}.cu and launched by poly_chain.cu when params.wgmma asks for it (opt-in
// until its GPU tests have passed on an H100).
//
// The same GEMM-with-chain-epilogue as poly_chain_forward.cuh (its slot layout, SlotMap and chain_epilogue), with
// a wider tile: 256 threads as two warpgroups, each computing 64 rows x 256 slots with wgmma.m64n256k16 (A and B
// read from shared memory), so a block covers 128 rows x 256 slots and one pass holds up to 32 degrees
// (per_pass = N for N <= 32; N = 3 uses 30 of the 32 n-tiles). The accumulator layout of wgmma is mma.sync's C
// layout tiled over 256 columns, so the epilogue is the mma.sync kernel's with one 16-row tile per warp.
//
// Pipeline: d in chunks of 64 elements (one 128-byte swizzled row, wgmma.h) through kStages stages of
// 48 KiB in dynamic shared memory, filled by cp.async (16 bytes, zero-fill past M, d, k; synchronous loads when x or
// W is not 16-byte aligned) kStages - 2 steps ahead. Each step issues 4 wgmma per warpgroup as one group and waits
// for the previous step's group only, so the tensor cores always have the next group queued; a stage is refilled
// two steps after its MMAs were issued, once every warpgroup has waited for them (the __syncthreads of the step in
// between). fence.proxy.async after that barrier makes the cp.async writes visible to wgmma, which reads through the
// async proxy: the sequence Triton emits for its own cp.async + wgmma pipelines.
//
// Persistent: one block per SM walks tiles blockIdx.x, + gridDim.x, ... in the mma.sync kernel's banded L2 order, and
// its loads run on into the next tile, so that tile's first stages arrive during this one's last MMAs and epilogue.
// Not (yet) here: TMA loads, warp specialisation, MMAs of the next tile during this one's epilogue.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "hadamard_kernels/activation.h"
#include "hadamard_kernels/common.h"
#include "hadamard_kernels/cp_async.h"
#include "hadamard_kernels/poly_chain.h"
#include "hadamard_kernels/wgmma.h"
#include "poly_chain_forward.cuh"

namespace hadamard_kernels {
namespace poly_chain_detail {
namespace forward_wgmma {

using forward::Geometry;
using forward::SlotMap;

// Warp w holds rows 16 w.. of the tile: warps 0-3 (warpgroup 0) rows 0-63, warps 4-7 rows 64-127, as wgmma's
// accumulator layout places a warpgroup's warps.
using Wgmma = Geometry<8, 1, 16, 256>;
constexpr int kWarpgroups = Wgmma::kThreads / 128;
constexpr int kWarpgroupRows = Wgmma::kTileRows / kWarpgroups;  // 64, the instruction's M

constexpr int kStages = 4;
constexpr int kChunk = kSwizzleRowBytes / 2;  // d elements per step
constexpr int kVec = 8;                       // elements per 16-byte vector
constexpr int kVecsPerRow = kSwizzleRowBytes / 16;
constexpr int kXBytes = Wgmma::kTileRows * kSwizzleRowBytes;                       // 16 KiB
constexpr int kStageBytes = kXBytes + Wgmma::kTileSlots * kSwizzleRowBytes;        // 48 KiB
constexpr int kSmemBytes = kStages * kStageBytes + kSwizzleAtomBytes;  // + room to align the first stage to an atom
constexpr int kXVecs = Wgmma::kTileRows * kVecsPerRow / Wgmma::kThreads;   // x vectors per thread and step
constexpr int kVecs = kXVecs + Wgmma::kTileSlots * kVecsPerRow / Wgmma::kThreads;
static_assert(kXBytes % kSwizzleAtomBytes == 0 && kStageBytes % kSwizzleAtomBytes == 0, "stages start on atoms");
static_assert(kVecs * Wgmma::kThreads == (Wgmma::kTileRows + Wgmma::kTileSlots) * kVecsPerRow, "even copy split");
static_assert(Wgmma::kThreads % kVecsPerRow == 0 && (Wgmma::kThreads / kVecsPerRow) % 8 == 0 &&
                  Wgmma::kTileRows % (Wgmma::kThreads / kVecsPerRow) == 0,
              "a thread's vectors share one piece and swizzle phase, and none straddles x and W");

template <typename T, int ACT, bool PRODUCT, bool HAS_BIAS>
__global__ void __launch_bounds__(Wgmma::kThreads) poly_chain_fwd_wgmma_kernel(const PolyChainParams p) {
#if HK_HAS_WGMMA
  using G = Wgmma;
  using B = uint16_t;
  HK_DYNAMIC_SHARED_MEMORY(smem_raw);
  // Swizzle atoms must start on 1024-byte boundaries of the shared window, which nothing promises the buffer.
  unsigned char* const smem = smem_raw + (kSwizzleAtomBytes - shared_address(smem_raw) % kSwizzleAtomBytes) %
                                             kSwizzleAtomBytes;
  const uint32_t smem_address = shared_address(smem);

  const SlotMap<G> map(p.N);
  const B* x = static_cast<const B*>(p.x);
  const B* w = static_cast<const B*>(p.weight);
  const bool x_async = is_aligned(x, 16) && p.x_row_stride % kVec == 0 && p.d % kVec == 0;
  const bool w_async = is_aligned(w, 16) && p.d % kVec == 0;
  // Persistent: this block takes tiles blockIdx.x, + gridDim.x, ..., and its steps (tile, pass, chunk of d) form one
  // stream, so the loads of a tile's first steps are in flight during the previous tile's last MMAs and epilogue.
  const int64_t chunks = (p.d + kChunk - 1) / kChunk, tile_steps = map.passes * chunks;
  const int64_t tiles = forward::num_tiles<G>(p);
  const int64_t my_tiles = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x, steps = my_tiles * tile_steps;

  // Thread vector i is 16-byte piece `piece` of staged row first_row + 32 i (kThreads / 8 = 32 rows apart, so the
  // same swizzle phase): i < kXVecs x rows, the rest W slots. Few registers (the accumulators take 128): the tile
  // being loaded is one x pointer and a row bound, and one W row index (degree * k + column, or -1) per vector.
  constexpr int kRowsApart = G::kThreads / kVecsPerRow;
  const int piece = threadIdx.x % kVecsPerRow, first_row = threadIdx.x / kVecsPerRow;
  const uint32_t first_offset = swizzle128_offset(first_row, piece);
  const B* x_src = nullptr;
  int64_t x_rows_left = 0, load_col0 = 0;  // vector i holds a row of x while 32 i < x_rows_left
  int32_t w_row[kVecs - kXVecs];
  auto point_w = [&](int pass) {
#pragma unroll
    for (int i = kXVecs; i < kVecs; ++i) {
      const int slot = first_row + i * kRowsApart - G::kTileRows;
      w_row[i - kXVecs] = static_cast<int32_t>(map.w_row(p, slot, pass, load_col0));
    }
  };

  // Loads the block's next step (called for steps 0, 1, 2, ... in order) into its ring stage.
  int64_t load_step = 0;
  auto load_next = [&] {
    const int64_t local = load_step % tile_steps;
    if (local == 0) {
      int64_t row0;
      forward::tile_origin<G>(p, map.cols, blockIdx.x + load_step / tile_steps * gridDim.x, row0, load_col0);
      x_src = x + (row0 + first_row) * p.x_row_stride;
      x_rows_left = p.M - row0 - first_row;
    }
    if (local % chunks == 0) point_w(static_cast<int>(local / chunks));
    unsigned char* stage = smem + (load_step % kStages) * kStageBytes + first_offset;
    const int64_t col = local % chunks * kChunk + piece * kVec;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const bool is_x = i < kXVecs;
      const B* row = is_x ? (i * kRowsApart < x_rows_left ? x_src + i * kRowsApart * p.x_row_stride : nullptr)
                          : (w_row[i - kXVecs] >= 0 ? w + w_row[i - kXVecs] * p.d : nullptr);
      B* dst = reinterpret_cast<B*>(stage + i * kRowsApart * kSwizzleRowBytes);
      forward::stage_vector(dst, row, col, p.d, is_x ? x_async : w_async, is_x ? x : w);
    }
    ++load_step;
  };

  float acc[G::kAcc];  // the first MMA of each pass overwrites them (scale-d false)
#pragma unroll
  for (int r = 0; r < G::kAcc; ++r) acc[r] = 0.f;
  float carry[G::kOwn];
#pragma unroll
  for (int i = 0; i < G::kOwn; ++i) carry[i] = 1.f;
  const uint32_t x_rows = static_cast<uint32_t>((threadIdx.x / 128) * kWarpgroupRows * kSwizzleRowBytes);

  for (int s = 0; s < kStages - 2; ++s) {
    if (load_step < steps) load_next();
    cp_async_commit();
  }
  int64_t step = 0;
  for (int64_t t = 0; t < my_tiles; ++t) {
    int64_t row0, col0;
    forward::tile_origin<G>(p, map.cols, blockIdx.x + t * gridDim.x, row0, col0);
    // One loop over d per pass, the epilogue outside it: inside, the accumulators flow only from wgmma to wgmma, so
    // ptxas keeps the next group queued (a register move between groups would make it wait for all of them).
    for (int pass = 0; pass < map.passes; ++pass) {
      for (int64_t c = 0; c < chunks; ++c, ++step) {
        cp_async_wait<kStages - 3>();  // this thread's copies of this step have landed
        __syncthreads();               // everyone's have; every warpgroup has waited for the MMAs of step - 2
        fence_async_shared();          // what this thread sees of them is visible to its wgmma (the async proxy)
        if (load_step < steps) load_next();  // step + kStages - 2, into the stage of step - 2
        cp_async_commit();

        const uint32_t stage = smem_address + static_cast<uint32_t>((step % kStages) * kStageBytes);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kChunk / 16; ++kk) {  // k16 slices: 32 bytes along the swizzled rows
          wgmma_m64n256k16<T>(acc, swizzle128_descriptor(stage + x_rows + kk * 32),
                              swizzle128_descriptor(stage + kXBytes + kk * 32), !(c == 0 && kk == 0));
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous step's group is done; this one runs on
      }
      wgmma_wait<0>();
      fence_registers(acc);
      forward::chain_epilogue<G, T, ACT, PRODUCT, HAS_BIAS>(p, map, pass, row0, col0, acc, carry);
    }
  }
  cp_async_wait<0>();  // nothing is left in flight when the block exits (the last loads are empty groups)
#else
  (void)p;
#endif
}

// Enqueues the wgmma forward for p (checked by poly_chain.cu). cudaErrorInvalidDeviceFunction where the GPU runs no
// sm_90a code of the kernel (another architecture, or an extension built without 90a).
template <typename T, int ACT, bool PRODUCT, bool HAS_BIAS>
cudaError_t launch(const PolyChainParams& p, cudaStream_t stream) {
  void (*kernel)(const PolyChainParams) = &poly_chain_fwd_wgmma_kernel<T, ACT, PRODUCT, HAS_BIAS>;
  const int64_t tiles = forward::num_tiles<Wgmma>(p);
#if defined(HK_CPU_EMULATION)
  (void)stream;
  // 3 "SMs": blocks take several tiles, and the tiles need not divide evenly among them.
  return hk_emulation::launch(kernel, dim3(static_cast<unsigned>(tiles < 3 ? tiles : 3)), Wgmma::kThreads,
                              kSmemBytes, p);
#else
  cudaFuncAttributes attributes;
  HK_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.binaryVersion != 90) return cudaErrorInvalidDeviceFunction;
  HK_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  int device = 0, sms = 0;
  HK_RETURN_IF_ERROR(cudaGetDevice(&device));
  HK_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // One block per SM (its shared memory allows no second), each looping over tiles.
  const unsigned blocks = static_cast<unsigned>(tiles < sms ? tiles : sms);
  kernel<<<blocks, Wgmma::kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
#endif
}

// Enqueues the instance of one mode that p asks for (activation, bias); T is __half or __nv_bfloat16.
template <typename T, bool PRODUCT>
cudaError_t launch_mode(const PolyChainParams& p, cudaStream_t stream) {
  return HK_ACTIVATION_SWITCH(p.activation, ACT, [&] {
    return HK_BOOL_SWITCH(p.bias != nullptr, HAS_BIAS, [&] { return launch<T, ACT, PRODUCT, HAS_BIAS>(p, stream); });
  });
}

// Defined in poly_chain_wgmma_{f16,bf16}_{ccp,product}.cu, a translation unit each: these instances are the slowest
// to compile (10 per unit), and four units let a parallel build finish sooner.
extern template cudaError_t launch_mode<__half, false>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch_mode<__half, true>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch_mode<__nv_bfloat16, false>(const PolyChainParams&, cudaStream_t);
extern template cudaError_t launch_mode<__nv_bfloat16, true>(const PolyChainParams&, cudaStream_t);

// Enqueues the instance p asks for (activation, mode, bias).
template <typename T>
cudaError_t launch_any(const PolyChainParams& p, cudaStream_t stream) {
  return p.mode == kModeProduct ? launch_mode<T, true>(p, stream) : launch_mode<T, false>(p, stream);
}

}  // namespace forward_wgmma
}  // namespace poly_chain_detail
}  // namespace hadamard_kernels

// poly_chain launchers (DESIGN.md §1): check the params, then pick the dtype's kernels. The kernels are in
// poly_chain_kernels.cuh, compiled one dtype per translation unit (poly_chain_{f32,f16,bf16}.cu).

#include <climits>
#include <cstdint>

#include "poly_chain_kernels.cuh"

namespace hadamard_kernels {
namespace {

using poly_chain_detail::kPerThread;
using poly_chain_detail::kThreads;
using poly_chain_detail::num_tiles;

// Host-side checks of what the kernels rely on; Python has already checked shapes and dtypes.
bool valid(const PolyChainParams& p) {
  if (p.M < 1 || p.d < 1 || p.k < 1 || p.N < 1 || p.N > INT_MAX) return false;
  if (p.x == nullptr || p.weight == nullptr || p.x_row_stride < p.d || p.y_row_stride < p.k) return false;
  if (p.mode != kModeCcp && p.mode != kModeProduct) return false;
  return num_tiles(p) <= INT_MAX;  // one block per tile in a 1D grid
}

template <bool BACKWARD>
cudaError_t dispatch(const PolyChainParams& p, cudaStream_t stream) {
  return HK_DTYPE_SWITCH(p.dtype, T, [&] { return poly_chain_detail::launch<T, BACKWARD>(p, stream); });
}

}  // namespace

int64_t poly_chain_bwd_workspace_bytes(const PolyChainParams& p) {
  if (!valid(p)) return 0;
  return num_tiles(p) * p.N * kPerThread * kThreads * static_cast<int64_t>(sizeof(float2));
}

cudaError_t launch_poly_chain_fwd(const PolyChainParams& p, cudaStream_t stream) {
  if (!valid(p) || p.y == nullptr) return cudaErrorInvalidValue;
  return dispatch<false>(p, stream);
}

cudaError_t launch_poly_chain_bwd(const PolyChainParams& p, cudaStream_t stream) {
  if (!valid(p) || p.grad_y == nullptr || p.grad_z == nullptr) return cudaErrorInvalidValue;
  if (p.workspace == nullptr || !is_aligned(p.workspace, sizeof(float2))) return cudaErrorInvalidValue;
  return dispatch<true>(p, stream);
}

}  // namespace hadamard_kernels

// poly_chain launchers (DESIGN.md §1): check the params, then pick the dtype's kernels. The kernels are in
// poly_chain_kernels.cuh, compiled one dtype per translation unit (poly_chain_{f32,f16,bf16}.cu), and the opt-in
// Hopper forward in poly_chain_forward_wgmma.cuh (poly_chain_wgmma_{f16,bf16}_{ccp,product}.cu).

#include <climits>
#include <cstdint>
#include <type_traits>

#include "poly_chain_forward_wgmma.cuh"
#include "poly_chain_kernels.cuh"

namespace hadamard_kernels {
namespace {

using poly_chain_detail::grad_z_blocks;
using poly_chain_detail::forward::MmaSync;
using poly_chain_detail::forward::num_tiles;

// Host-side checks of what the kernels rely on; Python has already checked shapes and dtypes.
bool valid_sizes(const PolyChainParams& p) {
  if (p.M < 1 || p.d < 1 || p.k < 1 || p.N < 1 || p.N > INT_MAX || p.y_row_stride < p.k) return false;
  return p.mode == kModeCcp || p.mode == kModeProduct;
}

template <bool BACKWARD>
cudaError_t dispatch(const PolyChainParams& p, cudaStream_t stream) {
  return HK_DTYPE_SWITCH(p.dtype, T, [&] { return poly_chain_detail::launch<T, BACKWARD>(p, stream); });
}

}  // namespace

cudaError_t launch_poly_chain_fwd(const PolyChainParams& p, cudaStream_t stream) {
  if (!valid_sizes(p) || p.x == nullptr || p.weight == nullptr || p.y == nullptr) return cudaErrorInvalidValue;
  if (p.x_row_stride < p.d) return cudaErrorInvalidValue;
  // wgmma has no exact fp32 (only tf32); its kernel indexes W rows (N * k) in 32 bits.
  if (p.wgmma && (p.dtype == DType::kFloat32 || p.N * p.k > INT_MAX)) return cudaErrorInvalidValue;
  if (!p.wgmma && num_tiles<MmaSync>(p) > INT_MAX) return cudaErrorInvalidValue;  // one block per tile, 1D grid
  if (p.wgmma) {
    return HK_DTYPE_SWITCH(p.dtype, T, [&] {
      if constexpr (std::is_same_v<T, float>) return cudaErrorInvalidValue;  // (refused above)
      else return poly_chain_detail::forward_wgmma::launch_any<T>(p, stream);
    });
  }
  return dispatch<false>(p, stream);
}

cudaError_t launch_poly_chain_bwd(const PolyChainParams& p, cudaStream_t stream) {
  if (!valid_sizes(p) || p.z == nullptr || p.grad_y == nullptr || p.grad_z == nullptr) return cudaErrorInvalidValue;
  if (grad_z_blocks(p) > INT_MAX) return cudaErrorInvalidValue;
  return dispatch<true>(p, stream);
}

}  // namespace hadamard_kernels

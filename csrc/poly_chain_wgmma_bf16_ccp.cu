// poly_chain's Hopper (wgmma) forward for bfloat16, mode ccp (poly_chain_forward_wgmma.cuh), a translation unit
// of its own.
#include "poly_chain_forward_wgmma.cuh"

namespace hadamard_kernels::poly_chain_detail::forward_wgmma {
template cudaError_t launch_mode<__nv_bfloat16, false>(const PolyChainParams&, cudaStream_t);
}  // namespace hadamard_kernels::poly_chain_detail::forward_wgmma
